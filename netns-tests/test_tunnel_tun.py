"""meshd.tunnel.tun on a real kernel: two hosts, a TUN device on each, packets carried between
them over plain UDP by a few lines of forwarding (no crypto: this tests the device adapter).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from netlab import Lab

TOPOLOGY = {"name": "tun", "segments": {"lan": {"subnet": "10.50.0.0/24"}},
            "hosts": {"a": {"segment": "lan"}, "b": {"segment": "lan"}}}
FORWARD = r"""
import selectors, socket, sys
from meshd.tunnel.tun import TunDevice
overlay, peer = sys.argv[1], sys.argv[2]
tun = TunDevice.open("mesh0", overlay, 16, mtu=1380)
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
