"""meshd.tunnel.endpoint: one node's sessions behind one demultiplexer, several nodes on a
virtual switch."""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import ipaddress
import random
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeweave.pki import CertificateAuthority, node_identity
from meshd.tunnel.endpoint import TunnelEndpoint
from meshd.tunnel.identity import CAPeerVerifier, LocalIdentity, Peer
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

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NODES = ["edge-a", "edge-b", "edge-c"]
OVERLAY: dict[str, OverlayAddress] = {
    n: ipaddress.IPv4Address(f"100.64.0.{i + 1}") for i, n in enumerate(NODES)
}
CA = CertificateAuthority.generate(now=NOW)
VERIFIER = CAPeerVerifier(CA.cert, lambda n: [OVERLAY[n]] if n in OVERLAY else [])


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
