"""meshd.turn.service and meshd.turn.endpoint: the cores on real loopback sockets (UDP and TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

import pytest

from meshd.stun.codec import (
    ChangeRequest,
    MessageClass,
    Method,
    StunMessage,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.turn.client import (
    Allocated,
    AllocationClosed,
    ChannelBound,
    DataReceived,
    PermissionCreated,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import mint_credentials
from meshd.turn.endpoint import TurnEndpoint, TurnEndpointError
from meshd.turn.framing import encode_channel_data
from meshd.turn.server import Transport, TurnServerConfig
from meshd.turn.service import TurnService, start_metrics
from meshd.udp import Address, BatchSocket, BindError, canonical

SECRET = b"service-secret"
CONFIG = TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip="127.0.0.1",
                          min_port=40000, max_port=60000, allow_loopback_peers=True)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


async def next_of(endpoint: TurnEndpoint, kind: type[TurnEvent]) -> TurnEvent:
    while True:
        event = await asyncio.wait_for(endpoint.events.get(), 10)
        if isinstance(event, kind):
            return event


def peer_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def relay_round_trip(service: TurnService, transport: Transport) -> None:
    credentials = mint_credentials(SECRET, "node-a", time.time(), 600)
    server = ("127.0.0.1", service.addresses.port)
    endpoint = await TurnEndpoint.open(server, credentials, local_ip="127.0.0.1",
                                       config=TurnClientConfig(transport=transport))
    loop = asyncio.get_running_loop()
    peer = peer_socket()
    try:
        allocated = await endpoint.allocate()
        assert allocated.relayed[0] == "127.0.0.1"
        assert allocated.mapped == endpoint.client.local
        target: Address = peer.getsockname()
        endpoint.send(b"via send", target)
        data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 10)
        assert (data, source) == (b"via send", allocated.relayed)
        await next_of(endpoint, PermissionCreated)
        peer.sendto(b"reply", allocated.relayed)
        event = await next_of(endpoint, DataReceived)
        assert event == DataReceived(target, b"reply", None)
        endpoint.client.bind_channel(target, endpoint.now())
        endpoint.flush()
        assert await next_of(endpoint, ChannelBound) == ChannelBound(target, 0x4000)
        endpoint.send(b"x" * 1001, target)  # odd length: padded over TCP
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), 10)
        assert data == b"x" * 1001
        peer.sendto(b"y" * 5, allocated.relayed)
        assert await next_of(endpoint, DataReceived) == DataReceived(target, b"y" * 5, 0x4000)
        assert service.server is not None and service.server.allocations == 1
        await endpoint.close()
        assert service.server.allocations == 0
        # The relayed port was released: it can be bound again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(allocated.relayed)
    finally:
        endpoint.abort()
        peer.close()


@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
def test_relay_round_trip(transport: Transport) -> None:
    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0)
        try:
            assert service.tcp_address == ("127.0.0.1", service.addresses.port)
            await relay_round_trip(service, transport)
        finally:
            service.close()
            service.close()

    run(main)


async def drive(client: TurnClient, sock: socket.socket, kind: type[TurnEvent]) -> TurnEvent:
    """Run a `TurnClient` core on a plain non-blocking socket until it emits a `kind` event."""
    loop = asyncio.get_running_loop()
    while True:
        for t in client.datagrams_to_send(time.time()):
            sock.sendto(t.data, t.destination)
        while (event := client.next_event()) is not None:
            if isinstance(event, kind):
                return event
        data, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), 10)
        client.handle_datagram(data, canonical(source), time.time())


def test_bursts_are_relayed_with_gro_reads_and_gso_sends() -> None:
    """Both directions of a channel, with bursts the kernel coalesces (UDP GSO on loopback
    arrives as one GRO read): every datagram arrives, in order, and the server read and sent
    them in batches."""
    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0,
                                          tcp=False)
        loop = asyncio.get_running_loop()
        client_sock, peer = peer_socket(), peer_socket()
        try:
            server = ("127.0.0.1", service.addresses.port)
            credentials = mint_credentials(SECRET, "node-a", time.time(), 600)
            client = TurnClient(server, credentials, local=client_sock.getsockname())
            client.allocate(time.time())
            allocated = await drive(client, client_sock, Allocated)
            assert isinstance(allocated, Allocated)
            target: Address = peer.getsockname()
            channel = client.bind_channel(target, time.time())
            await drive(client, client_sock, ChannelBound)

            payloads = [bytes([i]) * 1300 for i in range(20)] + [b"last"]
            frames = b"".join(encode_channel_data(channel, p) for p in payloads)
            BatchSocket(client_sock, client.local, gro=False).send_segments(frames, 1304, server)
            for expected in payloads:
                data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 65536), 10)
                assert (data, source) == (expected, allocated.relayed)

            replies = [bytes([i]) * 900 for i in range(30)]
            BatchSocket(peer, target, gro=False).send_segments(b"".join(replies), 900,
                                                               allocated.relayed)
            for expected in replies:
                data, _ = await asyncio.wait_for(loop.sock_recvfrom(client_sock, 65536), 10)
                assert data == encode_channel_data(channel, expected)

            core = service.server
            assert core is not None
            m = core.metrics
            assert (m.datagrams_out, m.datagrams_in) == (21, 30)
            if service.gro:  # Linux 5.0+: each burst was one read and left as one sendmsg
                assert m.coalesced_reads >= 2 and m.batches >= 2
        finally:
            client_sock.close()
            peer.close()
            service.close()

    run(main)


class RefusingSocket:
    """A socket whose kernel cannot segment (sendmsg with UDP_SEGMENT fails with `errno`)."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.sent: list[tuple[bytes, Address]] = []

    def sendmsg(self, *args: object) -> int:
        raise OSError(self.code, os.strerror(self.code))

    def sendto(self, data: bytes, destination: Address) -> int:
        self.sent.append((bytes(data), destination))
        return len(data)


@pytest.mark.parametrize(("code", "stays_on"), [(errno.EIO, True), (errno.EOPNOTSUPP, False)])
def test_refused_segmented_sends_go_one_by_one(code: int, stays_on: bool) -> None:
    fake = RefusingSocket(code)
    sock = BatchSocket(fake, ("127.0.0.1", 1), gro=False)  # type: ignore[arg-type]
    sock.send_segments(b"aaaabbbbcc", 4, ("127.0.0.1", 2))
    assert fake.sent == [(b"aaaa", ("127.0.0.1", 2)), (b"bbbb", ("127.0.0.1", 2)),
                         (b"cc", ("127.0.0.1", 2))]
    assert sock.gso is stays_on  # EIO may be one route's device; EOPNOTSUPP is the kernel
    assert (sock.counters.gso_refused, sock.counters.datagrams_sent) == (1, 3)


def ask_binding(server: Address, *attributes: ChangeRequest) -> tuple[StunMessage, Address]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(encode_message(StunMessage(MessageClass.REQUEST, Method.BINDING,
                                               b"servicetest!", attributes)), server)
        data, source = sock.recvfrom(2048)
        msg = parse_message(data)
        assert msg.get(XorMappedAddress) == XorMappedAddress(sock.getsockname())
        return msg, source


def test_stun_binding_and_rfc5780_keep_working_beside_turn() -> None:
    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", alt_ip="127.0.0.2",
                                          port=0, alt_port=0)
        try:
            a = service.addresses
            primary = ("127.0.0.1", a.port)
            _, source = await asyncio.to_thread(ask_binding, primary)
            assert source == primary
            _, source = await asyncio.to_thread(ask_binding, primary, ChangeRequest(True, True))
            assert source == ("127.0.0.2", a.alt_port)
            # Binding over TCP on the same port.
            reader, writer = await asyncio.open_connection(*primary)
            writer.write(encode_message(StunMessage(MessageClass.REQUEST, Method.BINDING,
                                                    b"tcp-binding!")))
            header = await asyncio.wait_for(reader.readexactly(20), 10)
            body = await reader.readexactly(int.from_bytes(header[2:4], "big"))
            assert parse_message(header + body).transaction_id == b"tcp-binding!"
            writer.close()
            assert service.stun is not None and service.stun.responses == 3
        finally:
            service.close()

    run(main)


def test_expiry_is_driven_by_the_clock() -> None:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0,
                                          tcp=False, clock=clock)
        credentials = mint_credentials(SECRET, "node-a", time.time(), 7200)
        server = ("127.0.0.1", service.addresses.port)
        endpoint = await TurnEndpoint.open(server, credentials, local_ip="127.0.0.1")
        try:
            allocated = await endpoint.allocate()
            assert service.tcp_address is None and service.server is not None
            offset[0] = 700.0  # past the 600 s lifetime; the client is not told
            await asyncio.to_thread(ask_binding, server)  # any input runs the core's expiry
            assert service.server.allocations == 0
            assert service.server.metrics.allocations_expired == 1
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                again.bind(allocated.relayed)
        finally:
            endpoint.abort()
            service.close()

    run(main)


def test_bad_credentials_and_tcp_garbage() -> None:
    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0)
        try:
            server = ("127.0.0.1", service.addresses.port)
            wrong = mint_credentials(b"not-the-secret", "node-a", time.time(), 600)
            endpoint = await TurnEndpoint.open(server, wrong, local_ip="127.0.0.1")
            with pytest.raises(TurnEndpointError, match="401"):
                await endpoint.allocate()
            await endpoint.close()
            reader, writer = await asyncio.open_connection(*server)
            writer.write(b"\xff" * 16)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
        finally:
            service.close()

    run(main)


def test_metrics_endpoint() -> None:
    async def main() -> None:
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0)
        assert service.server is not None
        runner = await start_metrics("127.0.0.1", 0, service.server.samples)
        try:
            host, port = runner.addresses[0][:2]

            def get() -> str:
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                    return str(r.read().decode())

            text = await asyncio.to_thread(get)
            assert "meshd_relay_allocations 0" in text
            assert 'meshd_relay_bytes_total{direction="in"} 0' in text
        finally:
            await runner.cleanup()
            service.close()

    run(main)


@contextlib.contextmanager
def tcp_port_free_for_udp() -> Iterator[int]:
    """A port held by a TCP listener whose UDP twin is free (checked)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port: int = busy.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            yield port
            return


def test_bind_errors() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            with pytest.raises(BindError, match=f"127.0.0.1:{port}"):
                await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=port, alt_port=0)
        with tcp_port_free_for_udp() as port, pytest.raises(BindError, match="TCP"):
            await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=port, alt_port=0)
        with pytest.raises(BindError, match=r"192\.0\.2\.1:0 \(relay IP\)"):
            await TurnService.start(replace(CONFIG, relay_ip="192.0.2.1"),
                                    primary_ip="127.0.0.1", port=0, alt_port=0)
        with pytest.raises(BindError, match="metrics"):
            await start_metrics("192.0.2.1", 9, list)

    run(main)


def test_endpoint_connect_error() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        credentials = mint_credentials(SECRET, "node-a", time.time(), 600)
        with pytest.raises(TurnEndpointError, match="cannot connect"):
            await TurnEndpoint.open(("127.0.0.1", port), credentials,
                                    config=TurnClientConfig(transport=Transport.TCP))
        udp = await TurnEndpoint.open(("127.0.0.1", port), credentials)
        await udp.close()  # nothing allocated: returns at once
        assert udp.events.empty() or isinstance(udp.events.get_nowait(), AllocationClosed)

    run(main)
