"""The relay's batched data path: `Batcher` runs, and `TurnServer.handle_reads` (coalesced reads
in, `TransmitBatch`es out) enforcing exactly what `handle_datagram` enforces, on a virtual
clock."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshd.stun.codec import Data, MessageClass, Method, StunMessage, XorPeerAddress, encode_message
from meshd.stun.server import ServerAddresses, StunServer
from meshd.turn.client import (
    Allocated,
    AllocationClosed,
    ChannelBound,
    PermissionCreated,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import mint_credentials
from meshd.turn.fastpath import Batcher, TransmitBatch, read_count
from meshd.turn.framing import CHANNEL_HEADER, encode_channel_data
from meshd.turn.ports import MemoryRelayPorts
from meshd.turn.server import (
    FiveTuple,
    Output,
    StreamWrite,
    Transport,
    TurnServer,
    TurnServerConfig,
)
from meshd.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, Address, Read, Transmit, split_read

EPOCH = 1_700_000_000.0
P = "198.51.100.1"
LISTEN: Address = (P, 3478)
CLIENT: Address = ("203.0.113.7", 40001)
PEER: Address = ("192.0.2.50", 6000)
SECRET = b"s3cret"
CONFIG = TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip=P, min_port=50000,
                          max_port=50099)
A: Address = ("10.0.0.1", 1)
B: Address = ("10.0.0.2", 2)
C: Address = ("10.0.0.3", 3)


def flat(outputs: Sequence[Output]) -> list[tuple[Address, Address, bytes]]:
    """Every UDP datagram of `outputs`, batches cut back into datagrams, in order."""
    out: list[tuple[Address, Address, bytes]] = []
    for o in outputs:
        if isinstance(o, TransmitBatch):
            out += [(o.source, o.destination, d) for d in o.datagrams()]
        elif isinstance(o, Transmit):
            out.append((o.source, o.destination, o.data))
    return out


def burst(*datagrams: bytes) -> bytes:
    """Datagrams as a GRO read holds them (all the size of the first, the last may be less)."""
    assert all(len(d) == len(datagrams[0]) for d in datagrams[:-1])
    return b"".join(datagrams)


# --- Batcher ---------------------------------------------------------------------------------


def test_batcher_joins_equal_datagrams_to_one_destination() -> None:
    b = Batcher()
    for i in range(5):
        b.add(A, B, bytes([i]) * 100)
    b.add(A, B, b"short")  # the last one may be shorter: it closes the run
    b.add(A, B, bytes(100))
    out = b.finish()
    assert out == [TransmitBatch(A, B, b"".join(bytes([i]) * 100 for i in range(5)) + b"short",
                                 100),
                   Transmit(A, B, bytes(100))]
    assert isinstance(out[0], TransmitBatch) and out[0].count == 6
    assert b.finish() == []


def test_batcher_never_reorders_and_splits_on_every_difference() -> None:
    b = Batcher()
    b.add(A, B, b"1111")
    b.add(A, C, b"2222")  # another destination
    b.add(A, B, b"3333")
    b.add(C, B, b"4444")  # another source
    b.add(C, B, b"55555")  # longer than the run's size
    b.add(C, B, b"")  # empty datagrams never join a run
    b.add(C, B, b"")
    assert flat(b.finish()) == [(A, B, b"1111"), (A, C, b"2222"), (A, B, b"3333"),
                                      (C, B, b"4444"), (C, B, b"55555"), (C, B, b""),
                                      (C, B, b"")]


def test_batcher_respects_the_kernel_limits() -> None:
    b = Batcher()
    for _ in range(GSO_MAX_SEGMENTS + 1):
        b.add(A, B, bytes(10))
    counts = [o.count if isinstance(o, TransmitBatch) else 1 for o in b.finish()]
    assert counts == [GSO_MAX_SEGMENTS, 1]
    size = 1400
    for _ in range(60):
        b.add(A, B, bytes(size))
    out = b.finish()
    assert all(isinstance(o, TransmitBatch) and len(o.data) <= GSO_MAX_BYTES for o in out)
    assert [o.count for o in out if isinstance(o, TransmitBatch)] == [
        GSO_MAX_BYTES // size, 60 - GSO_MAX_BYTES // size]


RUN = st.tuples(st.sampled_from([A, C]), st.sampled_from([B, C]),
                st.sampled_from([0, 1, 700, 1400, 40000]), st.integers(1, 70),
                st.integers(0, 1500))


@given(st.lists(RUN, max_size=8))
def test_add_many_is_add_one_by_one(runs: list[tuple[Address, Address, int, int, int]]) -> None:
    one, many = Batcher(), Batcher()
    for source, destination, size, count, last in runs:
        datagrams = [bytes(size)] * (count - 1) + [bytes(min(last, size))]
        for d in datagrams:
            one.add(source, destination, d)
        many.add_many(source, destination, datagrams)
    assert many.finish() == one.finish()


def test_add_block_cuts_to_the_kernel_limits_and_keeps_order() -> None:
    b = Batcher()
    b.add(A, B, b"before")
    block = b"".join(bytes([i % 256]) * 1000 for i in range(100)) + b"end"
    b.add_block(A, B, block, 1000)
    b.add_block(A, C, b"xy", 1)
    b.add_block(A, C, b"z", 1)
    out = b.finish()
    assert out[0] == Transmit(A, B, b"before")
    batches = out[1:-2]
    assert [o.count for o in batches if isinstance(o, TransmitBatch)] == [
        GSO_MAX_SEGMENTS, 101 - GSO_MAX_SEGMENTS]
    assert flat(batches) == [(A, B, d) for d in split_read(block, 1000)]
    assert out[-2:] == [TransmitBatch(A, C, b"xy", 1), Transmit(A, C, b"z")]


def test_read_helpers() -> None:
    assert read_count(10, 0) == read_count(0, 0) == read_count(10, 10) == 1
    assert read_count(10, 4) == 3
    assert split_read(b"abcdefghij", 4) == [b"abcd", b"efgh", b"ij"]
    assert split_read(b"abc", 0) == [b"abc"]


# --- the core's fast path ----------------------------------------------------------------------


class Agent:
    """meshd's `TurnClient` core against the server core, in memory, on a virtual clock."""

    def __init__(self, server: TurnServer, *, client: Address = CLIENT,
                 transport: Transport = Transport.UDP) -> None:
        self.server = server
        self.flow = FiveTuple(transport, client, LISTEN)
        self.now = EPOCH
        self.client = TurnClient(LISTEN, mint_credentials(SECRET, "node-a", EPOCH, 7200),
                                 local=client, rng=random.Random(1),
                                 config=TurnClientConfig(transport=transport, lifetime_s=3600))
        self.relayed: Address | None = None

    def pump(self, kind: type[TurnEvent]) -> TurnEvent:
        """Exchange messages until the client core emits a `kind` event."""
        for _ in range(10):
            for t in self.client.datagrams_to_send(self.now):
                self.deliver(self.feed(t.data))
            while (event := self.client.next_event()) is not None:
                if isinstance(event, kind):
                    return event
        raise AssertionError(f"no {kind.__name__}")

    def feed(self, data: bytes) -> list[Output]:
        if self.flow.transport is Transport.UDP:
            return self.server.handle_datagram(data, self.flow.client, LISTEN, self.now)
        return self.server.stream_received(self.flow, data, self.now)

    def deliver(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Transmit) and o.destination == self.flow.client:
                self.client.handle_datagram(o.data, LISTEN, self.now)
            elif isinstance(o, StreamWrite):
                self.client.receive_stream(o.data, self.now)

    def permit(self, ip: str) -> None:
        self.client.create_permission(ip, self.now)
        self.pump(PermissionCreated)


def make_server(config: TurnServerConfig = CONFIG) -> TurnServer:
    stun = StunServer(ServerAddresses(P, 3478, 3479))
    return TurnServer(config, MemoryRelayPorts(), stun=stun, rng=random.Random(7),
                      nonce_key=b"k")


def allocated(server: TurnServer | None = None, *, client: Address = CLIENT,
              transport: Transport = Transport.UDP) -> Agent:
    agent = Agent(server or make_server(), client=client, transport=transport)
    agent.client.allocate(agent.now)
    event = agent.pump(Allocated)
    assert isinstance(event, Allocated)
    agent.relayed = event.relayed
    return agent


def channel_agent(server: TurnServer | None = None, *,
                  transport: Transport = Transport.UDP) -> Agent:
    agent = allocated(server, transport=transport)
    assert agent.client.bind_channel(PEER, agent.now) == 0x4000
    agent.pump(ChannelBound)
    return agent


def client_reads(agent: Agent, *reads: tuple[bytes, int]) -> list[Output]:
    return agent.server.handle_reads([(d, s, agent.flow.client) for d, s in reads], LISTEN,
                                     agent.now)


def peer_reads(agent: Agent, *reads: tuple[bytes, int], peer: Address = PEER) -> list[Output]:
    assert agent.relayed is not None
    return agent.server.handle_reads([(d, s, peer) for d, s in reads], agent.relayed,
                                     agent.now)


def test_a_coalesced_channel_data_burst_leaves_as_one_batch() -> None:
    agent = channel_agent()
    payloads = [bytes([i]) * 1200 for i in range(10)] + [b"tail"]
    data = burst(*(encode_channel_data(0x4000, p) for p in payloads))
    out = client_reads(agent, (data, 1204))
    assert out == [TransmitBatch(agent.relayed, PEER, b"".join(payloads), 1200)]  # type: ignore[arg-type]
    m = agent.server.metrics
    assert (m.bytes_out, m.datagrams_out) == (12004, 11)
    assert (m.coalesced_reads, m.batches, m.batched_datagrams) == (1, 1, 11)
    assert ("meshd_relay_batches_total", {}, 1) in agent.server.samples()


def test_a_peer_burst_reaches_the_client_as_channel_data_in_one_batch() -> None:
    agent = channel_agent()
    payloads = [bytes([i]) * 1000 for i in range(7)] + [b"xyz"]
    out = peer_reads(agent, (burst(*payloads), 1000))
    (batch,) = out
    assert isinstance(batch, TransmitBatch)
    assert (batch.source, batch.destination, batch.segment) == (LISTEN, agent.flow.client, 1004)
    assert batch.datagrams() == [encode_channel_data(0x4000, p) for p in payloads]
    m = agent.server.metrics
    assert (m.bytes_in, m.datagrams_in, m.coalesced_reads) == (7003, 8, 1)


def test_single_datagram_reads_of_one_wake_up_join_one_run() -> None:
    agent = channel_agent()
    frame = encode_channel_data(0x4000, bytes(500))
    out = client_reads(agent, (frame, 0), (frame, 0), (frame, 0))
    assert out == [TransmitBatch(agent.relayed, PEER, bytes(1500), 500)]  # type: ignore[arg-type]


def test_a_coalesced_read_stays_a_run_of_its_own() -> None:
    """A GRO read is one GSO send of the client (a meshd tunnel message of several fragments,
    all full-size here): it never joins other reads, so the peer gets it as one burst."""
    agent = channel_agent()
    frame = encode_channel_data(0x4000, bytes(500))
    out = client_reads(agent, (frame * 3, 504), (frame, 0), (frame * 2, 504), (frame * 2, 504))
    assert out == [
        TransmitBatch(agent.relayed, PEER, bytes(1500), 500),  # type: ignore[arg-type]
        Transmit(agent.relayed, PEER, bytes(500)),  # type: ignore[arg-type]
        TransmitBatch(agent.relayed, PEER, bytes(1000), 500),  # type: ignore[arg-type]
        TransmitBatch(agent.relayed, PEER, bytes(1000), 500),  # type: ignore[arg-type]
    ]
    # The same towards a client: what a peer's GSO send brought stays one burst.
    out = peer_reads(agent, (bytes(60), 30), (bytes(60), 30))
    assert [o.count for o in out] == [2, 2]  # type: ignore[union-attr]


def test_no_open_relay_on_the_fast_path() -> None:
    server = make_server()
    agent = allocated(server)
    frame = encode_channel_data(0x4000, b"x" * 40)
    # No channel bound: nothing leaves, from the client or from the peer.
    assert client_reads(agent, (frame * 4, 44)) == []
    assert peer_reads(agent, (b"y" * 40 * 4, 40)) == []
    assert server.metrics.dropped_no_permission == 8
    # A 5-tuple without allocation (another client of the same server) relays nothing.
    stranger = Agent(server, client=("203.0.113.99", 1))
    assert client_reads(stranger, (frame * 4, 44)) == []
    assert server.metrics.dropped_no_allocation == 4
    # A relayed address nobody holds (closed meanwhile) drops too.
    assert server.handle_reads([(b"z" * 30, 10, PEER)], ("198.51.100.1", 1), EPOCH) == []
    assert server.metrics.dropped_no_allocation == 7


def test_peers_without_permission_are_dropped_per_datagram() -> None:
    agent = channel_agent()
    assert peer_reads(agent, (bytes(90), 30), peer=("192.0.2.99", PEER[1])) == []
    assert agent.server.metrics.dropped_no_permission == 3
    # Another port of a permitted IP: permitted (RFC 8656 §9), but no channel: Data indications.
    out = peer_reads(agent, (bytes(90), 30), peer=(PEER[0], 1))
    assert len(flat(out)) == 3 and all(d[0] < 0x40 for _, _, d in flat(out))


def test_permission_and_channel_expiry_on_the_injected_clock() -> None:
    agent = channel_agent()
    frame = encode_channel_data(0x4000, b"p" * 20)
    agent.now = EPOCH + 299
    assert len(flat(client_reads(agent, (frame * 2, 24)))) == 2
    agent.now = EPOCH + 301  # the permission (300 s) is gone, the channel (600 s) is not
    assert client_reads(agent, (frame * 2, 24)) == []
    assert peer_reads(agent, (b"q" * 40, 20)) == []
    assert agent.server.metrics.dropped_no_permission == 4
    agent.now = EPOCH + 350
    agent.permit(PEER[0])  # until 650 s
    assert len(flat(peer_reads(agent, (b"q" * 40, 20)))) == 2
    agent.now = EPOCH + 601  # the channel is gone (swept by the timer at the next read)
    assert client_reads(agent, (frame, 0)) == []
    (_, _, raw), = flat(peer_reads(agent, (b"q", 0)))
    assert raw[0] < 0x40  # a Data indication now


def test_rate_limit_per_node_on_the_fast_path() -> None:
    server = make_server(replace(CONFIG, bytes_per_s_per_node=550))
    agent = channel_agent(server)
    frame = encode_channel_data(0x4000, bytes(100))
    assert len(flat(client_reads(agent, (frame * 10, 104)))) == 5
    assert peer_reads(agent, (bytes(100), 0)) == []  # the budget is shared by both directions
    agent.now += 0.2
    assert len(flat(peer_reads(agent, (bytes(300), 100)))) == 1
    assert server.metrics.dropped_rate_limited == 8


def test_garbage_in_a_burst_is_dropped_and_counted() -> None:
    agent = channel_agent()
    good = encode_channel_data(0x4000, b"g" * 8)  # 12 bytes
    overrun = CHANNEL_HEADER.pack(0x4000, 9) + b"g" * 8
    unbound = encode_channel_data(0x4001, b"g" * 8)
    padded = CHANNEL_HEADER.pack(0x4000, 5) + b"hello\0\0\0"  # UDP may pad too (§12.5)
    junk = b"\xff" * 12
    data = burst(good, overrun, unbound, padded, junk, b"\x40")  # the last one: truncated
    out = client_reads(agent, (data, 12))
    assert flat(out) == [(agent.relayed, PEER, b"g" * 8), (agent.relayed, PEER, b"hello")]
    m = agent.server.metrics
    assert (m.dropped_malformed, m.dropped_no_permission) == (3, 1)
    assert client_reads(agent, (b"", 0)) == []  # an empty datagram
    assert m.dropped_malformed == 4


def test_requests_inside_a_burst_take_effect_in_order() -> None:
    agent = channel_agent()
    frame = encode_channel_data(0x4000, b"f" * 8)
    indication = encode_message(StunMessage(MessageClass.INDICATION, Method.SEND, bytes(12),
                                            (XorPeerAddress(PEER), Data(b"s"))))
    agent.client.close(agent.now)
    (delete,) = agent.client.datagrams_to_send(agent.now)  # Refresh, LIFETIME 0
    out = client_reads(agent, (frame, 0), (indication, 0), (delete.data, 0), (frame, 0))
    sent = flat(out)
    assert [d for _, _, d in sent[:2]] == [b"f" * 8, b"s"]
    assert sent[2][1] == agent.flow.client  # the Refresh answer
    assert len(sent) == 3  # the last ChannelData came after the allocation was deleted
    assert agent.server.metrics.dropped_no_allocation == 1


def test_tcp_clients_get_padded_frames_one_by_one() -> None:
    agent = channel_agent(transport=Transport.TCP)
    out = peer_reads(agent, (b"abcde" * 3, 5))
    assert out == [StreamWrite(agent.flow, encode_channel_data(0x4000, b"abcde", pad=True))] * 3


def two_relayed_nodes(config: TurnServerConfig = CONFIG) -> tuple[Agent, Agent]:
    """Two clients of one server whose channels point at each other's relayed address (two
    nodes behind symmetric NATs talking relay to relay)."""
    server = make_server(config)
    a = allocated(server)
    b = allocated(server, client=("203.0.113.8", 40002))
    assert a.relayed is not None and b.relayed is not None
    assert a.client.bind_channel(b.relayed, a.now) == 0x4000
    a.pump(ChannelBound)
    assert b.client.bind_channel(a.relayed, b.now) == 0x4000
    b.pump(ChannelBound)
    return a, b


def test_relay_to_relay_skips_the_kernel_with_the_same_checks() -> None:
    a, b = two_relayed_nodes()
    payloads = [bytes([i]) * 1300 for i in range(5)]
    out = client_reads(a, (b"".join(encode_channel_data(0x4000, p) for p in payloads), 1304))
    # What the kernel path would do: a's relayed socket sends to b's, b's core relays it.
    server = a.server
    assert b.relayed is not None and a.relayed is not None
    slow = [o for p in payloads
            for o in server.handle_datagram(p, a.relayed, b.relayed, a.now)]
    assert flat(out) == flat(slow)
    assert flat(out) == [(LISTEN, b.flow.client, encode_channel_data(0x4000, p))
                         for p in payloads]
    m = server.metrics
    assert m.relayed_locally == 5 and m.datagrams_out == 5 and m.datagrams_in == 10


def test_a_burst_with_a_shorter_last_datagram_stays_one_send() -> None:
    """A meshd tunnel message (full-size fragments and a shorter last one, one GSO send of the
    agent) leaves as one batch, relay to relay and to an outside peer: the receiving agent gets
    it as one coalesced read and opens it whole."""
    a, b = two_relayed_nodes()
    payloads = [bytes([i]) * 1421 for i in range(44)] + [bytes(630)]
    read = burst(*(encode_channel_data(0x4000, p) for p in payloads))
    out = client_reads(a, (read, 1425))
    assert b.relayed is not None and a.relayed is not None
    slow = [o for p in payloads for o in a.server.handle_datagram(p, a.relayed, b.relayed, a.now)]
    assert flat(out) == flat(slow)
    assert out == [TransmitBatch(LISTEN, b.flow.client, read, 1425)]
    m = a.server.metrics
    assert (m.relayed_locally, m.datagrams_out, m.datagrams_in) == (45, 45, 90)
    outside = channel_agent()
    out = client_reads(outside, (read, 1425))
    assert out == [TransmitBatch(outside.relayed, PEER, b"".join(payloads), 1421)]  # type: ignore[arg-type]
    # A last datagram of another channel is not part of the run: the loop handles it.
    mixed = burst(*(encode_channel_data(0x4000, p) for p in payloads[:-1]),
                  encode_channel_data(0x4001, payloads[-1]))
    assert flat(client_reads(outside, (mixed, 1425)))[:44] == [
        (outside.relayed, PEER, p) for p in payloads[:-1]]


def test_relay_to_relay_needs_the_receivers_permission() -> None:
    a, b = two_relayed_nodes()
    b.client.close(b.now)
    b.pump(AllocationClosed)  # b's relayed address is gone: nothing is delivered
    assert client_reads(a, (encode_channel_data(0x4000, b"x"), 0)) == [
        Transmit(a.relayed, b.relayed, b"x")]  # type: ignore[arg-type]
    a2, b2 = two_relayed_nodes()
    b2.now = a2.now = EPOCH + 301  # b2's permission for a2's relay IP ran out (a2 refreshes)
    a2.permit(P)
    assert client_reads(a2, (encode_channel_data(0x4000, b"x"), 0)) == []
    assert a2.server.metrics.dropped_no_permission == 1


def test_no_local_shortcut_behind_an_external_address() -> None:
    a, b = two_relayed_nodes(replace(CONFIG, external_ip="192.0.2.1"))
    assert b.relayed is not None and b.relayed[0] == "192.0.2.1"
    (out,) = client_reads(a, (encode_channel_data(0x4000, b"x"), 0))
    assert isinstance(out, Transmit) and out.destination == b.relayed


# --- the fast path is the slow path, batched ----------------------------------------------------

FRAME_KINDS = ("valid", "unbound", "short-length", "overrun", "stun", "junk")
READ = st.tuples(
    st.sampled_from(["client", "stranger", "peer", "peer-other-port", "peer-unknown"]),
    st.integers(5, 40),  # segment size
    st.lists(st.sampled_from(FRAME_KINDS), min_size=1, max_size=6),
    st.integers(1, 5),  # length of the last datagram (may be shorter)
    st.sampled_from([0.0, 0.0, 1.0, 200.0]),  # time passing before the read
    st.booleans(),  # every datagram valid (the uniform read of bulk traffic)
)


def build(kind: str, size: int, rnd: random.Random) -> bytes:
    body = rnd.randbytes(max(size - 4, 0))
    if kind == "valid":
        return (CHANNEL_HEADER.pack(0x4000, len(body)) + body)[:size]
    if kind == "unbound":
        return (CHANNEL_HEADER.pack(0x4001, len(body)) + body)[:size]
    if kind == "short-length":
        return (CHANNEL_HEADER.pack(0x4000, max(len(body) - 2, 0)) + body)[:size]
    if kind == "overrun":
        return (CHANNEL_HEADER.pack(0x4000, len(body) + 1) + body)[:size]
    if kind == "stun":
        return (b"\x00\x01" + rnd.randbytes(size))[:size]
    return (b"\xc0" + rnd.randbytes(size))[:size]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(READ, min_size=1, max_size=12), st.integers(0, 2**32), st.booleans())
def test_handle_reads_equals_handle_datagram_per_datagram(
        reads: list[tuple[str, int, list[str], int, float, bool]], seed: int,
        limited: bool) -> None:
    config = replace(CONFIG, bytes_per_s_per_node=300 if limited else 0)
    agents = [channel_agent(make_server(config)) for _ in range(2)]
    for agent in agents:
        agent.permit("192.0.2.77")
    one, many = agents
    rnd = random.Random(seed)
    sources = {"client": one.flow.client, "stranger": ("203.0.113.99", 9), "peer": PEER,
               "peer-other-port": (PEER[0], 7), "peer-unknown": ("192.0.2.200", 1)}
    for where, segment, kinds, last, later, uniform in reads:
        if uniform:
            kinds = ["valid"] * len(kinds)
        for agent in agents:
            agent.now += later
        sizes = [segment] * len(kinds)
        sizes[-1] = min(last + 3, segment)
        datagrams = [build(k, n, rnd) for k, n in zip(kinds, sizes, strict=True)]
        if where.startswith("peer"):
            datagrams = [rnd.randbytes(n) for n in sizes]
        source = sources[where]
        local = one.relayed if where.startswith("peer") else LISTEN
        assert local is not None
        expected: list[Output] = []
        for d in datagrams:
            expected += one.server.handle_datagram(d, source, local, one.now)
        read: Read = (b"".join(datagrams), segment if len(datagrams) > 1 else 0, source)
        got = many.server.handle_reads([read], local, many.now)
        assert flat(got) == flat(expected)
        assert [o for o in got if isinstance(o, StreamWrite)] == []
    m1, m2 = one.server.metrics, many.server.metrics
    for name in ("bytes_in", "bytes_out", "datagrams_in", "datagrams_out",
                 "dropped_no_permission", "dropped_rate_limited", "dropped_malformed",
                 "dropped_no_allocation", "requests"):
        assert getattr(m1, name) == getattr(m2, name), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(5, 40), st.lists(st.sampled_from(FRAME_KINDS),
                                                         min_size=1, max_size=6),
                          st.booleans(), st.sampled_from([0.0, 0.0, 200.0, 400.0])),
                min_size=1, max_size=8),
       st.integers(0, 2**32))
def test_relay_to_relay_equals_the_way_through_the_kernel(
        reads: list[tuple[int, list[str], bool, float]], seed: int) -> None:
    """a's ChannelData to b's relayed address: `handle_reads` (delivered inside the server)
    against `handle_datagram` twice (a's relayed socket sends, b's relayed socket reads)."""
    (one_a, one_b), (many_a, _) = two_relayed_nodes(), two_relayed_nodes()
    rnd = random.Random(seed)
    for segment, kinds, uniform, later in reads:
        if uniform:
            kinds = ["valid"] * len(kinds)
        for agent in (one_a, one_b, many_a):
            agent.now += later
        datagrams = [build(k, segment, rnd) for k in kinds]
        expected: list[Output] = []
        for d in datagrams:
            for o in one_a.server.handle_datagram(d, one_a.flow.client, LISTEN, one_a.now):
                if isinstance(o, Transmit) and o.destination == one_b.relayed:
                    expected += one_a.server.handle_datagram(o.data, o.source, o.destination,
                                                             one_a.now)
                else:
                    expected.append(o)
        read: Read = (b"".join(datagrams), segment if len(datagrams) > 1 else 0,
                      many_a.flow.client)
        assert flat(many_a.server.handle_reads([read], LISTEN, many_a.now)) == flat(expected)
    m1, m2 = one_a.server.metrics, many_a.server.metrics
    for name in ("bytes_in", "bytes_out", "datagrams_in", "datagrams_out",
                 "dropped_no_permission", "dropped_malformed", "dropped_no_allocation"):
        assert getattr(m1, name) == getattr(m2, name), name


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.integers(-3, 80),
                          st.sampled_from(["client", "peer", "other"]),
                          st.sampled_from(["listen", "relayed", "unknown"])), max_size=10))
@example([(b"@\x00", 1, "client", "listen")])  # segment under the ChannelData header (found)
@example([(b"@\x00\x00\xff" * 3, 3, "client", "listen")])
def test_garbage_reads_never_raise(reads: list[tuple[bytes, int, str, str]]) -> None:
    agent = channel_agent()
    assert agent.relayed is not None
    sources = {"client": agent.flow.client, "peer": PEER, "other": ("192.0.2.9", 9)}
    locals_ = {"listen": LISTEN, "relayed": agent.relayed, "unknown": ("192.0.2.1", 1)}
    for data, segment, source, local in reads:
        for o in agent.server.handle_reads([(data, segment, sources[source])], locals_[local],
                                           agent.now):
            assert isinstance(o, Transmit | TransmitBatch)


@pytest.mark.parametrize("segment", [0, 3])
def test_reads_on_an_unknown_local_address_are_counted(segment: int) -> None:
    server = make_server()
    server.handle_reads([(b"abcdefg", segment, PEER)], ("192.0.2.1", 9), EPOCH)
    assert server.metrics.dropped_no_allocation == (3 if segment else 1)
