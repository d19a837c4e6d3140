"""meshd.tunnel.endpoint: one node's sessions behind one demultiplexer, several nodes on a
virtual switch."""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import ipaddress
import random
import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeweave.pki import CertificateAuthority, node_identity
from meshd.tunnel.endpoint import TunnelEndpoint
from meshd.tunnel.identity import CAPeerVerifier, LocalIdentity, Peer
from meshd.tunnel.offload import PLAIN_HEADER
from meshd.tunnel.session import (
    DecryptedPackets,
    Event,
    HandshakeComplete,
    Rejected,
    RejectReason,
    State,
    TunnelConfig,
)
from meshd.tunnel.wire import TYPE_DATA, TYPE_INITIATION, OverlayAddress
from meshd.udp import split_read

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NODES = ["edge-a", "edge-b", "edge-c"]
OVERLAY: dict[str, OverlayAddress] = {
    n: ipaddress.IPv4Address(f"100.64.0.{i + 1}") for i, n in enumerate(NODES)
}
CA = CertificateAuthority.generate(now=NOW)
VERIFIER = CAPeerVerifier(CA.cert, lambda n: [OVERLAY[n]] if n in OVERLAY else [])

# Both data paths: the extension's counters and replay windows, and the pure-Python ones.
pytestmark = pytest.mark.usefixtures("data_path")


def identity(node: str) -> LocalIdentity:
    issued = CA.issue_client_cert(node_identity(node), now=NOW)
    static = X25519PrivateKey.from_private_bytes(hashlib.sha256(node.encode()).digest())
    return LocalIdentity.create(static, issued.cert, issued.key, OVERLAY[node])


IDS = {n: identity(n) for n in NODES}


def packet(src: str, dst: str, seq: int) -> bytes:
    body = struct.pack("!Q", seq) + bytes(32)
    return struct.pack("!BBHIBBH4s4s", 0x45, 0, 20 + len(body), 0, 64, 17, 0,
                       OVERLAY[src].packed, OVERLAY[dst].packed) + body


class Switch:
    """Endpoints by node name; datagrams take 10 ms; one batch per node per arrival time."""

    def __init__(self, *, accept_unknown: bool = True) -> None:
        self.now = 0.0
        self.endpoints = {
            n: TunnelEndpoint(IDS[n], VERIFIER, rng=random.Random(i),
                              wall_offset=NOW.timestamp(), accept_unknown_peers=accept_unknown)
            for i, n in enumerate(NODES)
        }
        self.flight: list[tuple[float, int, str, str, bytes]] = []
        self.seq = 0
        self.events: dict[str, list[Event]] = {n: [] for n in NODES}

    def know(self, node: str, other: str) -> None:
        self.endpoints[node].add_peer(Peer(other, IDS[other].static_public))

    def send(self, src: str, dst: str, packets: list[bytes]) -> None:
        for d in self.endpoints[src].encrypt(dst, packets, self.now):
            self.put(src, dst, d)
        self.drain()

    def put(self, src: str, dst: str, datagram: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.flight, (self.now + 0.01, self.seq, src, dst, datagram))

    def drain(self) -> None:
        for node, endpoint in self.endpoints.items():
            for dst, d in endpoint.datagrams_to_send(self.now):
                self.put(node, dst, d)

    def run(self, until: float) -> None:
        while True:
            times = [t for e in self.endpoints.values() if (t := e.get_timer()) is not None]
            if self.flight:
                times.append(self.flight[0][0])
            if not times or min(times) > until:
                break
            self.now = max(self.now, min(times))
            batches: dict[str, list[bytes]] = {n: [] for n in NODES}
            while self.flight and self.flight[0][0] <= self.now:
                _, _, _, dst, d = heapq.heappop(self.flight)
                batches[dst].append(d)
            for node, batch in batches.items():
                if batch:
                    self.events[node].extend(self.endpoints[node].receive_batch(batch, self.now))
            for node, endpoint in self.endpoints.items():
                self.events[node].extend(endpoint.handle_timer(self.now))
            self.drain()
        self.now = until

    def delivered(self, node: str) -> list[tuple[str, int]]:
        return [(e.peer, struct.unpack_from("!Q", p, 20)[0]) for e in self.events[node]
                if isinstance(e, DecryptedPackets) for p in e.packets]


def test_the_responder_learns_who_initiated_from_the_handshake() -> None:
    s = Switch()
    s.know("edge-a", "edge-b")  # b knows nothing about a beforehand
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 1)])
    s.run(1)
    b = s.endpoints["edge-b"]
    assert set(b.sessions) == {"edge-a"}
    assert b.sessions["edge-a"].peer.static_public == IDS["edge-a"].static_public
    assert s.delivered("edge-b") == [("edge-a", 1)]
    s.send("edge-b", "edge-a", [packet("edge-b", "edge-a", 2)])
    s.run(2)
    assert s.delivered("edge-a") == [("edge-b", 2)]


def test_unknown_initiators_can_be_refused() -> None:
    s = Switch(accept_unknown=False)
    s.know("edge-a", "edge-b")
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 1)])
    s.run(0.5)
    assert not s.endpoints["edge-b"].sessions
    rejected = [e for e in s.events["edge-b"] if isinstance(e, Rejected)]
    assert rejected[0] == Rejected(None, RejectReason.WRONG_PEER, 1, "unknown node edge-a")
    s.know("edge-b", "edge-a")  # once the registry lists it, the retry succeeds
    s.run(3)
    assert s.delivered("edge-b") == [("edge-a", 1)]


def test_many_peers_are_demultiplexed_in_one_batch() -> None:
    s = Switch()
    for node in ("edge-a", "edge-c"):
        s.know(node, "edge-b")
        s.send(node, "edge-b", [packet(node, "edge-b", 0)])
    s.run(1)
    for i in range(1, 6):  # interleaved in the same arrival batches at b
        s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", i)])
        s.send("edge-c", "edge-b", [packet("edge-c", "edge-b", 100 + i)])
    s.run(2)
    got = s.delivered("edge-b")
    assert [seq for peer, seq in got if peer == "edge-a"] == list(range(6))
    assert [seq for peer, seq in got if peer == "edge-c"] == [0, *range(101, 106)]
    b = s.endpoints["edge-b"]
    assert {n: x.state for n, x in b.sessions.items()} == {
        "edge-a": State.ESTABLISHED, "edge-c": State.ESTABLISHED
    }
    assert not [e for e in s.events["edge-b"] if isinstance(e, Rejected)]


def test_a_node_cannot_send_as_another_through_its_own_session() -> None:
    s = Switch()
    s.know("edge-c", "edge-b")
    s.send("edge-c", "edge-b", [packet("edge-a", "edge-b", 1), packet("edge-c", "edge-b", 2)])
    s.run(1)
    assert s.delivered("edge-b") == [("edge-c", 2)]
    assert [(e.peer, e.reason) for e in s.events["edge-b"] if isinstance(e, Rejected)] == [
        ("edge-c", RejectReason.SPOOFED_SOURCE)
    ]


def test_a_new_static_key_from_a_handshake_is_taken_over_once_confirmed() -> None:
    s = Switch()
    s.know("edge-a", "edge-b")
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 1)])
    first_initiation = [d for _, _, _, _, d in s.flight if d[0] == TYPE_INITIATION]
    s.run(1)
    # edge-a reinstalls: new static key, same certificate. Its new endpoint initiates.
    issued = CA.issue_client_cert(node_identity("edge-a"), now=NOW)
    fresh = LocalIdentity.create(X25519PrivateKey.generate(), issued.cert, issued.key,
                                 OVERLAY["edge-a"])
    s.endpoints["edge-a"] = TunnelEndpoint(fresh, VERIFIER, wall_offset=NOW.timestamp() + 5)
    s.know("edge-a", "edge-b")
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 2)])
    s.run(2)
    assert s.endpoints["edge-b"].sessions["edge-a"].peer.static_public == fresh.static_public
    assert s.delivered("edge-b") == [("edge-a", 1), ("edge-a", 2)]
    completes = [e for e in s.events["edge-b"] if isinstance(e, HandshakeComplete)]
    assert [e.rekey for e in completes] == [False, True]
    # Replaying edge-a's first initiation (made with its old key) changes nothing.
    events = s.endpoints["edge-b"].receive(first_initiation[0], s.now)
    assert [(e.reason) for e in events if isinstance(e, Rejected)] == [
        RejectReason.STALE_INITIATION
    ]
    assert s.endpoints["edge-b"].sessions["edge-a"].peer.static_public == fresh.static_public


def test_removed_peers_lose_their_keys_and_indexes() -> None:
    s = Switch()
    s.know("edge-a", "edge-b")
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 1)])
    s.run(1)
    b = s.endpoints["edge-b"]
    b.remove_peer("edge-a")
    assert b.session("edge-a") is None and b.get_timer() is None
    s.send("edge-a", "edge-b", [packet("edge-a", "edge-b", 2)])
    s.run(1.5)
    assert b.rejected == {RejectReason.UNKNOWN_INDEX: 1}


def test_stun_and_turn_bytes_are_not_ours() -> None:
    endpoint = TunnelEndpoint(IDS["edge-a"], VERIFIER)
    stun = bytes.fromhex("000100002112a442") + bytes(12)
    channel_data = bytes.fromhex("40000004") + b"data"
    events = endpoint.receive_batch([stun, channel_data, b""], 0.0)
    assert events == [Rejected(None, RejectReason.MALFORMED, 3, "not a tunnel message")]


ENDPOINT = TunnelEndpoint(IDS["edge-b"], VERIFIER, config=TunnelConfig())
ENDPOINT.add_peer(Peer("edge-a", IDS["edge-a"].static_public))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.binary(max_size=700),
    st.tuples(st.sampled_from([TYPE_INITIATION, 0xE2, TYPE_DATA]), st.binary(max_size=700))
    .map(lambda t: bytes([t[0]]) + t[1]),
), max_size=8))
def test_any_bytes_are_dropped_never_raised(datagrams: list[bytes]) -> None:
    events = ENDPOINT.receive_batch(datagrams, 1.0)
    assert all(isinstance(e, Rejected) for e in events)
    assert sum(e.count for e in events if isinstance(e, Rejected)) == len(datagrams)


def test_encrypting_to_an_unknown_node_is_a_local_error() -> None:
    with pytest.raises(KeyError):
        TunnelEndpoint(IDS["edge-a"], VERIFIER).encrypt("edge-z", [b"x"], 0.0)


# -- coalesced reads (UDP GRO) of 0xE4 messages ---------------------------------------------------

GRO_CONFIG = TunnelConfig(max_partial_messages=2, reassembly_timeout=0.5)
WHOLE_READS = [0]  # messages the property test saw taken whole (it must see some)


def gro_pair() -> tuple[TunnelEndpoint, TunnelEndpoint]:
    """edge-a → edge-b with confirmed keys; the same seeds always give the same indexes and
    counters (only the keys differ), so two pairs see the same datagrams' structure."""
    a, b = (TunnelEndpoint(IDS[n], VERIFIER, config=GRO_CONFIG, rng=random.Random(i),
                           wall_offset=NOW.timestamp()) for i, n in enumerate(NODES[:2]))
    a.add_peer(Peer("edge-b", IDS["edge-b"].static_public))
    b.add_peer(Peer("edge-a", IDS["edge-a"].static_public))
    a.encrypt("edge-b", [packet("edge-a", "edge-b", 0)], 0.0)
    for _ in range(3):
        for _, d in a.datagrams_to_send(0.0):
            b.receive(d, 0.0)
        for _, d in b.datagrams_to_send(0.0):
            a.receive(d, 0.0)
    assert b.sessions["edge-a"].state is State.ESTABLISHED
    b.frames_out = True
    return a, b


def plain_frame(size: int, seed: int) -> bytes:
    """An offload frame (no GSO) of `size` IP bytes from edge-a."""
    body = random.Random(seed).randbytes(size - 20)
    return PLAIN_HEADER + struct.pack("!BBHIBBH4s4s", 0x45, 0, size, 0, 64, 17, 0,
                                      OVERLAY["edge-a"].packed, OVERLAY["edge-b"].packed) + body


def gro_reads(messages: list[list[bytes]], ops: list[tuple[int, int, int, int]]
              ) -> list[tuple[float, bytes, int]]:
    """Reads built from `ops` (kind, message, a, b): a whole message, a slice of it, two
    messages back to back, one byte flipped, a truncated copy, garbage, time passing. Items that
    could be one GRO read (all the first one's size but the last, which may be shorter) are
    joined with their segment size; others stay single datagrams."""
    reads: list[tuple[float, bytes, int]] = []
    now = 0.0
    for kind, m, a, b in ops:
        msg = messages[m % len(messages)]
        items: list[bytes]
        if kind == 0:
            items = msg
        elif kind == 1:
            items = msg[a % len(msg):][:1 + b % len(msg)]
        elif kind == 2:
            items = msg + messages[(m + 1 + a) % len(messages)]
        elif kind == 3:
            joined = bytearray(b"".join(msg))
            joined[a * 977 % len(joined)] ^= 1 + b % 255
            size = len(msg[0])
            items = [bytes(joined[k:k + size]) for k in range(0, len(joined), size)]
        elif kind == 4:
            items = [*msg[:-1], msg[-1][:1 + b % len(msg[-1])]]
        elif kind == 5:
            items = [random.Random(a).randbytes(b % 60)]
        else:
            now += (a % 8) / 10
            continue
        shape = len(items) > 1 and all(len(d) == len(items[0]) for d in items[:-1]) \
            and 0 < len(items[-1]) <= len(items[0])
        if shape:
            reads.append((now, b"".join(items), len(items[0])))
        else:
            reads += [(now, d, 0) for d in items]
    return reads


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(21, 1300), st.integers(1500, 6000)), min_size=3,
                max_size=8),
       st.lists(st.tuples(st.integers(0, 6), st.integers(0, 20), st.integers(0, 99),
                          st.integers(0, 99)), max_size=25))
def test_coalesced_reads_deliver_and_count_like_single_datagrams(
    sizes: list[int], ops: list[tuple[int, int, int, int]],
) -> None:
    results = []
    for whole in (False, True):
        a, b = gro_pair()
        frames = [plain_frame(size, i) for i, size in enumerate(sizes)]
        sealed = a.encrypt_frames("edge-b", frames, 0.0)
        messages: list[list[bytes]] = []
        for d in sealed:
            if d[13] == 0:
                messages.append([])
            messages[-1].append(d)
        delivered: list[bytes] = []
        rejected: dict[RejectReason, int] = {}
        for now, data, segment in gro_reads(messages, ops):
            if whole:
                events = b.receive_read(data, segment, now)
            else:
                events = b.receive_batch(split_read(data, segment) if segment else [data], now)
            for e in events:
                if isinstance(e, DecryptedPackets):
                    delivered += e.packets
                elif isinstance(e, Rejected):
                    rejected[e.reason] = rejected.get(e.reason, 0) + e.count
        session = b.sessions["edge-a"]
        results.append((delivered, rejected, dict(b.rejected), session.partial_messages,
                        replace(session.stats(), messages_whole=0)))
        WHOLE_READS[0] += session.stats().messages_whole
    assert results[0] == results[1]


def test_the_property_test_took_the_short_way() -> None:
    if WHOLE_READS[0] == 0:  # run alone (-k): run the property test here
        test_coalesced_reads_deliver_and_count_like_single_datagrams()
    assert WHOLE_READS[0] > 0


def test_a_whole_message_read_takes_the_short_way() -> None:
    a, b = gro_pair()
    frames = [plain_frame(9000, 1), plain_frame(4000, 2)]
    sealed = a.encrypt_frames("edge-b", frames, 0.0)
    first, second = sealed[:7], sealed[7:]
    assert [d[13] for d in first] == list(range(7)) and [d[13] for d in second] == [0, 1, 2]
    events = b.receive_read(b"".join(first), len(first[0]), 0.0)
    assert events == [DecryptedPackets("edge-a", (frames[0],))]
    stats = b.sessions["edge-a"].stats()
    assert stats.messages_whole == stats.messages_received == 1
    # The same read again: a replay, counted per fragment as the per-datagram path does.
    events = b.receive_read(b"".join(first), len(first[0]), 0.0)
    assert events == [Rejected("edge-a", RejectReason.REPLAYED, 7, "")]
    # Part of a message is split and kept for reassembly; its last fragment completes it.
    events = b.receive_read(b"".join(second[:2]), len(second[0]), 0.0)
    assert events == []
    assert b.sessions["edge-a"].partial_messages == 1
    b.receive_read(second[2], 0, 0.0)
    stats = b.sessions["edge-a"].stats()
    assert (stats.messages_received, stats.messages_whole) == (2, 1)


def lone_datagrams(a: TunnelEndpoint, kinds: list[int]) -> list[bytes]:
    """Datagrams edge-a sends one at a time: frames, plain packets, a keepalive, a spoofed or
    malformed frame, by `kinds`."""
    out: list[bytes] = []
    session = a.sessions["edge-b"]
    for i, kind in enumerate(kinds):
        if kind == 0:
            out += a.encrypt_frames("edge-b", [plain_frame(40 + i % 900, i)], 0.0)
        elif kind == 1:
            out += a.encrypt("edge-b", [packet("edge-a", "edge-b", i)], 0.0)
        elif kind == 2:
            session.send_keepalive(0.0)
            out += [d for _, d in a.datagrams_to_send(0.0)]
        elif kind == 3:
            spoofed = bytearray(plain_frame(60, i))
            spoofed[10 + 12:10 + 16] = OVERLAY["edge-c"].packed
            out += a.encrypt_frames("edge-b", [bytes(spoofed)], 0.0)
        else:
            out += a.encrypt_frames("edge-b", [PLAIN_HEADER + b"\x00" * 30], 0.0)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.integers(0, 255)),
                max_size=30))
def test_lone_datagrams_the_short_way_match_the_batch_path(
    kinds: list[int], ops: list[tuple[int, int, int]],
) -> None:
    results = []
    for short in (False, True):
        a, b = gro_pair()
        sent = lone_datagrams(a, kinds)
        packets: list[bytes] = []
        rejected: dict[RejectReason, int] = {}
        now = 0.0
        for kind, i, x in ops:
            d = sent[i % len(sent)]
            if kind == 1:  # altered in flight
                d = d[:x % len(d)] + bytes([d[x % len(d)] ^ (x | 1)]) + d[x % len(d) + 1:]
            elif kind == 2:
                d = d[:x % len(d)]
            elif kind == 3:
                d = bytes([0xE3 + x % 2]) + random.Random(x).randbytes(x % 50)
            elif kind == 4:
                now += x / 10
            if not d:
                continue
            events = (b.receive_one_into(d, now, packets) if short
                      else b.receive_into([d], now, packets))
            for e in events:
                assert isinstance(e, Rejected)
                rejected[e.reason] = rejected.get(e.reason, 0) + e.count
        session = b.sessions["edge-a"]
        results.append((packets, rejected, dict(b.rejected), session.stats(), session.state,
                        b.output_pending))
    assert results[0] == results[1]
