"""Issue 5 acceptance on real kernels: nodes behind NAT routers (firewall on) reach each other's
Services through `meshd agent`'s tunnel, signaled and relayed by `meshd server` on a public
segment. Prints per pair: path, time to first byte, time to direct, RTT.

Sites: a = port-restricted (n1, n5: one LAN), b = full cone (n2), c = port-restricted (n3),
d = symmetric (n4), e = restricted (n6), f = symmetric (n7).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab.meshlab import MeshLab
from netlab.serviceplane import wait_for

SITES = {
    "a": {"nat": "port-restricted", "nodes": ["n1", "n5"]},
    "b": {"nat": "full-cone", "nodes": ["n2"]},
    "c": {"nat": "port-restricted", "nodes": ["n3"]},
    "d": {"nat": "symmetric", "nodes": ["n4"]},
    "e": {"nat": "restricted", "nodes": ["n6"]},
    "f": {"nat": "symmetric", "nodes": ["n7"]},
}
PAIRS = [  # (client node, server node, expected path, what)
    ("n1", "n2", "direct", "port-restricted x full-cone"),
    ("n1", "n3", "direct", "port-restricted x port-restricted"),
    ("n4", "n3", "relay", "symmetric x port-restricted"),
    ("n1", "n5", "direct", "same LAN"),
    ("n6", "n3", "direct", "restricted x port-restricted"),
    ("n2", "n4", "direct", "full-cone x symmetric (D*)"),
    ("n6", "n4", "direct", "restricted x symmetric (D*)"),
    ("n7", "n4", "relay", "symmetric x symmetric"),
]
SIZE = 100 * 1024 * 1024
BLOCK = random.Random(7).randbytes(1 << 20)  # what podserver's /bytes/N repeats


def manifests(nodes: list[str]) -> str:
    docs = []
    for node in nodes:
        docs.append(f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{node}, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web-{node}}}}}
  template:
    metadata: {{labels: {{app: web-{node}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers: [{{name: web, image: podserver}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-{node}, namespace: default}}
spec:
  selector: {{app: web-{node}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
""")
    return "---\n".join(docs)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    tmp = tmp_path_factory.mktemp("mesh")
    with MeshLab.up_sites(tmp, SITES) as lab:
        lab.apply(manifests([server for _, server, _, _ in PAIRS]))
        for _, server, _, _ in PAIRS:
            lab.wait_ready_pods(f"app=web-{server}", 1, timeout=90)
        try:
            yield lab
        finally:
            for node in lab.nodes:
                if node in lab.agent_logs:
                    print(f"--- agent {node} (tail)\n{lab.agent_log(node)[-1500:]}")


def client_pod(lab: MeshLab, node: str) -> str:
    return lab.lab.pods(node)[-1]


def first_byte(lab: MeshLab, node: str, service: str) -> tuple[float, str]:
    out = lab.curl(client_pod(lab, node), f"http://{service}.default/",
                   "-w", "\n%{time_starttransfer}", check=False)
    body, _, ttfb = out.rpartition("\n")
    return float(ttfb or "nan"), body.strip()


FETCH = r"""
import hashlib, socket, sys, time
host, size = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, 80), timeout=30)
s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
head, digest, got, started = b"", hashlib.sha256(), 0, time.monotonic()
while b"\r\n\r\n" not in head:
    chunk = s.recv(65536)
    if not chunk:
        break
    head += chunk
head, _, rest = head.partition(b"\r\n\r\n")
digest.update(rest); got += len(rest)
while chunk := s.recv(1 << 20):
    digest.update(chunk); got += len(chunk)
print(got, digest.hexdigest(), round(time.monotonic() - started, 3))
"""


def expected_sha(size: int) -> str:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        piece = BLOCK[:left]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


def fetch(lab: MeshLab, node: str, service: str, size: int) -> subprocess.Popen[str]:
    return lab.lab.popen(client_pod(lab, node), [sys.executable, "-c", FETCH,
                                                 f"{service}.default", str(size)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def has_path(lab: MeshLab, client: str, server: str) -> Callable[[], bool]:
    return lambda: (lab.peer(client, server) or {}).get("path", "none") != "none"


def test_pairs_take_the_expected_path(mesh: MeshLab) -> None:
    rows = []
    for client, server, expected, what in PAIRS:
        mesh.wait_endpoints(client, f"default/web-{server}", mesh.pod_ips(f"app=web-{server}"))
        wait_for(has_path(mesh, client, server), f"{client} has a path to {server}",
                 timeout=30, step=0.05)
        ttfb, body = first_byte(mesh, client, f"web-{server}")
        assert f"node={server}" in body, (client, server, body)
        waited = mesh.wait_path(client, server, expected, timeout=30)
        if expected == "relay":  # stays relayed: no direct pair exists
            time.sleep(2)
            peer = mesh.peer(client, server) or {}
            assert peer.get("path") == "relay", peer  # (retry rounds keep checking meanwhile)
        peer = mesh.peer(client, server) or {}
        rows.append((f"{client}->{server}", what, peer.get("path"), ttfb,
                     peer.get("timeToDirectS"), peer.get("rttMs"), peer.get("endpoint"), waited))
        assert ttfb <= 1.0, f"{client}->{server}: first byte after {ttfb:.3f} s"
        if expected == "direct":
            ttd = peer.get("timeToDirectS")  # measured 0.01-0.25 s; target 1 s
            assert ttd is not None and ttd <= 1.0, peer
    print("\npair       NAT pair                            path    TTFB s  to direct s  "
          "RTT ms  endpoint")
    for name, what, path, ttfb, ttd, rtt, endpoint, _ in rows:
        ttd_text = "-" if ttd is None else f"{ttd:.3f}"
        print(f"{name:10} {what:35} {path:7} {ttfb:6.3f}  {ttd_text:>11}"
              f"  {rtt if rtt is not None else '-':>6}  {endpoint}")


@pytest.mark.parametrize("client,server,path", [("n1", "n3", "direct"), ("n4", "n3", "relay")])
def test_100mb_arrives_byte_identical(mesh: MeshLab, client: str, server: str,
                                      path: str) -> None:
    mesh.wait_path(client, server, path, timeout=30)
    proc = fetch(mesh, client, f"web-{server}", SIZE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got, sha, seconds = out.split()
    assert int(got) == SIZE and sha == expected_sha(SIZE)
    sender, receiver = mesh.metrics(server), mesh.metrics(client)
    print(f"\n{client}->{server} ({path}): 100 MB in {seconds} s "
          f"({SIZE * 8 / float(seconds) / 1e6:.0f} Mbit/s), sha256 ok; GSO sends "
          f"{sender['meshd_tunnel_gso_sends_total']:.0f}, GRO reads "
          f"{receiver['meshd_tunnel_gro_reads_total']:.0f}")
    assert (mesh.peer(client, server) or {}).get("path") == path
    assert sender["meshd_tunnel_gso_sends_total"] > 0  # bulk leaves in runs, not one by one


def test_nat_state_loss_mid_transfer(mesh: MeshLab) -> None:
    client, server = "n1", "n3"
    mesh.wait_path(client, server, "direct", timeout=30)
    proc = fetch(mesh, client, f"web-{server}", SIZE)
    time.sleep(1.0)
    flushed = time.monotonic()
    mesh.lab.run(mesh.routers[server], ["conntrack", "-F"])
    mesh.lab.run(mesh.routers[client], ["conntrack", "-F"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got, sha, seconds = out.split()
    assert int(got) == SIZE and sha == expected_sha(SIZE)
    back = wait_for(lambda: (mesh.peer(client, server) or {}).get("path") == "direct"
                    and time.monotonic(), "direct path back", timeout=30, step=0.1)
    print(f"\nconntrack -F on both routers mid-transfer: 100 MB intact in {seconds} s; "
          f"direct again {back - flushed:.1f} s after the flush")
    assert back - flushed <= 10.0


def test_meshd_server_restart(mesh: MeshLab) -> None:
    """Direct paths keep flowing while the server is away; relayed peers recover ≤ 10 s."""
    mesh.wait_path("n1", "n3", "direct", timeout=30)
    mesh.wait_path("n4", "n3", "relay", timeout=30)
    proc = fetch(mesh, "n1", "web-n3", SIZE)
    time.sleep(0.5)
    back = mesh.restart_meshd_server()

    def relayed_answers() -> bool:
        return "node=n3" in mesh.curl(client_pod(mesh, "n4"), "http://web-n3.default/",
                                      "--max-time", "2", check=False)

    wait_for(relayed_answers, "n4 reaches web-n3 through the new relay", timeout=30, step=0.2)
    recovered = time.monotonic() - back
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got, sha, seconds = out.split()
    assert int(got) == SIZE and sha == expected_sha(SIZE)
    print(f"\nmeshd server restarted: direct n1->n3 100 MB intact in {seconds} s; relayed "
          f"n4->n3 answered {recovered:.1f} s after the server listened again")
    assert recovered <= 10.0
    assert (mesh.peer("n1", "n3") or {}).get("path") == "direct"


CAPTURE = r"""
import json, socket, struct, sys, time
marker, seconds = sys.argv[1].encode(), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.settimeout(0.2)
print("ready", flush=True)
seen, leaks, sample = 0, 0, None
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    ip = frame[14:]
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
        continue
    ihl = (ip[0] & 15) * 4
    sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
    payload = ip[ihl + 8:struct.unpack("!H", ip[2:4])[0]]
    if marker in payload:
        leaks += 1
    if sport >= 49152 or dport >= 49152 or sport == 3478 or dport == 3478:
        seen += 1
        # a relayed tunnel data datagram on its way to a node (ChannelData carrying 0xE3)
        if sample is None and sport == 3478 and payload[:1] in bytes(range(0x40, 0x80)) \
                and len(payload) > 100 and payload[4] == 0xE3:
            sample = ip[:struct.unpack("!H", ip[2:4])[0]].hex()
print(json.dumps({"seen": seen, "leaks": leaks, "sample": sample}), flush=True)
"""

REPLAY = r"""
import socket, sys
packet = bytearray.fromhex(sys.argv[1])
ihl = (packet[0] & 15) * 4
# Captured on its way out, before checksum offload filled it in: send it with the UDP
# checksum off (IPv4 allows it); the tunnel bytes are exactly what the relay sent.
packet[ihl + 6:ihl + 8] = b"\x00\x00"
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
dst = socket.inet_ntoa(bytes(packet[16:20]))
s.sendto(bytes(packet), (dst, 0))                # replayed as it was
# Altered in flight: a counter never used yet (so not a replay) -> the tag cannot verify.
altered = bytearray(packet)
at = ihl + 8 + 4 + 1 + 4                          # UDP, ChannelData, type, receiver index
counter = int.from_bytes(altered[at:at + 8], "big") + 100_000
altered[at:at + 8] = counter.to_bytes(8, "big")
s.sendto(bytes(altered), (dst, 0))
"""


def test_relay_sees_only_ciphertext_and_replays_are_dropped(mesh: MeshLab) -> None:
    client, server = "n4", "n3"
    mesh.wait_path(client, server, "relay", timeout=30)
    wait_for(lambda: f"node={server}" in mesh.curl(client_pod(mesh, client),
                                                   f"http://web-{server}.default/", check=False),
             f"{client} reaches web-{server}", timeout=30, step=0.5)
    marker = "PLAINTEXT-MARKER-7f3a"
    capture = mesh.lab.popen("cloud", [sys.executable, "-u", "-c", CAPTURE, marker, "6"],
                             stdout=subprocess.PIPE, text=True)
    assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
    for _ in range(5):  # the marker travels in the request (server side) and the answer
        body = mesh.curl(client_pod(mesh, client),
                         f"http://web-{server}.default/{marker}", "-H", f"X-Marker: {marker}")
        assert f"node={server}" in body
    fetch(mesh, client, f"web-{server}", 4 << 20).communicate(timeout=60)
    out, _ = capture.communicate(timeout=30)
    seen = json.loads(out.strip().splitlines()[-1])
    print(f"\nrelay host capture: {seen['seen']} relay datagrams, {seen['leaks']} with the "
          "plaintext marker")
    assert seen["seen"] > 0 and seen["leaks"] == 0
    assert seen["sample"], "no relayed tunnel datagram captured"
    # The captured datagram was to n4 (answers flow server -> client) or to n3: replay both.
    before = {n: mesh.metrics(n) for n in (client, server)}
    mesh.lab.run("cloud", [sys.executable, "-c", REPLAY, seen["sample"]])

    def counted() -> tuple[float, float] | None:
        replayed = altered = 0.0
        for n in (client, server):
            now = mesh.metrics(n)
            replayed += (now.get('meshd_tunnel_rejected_total{reason="replayed"}', 0)
                         - before[n].get('meshd_tunnel_rejected_total{reason="replayed"}', 0))
            altered += (now.get('meshd_tunnel_rejected_total{reason="auth-failed"}', 0)
                        - before[n].get('meshd_tunnel_rejected_total{reason="auth-failed"}', 0))
        return (replayed, altered) if replayed >= 1 and altered >= 1 else None

    try:
        replayed, altered = wait_for(counted, "replayed and altered datagrams counted",
                                     timeout=10)
    except AssertionError:
        for n in (client, server):
            now = mesh.metrics(n)
            print(n, {k: v - before[n].get(k, 0) for k, v in now.items()
                      if "tunnel" in k and v != before[n].get(k, 0)})
        print("sample", seen["sample"][:120])
        raise
    print(f"replayed datagram dropped ({replayed:.0f}), altered datagram dropped "
          f"({altered:.0f})")


def test_status_and_ping(mesh: MeshLab) -> None:
    proc = mesh.lab.run("n1", [sys.executable, "-m", "meshd", "status"])
    assert "PEER" in proc.stdout and "n3" in proc.stdout
    print("\n" + proc.stdout)
    ping = mesh.lab.run("n1", [sys.executable, "-m", "meshd", "ping", "n3", "-c", "2"])
    assert "pong from n3" in ping.stdout and "via direct" in ping.stdout
    print(ping.stdout)
    metrics = mesh.metrics("n1")
    assert any(k.startswith("meshd_tunnel_punch_successes_total") for k in metrics)


def test_agent_stop_leaves_nothing(mesh: MeshLab, tmp_path: Path) -> None:
    del tmp_path
    assert mesh.lab.run("n2", ["ip", "link", "show", "mesh0"], check=False).returncode == 0
    assert mesh.stop_agent("n2") == 0
    assert mesh.lab.run("n2", ["ip", "link", "show", "mesh0"], check=False).returncode != 0
