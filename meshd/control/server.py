"""The control channel's server core (`meshd server`), sans-I/O.

Inputs: a connection whose TLS handshake verified a client certificate from the cluster CA
(`connection_made`, with the node name the certificate carries), bytes from it
(`receive_data`), its end (`connection_lost`) and time (`handle_timer`). Every entry point
takes `now`, **Unix seconds** (TURN credentials carry a Unix expiry), and returns `Output`s for
the adapter: `SendFrame` and `CloseConnection`. `get_timer()` is the next deadline. Peer
garbage never raises: the connection gets an `error` message and is closed.

What it does:
- Identity comes only from the certificate: a connection without a node identity
  (`system:node:{name}` in `system:nodes`) is refused (`unauthorized`). A hello says nothing
  about who the node is, so a node can publish its own static key only, and its overlay
  address is whatever the registry holds for its name: a node cannot claim another's address.
  A static key held by another online node is refused (`key-in-use`).
- Registry (`meshd.control.registry`): stable overlay addresses per node name, persisted before
  use; the last static key and NAT per node, so peers are listed (offline) across server
  restarts.
- A hello of any version from `MIN_PROTOCOL_VERSION` up is accepted; the session speaks the
  lower of the hello's and ours (told in the welcome). A NAT comes in the hello or, in version 2
  sessions, in a `nat` message (rate-limited like signals); a change is saved and announced
  (`peerJoined`) to every other online node. A version 2 welcome carries the node's stored NAT
  (so a restarted agent knows its class before its own probe ends).
- A second connection of the same node replaces the first once its hello is accepted (the old
  one gets `replaced`); peers see no leave/join, only a `peerJoined` if the entry changed.
- Signals are routed between online nodes only, stamped with the sender's name, limited in
  size and rate (token bucket per session); refusals are answered with a non-fatal `error`.
- TURN credentials (`meshd.turn.credentials`, the "TURN REST API" scheme) in the welcome, and
  fresh ones (`credentials`) when half of their lifetime is gone.
- Sessions that stay silent for `idle_timeout_s` (agents ping every `keepalive_s`), or send no
  hello within `hello_timeout_s`, are closed. So is a session whose client certificate expires
  while it is open (`certificate-expired`): TLS checked validity once, at the handshake
  (RFC 5280 §6.1.3), and a node must not keep routing signals or minting TURN credentials on
  an expired identity. One sweep timer checks them every `sweep_interval_s`.
- Revocation (`set_revoked`: node names and certificate serials, from `control.revokedFile`):
  a revoked certificate is refused at connect (`revoked`), a connected one is cut at once, and
  a revoked node is left out of the published table: every online node gets a fresh `peers`
  table without it (agents drop a peer missing from it: routes, paths, tunnel keys), welcomes
  never list it, signals to it are refused as to an offline node. A node revoked by serial is
  hidden while the certificate of its last session is revoked (until it comes back with
  another one; in memory only: after a restart only node-name entries hide a node that has not
  reconnected). Lifting a revocation puts the node back (offline until it reconnects). The
  registry keeps its record and address throughout.
- Node list (`node_table`, types in `meshd.control.nodes`): every node it knows with its
  current or last session (connected at, last seen, remote address, certificate serial and
  expiry, why it ended), NAT, revocation entries that refuse it.

Session states (`TRANSITIONS`):

    AWAIT_HELLO --hello accepted--> ACTIVE --lost | replaced | idle | error--> CLOSED
         \\--lost | hello refused | hello timeout | error--> CLOSED
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgeweave.log import event
from edgeweave.pki.identity import is_valid_node_name
from edgeweave.ratelimit import TokenBucket
from meshd.control.nodes import NodeListing, NodeState, NodeTable, SessionInfo, revocation_entry
from meshd.control.registry import Registry, RegistryFull, RegistryStore, RegistryStoreError
from meshd.control.wire import (
    CLIENT_MAX_FRAME,
    MIN_PROTOCOL_VERSION,
    NAT_VERSION,
    PROTOCOL_VERSION,
    ControlProtocolError,
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
from meshd.control.wire import Credentials as CredentialsMessage
from meshd.turn.credentials import mint_credentials
from meshd.udp import Address

log = logging.getLogger("meshd.control")

ConnectionId = int
"""Chosen by the adapter, unique per connection for the life of the server."""

REFUSAL_LOG_S = 60.0
"""A refused host (or revoked node) is logged at WARNING once per this long; its retries in
between (agents retry every few seconds) are counted and reported with the next warning
(`refusals`)."""
_REFUSAL_HOSTS = 1024  # hosts remembered for that; older entries go first
_SOFTWARE_CHARS = 200  # of a hello's `software` kept for the node list (peer input)


class RefusalLog:
    """Which refused hosts to warn about now (a refused agent must not flood the log)."""

    def __init__(self, window_s: float = REFUSAL_LOG_S, hosts: int = _REFUSAL_HOSTS) -> None:
        self._window_s = window_s
        self._hosts = hosts
        self._seen: dict[str, tuple[float, int]] = {}  # host -> (last warned, refused since)

    def refused(self, host: str, now: float) -> int | None:
        """A refusal from `host`: the count of refusals since the last warning (including
        this one) when it should be warned about now, else None (counted)."""
        last = self._seen.pop(host, None)  # re-inserted last: the dict stays oldest-first
        if last is not None and now - last[0] < self._window_s:
            self._seen[host] = (last[0], last[1] + 1)
            return None
        if len(self._seen) >= self._hosts:
            del self._seen[next(iter(self._seen))]
        self._seen[host] = (now, 0)
        return 1 if last is None else last[1] + 1


class ErrorCode(enum.StrEnum):
    """`code` of the error messages the server sends (F = the connection is then closed)."""

    UNAUTHORIZED = "unauthorized"
    """F: the certificate names no node."""
    UNSUPPORTED_VERSION = "unsupported-version"
    """F: the hello's version is older than MIN_PROTOCOL_VERSION."""
    KEY_IN_USE = "key-in-use"
    """F: another online node presented that static key."""
    NO_ADDRESS = "no-address"
    """F: the overlay network is full."""
    UNAVAILABLE = "unavailable"
    """F: the registry could not be saved."""
    PROTOCOL = "protocol"
    """F: garbage, or a message not allowed in the session's state."""
    REPLACED = "replaced"
    """F: a newer connection of the same node took over."""
    HELLO_TIMEOUT = "hello-timeout"
    """F: no hello in time."""
    IDLE_TIMEOUT = "idle-timeout"
    """F: nothing received for idleTimeoutS."""
    CERTIFICATE_EXPIRED = "certificate-expired"
    """F: the client certificate's notAfter passed while connected."""
    SHUTDOWN = "shutdown"
    """F: the server is stopping (reconnect)."""
    REVOKED = "revoked"
    """F: the node, or this certificate of it, is on the revocation list."""
    BAD_PEER = "bad-peer"
    """A signal to oneself."""
    PEER_OFFLINE = "peer-offline"
    """A signal to a node without a session; dropped."""
    RATE_LIMITED = "rate-limited"
    """A signal or `nat` over the sender's rate; dropped."""
    TOO_LARGE = "too-large"
    """A signal payload over maxSignalBytes; dropped."""


@dataclass(frozen=True)
class SendFrame:
    """Write bytes (whole frames) to a connection."""

    conn: ConnectionId
    """The connection."""
    data: bytes
    """What to write."""


@dataclass(frozen=True)
class CloseConnection:
    """Close a connection after writing what was queued before."""

    conn: ConnectionId
    """The connection."""
    reason: str
    """Why, for the log."""


Output = SendFrame | CloseConnection
"""What the core asks its adapter to do."""


@dataclass(frozen=True)
class ControlServerConfig:
    """Settings of the control server core (`control:` in meshd's configuration maps here)."""

    overlay_network: ipaddress.IPv4Network = ipaddress.IPv4Network("100.64.0.0/16")
    """Where overlay addresses come from."""
    keepalive_s: float = 5.0
    """Agents ping this often (told in the welcome)."""
    idle_timeout_s: float = 15.0
    """A session silent this long is closed (told in the welcome)."""
    hello_timeout_s: float = 10.0
    """A connection without hello this long after connecting is closed."""
    sweep_interval_s: float = 1.0
    """How often idle sessions and due credentials are looked for."""
    turn_secret: bytes | None = None
    """Shared secret of the TURN REST credentials; None = no TURN credentials."""
    turn_realm: str = "edgeweave"
    """REALM of the TURN servers."""
    turn_ttl_s: int = 3600
    """Lifetime of minted TURN credentials; fresh ones are sent after half of it."""
    turn_servers: tuple[TurnServerAddress, ...] = ()
    """TURN servers told to agents; empty = the control host on port 3478 (UDP)."""
    signals_per_s: float = 20.0
    """Sustained signals per second per session."""
    signal_burst: int = 40
    """Signals a session may send at once."""
    max_signal_bytes: int = 16 * 1024
    """Largest signal body routed."""
    max_frame: int = CLIENT_MAX_FRAME
    """Largest frame body accepted from an agent."""

    def __post_init__(self) -> None:
        if min(self.keepalive_s, self.idle_timeout_s, self.hello_timeout_s,
               self.sweep_interval_s, self.signals_per_s) <= 0:
            raise ValueError("timeouts, intervals and signalsPerS must be positive")
        if self.idle_timeout_s <= self.keepalive_s:
            raise ValueError("idleTimeoutS must be longer than keepaliveS")
        if self.turn_ttl_s < 60:
            raise ValueError("turnTtlS must be at least 60")
        if self.signal_burst < 1 or self.max_signal_bytes < 256 or self.max_frame < 1024:
            raise ValueError("signalBurst >= 1, maxSignalBytes >= 256, maxFrame >= 1024")


@dataclass(slots=True)
class ControlMetrics:
    """Counters an exporter reads (gauges are computed by `ControlServer.samples`)."""

    connections_total: int = 0
    """Connections that completed TLS."""
    auth_failures: int = 0
    """TLS handshakes refused (no or foreign certificate) and certificates naming no node."""
    hellos: int = 0
    """Hellos accepted."""
    refused: dict[str, int] = field(default_factory=dict)
    """Fatal errors sent, by code."""
    sessions_replaced: int = 0
    """Sessions taken over by a newer connection of the same node."""
    sessions_expired: int = 0
    """Sessions closed for silence, a missing hello or an expired certificate."""
    protocol_errors: int = 0
    """Connections closed for garbage or out-of-place messages."""
    signals_routed: int = 0
    """Signals delivered."""
    signals_dropped: dict[str, int] = field(default_factory=dict)
    """Signals refused, by error code."""
    credentials_issued: int = 0
    """TURN credentials minted (welcome and refresh)."""
    nat_reports: int = 0
    """NATs agents reported (hello or `nat`) that changed their entry."""


class SessionState(enum.Enum):
    """Where one connection is."""

    AWAIT_HELLO = "await-hello"
    ACTIVE = "active"
    CLOSED = "closed"


TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (SessionState.AWAIT_HELLO, "hello"): SessionState.ACTIVE,
    (SessionState.AWAIT_HELLO, "close"): SessionState.CLOSED,
    (SessionState.ACTIVE, "close"): SessionState.CLOSED,
}
"""Every allowed (state, input) and the state it leads to."""

ACCEPTED: dict[SessionState, tuple[type, ...]] = {
    SessionState.AWAIT_HELLO: (Hello, Ping, Error),
    SessionState.ACTIVE: (Signal, Nat, Ping, Error),
}
"""Messages an agent may send in each state; anything else is a protocol error."""


@dataclass
class _Session:
    conn: ConnectionId
    node: str
    connected_at: float
    last_rx: float
    decoder: FrameDecoder
    signals: TokenBucket  # signals and `nat` messages share it
    state: SessionState = SessionState.AWAIT_HELLO
    static_key: bytes = b""
    version: int = MIN_PROTOCOL_VERSION
    turn_refresh_at: float | None = None
    not_after: float | None = None  # the client certificate's expiry (Unix seconds)
    serial: int | None = None  # the client certificate's serial number
    remote: Address | None = None  # where the connection came from (for the node list)
    software: str = ""  # what the hello said the agent runs

    def info(self, ended_at: float | None = None, reason: str | None = None) -> SessionInfo:
        return SessionInfo(self.connected_at, self.last_rx, ended_at, reason, self.remote,
                           self.serial, self.not_after, self.version, self.software)

    def move(self, what: str) -> None:
        self.state = TRANSITIONS[(self.state, what)]


class ControlServer:
    """The registry of connected nodes and the router between them."""

    def __init__(self, config: ControlServerConfig, store: RegistryStore) -> None:
        self.config = config
        """Settings."""
        self.registry = Registry(config.overlay_network, store)
        """Persisted node records (raises `RegistryStoreError` for a bad store)."""
        self.metrics = ControlMetrics()
        """Counters."""
        self._sessions: dict[ConnectionId, _Session] = {}
        self._online: dict[str, _Session] = {}  # node -> its ACTIVE session
        self._published: dict[str, PeerInfo] = {}  # the table as agents know it
        self._next_sweep: float | None = None
        self._revoked_nodes: frozenset[str] = frozenset()
        self._revoked_serials: frozenset[int] = frozenset()
        self._last_serial: dict[str, int] = {}  # node -> serial of its last accepted hello
        # node -> its last session that was active and ended (for the node list; one per
        # registered node, in memory only)
        self._ended: dict[str, SessionInfo] = {}
        self._refusals = RefusalLog()  # revoked nodes retry every few seconds
        for node in self.registry:
            info = self._info(node, online=False)
            if info is not None:
                self._published[node] = info

    # --- entry points ---------------------------------------------------------------------------

    def connection_made(self, conn: ConnectionId, node: str | None, now: float, *,
                        not_after: float | None = None, serial: int | None = None,
                        remote: Address | None = None) -> list[Output]:
        """A connection passed TLS; `node` is the node name in its client certificate (None if
        the certificate names no node), `not_after` when that certificate expires (Unix
        seconds; the session is closed then), `serial` its serial number (checked against
        the revocation list), `remote` the address it came from (shown in the node list)."""
        self.metrics.connections_total += 1
        if node is None or not is_valid_node_name(node):
            self.metrics.auth_failures += 1
            event(log, logging.WARNING, "control.refused", conn=conn,
                  reason="certificate names no node")
            return self._refuse_unregistered(conn, ErrorCode.UNAUTHORIZED,
                                             "the client certificate names no node")
        why = self._revocation(node, serial)
        if why is not None:
            count = self._refusals.refused(node, now)
            event(log, logging.WARNING if count is not None else logging.DEBUG,
                  "control.refused", conn=conn, node=node, reason=why,
                  refusals=count if count is not None else "-")
            return self._refuse_unregistered(conn, ErrorCode.REVOKED, why)
        self._sessions[conn] = _Session(conn, node, now, now,
                                        FrameDecoder(self.config.max_frame),
                                        TokenBucket.full(self.config.signals_per_s,
                                                         self.config.signal_burst, now),
                                        not_after=not_after, serial=serial, remote=remote)
        if self._next_sweep is None:
            self._next_sweep = now + self.config.sweep_interval_s
        event(log, logging.DEBUG, "control.connect", conn=conn, node=node)
        return []

    def handshake_failed(self, reason: str) -> None:
        """The adapter refused a TLS handshake (no certificate, or not from the CA)."""
        self.metrics.auth_failures += 1

    def receive_data(self, conn: ConnectionId, data: bytes, now: float) -> list[Output]:
        """Bytes from a connection."""
        session = self._sessions.get(conn)
        if session is None or not data:
            return []
        session.last_rx = now
        out: list[Output] = []
        try:
            messages = session.decoder.feed(data)
        except ControlProtocolError as exc:
            for message in exc.messages:
                self._receive(session, message, now, out)
                if session.state is SessionState.CLOSED:
                    return out
            return self._protocol_error(session, str(exc), now, out)
        for message in messages:
            self._receive(session, message, now, out)
            if session.state is SessionState.CLOSED:
                break
        return out

    def connection_lost(self, conn: ConnectionId, now: float) -> list[Output]:
        """The connection ended (by the peer, or after a `CloseConnection`)."""
        session = self._sessions.get(conn)
        if session is None:
            return []
        out: list[Output] = []
        self._end(session, "connection lost", now, out)
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` should run next."""
        return self._next_sweep

    def handle_timer(self, now: float) -> list[Output]:
        """Close silent sessions and those whose certificate expired; refresh due TURN
        credentials."""
        if self._next_sweep is None or now < self._next_sweep:
            return []
        out: list[Output] = []
        cfg = self.config
        for session in list(self._sessions.values()):
            if session.not_after is not None and now >= session.not_after:
                self.metrics.sessions_expired += 1
                event(log, logging.WARNING, "control.certificate_expired", conn=session.conn,
                      node=session.node)
                self._fail(session, ErrorCode.CERTIFICATE_EXPIRED,
                           "the client certificate expired", now, out)
            elif session.state is SessionState.AWAIT_HELLO:
                if now - session.connected_at >= cfg.hello_timeout_s:
                    self.metrics.sessions_expired += 1
                    self._fail(session, ErrorCode.HELLO_TIMEOUT, "no hello in time", now, out)
            elif now - session.last_rx >= cfg.idle_timeout_s:
                self.metrics.sessions_expired += 1
                self._fail(session, ErrorCode.IDLE_TIMEOUT,
                           f"nothing received for {cfg.idle_timeout_s:g} s", now, out)
            elif session.turn_refresh_at is not None and now >= session.turn_refresh_at:
                grant = self._grant(session, now)
                if grant is not None:
                    self._send(session, CredentialsMessage(grant), out)
        self._next_sweep = now + cfg.sweep_interval_s if self._sessions else None
        return out

    def set_revoked(self, nodes: Iterable[str], serials: Iterable[int],
                    now: float) -> list[Output]:
        """Put a revocation list in force (the whole list: what is not in it is no longer
        revoked): cut the sessions it revokes (`revoked`), and send every online node a fresh
        `peers` table if the nodes it hides or shows changed."""
        self._revoked_nodes = frozenset(nodes)
        self._revoked_serials = frozenset(serials)
        out: list[Output] = []
        for session in list(self._sessions.values()):
            why = self._revocation(session.node, session.serial)
            if why is not None:
                event(log, logging.WARNING, "control.revoked_session", conn=session.conn,
                      node=session.node, reason=why)
                self._fail(session, ErrorCode.REVOKED, why, now, out, announce=False)
        self._sync_table(out)
        return out

    def shutdown(self, now: float) -> list[Output]:
        """Tell every agent the server stops (they reconnect at once) and close everything."""
        out: list[Output] = []
        for session in list(self._sessions.values()):
            self._fail(session, ErrorCode.SHUTDOWN, "server stopping", now, out, count=False)
        return out

    # --- introspection ------------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        """Connections with a session (waiting for hello or active)."""
        return len(self._sessions)

    def online(self) -> list[str]:
        """Nodes with an active session, sorted."""
        return sorted(self._online)

    def peer_table(self) -> Mapping[str, PeerInfo]:
        """The table as agents see it (every node with a known static key, revoked ones
        left out)."""
        return dict(self._published)

    def node_table(self, relay_allocations: Mapping[str, int] | None = None) -> NodeTable:
        """Every node the server knows (registry, online, named by the revocation list), for
        `GET /nodes`; `relay_allocations` (node -> allocations held) from the relay of the
        same process, None without one."""
        names = set(self.registry) | set(self._online) | self._revoked_nodes
        listed = []
        for node in sorted(names):
            record = self.registry.get(node)
            active = self._online.get(node)
            revoked_by: list[str] = []
            if node in self._revoked_nodes:
                revoked_by.append(node)
            serial = self._last_serial.get(node)
            if serial is not None and serial in self._revoked_serials:
                revoked_by.append(revocation_entry(serial))
            state = (NodeState.REVOKED if revoked_by else
                     NodeState.ONLINE if active is not None else NodeState.OFFLINE)
            listed.append(NodeListing(
                node, record.overlay if record is not None else None, state,
                record.static_key if record is not None else None,
                record.nat if record is not None else None,
                active.info() if active is not None else self._ended.get(node),
                tuple(revoked_by),
                relay_allocations.get(node, 0) if relay_allocations is not None else None))
        pending = sum(1 for s in self._sessions.values()
                      if s.state is SessionState.AWAIT_HELLO)
        return NodeTable(tuple(listed), self.config.overlay_network, self._revoked_nodes,
                         self._revoked_serials, pending, relay_allocations is not None)

    def session_state(self, conn: ConnectionId) -> SessionState:
        """A connection's state (CLOSED when unknown)."""
        session = self._sessions.get(conn)
        return session.state if session is not None else SessionState.CLOSED

    def samples(self) -> list[tuple[str, dict[str, str], int]]:
        """Prometheus samples (name, labels, value) of counters and gauges."""
        m = self.metrics
        out: list[tuple[str, dict[str, str], int]] = [
            ("meshd_control_nodes_online", {}, len(self._online)),
            ("meshd_control_sessions", {}, len(self._sessions)),
            ("meshd_control_nodes_registered", {}, len(self.registry)),
            ("meshd_control_connections_total", {}, m.connections_total),
            ("meshd_control_auth_failures_total", {}, m.auth_failures),
            ("meshd_control_hellos_total", {}, m.hellos),
            ("meshd_control_sessions_replaced_total", {}, m.sessions_replaced),
            ("meshd_control_sessions_expired_total", {}, m.sessions_expired),
            ("meshd_control_protocol_errors_total", {}, m.protocol_errors),
            ("meshd_control_signals_routed_total", {}, m.signals_routed),
            ("meshd_control_credentials_issued_total", {}, m.credentials_issued),
            ("meshd_control_nat_reports_total", {}, m.nat_reports),
            ("meshd_control_revoked_nodes", {},
             len(self._revoked_nodes) + len(self._revoked_serials)),
        ]
        by_type: dict[str, int] = {}
        for node in self._online:
            info = self._published.get(node)
            kind = info.nat.nat_type if info is not None and info.nat is not None else "unknown"
            by_type[kind] = by_type.get(kind, 0) + 1
        out += [("meshd_control_nodes_online_by_nat", {"natType": kind}, n)
                for kind, n in sorted(by_type.items())]
        out += [("meshd_control_refused_total", {"code": code}, n)
                for code, n in sorted(m.refused.items())]
        out += [("meshd_control_signals_dropped_total", {"reason": reason}, n)
                for reason, n in sorted(m.signals_dropped.items())]
        return out

    # --- messages -----------------------------------------------------------------------------

    def _receive(self, session: _Session, message: Message, now: float,
                 out: list[Output]) -> None:
        if not isinstance(message, ACCEPTED[session.state]):
            self._protocol_error(session, f"{message_type(message)} not allowed in state "
                                 f"{session.state.value}", now, out)
        elif isinstance(message, Hello):
            self._hello(session, message, now, out)
        elif isinstance(message, Ping):
            self._send(session, Pong(message.seq), out)
        elif isinstance(message, Signal):
            self._signal(session, message, now, out)
        elif isinstance(message, Nat):
            self._nat(session, message, now, out)
        elif isinstance(message, Error):
            event(log, logging.INFO, "control.agent_error", node=session.node,
                  code=message.code, message=message.message)

    def _hello(self, session: _Session, hello: Hello, now: float, out: list[Output]) -> None:
        node = session.node
        if hello.version < MIN_PROTOCOL_VERSION:
            return self._fail(session, ErrorCode.UNSUPPORTED_VERSION,
                              f"version {hello.version} is older than {MIN_PROTOCOL_VERSION}",
                              now, out)
        for other, active in self._online.items():
            if other != node and active.static_key == hello.static_key:
                return self._fail(session, ErrorCode.KEY_IN_USE,
                                  "this static key belongs to another online node", now, out)
        try:
            record = self.registry.register(node, hello.static_key)
        except RegistryFull as exc:
            return self._fail(session, ErrorCode.NO_ADDRESS, str(exc), now, out)
        except RegistryStoreError as exc:
            event(log, logging.ERROR, "control.registry_error", node=node, error=exc)
            return self._fail(session, ErrorCode.UNAVAILABLE, "registry unavailable", now, out)
        previous = self._online.get(node)
        if previous is not None and previous is not session:
            self.metrics.sessions_replaced += 1
            self._fail(previous, ErrorCode.REPLACED, "a newer connection of this node took "
                       "over", now, out, count=False, announce=False)
        session.move("hello")
        session.static_key = hello.static_key
        session.version = min(hello.version, PROTOCOL_VERSION)
        session.software = hello.software[:_SOFTWARE_CHARS]
        if session.serial is not None:
            self._last_serial[node] = session.serial
        else:
            self._last_serial.pop(node, None)
        if hello.nat is not None:
            self._store_nat(session, hello.nat)
        self._online[node] = session
        self.metrics.hellos += 1
        cfg = self.config
        overlay = ipaddress.IPv4Interface(f"{record.overlay}/{cfg.overlay_network.prefixlen}")
        stored = self.registry.get(node)  # the hello's NAT, else the last one reported
        welcome = Welcome(node, overlay, now, cfg.keepalive_s, cfg.idle_timeout_s,
                          self._grant(session, now), session.version,
                          stored.nat if stored is not None and session.version >= NAT_VERSION
                          else None)
        self._send(session, welcome, out)
        self._send(session, Peers(tuple(p for n, p in sorted(self._published.items())
                                        if n != node)), out)
        event(log, logging.INFO, "control.hello", conn=session.conn, node=node,
              overlay=record.overlay, replaced=previous is not None,
              software=hello.software or "-")
        self._publish(node, out)

    def _signal(self, session: _Session, signal: Signal, now: float, out: list[Output]) -> None:
        cfg = self.config
        target = self._online.get(signal.peer)
        if signal.peer == session.node:
            return self._drop(session, signal, ErrorCode.BAD_PEER, "a signal to oneself", out)
        if not session.signals.take(now):
            return self._drop(session, signal, ErrorCode.RATE_LIMITED,
                              f"over {cfg.signals_per_s:g} signals/s", out)
        if target is None or self._hidden(signal.peer):
            return self._drop(session, signal, ErrorCode.PEER_OFFLINE,
                              f"{signal.peer} is not connected", out)
        try:
            frame = encode_frame(Signal(session.node, signal.payload),
                                 max_frame=cfg.max_signal_bytes)
        except ValueError:
            return self._drop(session, signal, ErrorCode.TOO_LARGE,
                              f"signal larger than {cfg.max_signal_bytes} bytes", out)
        self.metrics.signals_routed += 1
        out.append(SendFrame(target.conn, frame))

    def _nat(self, session: _Session, message: Nat, now: float, out: list[Output]) -> None:
        if session.version < NAT_VERSION:
            self._protocol_error(session, f"nat needs protocol version {NAT_VERSION}, the "
                                 f"session speaks {session.version}", now, out)
            return
        if not session.signals.take(now):
            dropped = self.metrics.signals_dropped
            dropped["rate-limited"] = dropped.get("rate-limited", 0) + 1
            self._send(session, Error(ErrorCode.RATE_LIMITED.value,
                                      f"nat: over {self.config.signals_per_s:g} messages/s"),
                       out)
            return
        if self._store_nat(session, message.nat):
            self._publish(session.node, out)

    def _store_nat(self, session: _Session, nat: NatSummary) -> bool:
        """Save a node's reported NAT; True when its entry changed."""
        record = self.registry.get(session.node)
        if record is None or record.nat == nat:
            return False
        try:
            self.registry.set_nat(session.node, nat)
        except RegistryStoreError as exc:  # not fatal: the hello of its next session says it
            event(log, logging.ERROR, "control.registry_error", node=session.node, error=exc)
            return False
        self.metrics.nat_reports += 1
        event(log, logging.INFO, "control.nat", node=session.node, nat_type=nat.nat_type,
              mapping=nat.mapping or "-", filtering=nat.filtering or "-")
        return True

    def _drop(self, session: _Session, signal: Signal, code: ErrorCode, text: str,
              out: list[Output]) -> None:
        dropped = self.metrics.signals_dropped
        dropped[code.value] = dropped.get(code.value, 0) + 1
        event(log, logging.DEBUG, "control.signal_drop", node=session.node, peer=signal.peer,
              reason=code.value)
        self._send(session, Error(code.value, text, signal.peer), out)

    # --- helpers ------------------------------------------------------------------------------

    def _grant(self, session: _Session, now: float) -> TurnGrant | None:
        cfg = self.config
        if cfg.turn_secret is None:
            return None
        ttl: float = cfg.turn_ttl_s
        if session.not_after is not None:  # no relay credentials beyond the identity
            ttl = max(1.0, min(ttl, session.not_after - now))
        creds = mint_credentials(cfg.turn_secret, session.node, now, ttl)
        self.metrics.credentials_issued += 1
        session.turn_refresh_at = now + ttl / 2
        return TurnGrant(creds.username, creds.password, creds.expires, cfg.turn_realm,
                         cfg.turn_servers)

    def _info(self, node: str, *, online: bool) -> PeerInfo | None:
        record = self.registry.get(node)
        if record is None or record.static_key is None or not self.registry.usable(record):
            return None
        return PeerInfo(node, record.overlay, record.static_key, online, record.nat)

    def _publish(self, node: str, out: list[Output]) -> None:
        """Tell every other online node about a change of `node`'s entry."""
        if self._hidden(node):
            return
        info = self._info(node, online=node in self._online)
        if info is None or self._published.get(node) == info:
            return
        left = node not in self._online
        self._published[node] = info
        message: Message = PeerLeft(node) if left else PeerJoined(info)
        frame = encode_frame(message)
        out.extend(SendFrame(s.conn, frame) for n, s in self._online.items() if n != node)

    def _revocation(self, node: str, serial: int | None) -> str | None:
        """Why a certificate of `node` with `serial` is revoked, None if it is not."""
        if node in self._revoked_nodes:
            return f"node {node} is revoked"
        if serial is not None and serial in self._revoked_serials:
            return f"certificate serial {serial:x} is revoked"
        return None

    def _hidden(self, node: str) -> bool:
        """Left out of the published table: revoked by name, or its last session's
        certificate is revoked."""
        return node in self._revoked_nodes or \
            self._last_serial.get(node, -1) in self._revoked_serials

    def _sync_table(self, out: list[Output]) -> None:
        """Bring the published table in line with the registry and the revocation list;
        if it changed, send every online node the whole table (a `peers` replaces the
        agent's, so peers missing from it are dropped; v1 agents understand it too)."""
        table: dict[str, PeerInfo] = {}
        for node in self.registry:
            if not self._hidden(node):
                info = self._info(node, online=node in self._online)
                if info is not None:
                    table[node] = info
        if table == self._published:
            return
        self._published = table
        event(log, logging.INFO, "control.table", nodes=len(table),
              hidden=sum(1 for n in self.registry if self._hidden(n)))
        for node, session in self._online.items():
            self._send(session, Peers(tuple(p for n, p in sorted(table.items())
                                            if n != node)), out)

    def _send(self, session: _Session, message: Message, out: list[Output]) -> None:
        out.append(SendFrame(session.conn, encode_frame(message)))

    def _protocol_error(self, session: _Session, text: str, now: float,
                        out: list[Output]) -> list[Output]:
        self.metrics.protocol_errors += 1
        event(log, logging.WARNING, "control.protocol_error", conn=session.conn,
              node=session.node, error=text)
        self._fail(session, ErrorCode.PROTOCOL, text, now, out)
        return out

    def _fail(self, session: _Session, code: ErrorCode, text: str, now: float,
              out: list[Output], *, count: bool = True, announce: bool = True) -> None:
        """Send a fatal error, close the connection and end the session."""
        if count:
            self.metrics.refused[code.value] = self.metrics.refused.get(code.value, 0) + 1
        self._send(session, Error(code.value, text), out)
        out.append(CloseConnection(session.conn, code.value))
        self._end(session, code.value, now, out, announce=announce)

    def _end(self, session: _Session, reason: str, now: float, out: list[Output], *,
             announce: bool = True) -> None:
        was_active = session.state is SessionState.ACTIVE
        session.move("close")
        del self._sessions[session.conn]
        if self._online.get(session.node) is session:
            del self._online[session.node]
            if announce:
                self._publish(session.node, out)
        if was_active:
            self._ended[session.node] = session.info(now, reason)
            event(log, logging.INFO, "control.bye", conn=session.conn, node=session.node,
                  reason=reason)
        if not self._sessions:
            self._next_sweep = None

    def _refuse_unregistered(self, conn: ConnectionId, code: ErrorCode,
                             text: str) -> list[Output]:
        self.metrics.refused[code.value] = self.metrics.refused.get(code.value, 0) + 1
        return [SendFrame(conn, encode_frame(Error(code.value, text))),
                CloseConnection(conn, code.value)]

