"""meshd.turn._relaypath: the relay's native data path, on real loopback sockets.

What the core relayed once (its `LearnedRoute`s) the extension relays afterwards, with the same
bytes on the wire and the same counters; whatever no live route covers reaches the core
unchanged. Each test compares with the core alone where the result could differ."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.stun.codec import FAMILY_IPV4, FAMILY_IPV6
from meshd.turn import service as service_module
from meshd.turn.client import (
    Allocated,
    ChannelBound,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import mint_credentials
from meshd.turn.framing import encode_channel_data
from meshd.turn.server import TurnServerConfig
from meshd.turn.service import TurnService
from meshd.udp import Address, BatchSocket, canonical

pytestmark = pytest.mark.skipif(service_module.NATIVE is None,
                                reason="meshd.turn._relaypath is not built")

SECRET = b"relaypath-secret"
CONFIG = TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip="127.0.0.1",
                          min_port=40000, max_port=60000, allow_loopback_peers=True)


class Clock:
    """The service's clock, moved by the test (starts at the real time: credentials)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


def udp(ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


@dataclass
class Client:
    """A TURN client core on its own socket, with an allocation."""

    core: TurnClient
    sock: socket.socket
    relayed: Address
    clock: Clock

    async def drive(self, kind: type[TurnEvent]) -> TurnEvent:
        loop = asyncio.get_running_loop()
        while True:
            for t in self.core.datagrams_to_send(self.clock()):
                self.sock.sendto(t.data, t.destination)
            while (event := self.core.next_event()) is not None:
                if isinstance(event, kind):
                    return event
            data, source = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536), 10)
            self.core.handle_datagram(data, canonical(source), self.clock())

    async def bind(self, peer: Address) -> int:
        channel = self.core.bind_channel(peer, self.clock())
        await self.drive(ChannelBound)
        return channel

    def send_burst(self, frames: bytes, segment: int, server: Address) -> None:
        """One UDP GSO send: the server reads it as one coalesced read."""
        BatchSocket(self.sock, self.core.local, gro=False).send_segments(frames, segment,
                                                                         server)


async def client(service: TurnService, node: str, clock: Clock,
                 ip: str = "127.0.0.1") -> Client:
    sock = udp(ip)
    server = (ip, service.addresses.port)
    family = FAMILY_IPV6 if ":" in ip else FAMILY_IPV4  # RFC 8656 §7.2: IPv4 unless asked
    core = TurnClient(server, mint_credentials(SECRET, node, clock(), 600),
                      local=canonical(sock.getsockname()),
                      config=TurnClientConfig(family=family))
    core.allocate(clock())
    c = Client(core, sock, ("", 0), clock)
    allocated = await c.drive(Allocated)
    assert isinstance(allocated, Allocated)
    c.relayed = allocated.relayed
    return c


async def receive(sock: socket.socket, count: int) -> list[tuple[bytes, Address]]:
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(count):
        data, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), 10)
        out.append((data, canonical(source)))
    return out


async def quiet(sock: socket.socket, seconds: float = 0.2) -> None:
    """Nothing arrives on `sock` for a while."""
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(loop.sock_recvfrom(sock, 65536), seconds)


@dataclass
class Rig:
    """A service, client A with an allocation and a channel to `peer`."""

    service: TurnService
    clock: Clock
    a: Client
    peer: socket.socket
    server: Address
    channel: int

    def send(self, data: bytes) -> None:
        self.a.sock.sendto(data, self.server)


@contextlib.asynccontextmanager
async def bound(native: bool = True, ip: str = "127.0.0.1") -> AsyncIterator[Rig]:
    """`ip`: the family of every socket (the server's, the relayed addresses, the client's and
    the peer's)."""
    clock = Clock()
    service = await TurnService.start(replace(CONFIG, relay_ip=ip), primary_ip=ip, port=0,
                                      alt_port=0, tcp=False, clock=clock, native=native)
    try:
        a = await client(service, "node-a", clock, ip)
        peer = udp(ip)
        try:
            channel = await a.bind(canonical(peer.getsockname()))
            yield Rig(service, clock, a, peer, (ip, service.addresses.port), channel)
        finally:
            a.sock.close()
            peer.close()
    finally:
        service.close()


async def learn_hello(rig: Rig) -> None:
    """ChannelData twice: the core relays the first and learns the route, C the second."""
    for _ in range(2):
        rig.send(encode_channel_data(rig.channel, b"hello"))
        assert await receive(rig.peer, 1) == [(b"hello", rig.a.relayed)]
    assert stats(rig.service)["relayed_reads"] == 1


def stats(service: TurnService) -> dict[str, int]:
    assert service.native is not None
    result: dict[str, int] = service.native.stats()
    return result


def burst(channel: int, sizes: list[int], fill: int = 0) -> tuple[bytes, list[bytes], int]:
    """ChannelData frames of one channel back to back: (frames, payloads, segment)."""
    payloads = [bytes([(fill + i) % 256]) * size for i, size in enumerate(sizes)]
    return (b"".join(encode_channel_data(channel, p) for p in payloads), payloads,
            sizes[0] + 4)


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_client_and_peer_directions_go_native_after_the_core_saw_them(ip: str) -> None:
    """ChannelData to a peer (STRIP) and a peer's datagrams back (WRAP): the first burst each
    way goes through the core, which learns the route; later bursts are relayed natively, with
    the same bytes, order and counters. IPv4 and IPv6."""
    if ip == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        async with bound(ip=ip) as rig:
            service, a, peer, server, channel = (rig.service, rig.a, rig.peer, rig.server,
                                                 rig.channel)
            assert service.native is not None
            target: Address = canonical(peer.getsockname())
            for round_ in range(3):
                frames, payloads, segment = burst(channel, [1300] * 20 + [77], round_)
                a.send_burst(frames, segment, server)
                assert await receive(peer, 21) == [(p, a.relayed) for p in payloads]
                replies = [bytes([round_ + i]) * 900 for i in range(30)]
                BatchSocket(peer, target, gro=False).send_segments(b"".join(replies), 900,
                                                                   a.relayed)
                got = await receive(a.sock, 30)
                assert got == [(encode_channel_data(channel, r), server) for r in replies]
            s = stats(service)
            assert s["relayed_reads"] >= 4  # rounds 2 and 3, both ways
            assert s["datagrams_out"] >= 42 and s["datagrams_in"] >= 60
            assert service.native.routes == 2
            samples = {(name, tuple(sorted(labels.items()))): value
                       for name, labels, value in service.samples()}
            # the core's counters include the native ones: as if the core had relayed it all
            assert samples[("meshd_relay_datagrams_total", (("direction", "out"),))] == 63
            assert samples[("meshd_relay_datagrams_total", (("direction", "in"),))] == 90
            assert samples[("meshd_relay_bytes_total", (("direction", "out"),))] == 3 * (
                20 * 1300 + 77)
            assert samples[("meshd_relay_bytes_total", (("direction", "in"),))] == 90 * 900
            assert samples[("meshd_relay_native_reads_total", ())] == s["relayed_reads"]
            assert samples[("meshd_relay_native_routes", ())] == 2

    run(main)


def test_relay_to_relay_rewrites_headers_natively() -> None:
    """Two clients of this server talking through their relayed addresses: A's ChannelData
    reaches B as B's ChannelData (header rewritten, one read in, one send out), natively from
    the second burst; a padded single datagram loses its padding as the core would drop it."""
    async def main() -> None:
        clock = Clock()
        service = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0,
                                          tcp=False, clock=clock)
        a = await client(service, "node-a", clock)
        b = await client(service, "node-b", clock)
        server = ("127.0.0.1", service.addresses.port)
        try:
            to_b = await a.bind(b.relayed)
            to_a = await b.bind(a.relayed)
            handed = stats(service)["handed"]  # the STUN requests so far
            for round_ in range(3):
                frames, payloads, segment = burst(to_b, [1400] * 40 + [3], round_)
                a.send_burst(frames, segment, server)
                got = await receive(b.sock, 41)
                assert got == [(encode_channel_data(to_a, p), server) for p in payloads]
            assert stats(service)["relayed_locally"] >= 82
            # A single ChannelData with 3 bytes after its payload (padding, RFC 8656 §12.5)
            a.sock.sendto(encode_channel_data(to_b, b"odd") + b"\0\0\0", server)
            assert await receive(b.sock, 1) == [(encode_channel_data(to_a, b"odd"), server)]
            assert stats(service)["handed"] == handed + 1  # the first burst only
        finally:
            a.sock.close()
            b.sock.close()
            service.close()

    run(main)


def test_routes_go_with_the_allocation() -> None:
    """Deleting the allocation (Refresh with LIFETIME 0, RFC 8656 §8) forgets every route."""
    async def main() -> None:
        async with bound() as rig:
            await learn_hello(rig)
            service, a = rig.service, rig.a
            assert service.native is not None and service.native.routes == 1
            a.core.close(rig.clock())
            for t in a.core.datagrams_to_send(rig.clock()):
                a.sock.sendto(t.data, t.destination)
            for _ in range(100):
                if service.server is not None and service.server.allocations == 0:
                    break
                await asyncio.sleep(0.02)
            assert service.native.routes == 0
            rig.send(encode_channel_data(rig.channel, b"gone"))
            await quiet(rig.peer)
            assert stats(service)["relayed_reads"] == 1

    run(main)


def test_routes_expire_with_the_permission_even_if_the_clock_steps_back() -> None:
    """Past the permission's 300 s (RFC 8656 §9) a read goes to the core, which drops it and
    sweeps the permission; the routes learnt before are forgotten, so a wall clock stepped
    back afterwards does not revive them."""
    async def main() -> None:
        async with bound() as rig:
            await learn_hello(rig)
            rig.clock.now += 301
            rig.send(encode_channel_data(rig.channel, b"late"))
            await quiet(rig.peer)
            assert stats(rig.service)["expired"] == 1
            assert rig.service.native is not None and rig.service.native.routes == 0
            rig.clock.now -= 301
            rig.send(encode_channel_data(rig.channel, b"again"))
            await quiet(rig.peer)
            assert stats(rig.service)["relayed_reads"] == 1

    run(main)


def test_rate_limit_or_native_false_keep_everything_in_the_core() -> None:
    async def main() -> None:
        limited = await TurnService.start(replace(CONFIG, bytes_per_s_per_node=10_000_000),
                                          primary_ip="127.0.0.1", port=0, alt_port=0,
                                          tcp=False)
        off = await TurnService.start(CONFIG, primary_ip="127.0.0.1", port=0, alt_port=0,
                                      tcp=False, native=False)
        try:
            assert limited.native is None and off.native is None
            assert limited.server is not None and limited.server.learned is None
            names = {name for name, _, _ in off.samples()}
            assert "meshd_relay_native_reads_total" not in names
        finally:
            limited.close()
            off.close()

    run(main)


def test_learn_names_the_argument_at_fault() -> None:
    rp = service_module.NATIVE.RelayPath()
    sock, tcp = udp(), socket.socket()
    try:
        fd = sock.fileno()
        good: dict[str, object] = dict(
            in_fd=fd, source=("127.0.0.1", 1), channel=0x4000, out_fd=fd,
            destination=("127.0.0.1", 2), out_channel=None, expires=1.0)
        rp.learn(**good)
        assert rp.routes == 1
        rp.learn(**good)  # the same key: replaced
        assert rp.routes == 1
        changes: list[tuple[dict[str, object], type[Exception], str]] = [
            ({"in_fd": tcp.fileno()}, ValueError, "in_fd .* is not a UDP socket"),
            ({"out_fd": 99999}, ValueError, "out_fd 99999 is not a UDP socket"),
            ({"channel": 0x3FFF}, ValueError, "channel 0x3fff is not a channel number"),
            ({"out_channel": 0x8000}, ValueError, "out_channel 0x8000"),
            ({"source": ("::1", 1)}, ValueError, "source .* is IPv6 but the socket is IPv4"),
            ({"destination": ("nowhere", 1)}, ValueError, "destination host 'nowhere'"),
            ({"destination": ("127.0.0.1", 70000)}, ValueError, "destination port 70000"),
            ({"source": "127.0.0.1"}, TypeError, "source must be"),
            ({"channel": None, "out_channel": None}, ValueError, "needs a channel"),
        ]
        for change, error, text in changes:
            with pytest.raises(error, match=text):
                rp.learn(**{**good, **change})
        rp.forget()
        assert rp.routes == 0
    finally:
        sock.close()
        tcp.close()


@st.composite
def reads(draw: st.DrawFn) -> list[bytes]:
    """What a client may send on the listening socket: ChannelData of the bound channel (right,
    short, overlong, padded), of other channels, STUN-looking bytes, garbage."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["good", "length", "channel", "garbage"]))
        payload = draw(st.binary(max_size=64))
        if kind == "good":
            out.append(encode_channel_data(0x4000, payload) + draw(st.binary(max_size=3)))
        elif kind == "length":
            length = draw(st.integers(0, 0xFFFF))
            out.append(b"\x40\x00" + length.to_bytes(2, "big") + payload)
        elif kind == "channel":
            number = draw(st.integers(0x4001, 0x7FFF))
            out.append(number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload)
        else:
            out.append(draw(st.binary(max_size=40)))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads())
def test_any_client_bytes_relay_as_the_core_would(datagrams: list[bytes]) -> None:
    """Hypothesis: after a route is learnt, whatever a client sends reaches the peer exactly as
    through the core alone (a second service with `native=False`), and nothing crashes."""
    async def one(native: bool) -> list[bytes]:
        async with bound(native) as rig:
            assert rig.channel == 0x4000
            rig.send(encode_channel_data(rig.channel, b"learn"))
            await receive(rig.peer, 1)
            for datagram in datagrams:
                rig.send(datagram)
            rig.send(encode_channel_data(rig.channel, b"end"))
            got = []
            while (data := (await receive(rig.peer, 1))[0][0]) != b"end":
                got.append(data)
            return got

    async def main() -> None:
        assert await one(True) == await one(False)

    run(main)
