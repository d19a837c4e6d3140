"""Node revocation in the lab: `meshd server` reads `control.revokedFile`; an operator adds a
node's name and sends SIGHUP, the node is cut off (control session, peers' tables and tunnel
sessions, its relay allocation) while the others keep talking; removing the line brings it back.

Sites: a = full cone (n1, the node revoked), b = port-restricted (n2), c = port-restricted (n3).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab.meshlab import MeshLab
from netlab.serviceplane import wait_for

SITES = {
    "a": {"nat": "full-cone", "nodes": ["n1"]},
    "b": {"nat": "port-restricted", "nodes": ["n2"]},
    "c": {"nat": "port-restricted", "nodes": ["n3"]},
}
NODES = ["n1", "n2", "n3"]
REVOKED = "n1"


class RevokeLab(MeshLab):
    """`MeshLab` whose `meshd server` has a revocation list (empty at start)."""

    @property
    def revoked_file(self) -> Path:
        return self.tmp / "revoked.txt"

    def start(self, *, agents: bool = True) -> None:
        self.revoked_file.write_text("# nodes cut off from the mesh, one per line\n")
        self.server_overrides = {"control": {"revokedFile": str(self.revoked_file)}}
        super().start(agents=agents)

    def server_log(self) -> str:
        return (self.tmp / "meshd-server.log").read_text(errors="replace")

    def hup(self) -> None:
        """SIGHUP to the `meshd server` the lab started (`ip netns exec` execs it: same pid)."""
        assert self.meshd_server is not None and self.meshd_server.poll() is None
        pid = self.meshd_server.pid
        assert b"meshd" in Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGHUP)

    def overlay(self, node: str) -> str:
        return str(self.tunnel(node)["overlay"]).split("/")[0]

    def pings(self, node: str, target: str, count: int = 3) -> bool:
        """`node` pings `target` (an overlay address) over mesh0 from inside its namespace."""
        proc = self.lab.run(node, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1",
                                   target], check=False, timeout=30)
        return proc.returncode == 0


def has_path(lab: RevokeLab, node: str, other: str) -> Callable[[], bool]:
    return lambda: (lab.peer(node, other) or {}).get("path") in ("direct", "relay")


def forgot(lab: RevokeLab, node: str, other: str) -> Callable[[], bool]:
    """`node`'s agent answers and its table has no `other`."""
    return lambda: bool(lab.tunnel(node).get("peers")) and lab.peer(node, other) is None


def online(lab: RevokeLab, node: str, other: str) -> Callable[[], bool]:
    return lambda: bool((lab.peer(node, other) or {}).get("online"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RevokeLab]:
    tmp = tmp_path_factory.mktemp("revoke")
    with RevokeLab.up_sites(tmp, SITES, name="rvk", pods=1, clients=1) as lab:
        assert isinstance(lab, RevokeLab)
        for node in NODES:
            for other in NODES:
                if other != node:
                    wait_for(has_path(lab, node, other), f"{node} has a path to {other}",
                             timeout=60)
        try:
            yield lab
        finally:
            lab.print_agent_tails(1500)
            print(f"--- meshd server (tail)\n{lab.server_log()[-3000:]}")


def test_revoking_a_node_cuts_it_off_and_lifting_it_brings_it_back(mesh: RevokeLab) -> None:
    others = [n for n in NODES if n != REVOKED]
    overlay = {node: mesh.overlay(node) for node in NODES}
    assert mesh.pings(REVOKED, overlay["n2"]) and mesh.pings("n2", overlay["n3"])

    # --- revoke: the line, then SIGHUP -----------------------------------------------------
    mesh.revoked_file.write_text(f"# leaked certificate\n{REVOKED}\n")
    started = time.monotonic()
    mesh.hup()
    for node in others:
        wait_for(forgot(mesh, node, REVOKED), f"{node} no longer lists {REVOKED}", timeout=10,
                 step=0.1)
    dropped_after = time.monotonic() - started
    log = mesh.server_log()
    assert "control.revoked nodes=1 serials=0" in log
    assert re.search(rf"control\.revoked_session conn=\d+ node={REVOKED} ", log), log[-2000:]
    # The relay in the same process let go of its allocation at once (its REST credentials
    # are still valid for up to turnTtlS).
    assert re.search(rf"turn\.delete node={REVOKED} relay=\S+ reason=revoked", log), log[-2000:]
    # Its agent says why and keeps retrying; its control channel is down.
    told = f"refused by the server: revoked: node {REVOKED} is revoked"
    wait_for(lambda: told in mesh.agent_logs[REVOKED].read_text(),
             f"{REVOKED} told it is revoked", timeout=10)
    assert mesh.tunnel(REVOKED).get("control") != "ready"
    assert "revoked" in str(mesh.tunnel(REVOKED).get("controlError")), mesh.tunnel(REVOKED)
    assert mesh.agents[REVOKED].poll() is None
    # No traffic from it to any peer's overlay address; the others keep talking.
    assert not mesh.pings(REVOKED, overlay["n2"])
    assert not mesh.pings(REVOKED, overlay["n3"])
    assert mesh.pings("n2", overlay["n3"]) and mesh.pings("n3", overlay["n2"])
    assert not mesh.pings("n2", overlay[REVOKED], count=2)  # nor to it
    refusals = mesh.agent_logs[REVOKED].read_text().count(" control.refused ")
    warned = len(re.findall(rf"WARNING meshd\.control control\.refused conn=\d+ "
                            rf"node={REVOKED} ", mesh.server_log()))
    assert refusals >= 2 and warned == 1, mesh.server_log()[-2000:]  # once a minute at most

    # --- lift: remove the line, SIGHUP -----------------------------------------------------
    mesh.revoked_file.write_text("# nodes cut off from the mesh, one per line\n")
    lifted = time.monotonic()
    mesh.hup()
    for node in others:
        wait_for(online(mesh, node, REVOKED), f"{node} lists {REVOKED} online again",
                 timeout=20, step=0.1)
    back_after = time.monotonic() - lifted
    assert mesh.overlay(REVOKED) == overlay[REVOKED]  # the registry kept its address
    wait_for(lambda: mesh.pings(REVOKED, overlay["n2"], count=1), f"{REVOKED} reaches n2",
             timeout=30, step=0.5)
    wait_for(lambda: mesh.pings("n3", overlay[REVOKED], count=1), f"n3 reaches {REVOKED}",
             timeout=30, step=0.5)
    assert mesh.pings("n2", overlay["n3"])
    print(f"\n{REVOKED} revoked (file + SIGHUP): gone from its peers' tables after "
          f"{dropped_after:.1f} s, pings from it to n2/n3 fail, n2 <-> n3 fine, server refused "
          f"its {refusals} attempts with one warning; lifted: listed online again after "
          f"{back_after:.1f} s, pings both ways again, same overlay {overlay[REVOKED]}")
