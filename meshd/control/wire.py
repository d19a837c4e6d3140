"""The control channel's wire format (agent ↔ `meshd server`, inside TLS): pure parse/encode.

One frame per message, a 4-byte length then one JSON object:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 Length of the body (big-endian)               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    /     Body: Length bytes of UTF-8 JSON, exactly one object,     /
    /     {"type": "<message type>", <fields>...}                   /
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Length is 1..`MAX_FRAME` (16 MiB: a full `peers` list of a large mesh); a receiver may set a
smaller limit (`meshd server` accepts `CLIENT_MAX_FRAME`, 64 KiB, from agents). Fields are
camelCase; unknown fields are ignored (a newer peer may add some), an unknown `type` is an error
(peers agree on the message set through `version` in hello/welcome).

Versions: the hello carries the highest version the agent speaks, the welcome the version of the
session, min(agent's, server's); a server accepts any version from `MIN_PROTOCOL_VERSION` up.
Version 2 adds `nat` (agent -> server) and the welcome's `nat` (the agent's stored class, so a
restarted agent knows it before its own probe ends). Servers of version 1 refuse any hello but
version 1 (`unsupported-version`): the agent then says hello again with version 1, and never
sends `nat` in a version 1 session (its NAT still reaches the server in the hello of the next
session).

    type         direction        fields
    -----------  ---------------  ---------------------------------------------------------
    hello        agent -> server  version, staticKey (base64 X25519, 32 bytes), nat?,
                                  software?
    nat          agent -> server  natType, mapping?, filtering? (v2: the agent's NAT changed;
                                  the server stores it and sends peerJoined to the others)
    welcome      server -> agent  version, node, overlay ("100.64.0.7/16"), serverTime,
                                  keepaliveS, idleTimeoutS, turn?, nat? (v2: the NAT the
                                  server stored for this node, from an earlier session)
    credentials  server -> agent  turn (fresh TURN credentials before the old ones expire)
    peers        server -> agent  peers: the whole table
    peerJoined   server -> agent  peer (added or changed)
    peerLeft     server -> agent  node (its session ended; the entry stays, offline)
    signal       both             peer (destination when an agent sends it, source when the
                                  server delivers it), payload (an opaque JSON object)
    ping / pong  agent -> server  seq (the server answers pong with the same seq)
    error        both             code, message, peer?

A peer entry is `{"node", "overlay": "100.64.0.7", "staticKey", "online", "nat"?, "groups"?}`;
`nat` is `{"natType", "mapping"?, "filtering"?}` (from `meshd netcheck`: natType one of `NAT_TYPES`,
mapping and filtering one of `BEHAVIOURS`, absent when untested; the server refuses other values
from agents, an agent reads a value it does not know from the server as `unknown`/absent; a
welcome's `nat` is read only when its `version` is 2 or more, so a v1 agent never sees it and an
older v2 agent skips it as an unknown field); `turn` is
`{"username", "password", "expiresAt", "realm", "servers": [{"host", "port", "transport"}]}`.

Any bytes given to `parse_body`, `parse_frame` or `FrameDecoder.feed` either parse or raise
`ControlProtocolError` (a remote error: the connection is closed). Bad values given to the
message classes or `encode_frame` raise `ValueError` (local misuse).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeweave.pki.identity import is_valid_node_name
from meshd.netcheck.classify import Behaviour, NatType
from meshd.turn.credentials import TurnCredentials

PROTOCOL_VERSION = 2
"""The message set of this module (2: `nat`)."""
MIN_PROTOCOL_VERSION = 1
"""The oldest version still spoken (1: everything but `nat`)."""
NAT_VERSION = 2
"""The first version with the `nat` message."""
NAT_TYPES = frozenset(t.value for t in NatType)
"""Values of `natType`."""
BEHAVIOURS = frozenset(b.value for b in Behaviour)
"""Values of `mapping` and `filtering` (RFC 4787)."""
HEADER = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024
"""Longest body anyone sends or accepts."""
CLIENT_MAX_FRAME = 64 * 1024
"""Longest body the server accepts from an agent (hello, signal, ping)."""
STATIC_KEY_BYTES = 32
MAX_PAYLOAD_DEPTH = 32
"""Nesting of a signal payload (objects and lists) accepted."""

Transport = Literal["udp", "tcp"]


class ControlProtocolError(Exception):
    """The peer sent something that is not a control message (a remote error)."""

    def __init__(self, message: str, messages: tuple[Message, ...] = ()) -> None:
        super().__init__(message)
        self.messages = messages
        """Complete messages `FrameDecoder.feed` decoded before the garbage, in order."""


# --- messages -----------------------------------------------------------------------------------


def _check_node(node: str, what: str = "node") -> None:
    if not is_valid_node_name(node):
        raise ValueError(f"{what}: {node!r} is not a node name (a DNS subdomain)")


def _check_key(key: bytes) -> None:
    if len(key) != STATIC_KEY_BYTES:
        raise ValueError(f"staticKey must be {STATIC_KEY_BYTES} bytes, got {len(key)}")


@dataclass(frozen=True)
class NatSummary:
    """What `meshd netcheck` found about the NAT in front of a node."""

    nat_type: str
    """`public`, `full-cone`, `restricted`, `port-restricted`, `symmetric` or `unknown`."""
    mapping: str | None = None
    """Mapping behaviour (RFC 4787), e.g. `endpoint-independent`; None if untested."""
    filtering: str | None = None
    """Filtering behaviour, same values; None if untested."""


@dataclass(frozen=True)
class TurnServerAddress:
    """Where an agent reaches a TURN server."""

    host: str
    """IP or DNS name."""
    port: int
    """UDP or TCP port."""
    transport: Transport = "udp"
    """How to talk to it."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("TURN server host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"TURN server port out of range: {self.port}")
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"TURN transport must be udp or tcp, got {self.transport!r}")


@dataclass(frozen=True)
class TurnGrant:
    """Short-lived TURN credentials ("TURN REST API" scheme) and where to use them."""

    username: str
    """`<expiresAt>:<node>`."""
    password: str
    """base64(HMAC-SHA1(secret, username))."""
    expires_at: int
    """Unix seconds after which TURN servers refuse them."""
    realm: str
    """REALM of the TURN servers."""
    servers: tuple[TurnServerAddress, ...] = ()
    """TURN servers; empty = the control server's host on the STUN port (3478), UDP."""

    def credentials(self) -> TurnCredentials:
        """The pair `meshd.turn.client.TurnClient` takes."""
        return TurnCredentials(self.username, self.password)


@dataclass(frozen=True)
class PeerInfo:
    """One node of the mesh as the server publishes it."""

    node: str
    """Node name (from its certificate)."""
    overlay: ipaddress.IPv4Address
    """Its stable overlay address (`mesh0`), assigned by the server."""
    static_key: bytes
    """Its X25519 tunnel static public key (32 bytes), as it last said in its hello."""
    online: bool
    """It holds a control session now."""
    nat: NatSummary | None = None
    """Its NAT, if it reported one."""
    groups: tuple[str, ...] = ()
    """Its node groups, when the server knows them."""

    def __post_init__(self) -> None:
        _check_node(self.node)
        _check_key(self.static_key)


@dataclass(frozen=True)
class Hello:
    """First message of an agent: who it is comes from its certificate, not from here."""

    static_key: bytes
    """Its X25519 tunnel static public key (32 bytes)."""
    version: int = PROTOCOL_VERSION
    """The protocol version it speaks."""
    nat: NatSummary | None = None
    """Its NAT as `meshd netcheck` classified it, if known."""
    software: str = ""
    """Agent software and version, for logs."""

    def __post_init__(self) -> None:
        _check_key(self.static_key)


@dataclass(frozen=True)
class Welcome:
    """The server accepted the agent."""

    node: str
    """The node name the certificate carries."""
    overlay: ipaddress.IPv4Interface
    """The node's overlay address with the mesh prefix, e.g. 100.64.0.7/16."""
    server_time: float
    """Server's Unix time (for logs and skew warnings)."""
    keepalive_s: float
    """Send a ping at least this often."""
    idle_timeout_s: float
    """The server drops a session silent this long (the agent should too)."""
    turn: TurnGrant | None = None
    """TURN credentials, when the server has a relay secret."""
    version: int = PROTOCOL_VERSION
    """The protocol version of the session."""
    nat: NatSummary | None = None
    """The NAT the server stored for this node (its last report), if any; version 2+ only."""

    def __post_init__(self) -> None:
        _check_node(self.node)
        if not (self.keepalive_s > 0 and self.idle_timeout_s > 0):
            raise ValueError("keepaliveS and idleTimeoutS must be positive")
        if self.nat is not None and self.version < NAT_VERSION:
            raise ValueError(f"a welcome of version {self.version} carries no nat "
                             f"(version {NAT_VERSION} and up)")


@dataclass(frozen=True)
class Credentials:
    """Fresh TURN credentials, sent before the previous ones expire."""

    turn: TurnGrant
    """The new credentials."""


@dataclass(frozen=True)
class Peers:
    """The whole peer table (after welcome, and whenever the server resends it)."""

    peers: tuple[PeerInfo, ...]
    """Every node the server knows, but the receiver."""


@dataclass(frozen=True)
class PeerJoined:
    """A node came online or changed (new static key, NAT or groups)."""

    peer: PeerInfo
    """Its new entry."""


@dataclass(frozen=True)
class PeerLeft:
    """A node's session ended; its entry stays (offline) with the same address and key."""

    node: str
    """Who."""

    def __post_init__(self) -> None:
        _check_node(self.node)


@dataclass(frozen=True)
class Signal:
    """An opaque message between two agents, routed by the server (ICE descriptions)."""

    peer: str
    """Destination when an agent sends it; source when the server delivers it."""
    payload: Mapping[str, Any]
    """A JSON object; the server does not look inside."""

    def __post_init__(self) -> None:
        _check_node(self.peer, "peer")


@dataclass(frozen=True)
class Nat:
    """The agent's NAT changed (its background netcheck finished); version 2 sessions only."""

    nat: NatSummary
    """What it found."""


@dataclass(frozen=True)
class Ping:
    """Liveness and RTT probe from the agent; the server answers `Pong` with the same seq."""

    seq: int
    """Chosen by the sender, echoed back."""


@dataclass(frozen=True)
class Pong:
    """Answer to `Ping`."""

    seq: int
    """The ping's seq."""


@dataclass(frozen=True)
class Error:
    """Something went wrong; after a fatal one the server closes the connection."""

    code: str
    """Machine-readable code (docs/reference/meshd.md lists them)."""
    message: str
    """Human-readable detail."""
    peer: str = ""
    """The peer it concerns (a signal's destination), or empty."""


Message = (Hello | Welcome | Credentials | Peers | PeerJoined | PeerLeft | Signal | Nat | Ping
           | Pong | Error)
"""Every control message."""


# --- encoding -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _nat_doc(nat: NatSummary) -> dict[str, Any]:
    doc: dict[str, Any] = {"natType": nat.nat_type}
    if nat.mapping is not None:
        doc["mapping"] = nat.mapping
    if nat.filtering is not None:
        doc["filtering"] = nat.filtering
    return doc


def _turn_doc(turn: TurnGrant) -> dict[str, Any]:
    return {
        "username": turn.username,
        "password": turn.password,
        "expiresAt": turn.expires_at,
        "realm": turn.realm,
        "servers": [{"host": s.host, "port": s.port, "transport": s.transport}
                    for s in turn.servers],
    }


def _peer_doc(peer: PeerInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"node": peer.node, "overlay": str(peer.overlay),
                           "staticKey": _b64(peer.static_key), "online": peer.online}
    if peer.nat is not None:
        doc["nat"] = _nat_doc(peer.nat)
    if peer.groups:
        doc["groups"] = list(peer.groups)
    return doc


def _hello_doc(m: Hello) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": m.version, "staticKey": _b64(m.static_key)}
    if m.nat is not None:
        doc["nat"] = _nat_doc(m.nat)
    if m.software:
        doc["software"] = m.software
    return doc


def _welcome_doc(m: Welcome) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": m.version, "node": m.node, "overlay": str(m.overlay),
                           "serverTime": m.server_time, "keepaliveS": m.keepalive_s,
                           "idleTimeoutS": m.idle_timeout_s}
    if m.turn is not None:
        doc["turn"] = _turn_doc(m.turn)
    if m.nat is not None:
        doc["nat"] = _nat_doc(m.nat)
    return doc


def _error_doc(m: Error) -> dict[str, Any]:
    doc: dict[str, Any] = {"code": m.code, "message": m.message}
    if m.peer:
        doc["peer"] = m.peer
    return doc


_ENCODERS: dict[type, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    Hello: ("hello", _hello_doc),
    Welcome: ("welcome", _welcome_doc),
    Credentials: ("credentials", lambda m: {"turn": _turn_doc(m.turn)}),
    Peers: ("peers", lambda m: {"peers": [_peer_doc(p) for p in m.peers]}),
    PeerJoined: ("peerJoined", lambda m: {"peer": _peer_doc(m.peer)}),
    PeerLeft: ("peerLeft", lambda m: {"node": m.node}),
    Signal: ("signal", lambda m: {"peer": m.peer, "payload": m.payload}),
    Nat: ("nat", lambda m: _nat_doc(m.nat)),
    Ping: ("ping", lambda m: {"seq": m.seq}),
    Pong: ("pong", lambda m: {"seq": m.seq}),
    Error: ("error", _error_doc),
}


def message_type(message: Message) -> str:
    """The `type` a message has on the wire (for logs and metrics)."""
    return _ENCODERS[type(message)][0]


def encode_body(message: Message) -> bytes:
    """The JSON body of `message` (no length prefix); ASCII-only, compact."""
    name, encode = _ENCODERS[type(message)]
    doc = {"type": name, **encode(message)}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not encodable as JSON: {exc}") from None
    return text.encode("ascii")


def encode_frame(message: Message, max_frame: int = MAX_FRAME) -> bytes:
    """Length prefix + body; `ValueError` when the body is longer than `max_frame`."""
    body = encode_body(message)
    if len(body) > max_frame:
        raise ValueError(f"{message_type(message)} frame of {len(body)} bytes exceeds "
                         f"{max_frame}")
    return HEADER.pack(len(body)) + body


# --- parsing ------------------------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Doc:
    """Typed access to one JSON object's fields; every failure is a `ControlProtocolError`."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise ControlProtocolError(f"{where}: expected an object")
        self.obj: dict[str, Any] = obj
        self.where = where

    def fail(self, key: str, expected: str) -> ControlProtocolError:
        return ControlProtocolError(f"{self.where}.{key}: expected {expected}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def text(self, key: str, *, empty: bool = False) -> str:
        value = self.obj.get(key)
        if not isinstance(value, str) or (not empty and not value):
            raise self.fail(key, "a string" if empty else "a non-empty string")
        return value

    def opt_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def integer(self, key: str, low: int = 0, high: int = 2**63 - 1) -> int:
        value = self.obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"an integer in {low}..{high}")
        return value

    def number(self, key: str) -> float:
        value = self.obj.get(key)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 <= value <= 2**63):  # also keeps float() of a huge integer finite
            raise self.fail(key, "a non-negative number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.obj.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def items(self, key: str) -> list[Any]:
        value = self.obj.get(key)
        if not isinstance(value, list):
            raise self.fail(key, "a list")
        return value

    def sub(self, key: str) -> _Doc:
        return _Doc(self.obj.get(key), f"{self.where}.{key}")

    def node(self, key: str) -> str:
        value = self.text(key)
        if not is_valid_node_name(value):
            raise self.fail(key, "a node name")
        return value

    def key(self, key: str) -> bytes:
        text = self.text(key)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(key, "base64") from None
        if len(raw) != STATIC_KEY_BYTES:
            raise self.fail(key, f"{STATIC_KEY_BYTES} bytes of base64")
        return raw


def _parse_nat(d: _Doc) -> NatSummary:
    """Strict: what an agent says about itself (hello, nat) must use known values."""
    kind = d.text("natType")
    if kind not in NAT_TYPES:
        raise d.fail("natType", "one of " + ", ".join(sorted(NAT_TYPES)))
    behaviours = []
    for key in ("mapping", "filtering"):
        value = d.opt_text(key)
        if value is not None and value not in BEHAVIOURS:
            raise d.fail(key, "one of " + ", ".join(sorted(BEHAVIOURS)))
        behaviours.append(value)
    return NatSummary(kind, behaviours[0], behaviours[1])


def _parse_peer_nat(d: _Doc) -> NatSummary:
    """Lenient: a newer server may relay values this agent does not know; they become unknown
    (and never reach a metric label as they came)."""
    kind = d.text("natType")
    mapping, filtering = d.opt_text("mapping"), d.opt_text("filtering")
    return NatSummary(kind if kind in NAT_TYPES else NatType.UNKNOWN.value,
                      mapping if mapping in BEHAVIOURS else None,
                      filtering if filtering in BEHAVIOURS else None)


def _parse_turn(d: _Doc) -> TurnGrant:
    servers = []
    for i, item in enumerate(d.items("servers")):
        s = _Doc(item, f"{d.where}.servers[{i}]")
        transport = s.text("transport")
        if transport not in ("udp", "tcp"):
            raise s.fail("transport", "udp or tcp")
        servers.append(TurnServerAddress(s.text("host"), s.integer("port", 1, 65535),
                                         "udp" if transport == "udp" else "tcp"))
    return TurnGrant(d.text("username"), d.text("password"), d.integer("expiresAt"),
                     d.text("realm"), tuple(servers))


def _parse_ipv4(d: _Doc, key: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(d.text(key))
    except ValueError:
        raise d.fail(key, "an IPv4 address") from None


def _parse_peer(d: _Doc) -> PeerInfo:
    groups = d.items("groups") if d.has("groups") else []
    if not all(isinstance(g, str) and g for g in groups):
        raise d.fail("groups", "a list of names")
    nat = _parse_peer_nat(d.sub("nat")) if d.has("nat") else None
    return PeerInfo(d.node("node"), _parse_ipv4(d, "overlay"), d.key("staticKey"),
                    d.flag("online"), nat, tuple(groups))


def _parse_hello(d: _Doc) -> Hello:
    nat = _parse_nat(d.sub("nat")) if d.has("nat") else None
    software = d.text("software", empty=True) if d.has("software") else ""
    return Hello(d.key("staticKey"), d.integer("version", 0, 2**31), nat, software)


def _parse_welcome(d: _Doc) -> Welcome:
    text = d.text("overlay")
    try:
        if "/" not in text:
            raise ValueError(text)
        overlay = ipaddress.IPv4Interface(text)
    except ValueError:
        raise d.fail("overlay", "an IPv4 address with prefix length") from None
    keepalive, idle = d.number("keepaliveS"), d.number("idleTimeoutS")
    if not (keepalive > 0 and idle > 0):
        raise d.fail("keepaliveS", "positive keepaliveS and idleTimeoutS")
    turn = _parse_turn(d.sub("turn")) if d.has("turn") else None
    version = d.integer("version", 0, 2**31)
    # Lenient like a peer's NAT (a newer server may know more classes); ignored below v2.
    nat = (_parse_peer_nat(d.sub("nat")) if version >= NAT_VERSION and d.has("nat")
           else None)
    return Welcome(d.node("node"), overlay, d.number("serverTime"), keepalive, idle, turn,
                   version, nat)


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_PAYLOAD_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, level + 1) for child in children)
    return deepest


def _parse_signal(d: _Doc) -> Signal:
    payload = d.obj.get("payload")
    if not isinstance(payload, dict):
        raise d.fail("payload", "an object")
    if _depth(payload) > MAX_PAYLOAD_DEPTH:
        raise d.fail("payload", f"at most {MAX_PAYLOAD_DEPTH} levels of nesting")
    return Signal(d.node("peer"), payload)


def _parse_peers(d: _Doc) -> Peers:
    items = d.items("peers")
    return Peers(tuple(_parse_peer(_Doc(p, f"{d.where}.peers[{i}]"))
                       for i, p in enumerate(items)))


def _parse_error(d: _Doc) -> Error:
    peer = d.text("peer", empty=True) if d.has("peer") else ""
    return Error(d.text("code"), d.text("message", empty=True), peer)


_PARSERS: dict[str, Callable[[_Doc], Message]] = {
    "hello": _parse_hello,
    "welcome": _parse_welcome,
    "credentials": lambda d: Credentials(_parse_turn(d.sub("turn"))),
    "peers": _parse_peers,
    "peerJoined": lambda d: PeerJoined(_parse_peer(d.sub("peer"))),
    "peerLeft": lambda d: PeerLeft(d.node("node")),
    "signal": _parse_signal,
    "nat": lambda d: Nat(_parse_nat(d)),
    "ping": lambda d: Ping(d.integer("seq")),
    "pong": lambda d: Pong(d.integer("seq")),
    "error": _parse_error,
}


def parse_body(body: bytes) -> Message:
    """Parse one frame body (the JSON object)."""
    try:
        obj = json.loads(body.decode("utf-8"), parse_float=_finite,
                         parse_constant=_reject_constant)
    except RecursionError:
        raise ControlProtocolError("JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, huge integers, NaN
        raise ControlProtocolError(f"not a JSON object: {str(exc)[:80]}") from None
    doc = _Doc(obj, "message")
    kind = doc.text("type")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ControlProtocolError(f"unknown message type {kind[:40]!r}")
    doc.where = kind
    try:
        return parser(doc)
    except ValueError as exc:  # a message class refused a value the checks above let through
        raise ControlProtocolError(f"{kind}: {exc}") from None


def parse_frame(frame: bytes, max_frame: int = MAX_FRAME) -> Message:
    """Parse exactly one whole frame (length prefix + body)."""
    decoder = FrameDecoder(max_frame)
    messages = decoder.feed(frame)
    if len(messages) != 1 or decoder.buffered:
        raise ControlProtocolError(f"expected exactly one frame in {len(frame)} bytes")
    return messages[0]


@dataclass
class FrameDecoder:
    """Splits a byte stream into messages; chunk boundaries do not matter.

    After `feed` raises `ControlProtocolError` the stream is unusable: every later call raises
    again (close the connection). The error carries, in `messages`, what that call decoded
    before the garbage, so the outcome does not depend on how the stream was chunked.
    """

    max_frame: int = MAX_FRAME
    """Longest body accepted; a longer length prefix is an error before any body arrives."""
    _buffer: bytearray = field(default_factory=bytearray, repr=False)
    _broken: str = field(default="", repr=False)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Append `data`; return every message now complete, in order."""
        if self._broken:
            raise ControlProtocolError(f"stream framing was lost earlier: {self._broken}")
        self._buffer += data
        out: list[Message] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            try:
                if not 1 <= length <= self.max_frame:
                    raise ControlProtocolError(
                        f"frame length {length} outside 1..{self.max_frame}")
                end = HEADER.size + length
                if len(self._buffer) < end:
                    break
                body = bytes(self._buffer[HEADER.size:end])
                del self._buffer[:end]
                out.append(parse_body(body))
            except ControlProtocolError as exc:
                self._broken = str(exc)
                raise ControlProtocolError(str(exc), tuple(out)) from None
        return out
