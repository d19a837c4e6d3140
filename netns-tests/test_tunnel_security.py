"""Issue 5 security acceptance in the lab: a node without a valid certificate is refused; a node
cannot claim another node's overlay address.

Sites: a = full cone (n1, the victim), b = port-restricted (n2, a node with a valid
certificate that tries to pass as n1; n5, whose certificate from the cluster CA has expired),
c = port-restricted (n3, the receiver; n4, whose certificate comes from a throwaway CA).

Replayed and altered datagrams and a relay that reads ciphertext only: test_tunnel_nat.py.
A handshake whose attestation claims another node's overlay address is refused: unit tests
`test_claiming_another_node_s_overlay_address_is_refused` (tests/meshd/test_tunnel_identity.py,
the verifier) and `test_a_node_claiming_another_node_s_overlay_address_is_refused`
(tests/meshd/test_tunnel_session.py, a whole handshake between two sessions).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from netlab.meshlab import MeshLab
from netlab.serviceplane import wait_for

from edgeweave.pki import PKI_SUBDIR
from edgeweave.pki.ca import CertificateAuthority, IssuedCert
from edgeweave.pki.identity import node_identity
from edgeweave.pki.kubeconfig import kubeconfig_document, write_kubeconfig

SITES = {
    "a": {"nat": "full-cone", "nodes": ["n1"]},
    "b": {"nat": "port-restricted", "nodes": ["n2", "n5"]},
    "c": {"nat": "port-restricted", "nodes": ["n3", "n4"]},
}
GOOD = ["n1", "n2", "n3"]
FOREIGN, EXPIRED = "n4", "n5"
LISTEN_PORT = 5555


class SecurityLab(MeshLab):
    """`MeshLab` where n4's certificate comes from a throwaway CA and n5's has expired (same
    node names, same kubeconfig layout: the cluster CA to trust the server, a client
    certificate and key); only the good nodes' agents are waited for."""

    def start(self, *, agents: bool = True) -> None:
        super().start(agents=False)
        ca = CertificateAuthority.load(self.data / PKI_SUBDIR)
        rogue = CertificateAuthority.generate(common_name=ca.cert.subject.rfc4514_string()
                                              .removeprefix("CN="))
        self.forge(FOREIGN, ca, rogue.issue_client_cert(node_identity(FOREIGN)))
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        self.forge(EXPIRED, ca, ca.issue_client_cert(node_identity(EXPIRED), now=past,
                                                     validity=dt.timedelta(days=1)))
        if agents:
            for node in self.nodes:
                self.start_agent(node)
            for node in GOOD:
                self.wait_agent(node, timeout=60)

    def forge(self, node: str, ca: CertificateAuthority, issued: IssuedCert) -> None:
        doc = kubeconfig_document(server=self.api_url, ca_cert_pem=ca.cert_pem(),
                                  user=f"system:node:{node}", client=issued)
        write_kubeconfig(self.tmp / node / f"{node}.kubeconfig", doc)

    def server_log(self) -> str:
        return (self.tmp / "meshd-server.log").read_text(errors="replace")

    def registry(self) -> dict[str, str]:
        """node -> overlay address, as `meshd server` persisted them."""
        doc = json.loads((self.tmp / "meshd-server-data" / "control-registry.json").read_text())
        return {node: entry["overlay"] for node, entry in doc["nodes"].items()}

    def overlay(self, node: str) -> str:
        return str(self.tunnel(node)["overlay"]).split("/")[0]


def knows(lab: SecurityLab, node: str, other: str) -> Callable[[], bool]:
    return lambda: lab.peer(node, other) is not None


def has_path(lab: SecurityLab, node: str, other: str) -> Callable[[], bool]:
    return lambda: (lab.peer(node, other) or {}).get("path") in ("direct", "relay")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecurityLab]:
    tmp = tmp_path_factory.mktemp("security")
    with SecurityLab.up_sites(tmp, SITES, name="sec", pods=1, clients=1) as lab:
        assert isinstance(lab, SecurityLab)
        for node in GOOD:
            for other in GOOD:
                if other != node:
                    wait_for(knows(lab, node, other), f"{node} knows {other}", timeout=30)
        try:
            yield lab
        finally:
            lab.print_agent_tails(1200)
            print(f"--- meshd server (tail)\n{lab.server_log()[-2500:]}")


# --- a. no valid certificate, no admission --------------------------------------------------


@pytest.mark.parametrize("node,why", [
    (FOREIGN, "client certificate refused: unable to get local issuer certificate"),
    (EXPIRED, "client certificate refused: certificate has expired")])
def test_a_node_without_a_valid_certificate_is_refused(mesh: SecurityLab, node: str,
                                                       why: str) -> None:
    # The server names the peer (its address: an unverified certificate names nobody) and why.
    # Its site's other node has a valid certificate and is never refused.
    router_wan = mesh.lab.addr(mesh.routers[node])
    pattern = re.compile(rf"control\.tls_refused peer={re.escape(router_wan)}:\d+ "
                         rf"reason=\"?([^\"\n]*)")
    refusals = wait_for(lambda: pattern.findall(mesh.server_log()) or None,
                        f"meshd server refused {node}", timeout=30)
    assert set(refusals) == {why}, refusals
    # The agent says so clearly, and keeps retrying without crashing; the server warns about
    # the host once per minute (RefusalLog), however often it retries.
    agent = mesh.agents[node]
    retried = wait_for(lambda: (lambda n: n if n >= 3 else None)(
        mesh.agent_log(node).count(" control.refused ")), f"{node} refused three times",
        timeout=30)
    assert agent.poll() is None, f"agent {node} exited: {mesh.agent_log(node)}"
    assert len(pattern.findall(mesh.server_log())) == 1, mesh.server_log()[-2000:]
    log = mesh.agent_logs[node].read_text()
    told = [line for line in log.splitlines() if " WARNING meshd.control control.refused " in line]
    assert told and "did not accept this node's certificate" in told[0], log[-2000:]
    assert "Traceback" not in log
    # Neither admitted nor known: no peer table lists it, the registry has no record of it.
    for good in GOOD:
        assert mesh.peer(good, node) is None, (good, mesh.tunnel(good))
    assert node not in mesh.registry()
    # No tunnel: it never got an overlay address, so it has no mesh0.
    assert mesh.lab.run(node, ["ip", "link", "show", "mesh0"], check=False).returncode != 0
    print(f"\n{node} ({retried} refusals so far, one warning), meshd server: "
          f"control.tls_refused peer={router_wan}:... reason={refusals[-1]}\n"
          f"{node} agent: {told[0].split(' ', 1)[1]}")


# --- b. nobody else's overlay address ---------------------------------------------------------


def test_the_server_assigns_each_node_its_own_address(mesh: SecurityLab) -> None:
    seen = {node: mesh.overlay(node) for node in GOOD}
    assert len(set(seen.values())) == len(GOOD), seen
    assert {n: a for n, a in mesh.registry().items() if n in GOOD} == seen
    for node in GOOD:  # what every peer was told matches what the node was given
        for other in GOOD:
            if other != node:
                assert (mesh.peer(node, other) or {}).get("overlay", "").split("/")[0] \
                    == seen[other]
    # The victim goes away, the server restarts: the impostor (valid certificate, reconnects
    # first) still gets its own address, the victim's stays reserved, and comes back to it.
    mesh.stop_agent("n1")
    mesh.restart_meshd_server()
    mesh.stop_agent("n2")
    mesh.start_agent("n2")
    mesh.wait_agent("n2", timeout=60)
    wait_for(lambda: mesh.tunnel("n2").get("overlay"), "n2 welcomed again", timeout=30)
    assert mesh.overlay("n2") == seen["n2"]
    assert mesh.registry()["n1"] == seen["n1"]
    offline = wait_for(lambda: (lambda p: p if p and not p.get("online", True) else None)(
        mesh.peer("n3", "n1")), "n3 sees n1 offline", timeout=30)
    assert offline["overlay"].split("/")[0] == seen["n1"]
    mesh.start_agent("n1")
    mesh.wait_agent("n1", timeout=60)
    wait_for(lambda: mesh.tunnel("n1").get("overlay"), "n1 welcomed again", timeout=30)
    after = {node: mesh.overlay(node) for node in GOOD}
    assert after == seen, (seen, after)
    print(f"\noverlay addresses {seen}; after n1 left, a meshd server restart and n2 "
          f"rejoining first: {after}")


LISTEN = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
print("ready", flush=True)
seen, end = {}, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, (ip, _) = s.recvfrom(2048)
    except TimeoutError:
        continue
    seen[ip] = seen.get(ip, 0) + 1
print(json.dumps(seen), flush=True)
"""

SEND = r"""
import socket, sys
source, target, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((source, 0))
for i in range(count):
    s.sendto(b"from %s #%d" % (source.encode(), i), (target, port))
"""


def rejected(mesh: SecurityLab, node: str) -> dict[str, float]:
    return {k: v for k, v in mesh.metrics(node).items()
            if k.startswith("meshd_tunnel_rejected_total")}


def test_a_node_cannot_send_from_another_node_s_overlay_address(mesh: SecurityLab) -> None:
    victim, impostor, receiver = "n1", "n2", "n3"
    for a, b in ((impostor, receiver), (receiver, impostor)):
        wait_for(has_path(mesh, a, b), f"{a} has a path to {b}", timeout=30)
    stolen, own, target = (mesh.overlay(victim), mesh.overlay(impostor),
                           mesh.overlay(receiver))
    mesh.lab.run(impostor, ["ip", "addr", "add", f"{stolen}/32", "dev", "mesh0"])
    key = 'meshd_tunnel_rejected_total{reason="spoofed-source"}'
    before = rejected(mesh, receiver).get(key, 0)
    listener = mesh.lab.popen(receiver, [sys.executable, "-u", "-c", LISTEN, str(LISTEN_PORT),
                                         "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        count = 20
        for source in (stolen, own):
            mesh.lab.run(impostor, [sys.executable, "-c", SEND, source, target,
                                    str(LISTEN_PORT), str(count)])
        spoofed_ping = mesh.lab.run(impostor, ["ping", "-n", "-c", "3", "-W", "1", "-I", stolen,
                                               target], check=False)
        honest_ping = mesh.lab.run(impostor, ["ping", "-n", "-c", "3", "-W", "1", "-I", own,
                                              target], check=False)
        out, _ = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
        mesh.lab.run(impostor, ["ip", "addr", "del", f"{stolen}/32", "dev", "mesh0"],
                     check=False)
    heard = json.loads(out.strip().splitlines()[-1])
    dropped = wait_for(lambda: (lambda n: n if n >= count + 3 else None)(
        rejected(mesh, receiver).get(key, 0) - before),
        f"{receiver} counted the spoofed packets", timeout=10)
    print(f"\n{impostor} sent {count} UDP datagrams and 3 pings from {victim}'s {stolen}, "
          f"{count} datagrams and 3 pings from its own {own}: {receiver}'s kernel saw {heard}; "
          f"{receiver} dropped {dropped:.0f} as spoofed-source; pings: spoofed "
          f"{'answered' if spoofed_ping.returncode == 0 else 'unanswered'}, honest "
          f"{'answered' if honest_ping.returncode == 0 else 'unanswered'}")
    assert heard.get(stolen, 0) == 0, heard
    assert heard.get(own) == count, heard
    assert spoofed_ping.returncode != 0 and honest_ping.returncode == 0
    assert dropped == count + 3  # exactly the spoofed packets, nothing else


def test_refused_agents_keep_retrying(mesh: SecurityLab) -> None:
    """Still alive after the other tests; the server is still refusing them."""
    time.sleep(1)
    for node in (FOREIGN, EXPIRED):
        assert mesh.agents[node].poll() is None, mesh.agent_log(node)
        assert node not in mesh.registry()

