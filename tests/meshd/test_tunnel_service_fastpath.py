"""meshd.tunnel.service with the native fast path: two real `TunnelService`s on loopback.

`meshd server`'s control channel (TLS, certificates from a CA minted in a temporary directory)
and its STUN/TURN service run in-process on 127.0.0.1; each agent binds its tunnel socket on
127.0.0.1, learns its overlay address from the welcome and goes direct to the other (host
candidates). mesh0 is played by an AF_UNIX datagram socketpair (reads and writes keep packet
boundaries as a TUN device's do): the service opens it through `TunnelService.start`'s
`open_tun`, and the test writes "kernel" packets into the other end and reads what the agent
delivers there. The faults are real: the thread's poll fails (`FastPath._fail_for_test`), or
the process has no fd left when the fast path starts (RLIMIT_NOFILE).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeweave.pki import CertificateAuthority, kubeconfig_document, node_identity, write_kubeconfig
from meshd.control.registry import MemoryRegistryStore
from meshd.control.server import ControlServer, ControlServerConfig
from meshd.control.service import ControlService, server_tls_context
from meshd.control.wire import TurnServerAddress
from meshd.tunnel import fastpath
from meshd.tunnel.service import TunnelService, TunnelSettings
from meshd.tunnel.tun import TunDevice
from meshd.turn.server import TurnServerConfig
from meshd.turn.service import TurnService

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE,
                                reason="meshd.tunnel._fastpath is not built")

SECRET = b"fastpath-service-secret"
TIMEOUT = 20.0


class SocketTun(TunDevice):
    """mesh0 on one end of a datagram socketpair; `kernel` is the other end (what the kernel's
    IP stack would read and write). Closing closes the fd only (there is no interface)."""

    def __init__(self, name: str, mtu: int) -> None:
        self.kernel, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.setblocking(False)
        device.setblocking(False)
        self._device = device
        super().__init__(device.fileno(), name, mtu)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._device.close()
        self.kernel.close()


@dataclass
class Agent:
    service: TunnelService
    tun: SocketTun

    @property
    def overlay(self) -> bytes:
        overlay = self.service.node.overlay
        assert overlay is not None
        return overlay.ip.packed


@dataclass(frozen=True)
class Lab:
    kubeconfigs: dict[str, Path]
    control_port: int
    stun_port: int


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[Path, CertificateAuthority]]:
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    ca.issue_server_cert("meshd-server", ips=["127.0.0.1"]).write(
        tmp_path / "server.crt", tmp_path / "server.key")
    yield tmp_path, ca


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


async def start_lab(pki: tuple[Path, CertificateAuthority]) -> tuple[Lab, list[Any]]:
    """`meshd server` in-process: control channel and STUN/TURN, on 127.0.0.1."""
    d, ca = pki
    turn = await TurnService.start(
        TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip="127.0.0.1",
                         min_port=40000, max_port=40999),
        primary_ip="127.0.0.1", port=0, alt_port=0, tcp=False)
    stun_port = turn.addresses.port
    core = ControlServer(ControlServerConfig(
        turn_secret=SECRET, turn_servers=(TurnServerAddress("127.0.0.1", stun_port),)),
        MemoryRegistryStore())
    control = await ControlService.start(core, server_tls_context(
        d / "server.crt", d / "server.key", d / "ca.crt"), "127.0.0.1", 0)
    kubeconfigs = {}
    for node in ("edge-a", "edge-b"):
        issued = ca.issue_client_cert(node_identity(node))
        kubeconfigs[node] = d / f"{node}.kubeconfig"
        write_kubeconfig(kubeconfigs[node], kubeconfig_document(
            server="https://127.0.0.1:6443", ca_cert_pem=ca.cert_pem(),
            user=f"system:node:{node}", client=issued))
    return Lab(kubeconfigs, control.address[1], stun_port), [control, turn]


async def start_agent(lab: Lab, node: str, *,
                      opened: Callable[[SocketTun], None] | None = None,
                      ready: Callable[[], None] | None = None) -> Agent:
    """An agent with the fast path on (mesh0 without offloads: one packet per read).
    `opened` runs as mesh0 is opened, `ready` right after the fast path started (or not)."""
    tuns: list[SocketTun] = []

    def open_tun(name: str, address: str, prefix: int, mtu: int = 1380,
                 **_: Any) -> TunDevice:
        tun = SocketTun(name, mtu)
        tuns.append(tun)
        if opened is not None:
            opened(tun)
        return tun

    service = await TunnelService.start(TunnelSettings(
        server_host="127.0.0.1", control_port=lab.control_port, stun_port=lab.stun_port,
        kubeconfig=lab.kubeconfigs[node], interface=f"fake-{node}", offload=False,
        fast_path=True), open_tun=open_tun)
    if ready is not None:
        service.on_ready(ready)
    assert await service.wait_ready(TIMEOUT), f"{node}: no welcome"
    return Agent(service, tuns[0])


def ip_packet(src: bytes, dst: bytes, marker: bytes) -> bytes:
    """An IPv4/UDP packet carrying `marker`."""
    size = 28 + len(marker)
    return struct.pack("!BBHIBBH4s4sHHHH", 0x45, 0, size, 0, 64, 17, 0, src, dst,
                       40000, 7, 8 + len(marker), 0) + marker


async def until(condition: Callable[[], bool], what: str) -> None:
    """Real sockets and a real thread: no virtual clock to move."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def deliver(src: Agent, dst: Agent, marker: bytes) -> None:
    """A packet written into `src`'s mesh0 comes out of `dst`'s (resent while the path and
    keys are being set up: until then the core may queue or drop it)."""
    loop = asyncio.get_running_loop()
    packet = ip_packet(src.overlay, dst.overlay, marker)
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, f"{marker!r} did not arrive"
        src.tun.kernel.send(packet)
        try:
            got = await asyncio.wait_for(loop.sock_recv(dst.tun.kernel, 65536), 0.5)
        except TimeoutError:
            continue
        if got == packet:
            return


def sending(agent: Agent, peer: str) -> bool:
    status = agent.service.status()["fastPath"]
    return status is not None and peer in status["sending"]


def metric(agent: Agent, name: str, **labels: str) -> float | None:
    for sample, sample_labels, value in agent.service.metrics_samples():
        if sample == name and sample_labels == labels:
            return value
    return None


async def direct_pair(lab: Lab, **b_options: Any) -> tuple[Agent, Agent]:
    a = await start_agent(lab, "edge-a")
    b = await start_agent(lab, "edge-b", **b_options)
    await deliver(a, b, b"first")  # the handshake, on whatever path is up by then
    await until(lambda: all(p["path"] == "direct" for agent in (a, b)
                            for p in agent.service.status()["peers"]), "direct paths")
    return a, b


async def stop_all(agents: list[Agent], servers: list[Any]) -> None:
    """Stop the agents, then the lab's servers (some close synchronously)."""
    for agent in agents:
        await agent.service.stop()
    for server in servers:
        result = server.close()
        if asyncio.iscoroutine(result):
            await result


def test_a_failing_thread_hands_everything_back_to_python(
        pki: tuple[Path, CertificateAuthority], caplog: pytest.LogCaptureFixture) -> None:
    """The thread carries the direct pair's packets; when its poll fails, the adapter logs
    `tunnel.fast_path_failed` (ERROR, with the reason), closes it and reads the socket and
    mesh0 itself: packets still flow both ways, and status and metrics say so."""
    caplog.set_level(logging.INFO, logger="meshd.tunnel")

    async def main() -> None:
        lab, servers = await start_lab(pki)
        agents: list[Agent] = []
        try:
            a, b = await direct_pair(lab)
            agents += [a, b]
            await until(lambda: sending(a, "edge-b") and sending(b, "edge-a"), "fast routes")
            fast = a.service.fast
            assert fast is not None
            before = fast.counters()
            await deliver(a, b, b"native out")
            await deliver(b, a, b"native in")
            after = fast.counters()
            assert after["fast_tx"] > before["fast_tx"] and after["fast_rx"] > before["fast_rx"]
            assert metric(a, "meshd_tunnel_fastpath_failed") == 0

            # A forged datagram under a's current index: dropped by the thread, counted where
            # the Python path counts it (within a second: the adapter folds stats in then).
            index = a.service.node.fast_routes(asyncio.get_running_loop().time())[
                "edge-b"].local_index
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
                forger.sendto(struct.pack("!BIQ", 0xE3, index, 1 << 40) + os.urandom(48),
                              a.service.node.local)
            await until(lambda: metric(a, "meshd_tunnel_rejected_total",
                                       reason="auth-failed") == 1, "the auth-failed count")
            assert fast.counters()["auth_failed"] == 1

            fast._fail_for_test(errno.EIO)
            await until(lambda: a.service.fast is None, "the fallback")
            failed = [r for r in caplog.records if r.getMessage().startswith(
                "tunnel.fast_path_failed")]
            assert len(failed) == 1 and failed[0].levelno == logging.ERROR
            assert "Input/output error" in str(failed[0].fields["error"])  # type: ignore[attr-defined]
            assert fast.error is not None and fast.error.errno == errno.EIO
            status = a.service.status()
            assert status["fastPath"] is None and "poll" in status["fastPathError"]
            assert metric(a, "meshd_tunnel_fastpath_failed") == 1
            sent_before = a.service.node.metrics.direct_bytes_out
            for i in range(3):  # a through Python now, b still natively
                await deliver(a, b, b"python out %d" % i)
                await deliver(b, a, b"python in %d" % i)
            assert a.service.node.metrics.direct_bytes_out > sent_before
            assert b.service.fast is not None and sending(b, "edge-a")
        finally:
            await stop_all(agents, servers)

    run(main)


def test_a_fast_path_that_cannot_start_leaves_python_reading(
        pki: tuple[Path, CertificateAuthority], caplog: pytest.LogCaptureFixture) -> None:
    """No fd left when mesh0 comes up (the soft RLIMIT_NOFILE at the lowest free fd, put back
    in the agent's first on-ready callback): the extension cannot dup its fds,
    `_start_fast_path` logs `tunnel.fast_path_failed` and the agent reads its socket and mesh0
    in Python; it talks with a peer that runs the fast path."""
    caplog.set_level(logging.INFO, logger="meshd.tunnel")
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)

    def no_fd_left(tun: SocketTun) -> None:
        lowest = os.dup(0)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, limits[1]))

    def fds_again() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    async def main() -> None:
        lab, servers = await start_lab(pki)
        agents: list[Agent] = []
        try:
            a = await start_agent(lab, "edge-a")
            agents.append(a)
            b = await start_agent(lab, "edge-b", opened=no_fd_left, ready=fds_again)
            agents.append(b)
            assert b.service.fast is None
            assert "Too many open files" in (b.service.fast_path_error or "")
            assert any(r.getMessage().startswith("tunnel.fast_path_failed")
                       and r.levelno == logging.ERROR for r in caplog.records)
            assert metric(b, "meshd_tunnel_fastpath_failed") == 1
            await deliver(a, b, b"to python")
            await deliver(b, a, b"from python")
            await until(lambda: sending(a, "edge-b"), "a's fast route")
            await deliver(a, b, b"native to python")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            await stop_all(agents, servers)

    run(main)

