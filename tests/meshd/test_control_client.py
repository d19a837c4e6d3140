"""meshd.control.client: the agent's machine alone, fed frames by hand on a virtual clock."""

from __future__ import annotations

import ipaddress
import logging
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.control.client import (
    REFUSAL_LOG_EVERY,
    TRANSITIONS,
    ClientState,
    Close,
    ControlClient,
    ControlClientConfig,
    ControlEvent,
    ControlNotReady,
    CredentialsRefreshed,
    Dial,
    Disconnected,
    PeersChanged,
    Send,
    ServerError,
    SignalReceived,
    Welcomed,
    effective_turn_servers,
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
    TurnGrant,
    TurnServerAddress,
    Welcome,
    encode_frame,
)

KEY = b"\x11" * 32
OVERLAY = ipaddress.IPv4Interface("100.64.9.9/16")
GRANT = TurnGrant("1700003600:edge-1", "pw", 1700003600, "edgeweave")


def peer(node: str, online: bool = True, key: int = 2) -> PeerInfo:
    return PeerInfo(node, ipaddress.IPv4Address(f"100.64.0.{key}"), bytes([key]) * 32, online)


class Driver:
    """One client; what it wrote, decoded; what it asked for."""

    def __init__(self, seed: int = 1, **config: Any) -> None:
        self.client = ControlClient(ControlClientConfig(KEY, **config), random.Random(seed))
        self.now = 100.0
        self.sent: list[Message] = []
        self.actions: list[str] = []
        self.events: list[ControlEvent] = []
        self._decoder = FrameDecoder()

    def drain(self) -> None:
        for command in self.client.commands():
            if isinstance(command, Send):
                self.sent += self._decoder.feed(command.data)
            elif isinstance(command, Dial):
                self.actions.append("dial")
            elif isinstance(command, Close):
                self.actions.append(f"close:{command.reason}")
                self._decoder = FrameDecoder()
        while (ev := self.client.next_event()) is not None:
            self.events.append(ev)

    def connect(self) -> None:
        self.client.connection_made(self.now)
        self.drain()

    def feed(self, *messages: Message) -> None:
        self.client.receive_data(b"".join(encode_frame(m) for m in messages), self.now)
        self.drain()

    def welcome(self, keepalive: float = 5.0, idle: float = 15.0) -> None:
        self.feed(Welcome("edge-1", OVERLAY, 1.7e9, keepalive, idle, GRANT), Peers(()))

    def ready(self) -> None:
        self.client.start(self.now)
        self.drain()
        self.connect()
        self.welcome()

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while (timer := self.client.get_timer()) is not None and timer <= target:
            self.now = max(self.now, timer)
            self.client.handle_timer(self.now)
            self.drain()
        self.now = target

    def take(self) -> list[ControlEvent]:
        out, self.events = self.events, []
        return out


def state(d: Driver) -> ClientState:
    return d.client.state


def test_start_hello_welcome() -> None:
    d = Driver(nat=NatSummary("symmetric"), software="t")
    d.client.start(d.now)
    d.drain()
    assert d.actions == ["dial"] and state(d) is ClientState.CONNECTING
    d.connect()
    assert d.sent == [Hello(KEY, nat=NatSummary("symmetric"), software="t")]
    assert state(d) is ClientState.HELLO_SENT
    d.welcome()
    welcomed, peers = d.take()
    assert welcomed == Welcomed("edge-1", OVERLAY, GRANT, 1.7e9, 1)
    assert peers == PeersChanged({}, (), ())
    assert d.client.ready and d.client.overlay == OVERLAY and d.client.turn == GRANT


def test_pings_and_rtt() -> None:
    d = Driver()
    d.ready()
    d.sent.clear()
    d.advance(5.0)
    assert d.sent == [Ping(1)]
    d.now += 0.04
    d.feed(Pong(1))
    assert d.client.rtt_s == pytest.approx(0.04)
    d.advance(5.0)
    assert d.sent[-1] == Ping(2)
    d.feed(Pong(99))  # unknown seq: ignored
    assert d.client.rtt_s == pytest.approx(0.04)


def test_silent_server_is_dropped_and_redialed_fast() -> None:
    d = Driver()
    d.ready()
    d.take()
    d.advance(14.9)
    assert d.client.ready
    d.advance(0.2)
    assert d.actions[-2:] == ["close:server silent for 15 s", "dial"]
    (disconnected,) = d.take()
    assert isinstance(disconnected, Disconnected)
    assert 0 < disconnected.retry_at - 115.0 <= 0.1  # a fast first retry


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    d = Driver(seed=7)
    d.client.start(d.now)
    d.drain()
    delays = []
    for _ in range(10):
        d.client.connection_failed("refused", d.now)
        d.drain()
        timer = d.client.get_timer()
        assert timer is not None
        delays.append(timer - d.now)
        d.advance(timer - d.now)
        assert d.actions[-1] == "dial"
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 * min(2.0, 0.1 * 2**i) <= x <= min(2.0, 0.1 * 2**i)
               for i, x in enumerate(delays))
    assert max(delays) <= 2.0 and delays[-1] >= 1.0
    assert not any(isinstance(e, Disconnected) for e in d.take())  # failed dials are quiet


def test_a_stable_session_resets_the_backoff_a_flapping_one_does_not() -> None:
    d = Driver()
    d.ready()
    d.client.failures = 5
    d.advance(10.0)
    d.feed(Pong(1))
    d.client.connection_lost("reset", d.now)
    d.drain()
    assert d.client.failures == 1  # stable for >= 10 s: start over
    d.advance(1.0)
    d.connect()
    d.welcome()
    d.client.connection_lost("reset", d.now)  # flapping: keeps growing
    assert d.client.failures == 2


def test_no_welcome_in_time() -> None:
    d = Driver(welcome_timeout_s=2.0)
    d.client.start(d.now)
    d.connect()
    d.advance(2.0)
    assert d.actions[-1] == "close:no welcome from the server"
    assert d.client.state is ClientState.BACKOFF


def test_server_errors_become_events_and_a_refusal_retries() -> None:
    d = Driver()
    d.client.start(d.now)
    d.connect()
    d.feed(Error("key-in-use", "no"))
    d.client.connection_lost("closed", d.now)
    d.drain()
    assert d.take() == [ServerError("key-in-use", "no", "")]
    assert d.client.state is ClientState.BACKOFF


def test_a_silent_close_after_tls_is_a_refusal_of_our_certificate(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.control")
    d = Driver()
    d.client.start(d.now)
    for attempt in range(1, REFUSAL_LOG_EVERY + 2):
        d.drain()
        d.connect()  # TLS 1.3: our handshake completes, then the server checks our certificate
        d.client.connection_lost("closed by the server", d.now)
        d.drain()
        assert d.client.state is ClientState.BACKOFF and d.client.refusals == attempt
        d.advance(5.0)
        assert d.actions[-1] == "dial"  # retried, however often
    assert d.client.last_error is not None and d.client.last_error.startswith("refused: ")
    assert "did not accept this node's certificate" in d.client.last_error
    assert not d.take()  # never welcomed: nothing for the application
    levels = [r.levelno for r in caplog.records if r.getMessage() == "control.refused"]
    assert levels == ([logging.WARNING] + [logging.INFO] * (REFUSAL_LOG_EVERY - 2)
                      + [logging.WARNING, logging.INFO])  # first, then every 30th
    d.connect()
    d.welcome()
    assert d.client.refusals == 0 and d.client.last_error is None


def test_a_fatal_error_before_the_welcome_is_a_refusal_naming_it() -> None:
    d = Driver()
    d.client.start(d.now)
    d.connect()
    d.feed(Error("unauthorized", "the client certificate names no node"))
    d.client.connection_lost("closed by the server", d.now)
    assert d.client.refusals == 1
    assert d.client.last_error == ("refused by the server: unauthorized: the client "
                                   "certificate names no node")


def test_a_server_that_answered_or_shut_down_did_not_refuse() -> None:
    d = Driver()
    d.client.start(d.now)
    d.connect()
    d.feed(Error("shutdown", "meshd server is stopping"))
    d.client.connection_lost("closed by the server", d.now)
    assert d.client.refusals == 0 and d.client.last_error == "closed by the server"
    d.advance(5.0)
    d.connect()
    d.feed(Pong(1))  # it spoke (out of place, but not a refusal of the handshake)
    assert d.client.state is ClientState.BACKOFF and d.client.refusals == 0
    assert d.client.last_error is not None and "protocol error" in d.client.last_error


def test_garbage_or_misplaced_messages_drop_the_connection() -> None:
    d = Driver()
    d.ready()
    d.client.receive_data(b"\x00\x00\x00\x02{}", d.now)
    d.drain()
    assert d.actions[-1].startswith("close:protocol error")
    d2 = Driver()
    d2.client.start(d2.now)
    d2.connect()
    d2.feed(Peers(()))  # before welcome
    assert d2.actions[-1].startswith("close:protocol error")
    d3 = Driver()
    d3.ready()
    d3.feed(Hello(KEY))  # never from a server
    assert d3.client.state is ClientState.BACKOFF


def test_peer_table() -> None:
    d = Driver()
    d.ready()
    d.take()
    d.feed(Peers((peer("edge-2"), peer("edge-3", key=3), peer("edge-1", key=9))))
    (changed,) = d.take()
    assert isinstance(changed, PeersChanged)
    assert set(changed.peers) == {"edge-2", "edge-3"}  # never ourselves
    d.feed(PeerLeft("edge-2"))
    (left,) = d.take()
    assert left.changed == ("edge-2",) and not d.client.peers["edge-2"].online  # type: ignore[union-attr]
    assert d.client.peers["edge-2"].static_key == bytes([2]) * 32  # kept, offline
    d.feed(PeerJoined(peer("edge-2", key=4)))
    assert d.client.peers["edge-2"] == peer("edge-2", key=4)
    d.feed(PeerJoined(peer("edge-2", key=4)))  # no change, no event
    assert len(d.take()) == 1
    # Disconnected: the table stays; the next full list replaces it.
    d.client.connection_lost("reset", d.now)
    assert set(d.client.peers) == {"edge-2", "edge-3"}
    d.advance(1.0)
    d.connect()
    d.feed(Welcome("edge-1", OVERLAY, 0, 5, 15), Peers((peer("edge-3", key=3),)))
    last = d.take()[-1]
    assert last == PeersChanged({"edge-3": peer("edge-3", key=3)}, (), ("edge-2",))


def test_signals_and_credentials() -> None:
    d = Driver()
    with pytest.raises(ControlNotReady):
        d.client.send_signal("edge-2", {}, d.now)
    d.ready()
    d.take()
    d.sent.clear()
    d.client.send_signal("edge-2", {"gen": 1}, d.now)
    d.drain()
    assert d.sent == [Signal("edge-2", {"gen": 1})]
    with pytest.raises(ValueError):
        d.client.send_signal("Not_A_Node", {}, d.now)
    fresh = TurnGrant("1700007200:edge-1", "pw2", 1700007200, "edgeweave")
    d.feed(Signal("edge-3", {"ufrag": "x"}), Credentials(fresh))
    assert d.take() == [SignalReceived("edge-3", {"ufrag": "x"}), CredentialsRefreshed(fresh)]
    assert d.client.turn == fresh


def test_stop() -> None:
    d = Driver()
    d.ready()
    d.client.stop(d.now)
    d.drain()
    assert d.actions[-1] == "close:stopped" and d.client.state is ClientState.STOPPED
    assert d.client.get_timer() is None
    d.advance(100)
    assert d.actions.count("dial") == 1


def test_stale_adapter_reports_are_ignored() -> None:
    d = Driver()
    d.client.connection_made(d.now)  # not dialing: ignored
    d.client.connection_failed("x", d.now)
    d.client.receive_data(b"junk", d.now)
    assert d.client.state is ClientState.IDLE


def test_effective_turn_servers() -> None:
    assert effective_turn_servers(GRANT, "cloud.example") == (
        TurnServerAddress("cloud.example", 3478, "udp"),)
    explicit = TurnGrant("u", "p", 1, "r", (TurnServerAddress("t", 443, "tcp"),))
    assert effective_turn_servers(explicit, "cloud.example") == explicit.servers


def test_transition_table_is_closed() -> None:
    for (state, _), target in TRANSITIONS.items():
        assert state in ClientState and target in ClientState
    assert all((s, "stop") in TRANSITIONS for s in ClientState)


def test_config_checks() -> None:
    with pytest.raises(ValueError):
        ControlClientConfig(b"short")
    with pytest.raises(ValueError):
        ControlClientConfig(KEY, first_retry_s=3.0, max_retry_s=2.0)
    with pytest.raises(ValueError):
        ControlClientConfig(KEY, jitter=1.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=48), max_size=6), st.booleans())
def test_any_bytes_from_the_server_never_raise(chunks: list[bytes], welcomed: bool) -> None:
    d = Driver()
    if welcomed:
        d.ready()
    else:
        d.client.start(d.now)
        d.connect()
    for chunk in chunks:
        d.client.receive_data(chunk, d.now)
        d.drain()
    d.advance(30.0)
    assert d.client.state in (ClientState.READY, ClientState.HELLO_SENT, ClientState.BACKOFF,
                              ClientState.CONNECTING)


# --- NAT reports and versions ---------------------------------------------------------------------

PR = NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")
SYM = NatSummary("symmetric", "address-and-port-dependent")


def test_report_nat_sends_a_nat_message_in_a_version_2_session_once_per_change() -> None:
    d = Driver()
    d.ready()
    assert d.client.version == 2
    d.sent.clear()
    d.client.report_nat(PR, d.now)
    d.client.report_nat(PR, d.now)
    d.drain()
    assert d.sent == [Nat(PR)] and d.client.nat == PR


def test_a_nat_reported_while_disconnected_rides_on_the_next_hello() -> None:
    d = Driver()
    d.client.report_nat(SYM, d.now)  # not ready: kept
    d.ready()
    assert d.sent[0] == Hello(KEY, 2, SYM, d.client.config.software)
    assert Nat(SYM) not in d.sent  # the hello said it already


def test_a_nat_reported_while_the_hello_is_on_its_way_follows_the_welcome() -> None:
    d = Driver()
    d.client.start(d.now)
    d.drain()
    d.connect()
    d.client.report_nat(PR, d.now)
    d.drain()
    assert d.sent == [Hello(KEY, 2, None, d.client.config.software)]
    d.welcome()
    assert d.sent[-1] == Nat(PR)


def test_the_stored_nat_of_the_welcome_is_used_until_our_own_report() -> None:
    d = Driver()
    assert (d.client.effective_nat, d.client.nat_source) == (None, None)
    d.client.start(d.now)
    d.drain()
    d.connect()
    d.feed(Welcome("edge-1", OVERLAY, 1.7e9, 5.0, 15.0, GRANT, 2, PR), Peers(()))
    (welcomed,) = [e for e in d.take() if isinstance(e, Welcomed)]
    assert welcomed.nat == PR and d.client.stored_nat == PR
    assert (d.client.effective_nat, d.client.nat_source) == (PR, "stored")
    assert d.client.nat is None  # not ours: never sent back as if we had probed it
    assert not any(isinstance(m, Nat) for m in d.sent)
    d.client.report_nat(SYM, d.now)  # our probe: it wins
    assert (d.client.effective_nat, d.client.nat_source) == (SYM, "probed")
    # A later welcome with an older stored class never overrides our own result.
    d.client.connection_lost("reset", d.now)
    d.advance(5.0)
    d.connect()
    assert d.sent[-1] == Hello(KEY, 2, SYM, d.client.config.software)
    d.feed(Welcome("edge-1", OVERLAY, 1.7e9, 5.0, 15.0, GRANT, 2, PR), Peers(()))
    assert d.client.stored_nat == PR
    assert (d.client.effective_nat, d.client.nat_source) == (SYM, "probed")


def test_a_welcome_without_a_stored_nat_leaves_the_class_unknown() -> None:
    d = Driver()
    d.ready()
    (welcomed,) = [e for e in d.take() if isinstance(e, Welcomed)]
    assert welcomed.nat is None
    assert (d.client.effective_nat, d.client.nat_source) == (None, None)


def test_a_version_1_session_never_sends_nat() -> None:
    d = Driver()
    d.client.start(d.now)
    d.drain()
    d.connect()
    d.feed(Welcome("edge-1", OVERLAY, 1.7e9, 5.0, 15.0, GRANT, 1), Peers(()))
    d.sent.clear()
    d.client.report_nat(PR, d.now)
    d.drain()
    assert d.sent == [] and d.client.version == 1


def test_an_old_server_refusing_version_2_gets_a_version_1_hello_until_the_session_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    d = Driver()
    d.client.start(d.now)
    d.drain()
    d.connect()
    assert isinstance(d.sent[-1], Hello) and d.sent[-1].version == 2
    with caplog.at_level(logging.INFO, "meshd.control"):
        d.feed(Error("unsupported-version", "version 2 is not 1"))
        d.client.connection_lost("closed by the server", d.now)
        d.drain()
    assert "control.version_fallback" in caplog.text and "control.refused" not in caplog.text
    assert d.client.refusals == 0
    d.advance(1.0)
    d.connect()
    assert d.sent[-1] == Hello(KEY, 1, None, d.client.config.software)
    d.feed(Welcome("edge-1", OVERLAY, 1.7e9, 5.0, 15.0, GRANT, 1), Peers(()))
    d.client.connection_lost("reset", d.now)  # a session ended: the server may be newer now
    d.drain()
    d.advance(3.0)
    d.connect()
    assert isinstance(d.sent[-1], Hello) and d.sent[-1].version == 2


def test_an_unsupported_version_at_version_1_is_a_refusal() -> None:
    d = Driver(version=1)
    d.client.start(d.now)
    d.drain()
    d.connect()
    d.feed(Error("unsupported-version", "version 1 is older than 3"))
    d.client.connection_lost("closed by the server", d.now)
    assert d.client.refusals == 1
    assert "unsupported-version" in (d.client.last_error or "")


def test_config_version_range() -> None:
    with pytest.raises(ValueError, match="version"):
        ControlClientConfig(KEY, version=3)
