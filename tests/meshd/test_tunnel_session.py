"""meshd.tunnel.session: two sessions against each other on a virtual wire. No sockets, no
sleeping; loss, duplication and tampering are seeded or scripted."""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import ipaddress
import itertools
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeweave.pki import CERT_VALIDITY, CertificateAuthority, node_identity
from meshd.simnet import APDF, EIM, SimNat, SimNetwork
from meshd.tunnel.fastpath import FastStats
from meshd.tunnel.identity import CAPeerVerifier, LocalIdentity, Peer
from meshd.tunnel.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    PLAIN_HEADER,
    VnetHeader,
    encode_vnet_header,
    to_packets,
)
from meshd.tunnel.session import (
    TRANSITIONS,
    DecryptedPackets,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    Rejected,
    RejectReason,
    State,
    Trigger,
    TunnelConfig,
    TunnelSession,
)
from meshd.tunnel.wire import (
    FRAGMENT_HEADER,
    TYPE_DATA,
    TYPE_FRAGMENT,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    OverlayAddress,
)
from meshd.udp import Address, Transmit

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
T0 = NOW.timestamp()
OVERLAY: dict[str, OverlayAddress] = {
    "edge-a": ipaddress.IPv4Address("100.64.0.1"),
    "edge-b": ipaddress.IPv4Address("100.64.0.2"),
    "edge-c": ipaddress.IPv4Address("100.64.0.3"),
    "edge-6": ipaddress.IPv6Address("fd00::6"),
    "edge-7": ipaddress.IPv6Address("fd00::7"),
}

# Both data paths: the extension's counters and replay windows, and the pure-Python ones.
pytestmark = pytest.mark.usefixtures("data_path")


# -- identities (minted once per module: CA work is the slow part) -----------------------------


@dataclass(frozen=True)
class Cluster:
    ca: CertificateAuthority
    verifier: CAPeerVerifier
    ids: dict[str, LocalIdentity]
    minted: dict[str, int]

    def issue(self, node: str, *, ca: CertificateAuthority | None = None,
              overlay: OverlayAddress | None = None,
              validity: dt.timedelta = CERT_VALIDITY) -> LocalIdentity:
        issued = (ca or self.ca).issue_client_cert(node_identity(node), now=NOW,
                                                   validity=validity)
        self.minted[node] = self.minted.get(node, 0) + 1
        # Static keys are derived from the node name, so tie-breaks are the same every run.
        seed = hashlib.sha256(f"{node}/{self.minted[node]}".encode()).digest()
        return LocalIdentity.create(
            X25519PrivateKey.from_private_bytes(seed), issued.cert, issued.key,
            overlay or OVERLAY[node],
        )


def make_cluster() -> Cluster:
    ca = CertificateAuthority.generate(now=NOW)
    verifier = CAPeerVerifier(ca.cert, lambda n: [OVERLAY[n]] if n in OVERLAY else [])
    cluster = Cluster(ca, verifier, {}, {})
    for node in OVERLAY:
        cluster.ids[node] = cluster.issue(node)
    return cluster


CLUSTER = make_cluster()


def peer(node: str, local: LocalIdentity | None = None) -> Peer:
    return Peer(node, (local or CLUSTER.ids[node]).static_public)


def session(
    local: str | LocalIdentity, remote: str, *, config: TunnelConfig | None = None,
    seed: int = 0, remote_key: LocalIdentity | None = None, wall_offset: float = T0,
) -> TunnelSession:
    me = CLUSTER.ids[local] if isinstance(local, str) else local
    return TunnelSession(
        me, peer(remote, remote_key), CLUSTER.verifier, config=config,
        rng=random.Random(seed), wall_offset=wall_offset,
    )


def ip_packet(src: OverlayAddress, dst: OverlayAddress, seq: int, size: int = 100) -> bytes:
    """A minimal IP packet (header + payload) carrying `seq` in its first payload bytes."""
    body = struct.pack("!Q", seq) + bytes(max(0, size - 8))
    if src.version == 4:
        return struct.pack("!BBHIBBH4s4s", 0x45, 0, 20 + len(body), 0, 64, 17, 0,
                           src.packed, dst.packed) + body
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), 17, 64, src.packed, dst.packed) + body


def seq_of(packet: bytes) -> int:
    offset = 20 if packet[0] >> 4 == 4 else 40
    value: int = struct.unpack_from("!Q", packet, offset)[0]
    return value


# -- the two-peer harness --------------------------------------------------------------------------


DropRule = Callable[[str, bytes], bool]


class Wire:
    """Sessions "a" and "b" joined by a wire with latency, seeded loss/duplication and drop
    rules; a virtual clock that jumps from event to event."""

    def __init__(
        self, a: TunnelSession, b: TunnelSession, *, latency: float = 0.01, loss: float = 0.0,
        duplicate: float = 0.0, seed: int = 0,
    ) -> None:
        self.sessions = {"a": a, "b": b}
        self.now = 0.0
        self.latency, self.loss, self.duplicate = latency, loss, duplicate
        self.rng = random.Random(seed)
        self.drop_rules: list[DropRule] = []
        self.flight: list[tuple[float, int, str, bytes]] = []
        self.seq = 0
        self.sent: list[tuple[float, str, bytes]] = []
        """Every datagram put on the wire: (time, sender side, bytes)."""
        self.events: dict[str, list[Event]] = {"a": [], "b": []}
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        """Packets each side decrypted, in order."""

    @property
    def a(self) -> TunnelSession:
        return self.sessions["a"]

    @property
    def b(self) -> TunnelSession:
        return self.sessions["b"]

    def send(self, side: str, packets: list[bytes]) -> None:
        for datagram in self.sessions[side].encrypt(packets, self.now):
            self.transmit(side, datagram)
        self.drain()

    def transmit(self, side: str, datagram: bytes) -> None:
        self.sent.append((self.now, side, datagram))
        if any(rule(side, datagram) for rule in self.drop_rules):
            return
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        to = "b" if side == "a" else "a"
        for copy in range(copies):
            self.seq += 1
            arrival = self.now + self.latency * (1 + copy)
            heapq.heappush(self.flight, (arrival, self.seq, to, datagram))

    def connect(self, side: str) -> None:
        self.sessions[side].start_handshake(self.now)
        self.drain()

    def inject(self, to: str, datagram: bytes) -> list[Event]:
        """Deliver a datagram now, bypassing the wire (an attacker's)."""
        events = self.sessions[to].receive(datagram, self.now)
        self.record(to, events)
        self.drain()
        return events

    def record(self, side: str, events: list[Event]) -> None:
        self.events[side].extend(events)
        for e in events:
            if isinstance(e, DecryptedPackets):
                self.delivered[side].extend(e.packets)

    def drain(self) -> None:
        for side, s in self.sessions.items():
            for datagram in s.datagrams_to_send(self.now):
                self.transmit(side, datagram)

    def next_time(self) -> float | None:
        times = [t for s in self.sessions.values() if (t := s.get_timer()) is not None]
        if self.flight:
            times.append(self.flight[0][0])
        return min(times) if times else None

    def run(self, until: float) -> None:
        """Advance to `until`, delivering datagrams (batched per arrival time) and timers."""
        while (t := self.next_time()) is not None and t <= until:
            self.now = max(self.now, t)
            batches: dict[str, list[bytes]] = {"a": [], "b": []}
            while self.flight and self.flight[0][0] <= self.now:
                _, _, to, datagram = heapq.heappop(self.flight)
                batches[to].append(datagram)
            for side, batch in batches.items():
                if batch:
                    self.record(side, self.sessions[side].receive_batch(batch, self.now))
            for side, s in self.sessions.items():
                timer = s.get_timer()
                if timer is not None and timer <= self.now:
                    self.record(side, s.handle_timer(self.now))
            self.drain()
        self.now = max(self.now, until)

    def of(self, side: str, kind: type[Event]) -> list[Event]:
        return [e for e in self.events[side] if isinstance(e, kind)]

    def rejected(self, side: str) -> dict[RejectReason, int]:
        out: dict[RejectReason, int] = {}
        for e in self.events[side]:
            if isinstance(e, Rejected):
                out[e.reason] = out.get(e.reason, 0) + e.count
        return out

    def sent_of(self, side: str, kind: int) -> list[tuple[float, bytes]]:
        return [(t, d) for t, s, d in self.sent if s == side and d[0] == kind]


def state(s: TunnelSession) -> State:
    """The session's state (a call: mypy must not keep a narrowed type across actions)."""
    return s.state


def packets(src: str, dst: str, seqs: Iterable[int], size: int = 100) -> list[bytes]:
    return [ip_packet(OVERLAY[src], OVERLAY[dst], i, size) for i in seqs]


def pair(config: TunnelConfig | None = None, *, latency: float = 0.01) -> Wire:
    return Wire(session("edge-a", "edge-b", config=config, seed=1),
                session("edge-b", "edge-a", config=config, seed=2), latency=latency)


def established(
    config: TunnelConfig | None = None, *, first: str = "a", latency: float = 0.01
) -> Wire:
    """A pair whose first handshake `first` initiated (with packet seq 0 to the other)."""
    w = pair(config, latency=latency)
    src, dst = ("edge-a", "edge-b") if first == "a" else ("edge-b", "edge-a")
    w.send(first, packets(src, dst, [0]))
    w.run(w.now + 1)
    assert state(w.a) is State.ESTABLISHED and state(w.b) is State.ESTABLISHED
    return w


def drop_first(kind: int, count: int, side: str | None = None) -> DropRule:
    seen = [0]

    def rule(sender: str, datagram: bytes) -> bool:
        if datagram[0] != kind or (side is not None and sender != side):
            return False
        seen[0] += 1
        return seen[0] <= count

    return rule


# -- handshake and data --------------------------------------------------------------------------


def test_first_packets_wait_for_the_handshake_then_flow_both_ways() -> None:
    w = pair()
    assert w.a.get_timer() is None and state(w.a) is State.IDLE
    w.send("a", packets("edge-a", "edge-b", range(3)))
    assert state(w.a) is State.INITIATING and not w.a.can_send
    w.run(1.0)
    assert [seq_of(p) for p in w.delivered["b"]] == [0, 1, 2]
    complete_a = w.of("a", HandshakeComplete)
    complete_b = w.of("b", HandshakeComplete)
    assert complete_a == [HandshakeComplete("edge-b", OVERLAY["edge-b"], True, False)]
    assert complete_b == [HandshakeComplete("edge-a", OVERLAY["edge-a"], False, False)]
    assert w.b.peer_overlay == OVERLAY["edge-a"]
    w.send("b", packets("edge-b", "edge-a", range(10, 15)))
    w.send("a", packets("edge-a", "edge-b", range(3, 6)))
    w.run(2.0)
    assert [seq_of(p) for p in w.delivered["a"]] == list(range(10, 15))
    assert [seq_of(p) for p in w.delivered["b"]] == list(range(6))
    assert not w.rejected("a") and not w.rejected("b")
    # One round trip: the initiation at 0, the response at 0.01, queued data at 0.02.
    assert [round(t, 3) for t, _ in w.sent_of("a", TYPE_INITIATION)] == [0.0]
    stats = w.b.stats()
    assert stats.packets_received == 6 and stats.bytes_received == 6 * 120
    assert stats.state == "established" and stats.handshakes_completed == 1


def test_the_keys_use_the_data_path_under_test(data_path: str) -> None:
    """The `data_path` fixture really swaps the classes (pure: as without the extension)."""
    w = established()
    route = w.a.fast_route(w.now, None)
    assert route is not None
    native = type(route.counter).__module__ == "meshd.tunnel._fastpath"
    assert native is (data_path == "native")
    assert (type(route.replay).__module__ == "meshd.tunnel._fastpath") is native


def test_the_state_table_path_of_a_first_handshake() -> None:
    w = established()
    assert list(w.a.history) == [
        (State.IDLE, Trigger.SEND, State.INITIATING),
        (State.INITIATING, Trigger.RESPONSE, State.ESTABLISHED),
    ]
    assert list(w.b.history) == [
        (State.IDLE, Trigger.INITIATION, State.RESPONDED),
        (State.RESPONDED, Trigger.CONFIRMED, State.ESTABLISHED),
    ]
    assert all(TRANSITIONS[(s, t)] is d for s, t, d in [*w.a.history, *w.b.history])


def test_the_responder_waits_for_key_confirmation_before_sending() -> None:
    w = pair()
    w.drop_rules.append(lambda side, d: side == "a" and d[0] == TYPE_DATA)  # no confirmation
    w.connect("a")
    assert state(w.a) is State.INITIATING
    w.run(0.015)  # the initiation arrived at b
    assert state(w.b) is State.RESPONDED and not w.b.can_send
    assert w.b.encrypt(packets("edge-b", "edge-a", [1]), w.now) == []  # queued, not sent
    w.drop_rules.clear()
    w.run(0.05)
    assert state(w.a) is State.ESTABLISHED
    w.send("a", packets("edge-a", "edge-b", [2]))
    w.run(0.1)
    assert state(w.b) is State.ESTABLISHED
    assert [seq_of(p) for p in w.delivered["a"]] == [1]  # b's queued packet went out then


def test_the_wire_carries_only_ciphertext() -> None:
    """What a relay operator sees: no payload, no certificate, no node name, no overlay."""
    w = established()
    secret = b"the relay must never read this" * 10
    w.send("a", [ip_packet(OVERLAY["edge-a"], OVERLAY["edge-b"], 7, 0) + secret])
    w.send("b", [ip_packet(OVERLAY["edge-b"], OVERLAY["edge-a"], 8, 0) + secret])
    w.run(w.now + 1)
    assert len(w.delivered["a"]) == 1 and w.delivered["b"][-1].endswith(secret)
    cleartexts = [
        secret[:16], b"edge-a", b"edge-b", b"system:node",
        CLUSTER.ids["edge-a"].certificate[40:80], CLUSTER.ids["edge-b"].certificate[40:80],
        CLUSTER.ids["edge-a"].signature[8:40], CLUSTER.ids["edge-a"].static_public,
        OVERLAY["edge-a"].packed + OVERLAY["edge-b"].packed,
    ]
    for _, _, datagram in w.sent:
        assert datagram[0] in (TYPE_INITIATION, TYPE_RESPONSE, TYPE_DATA)
        for clear in cleartexts:
            assert clear not in datagram


def test_ipv6_overlay_addresses() -> None:
    w = Wire(session("edge-6", "edge-7"), session("edge-7", "edge-6"))
    w.send("a", packets("edge-6", "edge-7", range(3)))
    w.run(1.0)
    assert [seq_of(p) for p in w.delivered["b"]] == [0, 1, 2]
    assert w.of("b", HandshakeComplete)[0] == HandshakeComplete(
        "edge-6", OVERLAY["edge-6"], False, False
    )


# -- replay, tampering, windows --------------------------------------------------------------------


def test_replayed_datagrams_are_dropped() -> None:
    w = established()
    w.send("a", packets("edge-a", "edge-b", [1]))
    data = w.sent_of("a", TYPE_DATA)[-1][1]
    w.run(w.now + 1)
    assert len(w.delivered["b"]) == 2
    events = w.inject("b", data)
    assert events == [Rejected("edge-a", RejectReason.REPLAYED, 1, "")]
    assert len(w.delivered["b"]) == 2
    # A replayed initiation is older than the last accepted one: no new keys, no answer.
    initiation = w.sent_of("a", TYPE_INITIATION)[0][1]
    responses = len(w.sent_of("b", TYPE_RESPONSE))
    events = w.inject("b", initiation)
    assert [e.reason for e in events if isinstance(e, Rejected)] == [
        RejectReason.STALE_INITIATION
    ]
    assert len(w.sent_of("b", TYPE_RESPONSE)) == responses
    # A replayed response matches no handshake in flight.
    response = w.sent_of("b", TYPE_RESPONSE)[0][1]
    assert [e.reason for e in w.inject("a", response) if isinstance(e, Rejected)] == [
        RejectReason.UNKNOWN_INDEX
    ]
    w.send("a", packets("edge-a", "edge-b", [2]))
    w.run(w.now + 1)
    assert [seq_of(p) for p in w.delivered["b"]] == [0, 1, 2]


WIRE_FOR_FUZZ = established()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_bit_flip_in_a_data_datagram_is_dropped(data: st.DataObject) -> None:
    w = WIRE_FOR_FUZZ
    w.send("a", packets("edge-a", "edge-b", [99]))
    datagram = w.sent_of("a", TYPE_DATA)[-1][1]
    w.flight.clear()
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    flipped = bytearray(datagram)
    flipped[bit // 8] ^= 1 << (bit % 8)
    before = len(w.delivered["b"])
    events = w.inject("b", bytes(flipped))
    assert len(w.delivered["b"]) == before
    assert len(events) == 1 and isinstance(events[0], Rejected)
    # A forged datagram never moves the replay window: the real one still gets through.
    w.inject("b", datagram)
    assert len(w.delivered["b"]) == before + 1


def test_altered_datagrams_are_counted_by_reason() -> None:
    w = established()
    w.send("a", packets("edge-a", "edge-b", [1]))
    datagram = w.sent_of("a", TYPE_DATA)[-1][1]
    w.flight.clear()
    tampered = {
        "ciphertext": datagram[:20] + bytes([datagram[20] ^ 0x80]) + datagram[21:],
        "tag": datagram[:-1] + bytes([datagram[-1] ^ 1]),
        "counter": datagram[:5] + bytes([datagram[5] ^ 1]) + datagram[6:],  # + 2**56
        "index": datagram[:1] + bytes([datagram[1] ^ 1]) + datagram[2:],
        "truncated": datagram[:28],
    }
    reasons = {name: w.inject("b", d) for name, d in tampered.items()}
    assert reasons["ciphertext"] == [Rejected("edge-a", RejectReason.AUTH_FAILED, 1, "")]
    assert reasons["tag"] == [Rejected("edge-a", RejectReason.AUTH_FAILED, 1, "")]
    assert reasons["counter"] == [Rejected("edge-a", RejectReason.AUTH_FAILED, 1, "")]
    assert reasons["index"] == [Rejected("edge-a", RejectReason.UNKNOWN_INDEX, 1, "")]
    assert [e.reason for e in reasons["truncated"] if isinstance(e, Rejected)] == [
        RejectReason.MALFORMED
    ]
    assert w.b.stats().rejected == {"auth-failed": 3, "unknown-index": 1, "malformed": 1}


def test_counters_older_than_the_window_are_dropped_newer_reorderings_kept() -> None:
    w = established(TunnelConfig(replay_window=256))
    w.flight.clear()
    datagrams = w.a.encrypt(packets("edge-a", "edge-b", range(400)), w.now)
    # Deliver 399 first, then everything else in reverse: counters more than 192 behind the
    # highest (the window of a 256-bit ring) are refused, the rest accepted once.
    events = w.b.receive_batch([datagrams[-1], *reversed(datagrams[:-1])], w.now)
    w.record("b", events)
    got = sorted(seq_of(p) for p in w.delivered["b"][1:])
    # Counter = seq + 1 (the handshake's packet had counter 0): the highest is 400, and
    # counters at least 192 (the window of a 256-bit ring) behind it are refused.
    assert got == list(range(400 - 192, 400))
    assert w.rejected("b") == {RejectReason.REPLAYED: 400 - len(got)}
    assert sum(isinstance(e, Rejected) for e in events) == 1  # one event per reason and batch


# -- rekeying -----------------------------------------------------------------------------------


def stream(w: Wire, *, until: float, every: float, per_tick: int = 2) -> int:
    """Both sides send `per_tick` packets every `every` seconds (seq from 0, delivery logs
    cleared first); returns packets per side."""
    seq = 0
    w.delivered = {"a": [], "b": []}
    while w.now < until:
        w.send("a", packets("edge-a", "edge-b", range(seq, seq + per_tick)))
        w.send("b", packets("edge-b", "edge-a", range(seq, seq + per_tick)))
        seq += per_tick
        w.run(w.now + every)
    w.run(w.now + 1)
    return seq


@pytest.mark.parametrize("first", ["a", "b"])
def test_rekey_by_message_count_loses_nothing(first: str) -> None:
    config = TunnelConfig(rekey_after_messages=40, reject_after_messages=100)
    w = established(config, first=first)
    sent = stream(w, until=5, every=0.005, per_tick=3)
    assert [seq_of(p) for p in w.delivered["b"]] == list(range(sent))
    assert [seq_of(p) for p in w.delivered["a"]] == list(range(sent))
    rekeys = [e for e in w.of("a", HandshakeComplete) if isinstance(e, HandshakeComplete)]
    assert len(rekeys) >= sent // 100 and all(e.rekey for e in rekeys[1:])
    assert not w.rejected("a") and not w.rejected("b")
    assert state(w.a) is State.ESTABLISHED


@pytest.mark.parametrize("first", ["a", "b"])
def test_rekey_by_time_loses_nothing(first: str) -> None:
    config = TunnelConfig(rekey_after_time=10, reject_after_time=15, handshake_retry_max=1,
                          keepalive_timeout=1)
    w = established(config, first=first, latency=0.05)
    sent = stream(w, until=60, every=0.25)
    assert [seq_of(p) for p in w.delivered["b"]] == list(range(sent))
    assert [seq_of(p) for p in w.delivered["a"]] == list(range(sent))
    # The initiator of the current keys renews them every rekey_after_time; the other side
    # never needs to.
    other = "b" if first == "a" else "a"
    initiations = [t for t, _ in w.sent_of(first, TYPE_INITIATION)]
    assert len(initiations) >= 6
    gaps = [later - earlier for earlier, later in itertools.pairwise(initiations)]
    assert all(10 <= gap < 10.5 for gap in gaps), gaps
    assert not w.sent_of(other, TYPE_INITIATION)
    assert not w.rejected("a") and not w.rejected("b")


def test_previous_keys_still_accept_datagrams_in_flight() -> None:
    config = TunnelConfig(rekey_after_messages=5)
    w = established(config)
    w.flight.clear()
    old = w.b.encrypt(packets("edge-b", "edge-a", [100]), w.now)  # under b's current keys
    w.send("a", packets("edge-a", "edge-b", range(1, 8)))  # a's counter reaches 8 ...
    w.send("a", packets("edge-a", "edge-b", [8]))  # ... and the next send rekeys
    w.run(w.now + 1)
    assert len(w.of("a", HandshakeComplete)) == 2 and state(w.a) is State.ESTABLISHED
    w.inject("a", old[0])  # arrives late, after the rotation
    assert [seq_of(p) for p in w.delivered["a"]] == [100]


def test_keys_are_refused_after_reject_after_time() -> None:
    config = TunnelConfig(rekey_after_time=10, reject_after_time=15)
    w = established(config)
    late = w.b.encrypt(packets("edge-b", "edge-a", [1]), w.now)
    w.flight.clear()
    w.run(w.now + 16)
    assert state(w.a) is State.IDLE and state(w.b) is State.IDLE and not w.a.can_send
    assert w.a.get_timer() is None
    assert [e.reason for e in w.inject("a", late[0]) if isinstance(e, Rejected)] == [
        RejectReason.UNKNOWN_INDEX
    ]
    # Sending again starts a fresh handshake.
    w.send("a", packets("edge-a", "edge-b", [2]))
    w.run(w.now + 1)
    assert [seq_of(p) for p in w.delivered["b"]][-1] == 2


def test_expired_keys_are_refused_even_before_the_timer_runs() -> None:
    config = TunnelConfig(rekey_after_time=10, reject_after_time=15)
    w = established(config)
    w.flight.clear()
    late = w.b.encrypt(packets("edge-b", "edge-a", [1]), w.now)
    events = w.a.receive(late[0], w.now + 15)
    assert events == [Rejected("edge-b", RejectReason.KEY_EXPIRED, 1, "")]


# -- simultaneous initiation ---------------------------------------------------------------------


@pytest.mark.parametrize("b_delay", [0.0, 0.004, 0.009])
@pytest.mark.parametrize("a_lower", [True, False])
def test_simultaneous_initiation_resolves_to_one_handshake(b_delay: float, a_lower: bool) -> None:
    one, two = CLUSTER.ids["edge-a"], CLUSTER.issue("edge-b")
    if (one.static_public < two.static_public) != a_lower:
        two = CLUSTER.issue("edge-b")
        while (one.static_public < two.static_public) != a_lower:
            two = CLUSTER.issue("edge-b")
    w = Wire(session(one, "edge-b", remote_key=two, seed=1), session(two, "edge-a", seed=2))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(b_delay)
    w.send("b", packets("edge-b", "edge-a", [2]))  # b's initiation crosses a's on the wire
    w.run(2.0)
    winner, loser = ("a", "b") if a_lower else ("b", "a")
    assert w.sessions[winner].stats().initiations_ignored == 1
    assert [e.initiator for e in w.of(winner, HandshakeComplete)
            if isinstance(e, HandshakeComplete)] == [True]
    assert [e.initiator for e in w.of(loser, HandshakeComplete)
            if isinstance(e, HandshakeComplete)] == [False]
    assert [seq_of(p) for p in w.delivered["b"]] == [1]
    assert [seq_of(p) for p in w.delivered["a"]] == [2]
    assert state(w.a) is State.ESTABLISHED and state(w.b) is State.ESTABLISHED
    assert len(w.sent_of("a", TYPE_INITIATION)) == len(w.sent_of("b", TYPE_INITIATION)) == 1


def test_the_tie_break_never_locks_out_a_peer_with_a_new_static_key() -> None:
    reinstalled = CLUSTER.issue("edge-b")
    while not CLUSTER.ids["edge-a"].static_public < reinstalled.static_public:
        reinstalled = CLUSTER.issue("edge-b")  # a would win the tie-break on keys alone
    w = Wire(session("edge-a", "edge-b"),  # a still knows edge-b's old key
             session(reinstalled, "edge-a"))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.send("b", packets("edge-b", "edge-a", [2]))
    w.run(0.5)
    assert [seq_of(p) for p in w.delivered["a"]] == [2]
    assert [seq_of(p) for p in w.delivered["b"]] == [1]
    assert w.a.peer.static_public == reinstalled.static_public
    assert w.a.stats().initiations_ignored == 0
    assert [e.reason for e in w.events["b"] if isinstance(e, Rejected)] == [
        RejectReason.HANDSHAKE_INVALID  # a's initiation to the old key
    ]


def test_simultaneous_rekey_by_count_resolves_too() -> None:
    config = TunnelConfig(rekey_after_messages=10)
    w = established(config)
    w.send("b", packets("edge-b", "edge-a", range(1, 12)))
    w.send("a", packets("edge-a", "edge-b", range(1, 12)))  # both counters pass 10 ...
    w.run(w.now + 1)
    w.send("b", packets("edge-b", "edge-a", [12]))
    w.send("a", packets("edge-a", "edge-b", [12]))  # ... so both rekey at the same moment
    w.run(w.now + 2)
    assert len(w.sent_of("a", TYPE_INITIATION)) == 2 and len(w.sent_of("b", TYPE_INITIATION)) == 1
    assert w.a.stats().initiations_ignored + w.b.stats().initiations_ignored == 1
    w.send("a", packets("edge-a", "edge-b", [50]))
    w.send("b", packets("edge-b", "edge-a", [50]))
    w.run(w.now + 1)
    assert [seq_of(p) for p in w.delivered["b"]] == [0, *range(1, 13), 50]
    assert [seq_of(p) for p in w.delivered["a"]] == [*range(1, 13), 50]
    assert not w.rejected("a") and not w.rejected("b")


# -- retries, give-up ----------------------------------------------------------------------------


def test_lost_initiations_are_retried_with_backoff_and_jitter() -> None:
    w = pair()
    w.drop_rules.append(drop_first(TYPE_INITIATION, 3))
    w.send("a", packets("edge-a", "edge-b", range(3)))
    w.run(20)
    times = [t for t, _ in w.sent_of("a", TYPE_INITIATION)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4
    for gap, base in zip(gaps, [1.0, 2.0, 4.0], strict=True):
        assert base <= gap <= base + 0.333
    assert [seq_of(p) for p in w.delivered["b"]] == [0, 1, 2]
    assert list(w.a.history)[:4] == [
        (State.IDLE, Trigger.SEND, State.INITIATING),
        *[(State.INITIATING, Trigger.RETRY, State.INITIATING)] * 3,
    ]


def test_retry_timing_comes_from_the_injected_rng() -> None:
    def retry_times(seed: int) -> list[float]:
        w = Wire(session("edge-a", "edge-b", seed=seed), session("edge-b", "edge-a"))
        w.drop_rules.append(lambda side, d: True)
        w.connect("a")
        w.run(10)
        return [t for t, _ in w.sent_of("a", TYPE_INITIATION)]

    assert retry_times(5) == retry_times(5)
    assert retry_times(5) != retry_times(6)
    times = retry_times(5)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert times[0] == 0.0
    for gap, base in zip(gaps, [1, 2, 4, 5, 5], strict=False):  # doubling up to the maximum
        assert base <= gap <= base + 0.333


def test_a_lost_response_is_retried() -> None:
    w = pair()
    w.drop_rules.append(drop_first(TYPE_RESPONSE, 1))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(5)
    assert len(w.sent_of("a", TYPE_INITIATION)) == 2
    assert len(w.sent_of("b", TYPE_RESPONSE)) == 2
    assert [seq_of(p) for p in w.delivered["b"]] == [1]
    assert w.b.stats().handshakes_completed == 1


def test_a_lost_confirmation_makes_a_waiting_responder_initiate() -> None:
    w = pair(TunnelConfig(confirm_timeout=2.0))
    w.drop_rules.append(drop_first(TYPE_DATA, 1, side="a"))  # a's confirming keepalive
    w.connect("a")
    w.run(0.5)
    assert state(w.a) is State.ESTABLISHED and state(w.b) is State.RESPONDED
    w.send("b", packets("edge-b", "edge-a", [7]))  # queued at b
    w.run(5)
    assert [seq_of(p) for p in w.delivered["a"]] == [7]
    assert (State.RESPONDED, Trigger.CONFIRM_TIMEOUT, State.INITIATING) in w.b.history
    initiated_at = [t for t, _ in w.sent_of("b", TYPE_INITIATION)]
    assert len(initiated_at) == 1 and 2.0 <= initiated_at[0] < 2.1
    assert state(w.b) is State.ESTABLISHED and state(w.a) is State.ESTABLISHED


def test_give_up_reports_and_drops_the_queue_then_a_new_send_starts_over() -> None:
    config = TunnelConfig(handshake_give_up=10)
    w = pair(config)
    w.drop_rules.append(lambda side, d: True)
    w.send("a", packets("edge-a", "edge-b", range(5)))
    w.run(30)
    failed = w.of("a", HandshakeFailed)
    assert len(failed) == 1
    assert isinstance(failed[0], HandshakeFailed)
    assert failed[0].peer == "edge-b" and failed[0].dropped_packets == 5
    assert failed[0].attempts == len(w.sent_of("a", TYPE_INITIATION)) == 4  # 0, 1, 3, 7
    assert state(w.a) is State.IDLE and w.a.get_timer() is None
    assert w.a.stats().queued_dropped == 5
    w.drop_rules.clear()
    w.send("a", packets("edge-a", "edge-b", [9]))
    w.run(w.now + 1)
    assert [seq_of(p) for p in w.delivered["b"]] == [9]


def test_the_queue_is_bounded_and_drops_the_oldest() -> None:
    w = pair(TunnelConfig(max_queued_packets=4))
    w.send("a", packets("edge-a", "edge-b", range(10)))
    w.run(1)
    assert [seq_of(p) for p in w.delivered["b"]] == [6, 7, 8, 9]
    assert w.a.stats().queued_dropped == 6


def test_persistent_keepalive() -> None:
    w = established(TunnelConfig(persistent_keepalive=25))
    start = w.now
    w.run(start + 100)
    keepalives = [t for t, d in w.sent_of("a", TYPE_DATA) if len(d) == 29 and t > start]
    assert len(keepalives) == 4
    assert w.b.stats().keepalives_received >= 4
    assert not w.of("b", DecryptedPackets)[1:]  # keepalives are not packets


@pytest.mark.parametrize("first", ["a", "b"], ids=["initiator-sends", "responder-sends"])
def test_a_peer_that_lost_our_keys_gets_a_new_handshake_after_15_s(first: str) -> None:
    """WireGuard's new-handshake timer: b forgets every key (e.g. it dropped a and took it
    back); a's data goes unanswered, and 15 s after its first unanswered packet a handshakes
    again instead of waiting for a rekey (120 s) or the keys' expiry (180 s)."""
    w = established(first=first)
    w.send("b", packets("edge-b", "edge-a", [1000]))  # both sides answered
    w.run(w.now + 1)
    w.b.close()
    lost_at = w.now
    t = lost_at
    while t < lost_at + 20:  # a sends a packet every second
        w.send("a", packets("edge-a", "edge-b", [int(t)]))
        t += 1.0
        w.run(t)
    initiations = [t for t, _ in w.sent_of("a", TYPE_INITIATION) if t > lost_at]
    assert initiations and lost_at + 15 <= initiations[0] <= lost_at + 15.1, initiations
    assert (State.ESTABLISHED, Trigger.NO_REPLY, State.REKEYING) in list(w.a.history)
    assert state(w.a) is State.ESTABLISHED and state(w.b) is State.ESTABLISHED
    got = [seq_of(p) for p in w.delivered["b"] if seq_of(p) >= int(lost_at)]
    assert got and got[-1] == int(lost_at) + 19  # flowing again, on the new keys
    assert w.rejected("b")  # what a sent meanwhile was refused (unknown index)


def test_a_one_way_flow_gets_passive_keepalives_and_no_new_handshakes() -> None:
    """Data only from a to b for a minute: b answers with an empty datagram 10 s after data
    it did not answer, so a never sees its data unanswered for 15 s (no handshake)."""
    w = established()
    start, initiations = w.now, len(w.sent_of("a", TYPE_INITIATION))
    t = start
    while t < start + 60:
        w.send("a", packets("edge-a", "edge-b", [int(t)]))
        t += 0.5
        w.run(t)
    keepalives = [t for t, d in w.sent_of("b", TYPE_DATA) if len(d) == 29 and t > start]
    assert 5 <= len(keepalives) <= 7, keepalives  # one per 10 s of one-way data
    assert len(w.sent_of("a", TYPE_INITIATION)) == initiations
    assert Trigger.NO_REPLY not in {trigger for _, trigger, _ in w.a.history}
    # Idle afterwards: no keepalives, no handshakes, no timers but the keys' expiry.
    w.run(w.now + 30)
    assert len([1 for t, d in w.sent_of("b", TYPE_DATA) if len(d) == 29 and t > start]) \
        <= len(keepalives) + 1
    timer = w.a.get_timer()
    assert timer is not None and timer > w.now + 60


def test_the_fast_paths_traffic_drives_the_reply_timers() -> None:
    """The thread's sends and receives (`fast_account`) arm and stop the same timers."""
    w = established()
    w.send("b", packets("edge-b", "edge-a", [1000]))
    w.run(w.now + 12)  # a's passive keepalive answers b's packet; then no timer runs
    timer = w.a.get_timer()
    assert timer is not None and timer > w.now + 100  # the keys' expiry only
    now = w.now
    w.a.fast_account(FastStats(tx_packets=3, tx_bytes=300, last_tx=now, rx_packets=0,
                               rx_bytes=0, last_rx=None))
    assert w.a.get_timer() == pytest.approx(now + 15)  # sent, not answered
    w.a.fast_account(FastStats(tx_packets=0, tx_bytes=0, last_tx=None, rx_packets=1,
                               rx_bytes=100, last_rx=now + 1))
    timer = w.a.get_timer()  # answered; now a passive keepalive is due
    assert timer == pytest.approx(now + 11)
    w.a.fast_account(FastStats(tx_packets=1, tx_bytes=100, last_tx=now + 2, rx_packets=0,
                               rx_bytes=0, last_rx=None))
    assert w.a.get_timer() == pytest.approx(now + 17)  # our send answered them; ours waits
    w.run(now + 17.5)
    assert (State.ESTABLISHED, Trigger.NO_REPLY, State.REKEYING) in list(w.a.history)


# -- identity ------------------------------------------------------------------------------------


def test_a_node_with_a_certificate_from_another_ca_is_refused() -> None:
    rogue_ca = CertificateAuthority.generate(now=NOW)
    rogue = CLUSTER.issue("edge-a", ca=rogue_ca)
    w = Wire(session(rogue, "edge-b", config=TunnelConfig(handshake_give_up=3)),
             session("edge-b", "edge-a"))
    w.b.update_peer(Peer("edge-a", rogue.static_public))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(10)
    refusals = [e for e in w.events["b"] if isinstance(e, Rejected)]
    assert {e.reason for e in refusals} == {RejectReason.PEER_REFUSED}
    assert "UntrustedCertificate" in refusals[0].detail
    assert not w.sent_of("b", TYPE_RESPONSE) and not w.delivered["b"]
    assert len(w.of("a", HandshakeFailed)) == 1


def test_a_responder_with_a_certificate_from_another_ca_is_refused() -> None:
    rogue = CLUSTER.issue("edge-b", ca=CertificateAuthority.generate(now=NOW))
    w = Wire(session("edge-a", "edge-b", remote_key=rogue), session(rogue, "edge-a"))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(0.5)
    assert len(w.sent_of("b", TYPE_RESPONSE)) == 1  # b answered ...
    assert [e.reason for e in w.events["a"] if isinstance(e, Rejected)] == [
        RejectReason.PEER_REFUSED  # ... and a refused the answer
    ]
    assert not w.a.can_send and state(w.a) is State.INITIATING


def test_an_expired_certificate_is_refused() -> None:
    old = CLUSTER.issue("edge-a", validity=dt.timedelta(hours=1))
    later = T0 + 7200  # two hours after the one-hour certificate was issued
    w = Wire(session(old, "edge-b", wall_offset=later),
             session("edge-b", "edge-a", remote_key=old, wall_offset=later))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(0.5)
    refusals = [e for e in w.events["b"] if isinstance(e, Rejected)]
    assert [e.reason for e in refusals] == [RejectReason.PEER_REFUSED]
    assert "CertificateExpired" in refusals[0].detail


def test_the_initiator_checks_it_reached_the_node_it_meant() -> None:
    # The registry (or whoever fed it) lies: edge-c's static key is published as edge-b's.
    w = Wire(session("edge-a", "edge-b", remote_key=CLUSTER.ids["edge-c"]),
             session("edge-c", "edge-a"))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(0.5)
    assert len(w.sent_of("b", TYPE_RESPONSE)) == 1  # edge-c answered as itself
    refusals = [e for e in w.events["a"] if isinstance(e, Rejected)]
    assert [e.reason for e in refusals] == [RejectReason.WRONG_PEER]
    assert "responder is node edge-c" in refusals[0].detail
    assert not w.a.can_send and not w.delivered["b"]


def test_a_session_accepts_initiations_from_its_own_peer_only() -> None:
    w = Wire(session("edge-c", "edge-b"), session("edge-b", "edge-a"))
    w.send("a", packets("edge-c", "edge-b", [1]))
    w.run(0.5)
    refusals = [e for e in w.events["b"] if isinstance(e, Rejected)]
    assert [e.reason for e in refusals] == [RejectReason.WRONG_PEER]
    assert "initiation from node edge-c" in refusals[0].detail


def test_a_node_claiming_another_node_s_overlay_address_is_refused() -> None:
    impostor = CLUSTER.issue("edge-c", overlay=OVERLAY["edge-a"])  # valid cert, stolen address
    w = Wire(session(impostor, "edge-b"), session("edge-b", "edge-c", remote_key=impostor))
    w.send("a", packets("edge-a", "edge-b", [1]))
    w.run(0.5)
    refusals = [e for e in w.events["b"] if isinstance(e, Rejected)]
    assert [e.reason for e in refusals] == [RejectReason.PEER_REFUSED]
    assert "OverlayNotAllowed" in refusals[0].detail
    assert not w.sent_of("b", TYPE_RESPONSE)


def test_packets_with_another_source_address_are_dropped() -> None:
    w = Wire(session("edge-c", "edge-b"), session("edge-b", "edge-c"))
    spoofed = ip_packet(OVERLAY["edge-a"], OVERLAY["edge-b"], 1)
    honest = ip_packet(OVERLAY["edge-c"], OVERLAY["edge-b"], 2)
    w.send("a", [spoofed, honest, b"\x60" + honest[1:], b"not ip"])
    w.run(0.5)
    assert [seq_of(p) for p in w.delivered["b"]] == [2]
    assert w.rejected("b") == {RejectReason.SPOOFED_SOURCE: 3}
    unchecked = Wire(session("edge-c", "edge-b"),
                     session("edge-b", "edge-c", config=TunnelConfig(check_inner_source=False)))
    unchecked.send("a", [spoofed])
    unchecked.run(0.5)
    assert unchecked.delivered["b"] == [spoofed]


# -- garbage -------------------------------------------------------------------------------------


GARBAGE_WIRE = established()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=1500),
    st.tuples(st.sampled_from([TYPE_INITIATION, TYPE_RESPONSE, TYPE_DATA]),
              st.binary(max_size=1200)).map(lambda t: bytes([t[0]]) + t[1]),
))
def test_any_bytes_are_dropped_as_a_remote_error_never_raised(datagram: bytes) -> None:
    w = GARBAGE_WIRE
    for side in ("a", "b"):
        events = w.sessions[side].receive(datagram, w.now)
        assert all(isinstance(e, Rejected) for e in events), events
        assert sum(e.count for e in events if isinstance(e, Rejected)) == 1
    w.send("a", packets("edge-a", "edge-b", [5]))
    w.run(w.now + 0.1)
    assert seq_of(w.delivered["b"][-1]) == 5


def test_garbage_that_looks_like_our_handshakes() -> None:
    w = established()
    initiation = w.sent_of("a", TYPE_INITIATION)[0][1]
    response = w.sent_of("b", TYPE_RESPONSE)[0][1]
    cases = {
        "initiation, payload bit flipped": initiation[:-5] + bytes([initiation[-5] ^ 4])
        + initiation[-4:],
        "initiation, truncated": initiation[:100],
        "response to us, garbage": response[:9] + bytes(len(response) - 9),
        "stun": bytes.fromhex("000100002112a442") + bytes(12),
    }
    reasons = {name: [e.reason for e in w.inject("b" if "init" in name else "a", d)
                      if isinstance(e, Rejected)] for name, d in cases.items()}
    assert reasons == {
        "initiation, payload bit flipped": [RejectReason.HANDSHAKE_INVALID],
        "initiation, truncated": [RejectReason.MALFORMED],
        "response to us, garbage": [RejectReason.UNKNOWN_INDEX],  # no handshake in flight
        "stun": [RejectReason.MALFORMED],
    }


# -- a lossy, duplicating network through NATs ---------------------------------------------------


def test_through_a_lossy_duplicating_network_and_a_nat() -> None:
    """On meshd.simnet: b behind a port-restricted NAT, 10% loss, 10% duplication."""
    net = SimNetwork(seed=7, loss=0.1, duplicate=0.1, latency_s=0.02)
    net.add_nat(SimNat("203.0.113.1", "10.0.0.0/24", mapping=EIM, filtering=APDF))
    a_addr: Address = ("198.51.100.1", 51820)
    b_addr: Address = ("10.0.0.2", 51820)
    a, b = session("edge-a", "edge-b", seed=3), session("edge-b", "edge-a", seed=4)
    got: list[bytes] = []
    where: dict[str, Address] = {}

    def endpoint(s: TunnelSession, local: Address) -> Callable[[bytes, Address, Address],
                                                                   list[Transmit]]:
        def handle(data: bytes, source: Address, _local: Address) -> list[Transmit]:
            where[s.local.node] = source
            for e in s.receive(data, net.now):
                if isinstance(e, DecryptedPackets):
                    got.extend(e.packets)
            return [Transmit(local, source, d) for d in s.datagrams_to_send(net.now)]
        return handle

    net.attach(a_addr, endpoint(a, a_addr))
    net.attach(b_addr, endpoint(b, b_addr))
    sent = 0
    while net.now < 30:  # b (inside) streams to a; a answers to wherever b came from
        for d in b.encrypt(packets("edge-b", "edge-a", range(sent, sent + 5)), net.now):
            net.send(Transmit(b_addr, a_addr, d))
        sent += 5
        for s, src in ((a, a_addr), (b, b_addr)):
            timer = s.get_timer()
            if timer is not None and timer <= net.now:
                s.handle_timer(net.now)
            dst = where.get(s.local.node, a_addr)
            for d in s.datagrams_to_send(net.now):
                net.send(Transmit(src, dst, d))
        net.advance(net.now + 0.05)
    net.advance(net.now + 2)
    seqs = [seq_of(p) for p in got]
    assert len(seqs) == len(set(seqs))  # duplicates never reach the TUN
    assert 0.7 * sent < len(seqs) <= sent
    # Duplicates are the only drops: of data (replayed) or of a handshake message that had
    # already done its job (unknown index, stale initiation).
    for s in (a, b):
        assert set(s.stats().rejected) <= {"replayed", "unknown-index", "stale-initiation"}
    assert a.stats().rejected["replayed"] > 0


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"handshake_retry": 0}, {"rekey_after_time": 200}, {"rekey_after_messages": 0},
    {"reject_after_messages": 2**64}, {"persistent_keepalive": 0}, {"replay_window": 100},
    {"max_queued_packets": -1}, {"handshake_jitter": -1},
])
def test_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(TunnelConfig(), **bad)


def test_every_transition_targets_a_state_and_every_state_is_reachable() -> None:
    assert {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values()) == set(State)
    assert {t for _, t in TRANSITIONS} == set(Trigger)


def test_close_forgets_keys_and_handshakes() -> None:
    w = established()
    w.a.encrypt(packets("edge-a", "edge-b", [1]), w.now)
    w.a.close()
    assert state(w.a) is State.IDLE and not w.a.can_send and w.a.get_timer() is None
    assert w.a.history[-1] == (State.ESTABLISHED, Trigger.CLOSE, State.IDLE)
    late = w.b.encrypt(packets("edge-b", "edge-a", [2]), w.now)
    assert [e.reason for e in w.a.receive(late[0], w.now) if isinstance(e, Rejected)] == [
        RejectReason.UNKNOWN_INDEX
    ]


def test_handshake_messages_fit_the_smallest_path_mtu() -> None:
    w = established()
    (_, initiation), = w.sent_of("a", TYPE_INITIATION)
    (_, response), = w.sent_of("b", TYPE_RESPONSE)
    # IPv6 minimum MTU 1280 - 40 (IPv6) - 8 (UDP) - 36 (TURN ChannelData / Send overhead).
    assert len(initiation) < 1196 and len(response) < 1196


# -- offload frames: 0xE4 fragments, capabilities, reassembly ----------------------------------
# Frames are what a TUN device with IFF_VNET_HDR reads (meshd.tunnel.offload).

MSS = 1328


def tcp_super(payload: bytes) -> bytes:
    """A TCP/IPv4 packet from edge-a to edge-b (checksums are redone by segmentation)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 77, 5 << 4, 0x18, 512, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0,
                       OVERLAY["edge-a"].packed, OVERLAY["edge-b"].packed) + tcp + payload


def gso_frame(length: int, seed: int = 0) -> bytes:
    """A TCP super-packet from edge-a to edge-b as a TUN device with TSO hands it over."""
    payload = random.Random(seed).randbytes(length)
    return encode_vnet_header(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 40, MSS, 20, 16)) + \
        tcp_super(payload)


def send_frames(w: Wire, side: str, frames: list[bytes]) -> list[bytes]:
    datagrams = w.sessions[side].encrypt_frames(frames, w.now)
    for d in datagrams:
        w.transmit(side, d)
    w.drain()
    return datagrams


def test_capabilities_are_negotiated_in_the_handshake() -> None:
    w = established()
    assert w.a.stats().peer_fragments and w.b.stats().peer_fragments
    old = established(TunnelConfig(fragments=False))
    assert not old.a.stats().peer_fragments and not old.b.stats().peer_fragments
    # One side without them (an older agent): neither sends fragments to the other.
    mixed = Wire(session("edge-a", "edge-b", seed=1),
                 session("edge-b", "edge-a", seed=2, config=TunnelConfig(fragments=False)))
    mixed.send("a", [ip_packet(OVERLAY["edge-a"], OVERLAY["edge-b"], 0)])
    mixed.run(1.0)
    assert not mixed.a.stats().peer_fragments and not mixed.b.stats().peer_fragments


def test_a_super_packet_is_one_message_in_fragments() -> None:
    w = established()
    w.b.frames_out = True
    frame = gso_frame(0xFFFF - 40)
    datagrams = send_frames(w, "a", [frame])
    assert len(datagrams) == 47 and {d[0] for d in datagrams} == {TYPE_FRAGMENT}
    assert {len(d) for d in datagrams[:-1]} == {1421}  # equal sizes: one UDP GSO run
    assert len({d[1:13] for d in datagrams}) == 1  # one index and counter: one message
    w.run(w.now + 1)
    assert w.delivered["b"][-1] == frame  # the frame itself: the kernel segments it
    stats = w.b.stats()
    assert stats.messages_received == 1 and w.a.stats().messages_sent == 1
    # A small frame is one fragment; a plain packet from the peer gets a plain header.
    small = gso_frame(100)
    assert len(send_frames(w, "a", [small])) == 1
    w.send("a", [ip_packet(OVERLAY["edge-a"], OVERLAY["edge-b"], 5)])
    w.run(w.now + 1)
    assert w.delivered["b"][-2:] == [small, PLAIN_HEADER + ip_packet(OVERLAY["edge-a"],
                                                                     OVERLAY["edge-b"], 5)]


def test_a_plain_tun_gets_the_frame_segmented_with_checksums() -> None:
    w = established()
    frame = gso_frame(5000, seed=3)
    send_frames(w, "a", [frame])
    w.run(w.now + 1)
    got = w.delivered["b"][-4:]
    assert got == to_packets(frame)  # (test_tunnel_offload checks what to_packets makes)


def test_an_old_peer_gets_complete_packets_as_data_datagrams() -> None:
    w = Wire(session("edge-a", "edge-b", seed=1),
             session("edge-b", "edge-a", seed=2, config=TunnelConfig(fragments=False)))
    w.send("a", [ip_packet(OVERLAY["edge-a"], OVERLAY["edge-b"], 0)])
    w.run(1.0)
    frame = gso_frame(4000, seed=4)
    datagrams = send_frames(w, "a", [frame])
    assert [d[0] for d in datagrams] == [TYPE_DATA] * 4
    w.run(w.now + 1)
    assert w.delivered["b"][-4:] == to_packets(frame)
    # Frames before any keys are queued as their packets and go out after the handshake.
    fresh = Wire(session("edge-a", "edge-b", seed=1), session("edge-b", "edge-a", seed=2))
    assert send_frames(fresh, "a", [frame]) == []
    fresh.run(1.0)
    assert fresh.delivered["b"] == to_packets(frame)


def test_reordered_and_duplicated_fragments_deliver_once() -> None:
    w = established()
    w.b.frames_out = True
    frames = [gso_frame(20_000, seed=i) for i in range(3)]
    datagrams = w.a.encrypt_frames(frames, w.now)
    mixed = datagrams + datagrams[:5]
    random.Random(1).shuffle(mixed)
    events = w.b.receive_batch(mixed, w.now)
    delivered = [p for e in events if isinstance(e, DecryptedPackets) for p in e.packets]
    assert sorted(delivered) == sorted(frames)
    assert rejected_in(events) == {RejectReason.REPLAYED: 5}


def test_lost_fragment_loses_the_message_and_expires() -> None:
    config = TunnelConfig(reassembly_timeout=0.5, max_partial_messages=4)
    w = established(config)
    datagrams = w.a.encrypt_frames([gso_frame(10_000)], w.now)
    assert not [e for e in w.b.receive_batch(datagrams[1:], w.now)
                if isinstance(e, DecryptedPackets)]
    w.b.handle_timer(w.now + 0.6)
    assert w.b.stats().messages_incomplete == 1
    # The late fragment starts a new partial message that never completes.
    w.b.receive_batch(datagrams[:1], w.now + 0.7)
    # More incomplete messages than the limit: the oldest go, memory stays bounded.
    for i in range(10):
        w.b.receive_batch(w.a.encrypt_frames([gso_frame(10_000, seed=i)], w.now)[1:], w.now)
    assert w.b.partial_messages == 4
    assert w.b.stats().messages_incomplete == 1 + 1 + 6


def test_forged_and_inconsistent_fragments_are_dropped() -> None:
    w = established()
    w.b.frames_out = True
    datagrams = w.a.encrypt_frames([gso_frame(3000)], w.now)
    tampered = bytearray(datagrams[1])
    tampered[-1] ^= 1
    events = w.b.receive_batch([datagrams[0], bytes(tampered), datagrams[2]], w.now)
    assert rejected_in(events) == {RejectReason.AUTH_FAILED: 1}
    again = w.a.encrypt_frames([gso_frame(3000)], w.now)
    recount = bytearray(again[1])
    recount[14] = 4  # "of 4" where the first said "of 3"
    bad_index = bytearray(again[2])
    bad_index[13] = 3  # part 3 of 3
    events = w.b.receive_batch([again[0], bytes(recount), bytes(bad_index)], w.now)
    assert rejected_in(events) == {RejectReason.MALFORMED: 2}


def test_frames_from_the_peer_are_checked() -> None:
    w = established()
    w.b.frames_out = True
    spoofed = bytearray(gso_frame(100))
    spoofed[10 + 12:10 + 16] = OVERLAY["edge-c"].packed
    bad_header = encode_vnet_header(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 20, 16)) + \
        tcp_super(b"x")
    events = w.b.receive_batch(w.a.encrypt_frames([bytes(spoofed), bad_header], w.now), w.now)
    assert rejected_in(events) == {RejectReason.SPOOFED_SOURCE: 1, RejectReason.MALFORMED: 1}


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 70), st.integers(0, 70),
                          st.binary(max_size=3000)), max_size=80),
       st.integers(0, 2**32))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_fragments_never_raise_and_stay_bounded(
    fragments: list[tuple[int, int, int, bytes]], seed: int,
) -> None:
    w = FUZZ_PAIR
    index = FUZZ_INDEX
    rng = random.Random(seed)
    datagrams = [FRAGMENT_HEADER.pack(TYPE_FRAGMENT, index if rng.random() < 0.9 else seed,
                                      10**6 + counter, part, count) + body
                 for counter, part, count, body in fragments]
    datagrams += [d[:rng.randrange(len(d) + 1)] for d in datagrams[:5]]
    events = w.b.receive_batch(datagrams, w.now)
    assert not [e for e in events if isinstance(e, DecryptedPackets)]
    assert w.b.partial_messages <= w.b.config.max_partial_messages


def _fuzz_pair() -> tuple[Wire, int]:
    w = established()
    [fragment] = w.a.encrypt_frames([gso_frame(10)], w.now)
    index: int = struct.unpack_from("!I", fragment, 1)[0]
    return w, index


FUZZ_PAIR, FUZZ_INDEX = _fuzz_pair()


def rejected_in(events: list[Event]) -> dict[RejectReason, int]:
    out: dict[RejectReason, int] = {}
    for e in events:
        if isinstance(e, Rejected):
            out[e.reason] = out.get(e.reason, 0) + e.count
    return out
