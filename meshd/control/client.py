"""The agent's side of the control channel, sans-I/O: `ControlClient`.

Inputs: the adapter's reports about the connection it dials when told to (`connection_made`,
`connection_failed`, `connection_lost`), bytes from it (`receive_data`), API calls
(`start`, `send_signal`, `stop`) and time (`handle_timer`). Every entry point takes `now`
(any monotonic clock). Outputs: `commands()` for the adapter (`Dial`, `Send`, `Close`),
`next_event()` for the application (the tunnel), and `get_timer()`.

States (`TRANSITIONS` is the whole table):

    IDLE --start--> CONNECTING --connected--> HELLO_SENT --welcome--> READY
                      ^    \\--failed--> BACKOFF        \\--lost--> BACKOFF
                      |                   |        READY --lost--> BACKOFF
                      \\------retry-------/
    any --stop--> STOPPED

"lost" covers the peer closing, garbage from the server, no welcome within
`welcome_timeout_s`, and a server silent for its `idleTimeoutS` (pings go every `keepaliveS`,
both from the welcome). A connection the server closes after the TLS handshake without a single
byte, or after a fatal `error` before the welcome, is a *refusal* (`last_error`, log
`control.refused`): with TLS 1.3 the client's handshake completes before the server has checked
the client certificate (RFC 8446 §4.4.2), so a certificate the server does not accept (another
CA, expired) shows up only as this silent close. Refusals are retried like any loss: the cause
may be on the server's side. Reconnects back off: `first_retry_s` (fast: a restarting server is
usually back within a second), doubling up to `max_retry_s`, each delay shortened by a random
fraction up to `jitter` so a fleet spreads out; the count starts over after a session that
stayed up for `stable_after_s`.

The peer table (`peers`) is kept while disconnected (tunnels keep flowing without the server)
and replaced by the server's full list after the next welcome. `PeerLeft` keeps the entry,
offline. A `revoked` error empties it (`PeersChanged` with every peer removed): the server
sent every peer a table without this node, so their tunnels to it are gone and their
handshakes refuse ours; keeping our half would leave keys the peers forgot in place once the
revocation is lifted. A fatal error that ends a session is named in `last_error` (`closed by
the server: revoked: ...`), as before the welcome, where the refusal line says it (the
`control.server_error` line is then a debug one: a refused node retries every few seconds).

Versions: the hello says `config.version` (the newest); a server that refuses it with
`unsupported-version` (a version 1 server refuses anything but 1) gets a hello of
`MIN_PROTOCOL_VERSION` on the next attempt, until a session ends (a restarted server may be
newer). `report_nat` sends a `nat` message in a session of version 2 or later; otherwise the
NAT waits for the next hello, which always carries the latest one. A version 2 welcome carries
the NAT the server stored for this node (`stored_nat`): `effective_nat` is this agent's own
classification once it has one, the stored class until then (never the other way round).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from edgeweave import __version__
from edgeweave.log import event
from meshd.control.wire import (
    MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    NAT_VERSION,
    PROTOCOL_VERSION,
    ControlProtocolError,
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
    message_type,
)

log = logging.getLogger("meshd.control")

DEFAULT_TURN_PORT = 3478


class ControlNotReady(Exception):
    """Local misuse: a signal was sent while the client has no session (check `ready`)."""


@dataclass(frozen=True)
class ControlClientConfig:
    """Who the agent is to the server, and the client's timings."""

    static_key: bytes
    """This node's X25519 tunnel static public key (32 bytes)."""
    nat: NatSummary | None = None
    """This node's NAT, if `meshd netcheck` classified it."""
    software: str = f"meshd (edgeweave) {__version__}"
    """Told to the server in the hello, for its logs."""
    first_retry_s: float = 0.1
    """Delay before the first reconnect."""
    retry_factor: float = 2.0
    """Each further failure multiplies the delay by this."""
    max_retry_s: float = 2.0
    """Longest delay between attempts."""
    jitter: float = 0.5
    """Each delay is shortened by a random fraction in [0, jitter)."""
    stable_after_s: float = 10.0
    """A session that lasted this long resets the backoff."""
    welcome_timeout_s: float = 5.0
    """Hello sent and no welcome this long: give up on the connection."""
    connect_timeout_s: float = 5.0
    """For the adapter: TCP connect plus TLS handshake."""
    max_frame: int = MAX_FRAME
    """Largest frame body accepted from the server."""
    version: int = PROTOCOL_VERSION
    """Protocol version said in the hello (older ones: tests of mixed fleets)."""

    def __post_init__(self) -> None:
        Hello(self.static_key)  # checks the key
        if not MIN_PROTOCOL_VERSION <= self.version <= PROTOCOL_VERSION:
            raise ValueError(f"version must be in {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
        if not 0 < self.first_retry_s <= self.max_retry_s or self.retry_factor < 1:
            raise ValueError("need 0 < firstRetryS <= maxRetryS and retryFactor >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if min(self.welcome_timeout_s, self.connect_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")


# --- commands (to the adapter) -----------------------------------------------------------------


@dataclass(frozen=True)
class Dial:
    """Open a connection to the server (TLS with the node certificate), then report it."""


@dataclass(frozen=True)
class Send:
    """Write bytes to the current connection."""

    data: bytes
    """Whole frames."""


@dataclass(frozen=True)
class Close:
    """Close the current connection; do not report its loss."""

    reason: str
    """Why, for the log."""


Command = Dial | Send | Close
"""What the machine asks of its adapter."""


# --- events (to the application) ---------------------------------------------------------------


@dataclass(frozen=True)
class Welcomed:
    """A session started (first time or after a reconnect)."""

    node: str
    """This node's name as the server knows it (from the certificate)."""
    overlay: ipaddress.IPv4Interface
    """This node's overlay address and the mesh prefix (for `mesh0`)."""
    turn: TurnGrant | None
    """TURN credentials, if the server hands any out."""
    server_time: float
    """The server's Unix time."""
    sessions: int
    """Sessions so far, this one included (1 = first connect)."""
    nat: NatSummary | None = None
    """This node's NAT as the server stored it (last report, maybe from before a restart);
    None when it has none or the session is version 1. `ControlClient.effective_nat` uses it
    until this agent classifies its NAT itself."""


@dataclass(frozen=True)
class PeersChanged:
    """The peer table changed."""

    peers: Mapping[str, PeerInfo]
    """The whole table now (a snapshot)."""
    changed: tuple[str, ...]
    """Nodes added or whose entry changed (online flag, key, NAT, groups)."""
    removed: tuple[str, ...]
    """Nodes no longer in the table."""


@dataclass(frozen=True)
class SignalReceived:
    """A peer sent us a signal through the server."""

    peer: str
    """The sender (stamped by the server, not claimed by the peer)."""
    payload: Mapping[str, Any]
    """The opaque JSON object."""


@dataclass(frozen=True)
class CredentialsRefreshed:
    """Fresh TURN credentials (hand them to `TurnClient.update_credentials`)."""

    turn: TurnGrant
    """The new credentials."""


@dataclass(frozen=True)
class ServerError:
    """The server reported an error (fatal ones are followed by `Disconnected`)."""

    code: str
    """`meshd.control.server.ErrorCode` value."""
    message: str
    """Detail."""
    peer: str
    """The peer it concerns (a signal's destination), or empty."""


@dataclass(frozen=True)
class Disconnected:
    """A session ended; the client reconnects by itself."""

    reason: str
    """Why."""
    retry_at: float
    """When the next attempt starts (the `now` clock)."""


ControlEvent = (Welcomed | PeersChanged | SignalReceived | CredentialsRefreshed | ServerError
                | Disconnected)
"""Everything `next_event` returns."""


class ClientState(enum.Enum):
    """Where the client is."""

    IDLE = "idle"
    CONNECTING = "connecting"
    HELLO_SENT = "hello-sent"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"


_S = ClientState
TRANSITIONS: dict[tuple[ClientState, str], ClientState] = {
    (_S.IDLE, "start"): _S.CONNECTING,
    (_S.CONNECTING, "connected"): _S.HELLO_SENT,
    (_S.CONNECTING, "failed"): _S.BACKOFF,
    (_S.HELLO_SENT, "welcome"): _S.READY,
    (_S.HELLO_SENT, "lost"): _S.BACKOFF,
    (_S.READY, "lost"): _S.BACKOFF,
    (_S.BACKOFF, "retry"): _S.CONNECTING,
    **{(state, "stop"): _S.STOPPED for state in ClientState},
}
"""Every allowed (state, input) and the state it leads to."""

_MAX_OUTSTANDING_PINGS = 8
REFUSAL_LOG_EVERY = 30
"""Consecutive refusals are logged at WARNING the first time and every this many (INFO
otherwise): one line per retry would flood the log of a node that will stay refused."""
SILENT_REFUSAL = ("the server closed the connection right after the TLS handshake without a "
                  "word: it did not accept this node's certificate (not issued by its CA, "
                  "expired, or not a node's); its log (control.tls_refused) says which")


def effective_turn_servers(turn: TurnGrant, control_host: str) -> tuple[TurnServerAddress, ...]:
    """The TURN servers to use: the grant's, or the control host on 3478/UDP when it names
    none."""
    return turn.servers or (TurnServerAddress(control_host, DEFAULT_TURN_PORT, "udp"),)


_ROUTINE_ERRORS = frozenset({"shutdown", "replaced"})  # expected in normal operation
REVOKED = "revoked"
"""The server's error code for a revoked node (`meshd.control.server.ErrorCode.REVOKED`)."""


class ControlClient:
    """One agent's control session, reconnecting forever until `stop`."""

    def __init__(self, config: ControlClientConfig, rng: random.Random | None = None) -> None:
        self.config = config
        """Settings."""
        self.state = ClientState.IDLE
        """Current state."""
        self.node: str | None = None
        """This node's name, once welcomed."""
        self.overlay: ipaddress.IPv4Interface | None = None
        """This node's overlay address, once welcomed (kept across reconnects)."""
        self.turn: TurnGrant | None = None
        """The latest TURN credentials."""
        self.rtt_s: float | None = None
        """Last ping round trip."""
        self.sessions = 0
        """Welcomes received."""
        self.failures = 0
        """Consecutive failed attempts (reset by a stable session)."""
        self.refusals = 0
        """Consecutive connections the server refused before a welcome."""
        self.last_error: str | None = None
        """Why the last attempt or session failed (None once welcomed)."""
        self.keepalive_s = 5.0
        """Ping interval (the server's, from the welcome)."""
        self.idle_timeout_s = 15.0
        """Silence after which the server counts as gone (the server's, from the welcome)."""
        self.version: int | None = None
        """Protocol version of the current (or last) session, from its welcome."""
        self.stored_nat: NatSummary | None = None
        """This node's NAT as the server stored it, from the latest welcome."""
        self._hello_version = config.version
        self._nat = config.nat
        self._nat_told: NatSummary | None = None  # what the current session's server has
        self._rng = rng or random.Random()
        self._peers: dict[str, PeerInfo] = {}
        self._commands: list[Command] = []
        self._events: deque[ControlEvent] = deque()
        self._decoder = FrameDecoder(config.max_frame)
        self._retry_at: float | None = None
        self._welcome_deadline: float | None = None
        self._ready_at = 0.0
        self._last_rx = 0.0
        self._next_ping: float | None = None
        self._ping_seq = 0
        self._pings: dict[int, float] = {}
        self._heard = False  # any byte on the current connection
        # The server's last session-level error, when nothing followed it: the reason of the
        # close that comes next (a fatal error, before or after the welcome).
        self._fatal: Error | None = None

    # --- API ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A session is up: signals can be sent."""
        return self.state is ClientState.READY

    @property
    def nat(self) -> NatSummary | None:
        """This node's NAT as last reported (config, then `report_nat`)."""
        return self._nat

    @property
    def effective_nat(self) -> NatSummary | None:
        """This node's NAT to act on (guessing, metric labels, status): our own classification
        (`nat`) once there is one, else the class the server stored (`stored_nat`)."""
        return self._nat if self._nat is not None else self.stored_nat

    @property
    def nat_source(self) -> str | None:
        """Where `effective_nat` comes from: `probed` (our own classification), `stored` (the
        server's record, from the welcome) or None (no class yet)."""
        if self._nat is not None:
            return "probed"
        return "stored" if self.stored_nat is not None else None

    def report_nat(self, nat: NatSummary, now: float) -> None:
        """This node's NAT was (re)classified: tell the server now when the session allows it
        (version 2), else in the next hello. A repeat of the last report sends nothing."""
        self._nat = nat
        self._tell_nat()

    def _tell_nat(self) -> None:
        nat = self._nat
        if (nat is None or nat == self._nat_told or not self.ready or self.version is None
                or self.version < NAT_VERSION):
            return
        self._send(Nat(nat))
        self._nat_told = nat

    @property
    def peers(self) -> Mapping[str, PeerInfo]:
        """The peer table (kept while disconnected)."""
        return self._peers

    def start(self, now: float) -> None:
        """Dial the server for the first time."""
        self._move("start")
        self._commands.append(Dial())

    def stop(self, now: float) -> None:
        """Close the session for good (no more dials)."""
        if self.state in (ClientState.HELLO_SENT, ClientState.READY, ClientState.CONNECTING):
            self._commands.append(Close("stopped"))
        self._move("stop")
        self._clear_timers()

    def send_signal(self, peer: str, payload: Mapping[str, Any], now: float) -> None:
        """Send an opaque JSON object to `peer` through the server. Raises `ControlNotReady`
        without a session, `ValueError` for a bad peer name or payload."""
        if not self.ready:
            raise ControlNotReady(f"no control session (state {self.state.value})")
        self._commands.append(Send(encode_frame(Signal(peer, payload))))

    def commands(self) -> list[Command]:
        """What the adapter must do now, in order (drains)."""
        out, self._commands = self._commands, []
        return out

    def next_event(self) -> ControlEvent | None:
        """The next event for the application, or None."""
        return self._events.popleft() if self._events else None

    # --- adapter reports ----------------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The dialed connection is up (TLS done): say hello."""
        if self.state is not ClientState.CONNECTING:
            return
        self._move("connected")
        self._decoder = FrameDecoder(self.config.max_frame)
        self._heard, self._fatal = False, None
        self._last_rx = now
        self._welcome_deadline = now + self.config.welcome_timeout_s
        cfg = self.config
        self._send(Hello(cfg.static_key, self._hello_version, self._nat, cfg.software))
        self._nat_told = self._nat

    def connection_failed(self, reason: str, now: float) -> None:
        """The dial failed (refused, timeout, TLS)."""
        if self.state is not ClientState.CONNECTING:
            return
        self._move("failed")
        self._backoff(now)
        self.last_error = reason
        event(log, logging.INFO, "control.dial_failed", reason=reason, failures=self.failures,
              retry_in=f"{self._retry_at - now if self._retry_at else 0:.2f}")

    def connection_lost(self, reason: str, now: float) -> None:
        """The connection ended without us asking."""
        if self.state is ClientState.CONNECTING:
            self.connection_failed(reason, now)
        elif self.state is ClientState.HELLO_SENT and (self._fatal is not None
                                                       or not self._heard):
            self._refused(reason, now)
        elif self.state in (ClientState.HELLO_SENT, ClientState.READY):
            fatal = self._fatal  # e.g. `revoked`: say it in last_error (meshd status)
            self._lose(f"{reason}: {fatal.code}: {fatal.message}" if fatal is not None
                       else reason, now, close=False)

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the server."""
        if not self._connected() or not data:
            return
        self._last_rx = now
        self._heard = True
        try:
            messages = self._decoder.feed(data)
        except ControlProtocolError as exc:
            for message in exc.messages:
                self._receive(message, now)
                if not self._connected():
                    return
            self._lose(f"protocol error: {exc}", now, close=True)
            return
        for message in messages:
            self._receive(message, now)
            if not self._connected():
                return

    # --- time ---------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` should run next."""
        if self.state is ClientState.BACKOFF:
            return self._retry_at
        if self.state is ClientState.HELLO_SENT:
            return self._welcome_deadline
        if self.state is ClientState.READY:
            assert self._next_ping is not None
            return min(self._next_ping, self._last_rx + self.idle_timeout_s)
        return None

    def handle_timer(self, now: float) -> None:
        """Retry, give up on a silent server, or ping, as due."""
        if self.state is ClientState.BACKOFF:
            if self._retry_at is not None and now >= self._retry_at:
                self._move("retry")
                self._retry_at = None
                self._commands.append(Dial())
        elif self.state is ClientState.HELLO_SENT:
            if self._welcome_deadline is not None and now >= self._welcome_deadline:
                self._lose("no welcome from the server", now, close=True)
        elif self.state is ClientState.READY:
            if now - self._last_rx >= self.idle_timeout_s:
                self._lose(f"server silent for {self.idle_timeout_s:g} s", now, close=True)
                return
            assert self._next_ping is not None
            if now >= self._next_ping:
                self._ping_seq += 1
                self._pings[self._ping_seq] = now
                if len(self._pings) > _MAX_OUTSTANDING_PINGS:
                    del self._pings[min(self._pings)]
                self._send(Ping(self._ping_seq))
                self._next_ping = now + self.keepalive_s

    # --- messages -----------------------------------------------------------------------------

    def _receive(self, message: Message, now: float) -> None:
        if isinstance(message, Error):
            if not message.peer:  # about the session, not a signal: the server then closes
                routine = message.code in _ROUTINE_ERRORS
                if not routine:
                    self._fatal = message
                # Before the welcome it is a refusal: `control.refused` names it, rate-limited
                # (a revoked or unauthorized node is refused on every retry).
                level = (logging.INFO if routine else logging.DEBUG
                         if self.state is ClientState.HELLO_SENT else logging.WARNING)
                event(log, level, "control.server_error", node=self.node or "-",
                      code=message.code, message=message.message)
            self._events.append(ServerError(message.code, message.message, message.peer))
            if not message.peer and message.code == REVOKED and self._peers:
                removed = tuple(self._peers)
                self._peers = {}
                event(log, logging.WARNING, "control.revoked", node=self.node or "-",
                      peers_dropped=len(removed))
                self._events.append(PeersChanged({}, (), removed))
            return
        # More from the server: an error before this was not what closes the session (a
        # `nat` over the rate is answered and the session goes on).
        self._fatal = None
        if self.state is ClientState.HELLO_SENT:
            if isinstance(message, Welcome):
                self._welcome(message, now)
            else:
                self._lose(f"protocol error: {message_type(message)} before welcome", now,
                           close=True)
            return
        if isinstance(message, Peers):
            self._replace_peers(message.peers)
        elif isinstance(message, PeerJoined):
            self._update_peer(message.peer)
        elif isinstance(message, PeerLeft):
            old = self._peers.get(message.node)
            if old is not None and old.online:
                self._update_peer(replace(old, online=False))
        elif isinstance(message, Signal):
            self._events.append(SignalReceived(message.peer, message.payload))
        elif isinstance(message, Credentials):
            self.turn = message.turn
            self._events.append(CredentialsRefreshed(message.turn))
        elif isinstance(message, Pong):
            sent = self._pings.pop(message.seq, None)
            if sent is not None:
                self.rtt_s = now - sent
        else:
            self._lose(f"protocol error: unexpected {message_type(message)}", now, close=True)

    def _welcome(self, welcome: Welcome, now: float) -> None:
        self._move("welcome")
        self._welcome_deadline = None
        self.refusals, self.last_error = 0, None
        self.node, self.overlay, self.turn = welcome.node, welcome.overlay, welcome.turn
        self.keepalive_s, self.idle_timeout_s = welcome.keepalive_s, welcome.idle_timeout_s
        self.version = welcome.version
        self.stored_nat = welcome.nat
        self.sessions += 1
        self._ready_at = now
        self._next_ping = now + self.keepalive_s
        self._pings.clear()
        event(log, logging.INFO, "control.welcome", node=welcome.node, overlay=welcome.overlay,
              session=self.sessions, turn=welcome.turn is not None,
              stored_nat=welcome.nat.nat_type if welcome.nat is not None else "-")
        self._events.append(Welcomed(welcome.node, welcome.overlay, welcome.turn,
                                     welcome.server_time, self.sessions, welcome.nat))
        self._tell_nat()  # reported while the hello was on its way

    def _replace_peers(self, peers: tuple[PeerInfo, ...]) -> None:
        table = {p.node: p for p in peers if p.node != self.node}
        changed = tuple(n for n, p in table.items() if self._peers.get(n) != p)
        removed = tuple(n for n in self._peers if n not in table)
        self._peers = table
        self._events.append(PeersChanged(dict(table), changed, removed))

    def _update_peer(self, peer: PeerInfo) -> None:
        if peer.node == self.node or self._peers.get(peer.node) == peer:
            return
        self._peers[peer.node] = peer
        self._events.append(PeersChanged(dict(self._peers), (peer.node,), ()))

    # --- helpers ------------------------------------------------------------------------------

    def _connected(self) -> bool:
        return self.state in (ClientState.HELLO_SENT, ClientState.READY)

    def _move(self, what: str) -> None:
        self.state = TRANSITIONS[(self.state, what)]

    def _send(self, message: Message) -> None:
        self._commands.append(Send(encode_frame(message)))

    def _refused(self, reason: str, now: float) -> None:
        """The server ended the connection before a welcome, silently or with a fatal error."""
        fatal = self._fatal
        if (fatal is not None and fatal.code == "unsupported-version"
                and self._hello_version > MIN_PROTOCOL_VERSION):
            # An older server: say hello again in the oldest version (no `nat` messages).
            event(log, logging.INFO, "control.version_fallback", refused=self._hello_version,
                  fallback=MIN_PROTOCOL_VERSION, message=fatal.message)
            self._hello_version = MIN_PROTOCOL_VERSION
            self._move("lost")
            self._backoff(now)
            return
        why = (f"refused by the server: {fatal.code}: {fatal.message}" if fatal is not None
               else f"refused: {SILENT_REFUSAL} ({reason})")
        self.refusals += 1
        self.last_error = why
        self._move("lost")
        self._backoff(now)
        assert self._retry_at is not None
        first = self.refusals == 1 or self.refusals % REFUSAL_LOG_EVERY == 0
        event(log, logging.WARNING if first else logging.INFO, "control.refused",
              reason=why, attempts=self.refusals, retry_in=f"{self._retry_at - now:.2f}")

    def _lose(self, reason: str, now: float, *, close: bool) -> None:
        was_ready = self.state is ClientState.READY
        self.last_error = reason
        if was_ready:
            self._hello_version = self.config.version  # the next server may be newer
        if close:
            self._commands.append(Close(reason))
        self._move("lost")
        if was_ready and now - self._ready_at >= self.config.stable_after_s:
            self.failures = 0
        self._backoff(now)
        assert self._retry_at is not None
        event(log, logging.WARNING if was_ready else logging.INFO, "control.lost",
              node=self.node or "-", reason=reason, retry_in=f"{self._retry_at - now:.2f}")
        if was_ready:
            self._events.append(Disconnected(reason, self._retry_at))

    def _backoff(self, now: float) -> None:
        cfg = self.config
        delay = min(cfg.max_retry_s, cfg.first_retry_s * cfg.retry_factor ** self.failures)
        delay *= 1 - cfg.jitter * self._rng.random()
        self.failures += 1
        self._clear_timers()
        self._retry_at = now + delay

    def _clear_timers(self) -> None:
        self._retry_at = self._welcome_deadline = self._next_ping = None
        self._pings.clear()

