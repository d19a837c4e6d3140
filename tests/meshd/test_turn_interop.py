"""TURN interop on loopback: (a) aioice's TURN client on our server, (b) coturn's
`turnutils_uclient` against `meshd server --relay`, (c) our TurnClient through coturn's
`turnserver` with the same REST secret. Every process is started here and stopped by pid."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.turn.client import (
    ChannelBound,
    DataReceived,
    PermissionCreated,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import mint_credentials
from meshd.turn.endpoint import TurnEndpoint
from meshd.turn.server import Transport, TurnServerConfig
from meshd.turn.service import TurnService
from meshd.udp import Address

SECRET = "interop-secret"
requires_coturn = pytest.mark.skipif(shutil.which("turnserver") is None
                                     or shutil.which("turnutils_uclient") is None,
                                     reason="coturn (turnserver, turnutils_uclient) not installed")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes],
             timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def free_port(*kinds: int) -> int:
    """A loopback port free for every socket kind given (checked, then released)."""
    while True:
        with socket.socket(socket.AF_INET, kinds[0]) as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            ok = True
            for kind in kinds[1:]:
                with socket.socket(socket.AF_INET, kind) as other:
                    try:
                        other.bind(("127.0.0.1", port))
                    except OSError:
                        ok = False
            if ok:
                return port


def udp_echo_answers(address: Address) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(b"ping", address)
        try:
            sock.recvfrom(64)
        except OSError:
            return False
        return True


# --- (a) aioice's TURN client on our server ---------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_allocates_and_relays_through_our_server(transport: str) -> None:
    aioice_turn = pytest.importorskip("aioice.turn")

    class Receiver(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: Address) -> None:
            self.queue.put_nowait((data, addr))

    async def main() -> None:
        config = TurnServerConfig(realm="edgeweave", secrets=(SECRET.encode(),),
                                  relay_ip="127.0.0.1", allow_loopback_peers=True)
        service = await TurnService.start(config, primary_ip="127.0.0.1", port=0, alt_port=0)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            credentials = mint_credentials(SECRET.encode(), "aioice-node", time.time(), 600)
            relay, receiver = await aioice_turn.create_turn_endpoint(
                Receiver, ("127.0.0.1", service.addresses.port), credentials.username,
                credentials.password, transport=transport)
            relayed = relay.get_extra_info("sockname")
            assert relayed[0] == "127.0.0.1"
            for i in range(3):  # aioice binds a channel on the first send, then ChannelData
                relay.sendto(b"to peer %d" % i, peer.getsockname())
                data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 10)
                assert (data, source) == (b"to peer %d" % i, tuple(relayed))
                peer.sendto(b"to aioice %d" % i, source)
                assert await asyncio.wait_for(receiver.queue.get(), 10) == (
                    b"to aioice %d" % i, peer.getsockname())
            assert service.server is not None and service.server.allocations == 1
            relay.close()  # Refresh with LIFETIME 0
            for _ in range(100):
                if service.server.allocations == 0:
                    break
                await asyncio.sleep(0.05)
            assert service.server.allocations == 0
            assert service.server.metrics.auth_failures == 0
        finally:
            peer.close()
            service.close()

    asyncio.run(asyncio.wait_for(main(), 60))


# --- (b) coturn's turnutils_uclient against `meshd server --relay` -----------------------------


@pytest.fixture(scope="module")
def meshd_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Address]:
    """`meshd server` with the relay on 127.0.0.1 (free ports), shared by the uclient runs;
    yields its address."""
    tmp_path = tmp_path_factory.mktemp("meshd-relay")
    secret = tmp_path / "turn-secret"
    secret.write_text(SECRET + "\n")
    config = tmp_path / "meshd.yaml"
    config.write_text(
        "stun: {addresses: [127.0.0.1], port: 0, altPort: 0}\n"
        f"relay: {{enabled: true, authSecretFile: {secret}, allowLoopbackPeers: true,\n"
        "        quotaPerNode: 100, minPort: 40000, maxPort: 60000}\n")
    log = tmp_path / "meshd-server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "meshd", "server", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: "turn.relay" in log.read_text(), "meshd server", proc)
        match = re.search(r"stun\.listen address=127\.0\.0\.1:(\d+) role=primary",
                          log.read_text())
        assert match, log.read_text()
        yield ("127.0.0.1", int(match.group(1)))
    finally:
        stop(proc)
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def turn_peer() -> Iterator[Address]:
    """coturn's `turnutils_peer`, a UDP echo server, on a free loopback port."""
    port = free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: udp_echo_answers(("127.0.0.1", port)), "turnutils_peer", proc)
        yield ("127.0.0.1", port)
    finally:
        stop(proc)


@requires_coturn
@pytest.mark.parametrize("flags", [[], ["-t"], ["-s"], ["-y"], ["-t", "-y"], ["-g", "-m", "3"]],
                         ids=["udp-channels", "tcp", "send-indications", "client-to-client",
                              "tcp-client-to-client", "dont-fragment-3-clients"])
def test_uclient_against_meshd_server(meshd_relay: Address, turn_peer: Address,
                                      flags: list[str]) -> None:
    command = ["turnutils_uclient", *flags, "-e", turn_peer[0], "-r", str(turn_peer[1]),
               "-W", SECRET, "-u", "uclient-node", "-n", "20", "-c",
               "-p", str(meshd_relay[1]), meshd_relay[0]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", output)
    assert totals, output
    sent, received = map(int, totals[-1])
    assert sent > 0 and sent == received, output
    assert "Total lost packets 0 " in output, output


# --- (c) our TurnClient through coturn ---------------------------------------------------------


@pytest.fixture
def coturn_relay(tmp_path: Path) -> Iterator[Address]:
    """Debian's `turnserver` with REST auth (`use-auth-secret`) on a free loopback port."""
    if shutil.which("turnserver") is None:
        pytest.skip("coturn (turnserver) is not installed")
    port = free_port(socket.SOCK_DGRAM, socket.SOCK_STREAM)
    low = 20000 + (port % 20) * 1000  # a relay range away from the kernel's ephemeral ports
    log = tmp_path / "turnserver.log"
    command = [
        "turnserver", "-n", "--use-auth-secret", f"--static-auth-secret={SECRET}",
        "--realm=coturn.test", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
        f"--listening-port={port}", f"--min-port={low}", f"--max-port={low + 999}",
        "--no-cli", "--no-tls", "--no-dtls", "--allow-loopback-peers",
        "--pidfile", str(tmp_path / "turnserver.pid"), "--userdb", str(tmp_path / "turndb"),
        "--log-file", str(log), "--simple-log", "--no-stdout-log",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)
    try:
        def listening() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, "turnserver", proc)
        yield ("127.0.0.1", port)
    finally:
        stop(proc)


async def next_of(endpoint: TurnEndpoint, kind: type[TurnEvent]) -> TurnEvent:
    while True:
        event = await asyncio.wait_for(endpoint.events.get(), 10)
        if isinstance(event, kind):
            return event


@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
def test_our_client_relays_through_coturn(coturn_relay: Address, transport: Transport) -> None:
    async def main() -> None:
        credentials = mint_credentials(SECRET.encode(), "node-x", time.time(), 600)
        endpoint = await TurnEndpoint.open(coturn_relay, credentials, local_ip="127.0.0.1",
                                           config=TurnClientConfig(transport=transport))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        target: Address = peer.getsockname()
        loop = asyncio.get_running_loop()
        try:
            allocated = await endpoint.allocate()
            assert allocated.relayed[0] == "127.0.0.1"
            endpoint.send(b"send indication", target)
            data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 10)
            assert (data, source) == (b"send indication", allocated.relayed)
            await next_of(endpoint, PermissionCreated)
            peer.sendto(b"data indication", source)
            assert await next_of(endpoint, DataReceived) == DataReceived(
                target, b"data indication", None)
            endpoint.client.bind_channel(target, endpoint.now())
            endpoint.flush()
            assert await next_of(endpoint, ChannelBound) == ChannelBound(target, 0x4000)
            endpoint.send(b"channel data!", target)  # 13 bytes: padded over TCP
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 10)
            assert data == b"channel data!"
            peer.sendto(b"back on the channel", source)
            assert await next_of(endpoint, DataReceived) == DataReceived(
                target, b"back on the channel", 0x4000)
            await endpoint.close()
            assert endpoint.client.state.value == "closed"
        finally:
            endpoint.abort()
            peer.close()

    asyncio.run(asyncio.wait_for(main(), 60))
