"""Sans-I/O TURN client (RFC 8656 §7-§12): one allocation on one TURN server.

    client = TurnClient(server, credentials, local=("0.0.0.0", 40000))
    client.allocate(now)                       # 401 challenge, then the authenticated Allocate
    ... adapter: send client.datagrams_to_send(now), feed client.handle_datagram(data, src, now),
        wake at client.get_timer() and call client.handle_timer(now), drain client.next_event()
    client.create_permission("198.51.100.7", now)
    client.bind_channel(("198.51.100.7", 5000), now)
    client.send(b"...", ("198.51.100.7", 5000), now)   # ChannelData once bound, else Send
    client.close(now)                          # Refresh with LIFETIME 0

States (TRANSITIONS):

    IDLE --allocate--> ALLOCATING --allocated--> ALLOCATED --close--> DELETING --deleted--> CLOSED
                           |  \\--close--> CLOSED       \\--lost--> FAILED
                           \\--failed--> FAILED

The client refreshes the allocation before it expires, every permission it was asked for and
every channel (a ChannelBind also refreshes the peer's permission, RFC 8656 §12.2), until
`close` or `remove_permission`. Long-term credentials (RFC 5389 §10.2): the first Allocate goes
without credentials; the 401 brings REALM and NONCE; 438 (Stale Nonce) brings a new NONCE and the
request is repeated. Responses to authenticated requests are accepted only with a correct
MESSAGE-INTEGRITY (except the 401/438 challenges, which cannot carry one).

Over TCP (`TurnClientConfig.transport`) requests are not retransmitted (RFC 5389 §7.2.2),
ChannelData is padded, and the adapter feeds the byte stream to `receive_stream`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from meshd.stun.codec import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    PROTOCOL_UDP,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    StunMessage,
    StunParseError,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_integrity,
)
from meshd.stun.transaction import ClientTransaction, RetransmitPolicy
from meshd.turn.credentials import TurnCredentials
from meshd.turn.framing import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    StreamDecoder,
    encode_channel_data,
    is_channel_data,
    parse_channel_data,
)
from meshd.turn.server import Transport
from meshd.udp import Address, Transmit

TCP_TRANSACTION_TIMEOUT_S = 39.5  # RFC 5389 §7.2.2: Ti for reliable transports
_MAX_AUTH_RETRIES = 2  # 401 then 438 at most, per request
MAX_QUEUED_SENDS = 16  # Send indications held per peer IP until its permission exists


class TurnClientError(Exception):
    """Local misuse: sending without an allocation, binding too many channels, ..."""


class ClientState(Enum):
    """Where the allocation is (see TRANSITIONS)."""

    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    DELETING = "deleting"
    CLOSED = "closed"
    FAILED = "failed"


TRANSITIONS: dict[tuple[ClientState, str], ClientState] = {
    (ClientState.IDLE, "allocate"): ClientState.ALLOCATING,
    (ClientState.ALLOCATING, "allocated"): ClientState.ALLOCATED,
    (ClientState.ALLOCATING, "failed"): ClientState.FAILED,
    (ClientState.ALLOCATING, "close"): ClientState.CLOSED,
    (ClientState.ALLOCATED, "close"): ClientState.DELETING,
    (ClientState.ALLOCATED, "lost"): ClientState.FAILED,
    (ClientState.DELETING, "deleted"): ClientState.CLOSED,
}


def _default_retransmit() -> RetransmitPolicy:
    return RetransmitPolicy(initial_rto_s=0.5, transmissions=7, give_up_s=39.5)


@dataclass(frozen=True)
class TurnClientConfig:
    """Tunables of the client (tests shorten them here, never by patching)."""

    lifetime_s: int = 600
    """LIFETIME asked for in Allocate and Refresh (the server may grant another)."""
    refresh_before_s: float = 60.0
    """Refresh this long before expiry (at most half the granted lifetime)."""
    permission_refresh_s: float = 240.0
    """Re-send CreatePermission/ChannelBind this often (permissions last 300 s, §9)."""
    retransmit: RetransmitPolicy = field(default_factory=_default_retransmit)
    """UDP retransmissions (RFC 5389 §7.2.1 defaults: RTO 0.5 s, 7 copies, 39.5 s)."""
    transport: Transport = Transport.UDP
    """How this client reaches the server."""
    family: int = FAMILY_IPV4
    """Family of the relayed address (REQUESTED-ADDRESS-FAMILY is sent for IPv6 only)."""
    dont_fragment: bool = False
    """Ask for DF on relayed datagrams (DONT-FRAGMENT in Allocate)."""

    def __post_init__(self) -> None:
        if self.lifetime_s <= 0 or self.refresh_before_s <= 0 or self.permission_refresh_s <= 0:
            raise ValueError("lifetimes and refresh intervals must be positive")
        if self.family not in (FAMILY_IPV4, FAMILY_IPV6):
            raise ValueError(f"unknown address family {self.family}")

    def policy(self) -> RetransmitPolicy:
        """The retransmission schedule for this transport."""
        if self.transport is Transport.TCP:
            return RetransmitPolicy(TCP_TRANSACTION_TIMEOUT_S, 1, TCP_TRANSACTION_TIMEOUT_S)
        return self.retransmit


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocated:
    """The server allocated a relayed address."""

    relayed: Address
    """XOR-RELAYED-ADDRESS: what peers send to (the relayed candidate)."""
    mapped: Address
    """XOR-MAPPED-ADDRESS: this client as the server sees it (the candidate's related
    address)."""
    lifetime_s: int
    """Seconds granted."""


@dataclass(frozen=True)
class AllocationRefreshed:
    """A Refresh succeeded."""

    lifetime_s: int
    """Seconds granted from now."""


@dataclass(frozen=True)
class AllocationFailed:
    """The Allocate was refused or went unanswered; the client is FAILED."""

    code: int | None
    """The error code; None for a timeout or an unusable answer."""
    reason: str
    """Reason phrase or what went wrong."""


@dataclass(frozen=True)
class AllocationLost:
    """An allocation we had is gone (expired unrefreshed, refused refresh, stream lost)."""

    reason: str
    """What happened."""


@dataclass(frozen=True)
class AllocationClosed:
    """`close` finished (the server confirmed, forgot, or did not answer)."""


@dataclass(frozen=True)
class PermissionCreated:
    """The server installed a permission for a peer IP (first success only)."""

    peer_ip: str
    """The peer's IP."""


@dataclass(frozen=True)
class PermissionFailed:
    """A CreatePermission was refused or unanswered; the permission is forgotten."""

    peer_ip: str
    """The peer's IP."""
    code: int | None
    """Error code (403: the server does not relay to that peer); None for a timeout."""
    reason: str
    """Reason phrase or what went wrong."""


@dataclass(frozen=True)
class ChannelBound:
    """A channel is bound (first success only); `send` to the peer now uses ChannelData."""

    peer: Address
    """The peer."""
    channel: int
    """0x4000..0x4FFF."""


@dataclass(frozen=True)
class ChannelBindFailed:
    """A ChannelBind was refused or unanswered; the binding is forgotten."""

    peer: Address
    """The peer."""
    channel: int
    """The number that was tried (not reused)."""
    code: int | None
    """Error code; None for a timeout."""
    reason: str
    """Reason phrase or what went wrong."""


@dataclass(frozen=True)
class DataReceived:
    """A peer's datagram arrived through the relay."""

    peer: Address
    """The peer's address as the server saw it."""
    data: bytes
    """The payload."""
    channel: int | None
    """The channel it came on; None for a Data indication."""


TurnEvent = (
    Allocated | AllocationRefreshed | AllocationFailed | AllocationLost | AllocationClosed
    | PermissionCreated | PermissionFailed | ChannelBound | ChannelBindFailed | DataReceived
)


# --- internal state -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    kind: str  # allocate | refresh | delete | permission | channel
    method: int
    attributes: tuple[Attribute, ...]
    transaction: ClientTransaction
    authenticated: bool
    auth_retries: int = 0
    peer: Address | None = None
    channel: int | None = None


@dataclass(eq=False)
class _Permission:
    installed: bool = False
    in_flight: bool = False
    refresh_at: float | None = None
    queued: list[Transmit] = field(default_factory=list)  # Sends waiting for the first success


@dataclass(eq=False)
class _Binding:
    peer: Address
    number: int
    bound: bool = False
    in_flight: bool = False
    refresh_at: float | None = None


class TurnClient:
    """One allocation on one TURN server; see the module doc."""

    def __init__(
        self,
        server: Address,
        credentials: TurnCredentials,
        *,
        local: Address = ("0.0.0.0", 0),
        config: TurnClientConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.server = server
        """The TURN server's address."""
        self.local = local
        """This client's socket (the source of its `Transmit`s)."""
        self.config = config or TurnClientConfig()
        self.state = ClientState.IDLE
        """Where the allocation is."""
        self.relayed_address: Address | None = None
        """XOR-RELAYED-ADDRESS once allocated."""
        self.mapped_address: Address | None = None
        """XOR-MAPPED-ADDRESS once allocated."""
        self.expires: float | None = None
        """When the allocation runs out unless refreshed."""
        self.dropped = 0
        """Datagrams ignored: not from the server, garbage, unknown transaction, forged or
        from peers without permission."""
        self._credentials = credentials
        self._rng = rng if rng is not None else random.SystemRandom()
        self._realm: str | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._pending: dict[bytes, _Request] = {}
        self._outbox: list[Transmit] = []
        self._events: deque[TurnEvent] = deque()
        self._refresh_at: float | None = None
        self._permissions: dict[str, _Permission] = {}
        self._bindings: dict[Address, _Binding] = {}
        self._by_number: dict[int, _Binding] = {}
        self._next_channel = CHANNEL_MIN
        self._indications = 0
        self._stream = StreamDecoder() if self.config.transport is Transport.TCP else None

    # --- API ------------------------------------------------------------------------------------

    def allocate(self, now: float) -> None:
        """Start the allocation (IDLE only)."""
        self._transition("allocate")
        attributes: list[Attribute] = [RequestedTransport(PROTOCOL_UDP),
                                       Lifetime(self.config.lifetime_s)]
        if self.config.family != FAMILY_IPV4:
            attributes.append(RequestedAddressFamily(self.config.family))
        if self.config.dont_fragment:
            attributes.append(DontFragment())
        self._request("allocate", Method.ALLOCATE, tuple(attributes), now)

    def create_permission(self, peer_ip: str, now: float) -> None:
        """Ask for (and keep refreshing) a permission for `peer_ip`; before the allocation
        exists the request waits for it."""
        self._check_usable()
        if peer_ip in self._permissions:
            return
        self._permissions[peer_ip] = _Permission()
        if self.state is ClientState.ALLOCATED:
            self._send_permission(peer_ip, now)

    def remove_permission(self, peer_ip: str) -> None:
        """Stop refreshing `peer_ip`'s permission (the server lets it expire, §9)."""
        self._permissions.pop(peer_ip, None)

    def bind_channel(self, peer: Address, now: float) -> int:
        """Bind a channel to `peer` (and keep it and the peer's permission alive); returns the
        channel number. Idempotent per peer."""
        self._check_usable()
        binding = self._bindings.get(peer)
        if binding is not None:
            return binding.number
        if self._next_channel > CHANNEL_MAX:
            raise TurnClientError("all 4096 channel numbers are used")
        binding = _Binding(peer, self._next_channel)
        self._next_channel += 1  # never reused: RFC 8656 §12 leaves old numbers alone
        self._bindings[peer] = binding
        self._by_number[binding.number] = binding
        if self.state is ClientState.ALLOCATED:
            self._send_channel_bind(binding, now)
        return binding.number

    def send(self, data: bytes, peer: Address, now: float) -> None:
        """Relay `data` to `peer`: ChannelData when a channel is bound, else a Send indication.
        Without a permission for the peer's IP one is asked for, and up to `MAX_QUEUED_SENDS`
        datagrams wait for it (more are dropped, as UDP may drop anything)."""
        if self.state is not ClientState.ALLOCATED:
            raise TurnClientError(f"cannot send in state {self.state.value}")
        binding = self._bindings.get(peer)
        if binding is not None and binding.bound:
            frame = encode_channel_data(binding.number, data,
                                        pad=self.config.transport is Transport.TCP)
        else:
            if binding is None and peer[0] not in self._permissions:
                self.create_permission(peer[0], now)
            self._indications += 1  # indications need a transaction id, not a random one
            message = StunMessage(MessageClass.INDICATION, Method.SEND,
                                  self._indications.to_bytes(12, "big"),
                                  (XorPeerAddress(peer), Data(data)))
            frame = encode_message(message)
            permission = self._permissions.get(peer[0])
            if permission is not None and not permission.installed and (
                    binding is None or not binding.bound):
                # The server would drop it before the permission exists (§11.2): hold a few.
                if len(permission.queued) < MAX_QUEUED_SENDS:
                    permission.queued.append(Transmit(self.local, self.server, frame))
                return
        self._outbox.append(Transmit(self.local, self.server, frame))

    def close(self, now: float) -> None:
        """Delete the allocation (Refresh with LIFETIME 0, RFC 8656 §8)."""
        if self.state is ClientState.ALLOCATING:
            self._pending.clear()
            self._transition("close")
            self._events.append(AllocationClosed())
            return
        if self.state is not ClientState.ALLOCATED:
            return
        self._transition("close")
        self._pending.clear()
        self._refresh_at = None
        self._request("delete", Method.REFRESH, (Lifetime(0),), now)

    def update_credentials(self, credentials: TurnCredentials) -> None:
        """Use fresh credentials (REST credentials expire) for the next requests."""
        self._credentials = credentials
        if self._realm is not None:
            self._key = self._make_key()

    @property
    def channels(self) -> dict[Address, int]:
        """Bound channels by peer (confirmed by the server)."""
        return {peer: b.number for peer, b in self._bindings.items() if b.bound}

    @property
    def permissions(self) -> frozenset[str]:
        """Peer IPs with an installed permission."""
        return frozenset(ip for ip, p in self._permissions.items() if p.installed)

    # --- input ----------------------------------------------------------------------------------

    def handle_datagram(self, data: bytes, source: Address, now: float) -> None:
        """A datagram that arrived on the client's socket (UDP)."""
        if source != self.server:
            self.dropped += 1
            return
        self._handle_frame(data, now)

    def receive_stream(self, data: bytes, now: float) -> None:
        """Bytes from the TCP connection to the server (any chunking)."""
        if self._stream is None:
            raise TurnClientError("receive_stream is for TCP clients")
        self._stream.receive_data(data)
        while True:
            try:
                frame = self._stream.next_frame()
            except StunParseError as exc:
                self._lose(f"stream framing lost: {exc}")
                return
            if frame is None:
                return
            self._handle_frame(frame, now)

    def connection_lost(self) -> None:
        """The TCP connection to the server ended (the server deleted the allocation)."""
        self._lose("connection to the server closed")

    # --- output ---------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """What to send now: queued indications and ChannelData, due (re)transmissions."""
        out, self._outbox = self._outbox, []
        for request in list(self._pending.values()):
            out.extend(request.transaction.datagrams_to_send(now))
        return out

    def next_event(self) -> TurnEvent | None:
        """The oldest undelivered event."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The next retransmission, timeout, refresh or expiry."""
        times = [r.transaction.get_timer() for r in self._pending.values()]
        if self.state is ClientState.ALLOCATED:
            if self._refresh_at is not None:
                times.append(self._refresh_at)
            if self.expires is not None:
                times.append(self.expires)
            times.extend(p.refresh_at for p in self._permissions.values()
                         if p.refresh_at is not None and not p.in_flight)
            times.extend(b.refresh_at for b in self._bindings.values()
                         if b.refresh_at is not None and not b.in_flight)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Time out transactions; send refreshes that are due; notice expiry."""
        for txid, request in list(self._pending.items()):
            if request.transaction.expired(now) and self._pending.get(txid) is request:
                del self._pending[txid]
                self._failed(request, None, "no answer", now)
        if self.state is not ClientState.ALLOCATED:
            return
        if self.expires is not None and now >= self.expires:
            self._lose("allocation expired before a refresh succeeded")
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._request("refresh", Method.REFRESH, (Lifetime(self.config.lifetime_s),), now)
        for ip, permission in self._permissions.items():
            if permission.refresh_at is not None and now >= permission.refresh_at \
                    and not permission.in_flight:
                self._send_permission(ip, now)
        for binding in self._bindings.values():
            if binding.refresh_at is not None and now >= binding.refresh_at \
                    and not binding.in_flight:
                self._send_channel_bind(binding, now)

    # --- requests -------------------------------------------------------------------------------

    def _send_permission(self, peer_ip: str, now: float) -> None:
        self._permissions[peer_ip].in_flight = True
        self._request("permission", Method.CREATE_PERMISSION, (XorPeerAddress((peer_ip, 0)),),
                      now, peer=(peer_ip, 0))

    def _send_channel_bind(self, binding: _Binding, now: float) -> None:
        binding.in_flight = True
        self._request("channel", Method.CHANNEL_BIND,
                      (ChannelNumber(binding.number), XorPeerAddress(binding.peer)), now,
                      peer=binding.peer, channel=binding.number)

    def _request(self, kind: str, method: int, attributes: tuple[Attribute, ...], now: float,
                 *, peer: Address | None = None, channel: int | None = None,
                 auth_retries: int = 0) -> None:
        txid = self._txid()
        body = attributes
        if self._key is not None:
            assert self._realm is not None and self._nonce is not None
            body += (Username(self._credentials.username), Realm(self._realm),
                     Nonce(self._nonce))
        data = encode_message(StunMessage(MessageClass.REQUEST, method, txid, body),
                              key=self._key)
        transaction = ClientTransaction(txid, data, self.local, self.server, self.config.policy(),
                                        now)
        self._pending[txid] = _Request(kind, method, attributes, transaction,
                                       authenticated=self._key is not None,
                                       auth_retries=auth_retries, peer=peer, channel=channel)

    def _txid(self) -> bytes:
        return self._rng.randbytes(12)

    def _make_key(self) -> bytes:
        assert self._realm is not None
        return long_term_key(self._credentials.username, self._realm,
                             self._credentials.password)

    # --- responses and data ---------------------------------------------------------------------

    def _handle_frame(self, data: bytes, now: float) -> None:
        if is_channel_data(data):
            self._channel_data(data)
            return
        try:
            msg = parse_message(data)
        except StunParseError:
            self.dropped += 1
            return
        if msg.message_class is MessageClass.INDICATION and msg.method == Method.DATA:
            self._data_indication(msg)
        elif msg.message_class in (MessageClass.SUCCESS, MessageClass.ERROR):
            self._response(data, msg, now)
        else:
            self.dropped += 1

    def _channel_data(self, data: bytes) -> None:
        try:
            message = parse_channel_data(data)
        except StunParseError:
            self.dropped += 1
            return
        binding = self._by_number.get(message.channel)
        if binding is None:
            self.dropped += 1
            return
        self._events.append(DataReceived(binding.peer, message.data, message.channel))

    def _data_indication(self, msg: StunMessage) -> None:
        peer, data = msg.get(XorPeerAddress), msg.get(Data)
        if peer is None or data is None or not self._permitted(peer.address[0]):
            self.dropped += 1  # RFC 8656 §11.4: only from peers we asked for
            return
        self._events.append(DataReceived(peer.address, data.value, None))

    def _permitted(self, ip: str) -> bool:
        return ip in self._permissions or any(p[0] == ip for p in self._bindings)

    def _response(self, data: bytes, msg: StunMessage, now: float) -> None:
        request = self._pending.get(msg.transaction_id)
        if request is None or msg.method != request.method:
            self.dropped += 1
            return
        error = msg.get(ErrorCode)
        code = error.code if msg.message_class is MessageClass.ERROR and error else None
        challenge = code in (401, 438)
        if request.authenticated and not challenge and not self._trusted(data, msg):
            self.dropped += 1  # RFC 5389 §10.2.3: forged or corrupted; keep waiting
            return
        del self._pending[msg.transaction_id]
        if msg.message_class is MessageClass.SUCCESS:
            self._succeeded(request, msg, now)
        elif challenge and self._rechallenge(request, msg, code, now):
            return
        else:
            self._failed(request, code,
                         error.reason if error else "error response without ERROR-CODE", now)

    def _trusted(self, data: bytes, msg: StunMessage) -> bool:
        """A response to an authenticated request: success must be signed with our key; an
        error may be unsigned, but a signature present must be right."""
        if msg.integrity is None:
            return msg.message_class is MessageClass.ERROR
        return self._key is not None and verify_integrity(data, self._key)

    def _rechallenge(self, request: _Request, msg: StunMessage, code: int | None,
                     now: float) -> bool:
        """401/438: take REALM/NONCE and repeat the request with credentials (bounded)."""
        realm, nonce = msg.get(Realm), msg.get(Nonce)
        if nonce is None or request.auth_retries >= _MAX_AUTH_RETRIES:
            return False
        if code == 401 and realm is None:
            return False
        if code == 401 and request.authenticated and realm is not None \
                and realm.value == self._realm and nonce.value == self._nonce:
            return False  # our credentials are simply wrong
        if realm is not None:
            self._realm = realm.value
        if self._realm is None:
            return False
        self._nonce = nonce.value
        self._key = self._make_key()
        self._request(request.kind, request.method, request.attributes, now, peer=request.peer,
                      channel=request.channel, auth_retries=request.auth_retries + 1)
        return True

    def _succeeded(self, request: _Request, msg: StunMessage, now: float) -> None:
        if request.kind == "allocate":
            relayed, lifetime = msg.get(XorRelayedAddress), msg.get(Lifetime)
            mapped = msg.get(XorMappedAddress)
            if relayed is None or lifetime is None or mapped is None:
                self._failed(request, None, "Allocate success without XOR-RELAYED-ADDRESS, "
                             "LIFETIME or XOR-MAPPED-ADDRESS", now)
                return
            self.relayed_address, self.mapped_address = relayed.address, mapped.address
            self._transition("allocated")
            self._granted(lifetime.seconds, now)
            self._events.append(Allocated(relayed.address, mapped.address, lifetime.seconds))
            for ip in self._permissions:
                self._send_permission(ip, now)
            for pending in self._bindings.values():
                self._send_channel_bind(pending, now)
        elif request.kind == "refresh":
            lifetime = msg.get(Lifetime)
            seconds = lifetime.seconds if lifetime is not None else self.config.lifetime_s
            self._granted(seconds, now)
            self._events.append(AllocationRefreshed(seconds))
        elif request.kind == "delete":
            self._deleted()
        elif request.kind == "permission":
            assert request.peer is not None
            permission = self._permissions.get(request.peer[0])
            if permission is None:
                return  # removed meanwhile
            permission.in_flight = False
            permission.refresh_at = now + self.config.permission_refresh_s
            if not permission.installed:
                permission.installed = True
                self._events.append(PermissionCreated(request.peer[0]))
                self._outbox.extend(permission.queued)
                permission.queued.clear()
        elif request.kind == "channel":
            assert request.peer is not None
            binding = self._bindings.get(request.peer)
            if binding is None:
                return
            binding.in_flight = False
            binding.refresh_at = now + self.config.permission_refresh_s
            if not binding.bound:
                binding.bound = True
                self._events.append(ChannelBound(binding.peer, binding.number))

    def _failed(self, request: _Request, code: int | None, reason: str, now: float) -> None:
        if request.kind == "allocate":
            if self.state is ClientState.ALLOCATING:
                self._transition("failed")
                self._events.append(AllocationFailed(code, reason))
        elif request.kind == "refresh":
            if self.state is not ClientState.ALLOCATED:
                return
            if code == 437:
                self._lose(f"refresh refused: {code} {reason}")
                return
            # Try again halfway to expiry; `handle_timer` reports the loss at expiry.
            assert self.expires is not None
            self._refresh_at = now + max(1.0, (self.expires - now) / 2)
        elif request.kind == "delete":
            self._deleted()  # 437 = already gone; timeout = it will expire anyway
        elif request.kind == "permission":
            assert request.peer is not None
            if self._permissions.pop(request.peer[0], None) is not None:
                self._events.append(PermissionFailed(request.peer[0], code, reason))
        elif request.kind == "channel":
            assert request.peer is not None and request.channel is not None
            binding = self._bindings.get(request.peer)
            if binding is not None and binding.number == request.channel:
                del self._bindings[request.peer]
                del self._by_number[binding.number]
                self._events.append(ChannelBindFailed(request.peer, request.channel, code,
                                                      reason))

    def _granted(self, lifetime_s: int, now: float) -> None:
        self.expires = now + lifetime_s
        self._refresh_at = self.expires - min(self.config.refresh_before_s, lifetime_s / 2)

    def _deleted(self) -> None:
        if self.state is ClientState.DELETING:
            self._transition("deleted")
            self._events.append(AllocationClosed())

    def _lose(self, reason: str) -> None:
        self._pending.clear()
        self._refresh_at = None
        if self.state is ClientState.ALLOCATED:
            self._transition("lost")
            self._events.append(AllocationLost(reason))
        elif self.state is ClientState.ALLOCATING:
            self._transition("failed")
            self._events.append(AllocationFailed(None, reason))
        elif self.state is ClientState.DELETING:
            self._deleted()

    def _check_usable(self) -> None:
        if self.state not in (ClientState.IDLE, ClientState.ALLOCATING, ClientState.ALLOCATED):
            raise TurnClientError(f"no allocation to use in state {self.state.value}")

    def _transition(self, what: str) -> None:
        target = TRANSITIONS.get((self.state, what))
        if target is None:
            raise TurnClientError(f"cannot {what} in state {self.state.value}")
        self.state = target
