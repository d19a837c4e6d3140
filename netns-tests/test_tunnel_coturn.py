"""Issue 5 interop: agents relay through Debian's coturn instead of `meshd server`'s relay.

coturn runs on `cloud` beside `meshd server` (ours holds 3478/3479, coturn takes 3480) with
`use-auth-secret` + `static-auth-secret` = the lab's TURN secret and the realm `meshd server`'s
grants carry; `control.turnServers` tells agents to allocate there. Two sites behind symmetric
NATs cannot punch (design §6: R), so their traffic relays, through coturn.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from natcheck import start_coturn
from netlab.meshlab import MeshLab
from netlab.serviceplane import wait_for
from test_tunnel_nat import FETCH, client_pod, expected_sha, manifests

SITES = {
    "a": {"nat": "symmetric", "nodes": ["n1"]},
    "b": {"nat": "symmetric", "nodes": ["n2"]},
}
COTURN_PORT = 3480
RELAY_PORTS = (31000, 31999)  # coturn's relayed ports; meshd server's relay uses 49152-65535
SECRET = "lab-turn-secret"  # what MeshLab writes to meshd server's relay.authSecretFile
REALM = "edgeweave"  # relay.realm's default: the realm meshd server's grants carry
# Short nonces and allocations, so the lab sees coturn's 438 (Stale Nonce) and our Refreshes
# within a minute (defaults: 600 s nonces; our client asks 600 s, refreshes 60 s before).
STALE_NONCE_S, MAX_LIFETIME_S = 10, 30
SIZE = 16 * 1024 * 1024


class CoturnLab(MeshLab):
    """`MeshLab` whose agents are told (control.turnServers) to relay through coturn."""

    coturn: subprocess.Popen[Any] | None = None

    def start(self, *, agents: bool = True) -> None:
        self.server_overrides = {"control": {"turnServers": [f"{self.cloud_ip}:{COTURN_PORT}"]}}
        # Up before any agent is welcomed, so the first allocation already goes there.
        self.coturn = start_coturn(self.lab, "cloud", self.tmp, COTURN_PORT, auth_secret=SECRET,
                                   realm=REALM, relay_ports=RELAY_PORTS,
                                   extra=[f"--stale-nonce={STALE_NONCE_S}",
                                          f"--max-allocate-lifetime={MAX_LIFETIME_S}"])
        super().start(agents=agents)

    def coturn_log(self) -> str:
        path = self.tmp / "turn.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoturnLab]:
    tmp = tmp_path_factory.mktemp("coturn")
    with CoturnLab.up_sites(tmp, SITES, name="coturn") as lab:
        assert isinstance(lab, CoturnLab)
        lab.apply(manifests(["n2"]))
        lab.wait_ready_pods("app=web-n2", 1, timeout=90)
        try:
            yield lab
        finally:
            lab.print_agent_tails(1500)
            print(f"--- coturn (tail)\n{lab.coturn_log()[-1500:]}")


def coturn_relay_ports(lab: CoturnLab) -> set[int]:
    """The relayed ports coturn's log says it allocated."""
    return {int(p) for p in re.findall(r"[Rr]elay addr: [0-9.]+:(\d+)", lab.coturn_log())}


def test_agents_relay_through_coturn(mesh: CoturnLab) -> None:
    cloud = mesh.cloud_ip
    mesh.wait_endpoints("n1", "default/web-n2", mesh.pod_ips("app=web-n2"))
    for client, server in (("n1", "n2"), ("n2", "n1")):
        mesh.wait_path(client, server, "relay", timeout=30)
    # Each agent allocated on coturn (REST username `<expiry>:<node>`), none on meshd server.
    log = mesh.coturn_log()
    for node in mesh.nodes:
        assert re.search(rf"username=<\d+:{node}>", log) or re.search(rf"user <\d+:{node}>",
                                                                      log), log[-3000:]
    allocated = coturn_relay_ports(mesh)
    assert len(allocated) >= 2, log[-3000:]
    assert "turn.allocate" not in (mesh.tmp / "meshd-server.log").read_text()
    # The relayed candidates the agents gathered and use are coturn's: its address, its ports.
    for node in mesh.nodes:
        host, _, port = str(mesh.tunnel(node).get("relayed")).rpartition(":")
        assert host == cloud and int(port) in allocated, (node, mesh.tunnel(node), allocated)
    rows = []
    for client, server in (("n1", "n2"), ("n2", "n1")):
        peer = mesh.peer(client, server) or {}
        host, _, port = str(peer.get("endpoint")).rpartition(":")
        rows.append((client, server, peer.get("path"), peer.get("endpoint"), peer.get("rttMs")))
        assert host == cloud and RELAY_PORTS[0] <= int(port) <= RELAY_PORTS[1], peer
        assert int(port) in allocated, (peer, allocated)
    # ... and those ports are coturn's sockets on `cloud`.
    sockets = mesh.lab.run("cloud", ["ss", "-Hanup"]).stdout.splitlines()
    held = {int(m[1]) for line in sockets if "turnserver" in line
            and (m := re.search(rf"{re.escape(cloud)}:(\d+)\s", line))}
    assert allocated <= held, (allocated, sockets)
    # Curl by name works through it.
    body = mesh.curl(client_pod(mesh, "n1"), "http://web-n2.default/")
    assert "node=n2" in body, body
    print(f"\ncoturn {cloud}:{COTURN_PORT} allocated relayed ports {sorted(allocated)} "
          f"(range {RELAY_PORTS[0]}-{RELAY_PORTS[1]}); meshd server allocated none")
    for client, server, path, endpoint, rtt in rows:
        print(f"{client}->{server}: path {path}, endpoint {endpoint}, RTT {rtt} ms")
    print(f"curl web-n2.default from n1: {body.strip()}")


def test_multi_mb_through_coturn_is_byte_identical(mesh: CoturnLab) -> None:
    mesh.wait_path("n1", "n2", "relay", timeout=30)
    before = mesh.metrics("n1")
    proc = mesh.lab.popen(client_pod(mesh, "n1"), [sys.executable, "-c", FETCH,
                                                   "web-n2.default", str(SIZE)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    got, sha, seconds = out.split()
    assert int(got) == SIZE and sha == expected_sha(SIZE)
    after = mesh.metrics("n1")
    relayed_in = (after.get("meshd_tunnel_relay_bytes_total{direction=\"in\"}", 0)
                  - before.get("meshd_tunnel_relay_bytes_total{direction=\"in\"}", 0))
    print(f"\nn1->n2 through coturn: {SIZE >> 20} MB in {seconds} s "
          f"({SIZE * 8 / float(seconds) / 1e6:.0f} Mbit/s), sha256 ok; "
          f"n1 relay bytes in +{relayed_in:.0f}")
    assert (mesh.peer("n1", "n2") or {}).get("path") == "relay"
    assert relayed_in >= SIZE  # it came through the relay, not some other way


def test_stale_nonces_and_refreshes_with_coturn(mesh: CoturnLab) -> None:
    """coturn's nonces go stale every 10 s (438) and it grants 30 s allocations: our client
    takes the new NONCE, refreshes in time, and the relayed pair keeps working."""
    def seen() -> tuple[int, int] | None:
        log = mesh.coturn_log()
        stale = len(re.findall(r"error 438", log))
        refreshed = len(re.findall(r"REFRESH processed, success", log))
        return (stale, refreshed) if stale and refreshed >= 2 else None

    stale, refreshed = wait_for(seen, "coturn saw a stale nonce and two refreshes", timeout=60,
                                step=1)
    log = mesh.coturn_log()
    assert mesh.coturn is not None and mesh.coturn.poll() is None
    errors = [line for line in log.splitlines()
              if re.search(r"processed, error (?!401|438)", line)]
    granted = set(re.findall(r"lifetime=(\d+)", log))
    print(f"\ncoturn log: {stale} x 438 Stale Nonce answered, {refreshed} Refresh successes, "
          f"lifetimes granted {sorted(granted)}, {len(errors)} other errors")
    assert not errors, "\n".join(errors[-20:])
    # Still the first allocation of each node: none expired (coturn would log "allocation
    # timeout") and none had to be made again.
    assert "allocation timeout" not in log
    assert len(re.findall(r"ALLOCATE processed, success", log)) == len(mesh.nodes), log[-3000:]
    for node in mesh.nodes:
        relayed = mesh.tunnel(node).get("relayed") or ""
        assert relayed.startswith(f"{mesh.cloud_ip}:"), relayed
    assert "node=n2" in mesh.curl(client_pod(mesh, "n1"), "http://web-n2.default/")
    assert (mesh.peer("n1", "n2") or {}).get("path") == "relay"
