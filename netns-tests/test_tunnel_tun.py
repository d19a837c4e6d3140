"""meshd.tunnel.tun on a real kernel: two hosts, a TUN device on each, packets carried between
them over UDP. First by a few lines of plain forwarding (the device adapter alone), then by two
real `TunnelSession`s (handshake, encryption, 0xE4 fragments) with the devices in offload mode
(IFF_VNET_HDR + TSO/checksum offloads: 64 KB super-packets per read and write), in per-packet
mode, mixed, and against a peer that does not announce fragments (an older agent).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from netlab import Lab

from edgeweave.pki import CertificateAuthority, node_identity

TOPOLOGY = {"name": "tun", "segments": {"lan": {"subnet": "10.50.0.0/24"}},
            "hosts": {"a": {"segment": "lan"}, "b": {"segment": "lan"}}}
FORWARD = r"""
import selectors, socket, sys
from meshd.tunnel.tun import TunDevice
overlay, peer = sys.argv[1], sys.argv[2]
tun = TunDevice.open("mesh0", overlay, 16, mtu=1380, offload=False)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 51820))
udp.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(tun.fd, selectors.EVENT_READ, "tun")
sel.register(udp, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.data == "tun":
            for packet in tun.read_batch():
                udp.sendto(packet, (peer, 51820))
        else:
            while True:
                try:
                    tun.write(udp.recv(65535))
                except BlockingIOError:
                    break
"""
# Two TunnelSessions over a UDP socket: what TunnelService does, without the control plane.
SESSION = r"""
import ipaddress, json, selectors, signal, socket, sys, time
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from meshd.tunnel.identity import CAPeerVerifier, LocalIdentity, Peer
from meshd.tunnel.session import DecryptedPackets, TunnelConfig, TunnelSession
from meshd.tunnel.tun import TunDevice

d, me, other, peer_ip = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
offload, fragments = sys.argv[5] == "offload", sys.argv[6] == "fragments"
overlay = json.loads((d / "overlay.json").read_text())
ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
verifier = CAPeerVerifier(ca, lambda n: [ipaddress.IPv4Address(overlay[n])] if n in overlay
                          else [])
local = LocalIdentity.create(
    X25519PrivateKey.from_private_bytes((d / f"{me}.static").read_bytes()),
    x509.load_pem_x509_certificate((d / f"{me}.pem").read_bytes()),
    load_pem_private_key((d / f"{me}.key").read_bytes(), None),
    ipaddress.IPv4Address(overlay[me]))
session = TunnelSession(local, Peer(other, (d / f"{other}.public").read_bytes()), verifier,
                        config=TunnelConfig(fragments=fragments),
                        wall_offset=time.time() - time.monotonic())
tun = TunDevice.open("mesh0", overlay[me], 16, mtu=1380, offload=offload)
session.frames_out = tun.offload
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
udp.bind(("0.0.0.0", 51820))
udp.setblocking(False)
dest = (peer_ip, 51820)
drops = 0

def send(datagrams):
    for datagram in datagrams:
        try:
            udp.sendto(datagram, dest)
        except BlockingIOError:
            time.sleep(0.0005)  # the socket buffer is full: let the kernel drain it
            udp.sendto(datagram, dest)

def stop(*_):
    raise SystemExit(0)

signal.signal(signal.SIGTERM, stop)
sel = selectors.DefaultSelector()
sel.register(tun.fd, selectors.EVENT_READ, "tun")
sel.register(udp, selectors.EVENT_READ, "udp")
print(f"ready {tun.offloads:#x}", flush=True)
try:
    while True:
        timer = session.get_timer()
        wait = None if timer is None else max(0.0, timer - time.monotonic())
        for key, _ in sel.select(wait):
            now = time.monotonic()
            if key.data == "tun":
                frames = tun.read_batch(32)
                send(session.encrypt_frames(frames, now) if tun.offload
                     else session.encrypt(frames, now))
            else:
                batch = []
                while len(batch) < 256:
                    try:
                        batch.append(udp.recv(65535))
                    except BlockingIOError:
                        break
                for ev in session.receive_batch(batch, now):
                    if isinstance(ev, DecryptedPackets):
                        for packet in ev.packets:
                            drops += not tun.write(packet)
        now = time.monotonic()
        if timer is not None and now >= timer:
            session.handle_timer(now)
        send(session.datagrams_to_send(now))
finally:
    s = session.stats()
    print(json.dumps({"messages_sent": s.messages_sent, "messages_received": s.messages_received,
                      "packets_sent": s.packets_sent, "packets_received": s.packets_received,
                      "peer_fragments": s.peer_fragments, "rejected": s.rejected,
                      "offloads": tun.offloads, "tun_drops": drops}), flush=True)
"""
MOVE_SERVER = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5300))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while chunk := c.recv(1 << 20):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""
MOVE_CLIENT = r"""
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[2]))
s = socket.create_connection((sys.argv[1], 5300), timeout=30)
s.sendall(data)
s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def test_tun_devices_carry_ping_and_tcp(make_lab: Callable[[Any], Lab]) -> None:
    lab = make_lab(TOPOLOGY)
    procs = {}
    for host, overlay, peer in (("a", "100.64.0.1", "b"), ("b", "100.64.0.2", "a")):
        procs[host] = lab.popen(host, [sys.executable, "-c", FORWARD, overlay, lab.addr(peer)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = procs[host].stdout
        assert out is not None
        assert out.readline().strip() == "ready", procs[host].stderr
    link = lab.run("a", ["ip", "-o", "addr", "show", "dev", "mesh0"]).stdout
    assert "100.64.0.1/16" in link
    assert "mtu 1380" in lab.run("a", ["ip", "-o", "link", "show", "dev", "mesh0"]).stdout
    ping = lab.run("a", ["ping", "-c", "3", "-i", "0.2", "-W", "2", "100.64.0.2"])
    assert " 0% packet loss" in ping.stdout
    server = lab.popen("b", ["iperf3", "-s", "-1", "-B", "100.64.0.2"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    bulk = lab.run("a", ["iperf3", "-c", "100.64.0.2", "-t", "1", "-J"], timeout=30)
    assert '"bits_per_second"' in bulk.stdout
    server.wait(timeout=10)
    procs["a"].kill()
    procs["a"].wait()
    # A killed process's TUN device goes with its file descriptor: nothing stale is left.
    deadline = time.monotonic() + 5
    while lab.run("a", ["ip", "link", "show", "dev", "mesh0"], check=False).returncode == 0:
        assert time.monotonic() < deadline, "mesh0 outlived its process"
        time.sleep(0.05)


def _material(tmp: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.generate(now=now)
    (tmp / "ca.pem").write_bytes(ca.cert_pem())
    overlay = {"node-a": "100.64.0.1", "node-b": "100.64.0.2"}
    (tmp / "overlay.json").write_text(json.dumps(overlay))
    for node in overlay:
        issued = ca.issue_client_cert(node_identity(node), now=now)
        (tmp / f"{node}.pem").write_bytes(issued.cert_pem())
        (tmp / f"{node}.key").write_bytes(issued.key_pem())
        static = X25519PrivateKey.generate()
        (tmp / f"{node}.static").write_bytes(static.private_bytes_raw())
        (tmp / f"{node}.public").write_bytes(
            static.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


# (a's TUN mode, a announces fragments, b's TUN mode, b announces fragments)
MODES = {
    "offload": ("offload", "fragments", "offload", "fragments"),
    "fallback": ("plain", "fragments", "plain", "fragments"),
    "mixed": ("offload", "fragments", "plain", "fragments"),
    "old-peer": ("offload", "fragments", "offload", "none"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_sessions_over_tun_offloads(make_lab: Callable[[Any], Lab], tmp_path: Path,
                                    mode: str) -> None:
    a_tun, a_frag, b_tun, b_frag = MODES[mode]
    _material(tmp_path)
    lab = make_lab(TOPOLOGY)
    procs: dict[str, subprocess.Popen[str]] = {}
    offloads = {}
    for host, me, other, peer, tun, frag in (("a", "node-a", "node-b", "b", a_tun, a_frag),
                                              ("b", "node-b", "node-a", "a", b_tun, b_frag)):
        proc = lab.popen(host, [sys.executable, "-c", SESSION, str(tmp_path), me, other,
                                lab.addr(peer), tun, frag],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[host] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "ready", proc.stderr.read() if proc.stderr else ""
        offloads[host] = int(line[1], 16)
    for host, tun in (("a", a_tun), ("b", b_tun)):
        # This kernel (6.x) takes the offloads: the fallback is only what we ask for here.
        assert (offloads[host] != 0) == (tun == "offload"), offloads
    ping = lab.run("a", ["ping", "-c", "3", "-i", "0.2", "-W", "2", "100.64.0.2"])
    assert " 0% packet loss" in ping.stdout
    big = lab.run("a", ["ping", "-c", "2", "-s", "4000", "-W", "2", "100.64.0.2"])
    assert " 0% packet loss" in big.stdout  # IP fragments through the tunnel
    server = lab.popen("b", [sys.executable, "-c", MOVE_SERVER, "100.64.0.2"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    sent = lab.run("a", [sys.executable, "-c", MOVE_CLIENT, "100.64.0.2", str(20 << 20)],
                   timeout=120).stdout.split()
    received = server.stdout.readline().split()
    assert sent == received, (sent, received)  # 20 MB, byte for byte (TCP checksums held)
    iperf = lab.popen("b", ["iperf3", "-s", "-1", "-B", "100.64.0.2"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    bulk = json.loads(lab.run("a", ["iperf3", "-c", "100.64.0.2", "-t", "2", "-J"],
                              timeout=30).stdout)
    mbps = bulk["end"]["sum_received"]["bits_per_second"] / 1e6
    iperf.wait(timeout=10)
    stats = {}
    for host, proc in procs.items():
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        stats[host] = json.loads(out.strip().splitlines()[-1])
    print(f"{mode}: iperf3 {mbps:.0f} Mbit/s, a {stats['a']}, b {stats['b']}")
    assert mbps > 10
    sides = {"a": (a_tun, a_frag), "b": (b_tun, b_frag)}
    for host, other in (("a", "b"), ("b", "a")):
        # Frames go out as 0xE4 messages only from an offload device, between two sides that
        # both use fragments; a plain device or an old peer gets per-packet 0xE3 datagrams.
        agreed = sides[host][1] == sides[other][1] == "fragments"
        assert stats[host]["peer_fragments"] == agreed, stats
        assert (stats[host]["messages_sent"] > 0) == (agreed and sides[host][0] == "offload")
        assert stats[other]["messages_received"] <= stats[host]["messages_sent"]
        assert not stats[host]["rejected"].get("malformed"), stats
        assert stats[host]["tun_drops"] == 0, stats
