"""meshd.control.server: the sans-I/O core, driven with raw frames and a virtual clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.control.registry import MemoryRegistryStore, NodeRecord
from meshd.control.server import (
    ACCEPTED,
    TRANSITIONS,
    CloseConnection,
    ControlServer,
    ControlServerConfig,
    ErrorCode,
    Output,
    SendFrame,
    SessionState,
)
from meshd.control.wire import (
    Credentials,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Nat,
    NatSummary,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    Peers,
    Ping,
    Pong,
    Signal,
    TurnServerAddress,
    Welcome,
    encode_frame,
)

T0 = 1_700_000_000.0
SECRET = b"turn-secret"
K = {name: hashlib.sha256(name.encode()).digest() for name in ("a", "b", "c", "x")}


class Harness:
    """A ControlServer and the frames it sent to each connection."""

    def __init__(self, store: MemoryRegistryStore | None = None, **config: Any) -> None:
        self.store = store or MemoryRegistryStore()
        config.setdefault("turn_secret", SECRET)
        self.server = ControlServer(ControlServerConfig(**config), self.store)
        self.now = T0
        self.inbox: dict[int, list[Message]] = {}
        self.closed: dict[int, str] = {}
        self._decoders: dict[int, FrameDecoder] = {}
        self._next = 1

    def take(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, SendFrame):
                decoder = self._decoders.setdefault(out.conn, FrameDecoder())
                self.inbox.setdefault(out.conn, []).extend(decoder.feed(out.data))
            elif isinstance(out, CloseConnection):
                assert out.conn not in self.closed, "closed twice"
                self.closed[out.conn] = out.reason

    def connect(self, node: str | None, not_after: float | None = None) -> int:
        conn, self._next = self._next, self._next + 1
        self.take(self.server.connection_made(conn, node, self.now, not_after=not_after))
        return conn

    def send(self, conn: int, *messages: Message) -> None:
        self.raw(conn, b"".join(encode_frame(m) for m in messages))

    def raw(self, conn: int, data: bytes) -> None:
        self.take(self.server.receive_data(conn, data, self.now))

    def join(self, node: str, key: bytes | None = None, **hello: Any) -> int:
        conn = self.connect(node)
        self.send(conn, Hello(key or K[node[0]], **hello))
        return conn

    def msgs(self, conn: int) -> list[Message]:
        out, self.inbox[conn] = self.inbox.get(conn, []), []
        return out

    def of(self, conn: int, kind: type) -> list[Any]:
        return [m for m in self.msgs(conn) if isinstance(m, kind)]

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while (timer := self.server.get_timer()) is not None and timer <= target:
            self.now = timer
            self.take(self.server.handle_timer(self.now))
        self.now = target

    def lose(self, conn: int) -> None:
        self.take(self.server.connection_lost(conn, self.now))


def welcome_of(h: Harness, conn: int) -> Welcome:
    (welcome,) = [m for m in h.inbox.get(conn, []) if isinstance(m, Welcome)]
    return welcome


# --- registration -------------------------------------------------------------------------------


def test_hello_gets_welcome_peers_and_rest_style_turn_credentials() -> None:
    servers = (TurnServerAddress("198.51.100.7", 3478, "udp"),)
    h = Harness(turn_servers=servers, turn_ttl_s=600)
    conn = h.join("a-node", nat=NatSummary("symmetric"), software="test")
    welcome, peers = h.msgs(conn)
    assert isinstance(welcome, Welcome) and isinstance(peers, Peers)
    assert welcome.node == "a-node" and welcome.server_time == T0
    assert welcome.overlay.network == ipaddress.IPv4Network("100.64.0.0/16")
    assert (welcome.keepalive_s, welcome.idle_timeout_s) == (5.0, 15.0)
    turn = welcome.turn
    assert turn is not None and turn.servers == servers and turn.realm == "edgeweave"
    assert turn.username == f"{int(T0) + 600}:a-node" and turn.expires_at == int(T0) + 600
    mac = hmac.new(SECRET, turn.username.encode(), hashlib.sha1).digest()
    assert turn.password == base64.b64encode(mac).decode()
    assert peers == Peers(())
    assert h.server.online() == ["a-node"]
    assert h.server.session_state(conn) is SessionState.ACTIVE


def test_without_a_secret_no_turn_credentials() -> None:
    h = Harness(turn_secret=None)
    conn = h.join("a")
    assert welcome_of(h, conn).turn is None


def test_peers_see_each_other_join_and_leave() -> None:
    h = Harness()
    a = h.join("a", nat=NatSummary("full-cone"))
    b = h.join("b")
    overlay_a, overlay_b = welcome_of(h, a).overlay.ip, welcome_of(h, b).overlay.ip
    assert h.of(b, Peers) == [Peers((PeerInfo("a", overlay_a, K["a"], True,
                                              NatSummary("full-cone")),))]
    assert h.of(a, PeerJoined) == [PeerJoined(PeerInfo("b", overlay_b, K["b"], True))]
    h.lose(b)
    assert h.of(a, PeerLeft) == [PeerLeft("b")]
    # The entry stays, offline, with its address and key; a newcomer sees it.
    c = h.join("c")
    assert h.of(c, Peers) == [Peers((
        PeerInfo("a", overlay_a, K["a"], True, NatSummary("full-cone")),
        PeerInfo("b", overlay_b, K["b"], False)))]


def test_overlay_address_survives_a_server_restart() -> None:
    store = MemoryRegistryStore()
    h = Harness(store)
    first = {n: welcome_of(h, h.join(n)).overlay for n in ("a", "b")}
    h2 = Harness(store)  # a new process with the same data directory
    # Before anyone reconnects, peers are known offline from the registry.
    c = h2.join("c")
    listed = h2.of(c, Peers)[0].peers
    assert [(p.node, p.online, p.overlay) for p in listed] == [
        ("a", False, first["a"].ip), ("b", False, first["b"].ip)]
    assert {n: welcome_of(h2, h2.join(n)).overlay for n in ("b", "a")} == first


def test_an_address_is_never_handed_to_another_node() -> None:
    h = Harness(overlay_network=ipaddress.IPv4Network("10.1.0.0/29"))  # 6 addresses
    overlays = [welcome_of(h, h.join(f"n{i}", bytes([i + 1]) * 32)).overlay.ip
                for i in range(6)]
    assert len(set(overlays)) == 6
    conn = h.join("n6", b"\x07" * 32)
    assert h.msgs(conn) == [Error("no-address", "no free address left in 10.1.0.0/29")]
    assert h.closed[conn] == "no-address"
    # Going offline does not free an address either.
    h.lose(1)
    conn = h.join("n7", b"\x08" * 32)
    assert h.closed[conn] == "no-address"


def test_preset_records_are_respected() -> None:
    taken = ipaddress.IPv4Address("100.64.1.1")
    h = Harness(MemoryRegistryStore({"b": NodeRecord(taken)}))
    assert welcome_of(h, h.join("b")).overlay.ip == taken


# --- identity and spoofing -------------------------------------------------------------------


def test_a_certificate_without_node_identity_is_refused() -> None:
    h = Harness()
    conn = h.connect(None)
    assert h.msgs(conn) == [Error("unauthorized", "the client certificate names no node")]
    assert h.closed[conn] == "unauthorized"
    assert h.server.metrics.auth_failures == 1
    h.server.handshake_failed("no certificate")
    assert h.server.metrics.auth_failures == 2
    assert h.server.sessions == 0


def test_a_node_cannot_claim_another_nodes_name_or_address() -> None:
    h = Harness()
    a = h.join("a")
    overlay_a = welcome_of(h, a).overlay
    # b's hello carries extra fields naming a and a's address: they mean nothing.
    frame = json.dumps({"type": "hello", "version": 1, "node": "a", "overlay": str(overlay_a),
                        "staticKey": base64.b64encode(K["b"]).decode()}).encode()
    b = h.connect("b")
    h.raw(b, struct.pack("!I", len(frame)) + frame)
    welcome_b = welcome_of(h, b)
    assert welcome_b.node == "b" and welcome_b.overlay != overlay_a
    assert h.server.peer_table()["a"].overlay == overlay_a.ip
    assert h.server.peer_table()["a"].static_key == K["a"]


def test_a_node_cannot_publish_another_online_nodes_key() -> None:
    h = Harness()
    a = h.join("a")
    b = h.join("b", key=K["a"])
    assert h.msgs(b) == [Error("key-in-use", "this static key belongs to another online node")]
    assert h.closed[b] == "key-in-use"
    assert h.server.peer_table()["a"].static_key == K["a"] and "b" not in h.server.peer_table()
    assert not h.of(a, PeerJoined)


def test_the_only_way_to_publish_a_key_is_ones_own_hello() -> None:
    # Messages that carry keys for others (peers, peerJoined) are refused from agents.
    h = Harness()
    a = h.join("a")
    h.msgs(a)
    fake = PeerInfo("b", ipaddress.IPv4Address("100.64.0.9"), K["x"], True)
    h.send(a, PeerJoined(fake))
    assert h.closed[a] == "protocol"
    assert "b" not in h.server.peer_table()
    assert h.server.metrics.protocol_errors == 1


# --- duplicate connections -----------------------------------------------------------------


def test_a_second_connection_replaces_the_first_without_a_leave() -> None:
    h = Harness()
    a1 = h.join("a")
    overlay = welcome_of(h, a1).overlay
    b = h.join("b")
    h.msgs(b)
    a2 = h.join("a")
    assert h.msgs(a1)[-1] == Error("replaced", "a newer connection of this node took over")
    assert h.closed[a1] == "replaced"
    assert welcome_of(h, a2).overlay == overlay
    assert h.msgs(b) == []  # same key, still online: nothing to tell
    h.send(b, Signal("a", {"n": 1}))
    assert h.of(a2, Signal) == [Signal("b", {"n": 1})]
    h.lose(a1)  # the old connection's end changes nothing
    assert h.server.online() == ["a", "b"] and h.msgs(b) == []
    assert h.server.metrics.sessions_replaced == 1


def test_reconnect_with_a_new_key_is_announced() -> None:
    h = Harness()
    a = h.join("a")
    b = h.join("b")
    h.lose(b)
    h.msgs(a)
    b2 = h.join("b", key=K["x"])
    (joined,) = h.of(a, PeerJoined)
    assert joined.peer.static_key == K["x"] and joined.peer.online
    assert joined.peer.overlay == welcome_of(h, b2).overlay.ip


# --- signals --------------------------------------------------------------------------------


def test_signals_are_routed_between_online_nodes_only() -> None:
    h = Harness()
    a, b = h.join("a"), h.join("b")
    h.msgs(a)
    h.msgs(b)
    h.send(a, Signal("b", {"ufrag": "u", "cands": ["host 10.0.0.1 1 2 f"]}))
    assert h.msgs(b) == [Signal("a", {"ufrag": "u", "cands": ["host 10.0.0.1 1 2 f"]})]
    h.send(a, Signal("c", {}))
    assert h.msgs(a) == [Error("peer-offline", "c is not connected", "c")]
    h.send(a, Signal("a", {}))
    assert h.msgs(a) == [Error("bad-peer", "a signal to oneself", "a")]
    assert h.server.metrics.signals_routed == 1
    assert h.server.metrics.signals_dropped == {"peer-offline": 1, "bad-peer": 1}


def test_signals_before_hello_are_a_protocol_error() -> None:
    h = Harness()
    conn = h.connect("a")
    h.send(conn, Signal("b", {}))
    assert h.closed[conn] == "protocol"


def test_signal_rate_limit_per_node() -> None:
    h = Harness(signals_per_s=2.0, signal_burst=3)
    a, b = h.join("a"), h.join("b")
    h.msgs(b)
    h.send(a, *[Signal("b", {"i": i}) for i in range(5)])
    assert len(h.of(b, Signal)) == 3
    assert [e.code for e in h.of(a, Error)] == ["rate-limited", "rate-limited"]
    h.advance(1.0)  # two more tokens
    h.send(a, *[Signal("b", {"i": i}) for i in range(3)])
    assert len(h.of(b, Signal)) == 2
    assert h.server.metrics.signals_dropped == {"rate-limited": 3}
    # b's own budget is untouched.
    h.send(b, Signal("a", {}))
    assert len(h.of(a, Signal)) == 1


def test_oversized_signals_are_dropped() -> None:
    h = Harness(max_signal_bytes=300)
    a, b = h.join("a"), h.join("b")
    h.msgs(b)
    h.send(a, Signal("b", {"blob": "x" * 400}))
    assert h.of(b, Signal) == []
    assert h.msgs(a)[-1].code == "too-large"  # type: ignore[union-attr]
    assert h.server.session_state(a) is SessionState.ACTIVE


# --- liveness ---------------------------------------------------------------------------------


def test_pings_keep_a_session_alive_and_silence_ends_it() -> None:
    h = Harness()
    a, b = h.join("a"), h.join("b")
    for _ in range(6):  # 30 s of pings every 5 s
        h.advance(5.0)
        h.send(a, Ping(7))
        h.send(b, Ping(1))
    assert h.of(a, Pong)[-1] == Pong(7)
    assert h.server.online() == ["a", "b"]
    for _ in range(4):  # b goes silent
        h.advance(5.0)
        h.send(a, Ping(8))
    assert h.closed.get(b) == "idle-timeout"
    assert h.server.online() == ["a"]
    assert h.of(a, PeerLeft) == [PeerLeft("b")]
    assert h.server.metrics.sessions_expired == 1


def test_no_hello_in_time() -> None:
    h = Harness(hello_timeout_s=3.0)
    conn = h.connect("a")
    h.send(conn, Ping(1))  # pings do not count as hello
    h.advance(2.5)
    assert conn not in h.closed
    h.advance(1.0)
    assert h.closed[conn] == "hello-timeout"
    assert h.server.get_timer() is None  # nothing left to watch


def test_turn_credentials_are_refreshed_at_half_life() -> None:
    h = Harness(turn_ttl_s=600)
    a = h.join("a")
    first = welcome_of(h, a).turn
    assert first is not None
    h.msgs(a)
    for _ in range(59):
        h.advance(5.0)
        h.send(a, Ping(1))
    assert h.of(a, Credentials) == []
    h.advance(5.0)
    h.send(a, Ping(1))
    (fresh,) = h.of(a, Credentials)
    assert fresh.turn.expires_at == int(T0 + 300) + 600 > first.expires_at
    assert h.server.metrics.credentials_issued == 2


def test_a_session_ends_when_its_certificate_expires() -> None:
    h = Harness(turn_ttl_s=600)
    a = h.join("a")
    b = h.connect("b", not_after=T0 + 12.5)
    h.send(b, Hello(K["b"]))
    grant = welcome_of(h, b).turn
    assert grant is not None and grant.expires_at <= T0 + 12.5  # not beyond the identity
    for _ in range(2):
        h.advance(5.0)
        h.send(a, Ping(1))
        h.send(b, Ping(1))
    assert b not in h.closed
    h.advance(3.0)
    assert h.closed[b] == "certificate-expired"
    (error,) = [m for m in h.msgs(b) if isinstance(m, Error)]
    assert error.code == "certificate-expired"
    assert h.server.online() == ["a"]
    assert h.of(a, PeerLeft) == [PeerLeft("b")]
    assert h.server.metrics.refused["certificate-expired"] == 1


def test_credentials_refresh_stays_within_the_certificate() -> None:
    h = Harness(turn_ttl_s=600)
    b = h.connect("b", not_after=T0 + 100)
    h.send(b, Hello(K["b"]))
    assert welcome_of(h, b).turn is not None
    h.msgs(b)
    for _ in range(11):  # refresh at half of the 100 s granted
        h.advance(5.0)
        h.send(b, Ping(1))
    (fresh,) = h.of(b, Credentials)
    assert fresh.turn.expires_at <= T0 + 100


# --- garbage and misuse -------------------------------------------------------------------------


def test_garbage_closes_the_connection_after_what_parsed() -> None:
    h = Harness()
    a, b = h.join("a"), h.join("b")
    h.msgs(a)
    h.raw(a, encode_frame(Ping(3)) + b"\x00\x00\x00\x03abc")
    msgs = h.msgs(a)
    assert msgs[0] == Pong(3) and isinstance(msgs[1], Error) and msgs[1].code == "protocol"
    assert h.closed[a] == "protocol"
    assert h.of(b, PeerLeft) == [PeerLeft("a")]
    h.raw(a, encode_frame(Ping(4)))  # whatever still arrives is ignored
    assert h.msgs(a) == []


def test_oversized_frame_from_an_agent_is_refused_early() -> None:
    h = Harness()
    a = h.join("a")
    h.raw(a, struct.pack("!I", 1 << 20))
    assert h.closed[a] == "protocol"


@pytest.mark.parametrize("message", [
    Welcome("a", ipaddress.IPv4Interface("1.2.3.4/8"), 0, 1, 3),
    Peers(()), PeerLeft("b"), Pong(1),
])
def test_server_only_messages_from_an_agent_are_protocol_errors(message: Message) -> None:
    h = Harness()
    a = h.join("a")
    h.send(a, message)
    assert h.closed[a] == "protocol"


def test_unsupported_version() -> None:
    h = Harness()
    conn = h.connect("a")
    h.send(conn, Hello(K["a"], version=0))
    assert h.msgs(conn) == [Error("unsupported-version", "version 0 is older than 1")]
    assert h.server.metrics.refused == {"unsupported-version": 1}


@pytest.mark.parametrize(("hello", "session"), [(1, 1), (2, 2), (7, 2)])
def test_the_session_speaks_the_older_version(hello: int, session: int) -> None:
    h = Harness()
    conn = h.join("a", version=hello)
    assert welcome_of(h, conn).version == session


def test_second_hello_is_a_protocol_error() -> None:
    h = Harness()
    a = h.join("a")
    h.send(a, Hello(K["a"]))
    assert h.closed[a] == "protocol"


def test_registry_failure_refuses_the_hello() -> None:
    h = Harness()
    h.store.fail = "disk full"
    conn = h.join("a")
    assert h.msgs(conn) == [Error("unavailable", "registry unavailable")]
    assert h.server.online() == []


def test_agent_errors_are_logged_not_fatal() -> None:
    h = Harness()
    a = h.join("a")
    h.send(a, Error("confused", "what?"))
    assert a not in h.closed


def test_shutdown_tells_everyone() -> None:
    h = Harness()
    a, b = h.join("a"), h.connect("b")
    h.take(h.server.shutdown(h.now))
    assert h.msgs(a)[-1] == Error("shutdown", "server stopping")
    assert h.closed == {a: "shutdown", b: "shutdown"}
    assert h.server.sessions == 0 and h.server.online() == []


def test_metrics_samples() -> None:
    h = Harness()
    h.join("a")
    h.connect(None)
    samples = {(name, tuple(labels.items())): v for name, labels, v in h.server.samples()}
    assert samples[("meshd_control_nodes_online", ())] == 1
    assert samples[("meshd_control_auth_failures_total", ())] == 1
    assert samples[("meshd_control_refused_total", (("code", "unauthorized"),))] == 1
    assert samples[("meshd_control_credentials_issued_total", ())] == 1


def test_tables_are_consistent() -> None:
    codes = {c.value for c in ErrorCode}
    assert "replaced" in codes and "rate-limited" in codes
    for (state, _), target in TRANSITIONS.items():
        assert state in SessionState and target in SessionState
    assert set(ACCEPTED) == {SessionState.AWAIT_HELLO, SessionState.ACTIVE}


def test_config_checks() -> None:
    with pytest.raises(ValueError):
        ControlServerConfig(keepalive_s=10, idle_timeout_s=5)
    with pytest.raises(ValueError):
        ControlServerConfig(turn_ttl_s=1)


# --- fuzz: agent garbage never escapes as anything but a closed connection -------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
def test_any_bytes_from_an_agent_never_raise(chunks: list[bytes], hello_first: bool) -> None:
    h = Harness()
    other = h.join("b")
    conn = h.join("a") if hello_first else h.connect("a")
    for chunk in chunks:
        h.raw(conn, chunk)
    h.advance(60.0)
    assert h.server.online() in ([], ["b"], ["a", "b"], ["a"])
    del other


# --- NAT reports ----------------------------------------------------------------------------------

PR = NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")
SYM = NatSummary("symmetric", "address-and-port-dependent", "address-and-port-dependent")


def test_a_nat_message_is_stored_and_announced_to_the_others() -> None:
    h = Harness()
    a, b, c = h.join("a"), h.join("b"), h.join("c")
    h.msgs(a), h.msgs(b), h.msgs(c)
    saves = h.store.saves
    h.send(a, Nat(PR))
    assert h.msgs(a) == []
    for other in (b, c):
        (joined,) = h.of(other, PeerJoined)
        assert (joined.peer.node, joined.peer.nat, joined.peer.online) == ("a", PR, True)
    assert h.store.records["a"].nat == PR and h.store.saves == saves + 1
    assert h.server.peer_table()["a"].nat == PR
    h.send(a, Nat(PR))  # no change: no write, no announcement
    assert h.of(b, PeerJoined) == [] and h.store.saves == saves + 1
    assert h.server.metrics.nat_reports == 1
    samples = {(n, tuple(sorted(lbl.items()))): v for n, lbl, v in h.server.samples()}
    assert samples[("meshd_control_nat_reports_total", ())] == 1
    assert samples[("meshd_control_nodes_online_by_nat", (("natType", "port-restricted"),))] == 1
    assert samples[("meshd_control_nodes_online_by_nat", (("natType", "unknown"),))] == 2


def test_a_nat_message_in_a_version_1_session_is_a_protocol_error() -> None:
    h = Harness()
    a = h.join("a", version=1)
    h.send(a, Nat(PR))
    assert h.closed[a] == "protocol"
    (error,) = h.of(a, Error)
    assert "nat needs protocol version 2" in error.message


def test_a_nat_message_before_the_hello_is_a_protocol_error() -> None:
    h = Harness()
    conn = h.connect("a")
    h.send(conn, Nat(PR))
    assert h.closed[conn] == "protocol"


def test_the_nat_survives_offline_and_a_server_restart_and_a_new_hello_without_one() -> None:
    store = MemoryRegistryStore()
    h = Harness(store)
    a, b = h.join("a", nat=SYM), h.join("b")
    assert h.store.records["a"].nat == SYM
    h.lose(a)
    assert h.server.peer_table()["a"].nat == SYM  # listed offline, with its NAT
    restarted = Harness(store)
    b = restarted.join("b")
    (peers,) = restarted.of(b, Peers)
    assert [(p.node, p.online, p.nat) for p in peers.peers] == [("a", False, SYM)]
    a = restarted.join("a")  # a hello without a NAT keeps the last one (it re-learns soon)
    (joined,) = restarted.of(b, PeerJoined)
    assert joined.peer.nat == SYM and joined.peer.online


def test_the_welcome_carries_the_stored_nat_after_a_server_restart() -> None:
    store = MemoryRegistryStore()
    h = Harness(store)
    a = h.join("a")
    assert welcome_of(h, a).nat is None  # a new node: nothing stored
    h.msgs(a)
    h.send(a, Nat(PR))
    h.lose(a)
    restarted = Harness(store)  # a new server process with the same registry
    a = restarted.join("a")  # the agent restarted too: its hello has no NAT yet
    assert welcome_of(restarted, a).nat == PR
    b = restarted.join("b", nat=SYM)  # a NAT in the hello is what is stored by the welcome
    assert welcome_of(restarted, b).nat == SYM
    old = restarted.join("a", version=1)  # version 1 sessions never carry it
    welcome = welcome_of(restarted, old)
    assert welcome.version == 1 and welcome.nat is None


def test_nat_messages_share_the_signal_rate_limit() -> None:
    h = Harness(signal_burst=2, signals_per_s=1.0)
    a, b = h.join("a"), h.join("b")
    h.msgs(a), h.msgs(b)
    h.send(a, Nat(PR), Nat(SYM), Nat(PR))
    assert h.of(a, Error) == [Error("rate-limited", "nat: over 1 messages/s")]
    assert [j.peer.nat for j in h.of(b, PeerJoined)] == [PR, SYM]
    h.advance(1.0)
    h.send(a, Nat(PR))
    assert [j.peer.nat for j in h.of(b, PeerJoined)] == [PR]


def test_a_registry_failure_on_a_nat_report_keeps_the_session() -> None:
    h = Harness()
    a, b = h.join("a"), h.join("b")
    h.msgs(b)
    h.store.fail = "disk full"
    h.send(a, Nat(PR))
    assert a not in h.closed and h.of(b, PeerJoined) == []
    h.store.fail = ""
    h.send(a, Nat(PR))
    assert [j.peer.nat for j in h.of(b, PeerJoined)] == [PR]
