"""Sans-I/O TURN server (RFC 8656) beside the STUN Binding server, on the same port.

Inputs are datagrams (on a listening address or on a relayed address), TCP stream bytes of a
client connection, and timers; every entry point takes `now`, **seconds since the Unix epoch**
(the REST credentials carry a Unix expiry), and returns `Output`s: `Transmit`s for UDP,
`StreamWrite`/`StreamClose` for TCP connections. `get_timer()` is the next expiry. Peer and
client garbage never raises: it is dropped and counted.

What it does:
- Long-term credentials (RFC 8656 §5, RFC 5389 §10.2) with REST-style usernames
  `<expiry>:<node>` whose password is derived from a shared secret (`meshd.turn.credentials`):
  401 with REALM and NONCE to unauthenticated requests, 438 for stale nonces (stateless nonces,
  an HMAC over their expiry and the client IP), 441 when another node touches an allocation.
- Allocations keyed by the 5-tuple (§7): lifetime, refresh and delete (LIFETIME 0, §8),
  437 for a 5-tuple in use or without allocation, 486 above the per-node quota, 508 without
  a free port, EVEN-PORT with reservations (RESERVATION-TOKEN), DONT-FRAGMENT,
  REQUESTED-ADDRESS-FAMILY (the family of the relay IP only).
- Permissions (§9, 300 s) and channels (§12, 600 s, 0x4000-0x4FFF, and up to 0x7FFF for
  RFC 5766 clients); Send/Data indications
  (§11) and ChannelData (§12.4) both ways. Nothing is relayed to or from a peer without a
  permission; peers on loopback, multicast or denied networks are refused (403).
- An optional per-node token bucket on relayed bytes.
- Revoked nodes (`set_revoked_nodes`, from the control channel's revocation list in the same
  process): their allocations are deleted at once and their requests refused with 403
  (Forbidden: "valid but cannot be performed due to administrative or similar restrictions",
  RFC 8656 §19), though their REST credentials are still valid; a 401 would only make the
  client authenticate again with the same credentials.
- A batched data path (`handle_reads`, RFC 8656 §12.4 ChannelData both ways): reads of several
  datagrams in, `TransmitBatch`es out (one UDP GSO send each), the same checks and counters as
  `handle_datagram`; two relayed addresses of this server talk without the kernel in between.
- Binding requests go to the composed `StunServer` (RFC 5780 and all).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from edgeweave.log import event
from edgeweave.ratelimit import TokenBucket
from meshd.stun.codec import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    PROTOCOL_UDP,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    Software,
    StunMessage,
    StunParseError,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_integrity,
)
from meshd.stun.server import DEFAULT_SOFTWARE, StunServer
from meshd.turn.credentials import candidate_passwords, parse_username
from meshd.turn.fastpath import Batcher, TransmitBatch, read_count
from meshd.turn.framing import (
    CHANNEL_HEADER,
    CHANNEL_MIN,
    LEGACY_CHANNEL_MAX,
    StreamDecoder,
    encode_channel_data,
    is_channel_data,
    pad_for_stream,
)
from meshd.turn.ports import PortPool, RelayPorts
from meshd.udp import Address, Read, Transmit, format_address

log = logging.getLogger("meshd.turn")

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    508: "Insufficient Capacity",
}
_NONCE_MAC_BYTES = 12


class Transport(IntEnum):
    """Client-to-server transport (RFC 8656 §3.1); values are IP protocol numbers."""

    TCP = 6
    UDP = 17


@dataclass(frozen=True)
class FiveTuple:
    """What identifies an allocation (RFC 8656 §2): transport, client and server address."""

    transport: Transport
    """UDP or TCP between client and server."""
    client: Address
    """The client's address as the server sees it (its server-reflexive address)."""
    server: Address
    """The listening address the client talks to, as bound (may be a wildcard)."""


@dataclass(frozen=True)
class StreamWrite:
    """Bytes for a TCP client connection (already framed and padded)."""

    flow: FiveTuple
    """The connection."""
    data: bytes
    """What to write."""


@dataclass(frozen=True)
class StreamClose:
    """Close a TCP client connection (its framing is lost)."""

    flow: FiveTuple
    """The connection."""
    reason: str
    """Why, for the log."""


Output = Transmit | TransmitBatch | StreamWrite | StreamClose
"""What the core asks its adapter to do (`TransmitBatch` only from `handle_reads`)."""


@dataclass(frozen=True)
class TurnServerConfig:
    """Settings of the TURN core (the `relay:` section of meshd's configuration maps here)."""

    realm: str
    """REALM of the long-term credentials (part of the key: clients must use the same)."""
    secrets: tuple[bytes, ...]
    """Shared secrets of the REST credentials; any of them is accepted (rotation)."""
    relay_ip: str
    """IP the relayed sockets bind to."""
    min_port: int = 49152
    """Lowest relayed port (RFC 8656 §7.2 suggests the dynamic range 49152-65535)."""
    max_port: int = 65535
    """Highest relayed port."""
    external_ip: str | None = None
    """Address advertised in XOR-RELAYED-ADDRESS instead of `relay_ip` (1:1 NAT in front)."""
    quota_per_node: int = 10
    """Allocations one node may hold at once (486 beyond, RFC 8656 §7.2)."""
    bytes_per_s_per_node: int = 0
    """Relayed payload bytes per second per node, both directions together; 0 = no limit.
    Bursts of one second's worth pass; beyond that datagrams are dropped."""
    default_lifetime_s: int = 600
    """Allocation lifetime when the client asks for less or nothing (RFC 8656 §7.2)."""
    max_lifetime_s: int = 3600
    """Longest allocation lifetime granted."""
    permission_lifetime_s: float = 300.0
    """RFC 8656 §9: 300 s."""
    channel_lifetime_s: float = 600.0
    """RFC 8656 §12: 600 s."""
    nonce_lifetime_s: float = 600.0
    """How long a NONCE stays valid before 438 (Stale Nonce)."""
    reservation_lifetime_s: float = 30.0
    """How long a port reserved by EVEN-PORT's R bit is held (RFC 8656 §7.2: about 30 s)."""
    max_permissions: int = 64
    """Permissions (peer IPs), and separately channels, one allocation may hold (508 beyond)."""
    allow_loopback_peers: bool = False
    """Relay to and from 127.0.0.0/8 and ::1 (labs and tests only)."""
    denied_peers: tuple[str, ...] = ()
    """Networks (CIDR) never relayed to, e.g. the server's own LAN (403)."""
    software: str = DEFAULT_SOFTWARE
    """SOFTWARE attribute in responses."""

    def __post_init__(self) -> None:
        if not self.secrets or any(not s for s in self.secrets):
            raise ValueError("at least one non-empty secret is needed")
        relay = ipaddress.ip_address(self.relay_ip)
        advertised = relay
        if self.external_ip is not None:
            advertised = ipaddress.ip_address(self.external_ip)
            if advertised.version != relay.version:
                raise ValueError("externalIp and relayIp must be of the same family")
        if advertised.is_unspecified:
            raise ValueError("the advertised relay IP cannot be a wildcard; set externalIp")
        if not 1 <= self.min_port <= self.max_port <= 65535:
            raise ValueError(f"bad relay port range {self.min_port}..{self.max_port}")
        if self.quota_per_node < 1:
            raise ValueError("quotaPerNode must be at least 1")
        if self.bytes_per_s_per_node < 0:
            raise ValueError("bytesPerSPerNode must not be negative")
        if not 0 < self.default_lifetime_s <= self.max_lifetime_s:
            raise ValueError("need 0 < defaultLifetimeS <= maxLifetimeS")
        if min(self.permission_lifetime_s, self.channel_lifetime_s, self.nonce_lifetime_s,
               self.reservation_lifetime_s) <= 0:
            raise ValueError("lifetimes must be positive")
        if self.max_permissions < 1:
            raise ValueError("maxPermissions must be at least 1")
        for net in self.denied_peers:
            ipaddress.ip_network(net, strict=False)

    @property
    def family(self) -> int:
        """FAMILY_IPV4 or FAMILY_IPV6: the family of every relayed address."""
        version = ipaddress.ip_address(self.relay_ip).version
        return FAMILY_IPV4 if version == 4 else FAMILY_IPV6


@dataclass(slots=True)
class TurnMetrics:
    """Counters an exporter reads (gauges are computed by `TurnServer.samples`)."""

    allocations_total: int = 0
    """Allocations created."""
    allocations_expired: int = 0
    """Allocations that ran out of lifetime."""
    allocations_deleted: int = 0
    """Allocations deleted by the client (LIFETIME 0) or with their TCP connection."""
    requests: int = 0
    """TURN requests handled (Binding is counted by the StunServer)."""
    auth_challenges: int = 0
    """401 to requests without credentials (the normal first step)."""
    auth_failures: int = 0
    """Wrong or expired credentials, wrong MESSAGE-INTEGRITY, another node's allocation."""
    stale_nonces: int = 0
    """438 responses."""
    errors: dict[int, int] = field(default_factory=dict)
    """Error responses by code."""
    bytes_in: int = 0
    """Payload bytes relayed from peers to clients."""
    bytes_out: int = 0
    """Payload bytes relayed from clients to peers."""
    datagrams_in: int = 0
    """Datagrams relayed from peers to clients."""
    datagrams_out: int = 0
    """Datagrams relayed from clients to peers."""
    dropped_no_permission: int = 0
    """Peer datagrams, Send indications and ChannelData without a (live) permission/channel."""
    dropped_rate_limited: int = 0
    """Datagrams over the node's bytes/s budget."""
    dropped_malformed: int = 0
    """Client messages that did not parse, and unexpected message classes."""
    dropped_no_allocation: int = 0
    """Indications and ChannelData from a 5-tuple without allocation, datagrams to closed
    relayed ports."""
    coalesced_reads: int = 0
    """Reads given to `handle_reads` that held several datagrams (UDP GRO)."""
    batches: int = 0
    """`TransmitBatch`es `handle_reads` returned (each one GSO send of several datagrams)."""
    batched_datagrams: int = 0
    """Datagrams those batches carried."""
    relayed_locally: int = 0
    """ChannelData payloads whose peer was another relayed address of this server, handed
    to that allocation directly (see `TurnServer._send_run`)."""


@dataclass(frozen=True, slots=True)
class LearnedRoute:
    """What the core just did with the datagrams of one (socket, source, channel), for a native
    data path to repeat without asking again until `expires` (meshd/turn/_relaypath.c): the
    earliest expiry of every allocation, channel and permission the core checked. Recorded
    only while `TurnServer.learned` is a list and no rate limit applies."""

    local: Address
    """The socket they arrive on: a listening address (ChannelData) or a relayed address."""
    source: Address
    """Who sends them: the client, or the peer."""
    channel: int | None
    """Their ChannelData channel; None: a peer's bare datagrams on a relayed address."""
    out_local: Address
    """The socket they leave from."""
    destination: Address
    """Where they go: the channel's peer, or the allocation's client."""
    out_channel: int | None
    """The channel of the ChannelData they leave as; None: bare payloads (to a peer)."""
    expires: float
    """Unix time from which the core must see them again."""


@dataclass(slots=True)
class _Channel:
    peer: Address
    expires: float


@dataclass(slots=True, eq=False)
class _Allocation:
    flow: FiveTuple
    username: str
    node: str
    port: int
    relay: Address  # bound
    advertised: Address  # told to the client
    expires: float
    txid: bytes  # the Allocate that created it, to answer retransmissions
    response: bytes
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, _Channel] = field(default_factory=dict)
    peer_channels: dict[Address, int] = field(default_factory=dict)
    sweep_at: float | None = None
    deleted: bool = False

    def next_deadline(self) -> float:
        times = [self.expires, *self.permissions.values()]
        times.extend(c.expires for c in self.channels.values())
        return min(times)


@dataclass(slots=True)
class _Reservation:
    port: int
    expires: float


@dataclass(frozen=True)
class _Auth:
    username: str
    node: str
    key: bytes


class TurnServer:
    """The TURN core. Compose it with the STUN core serving the same listening addresses."""

    def __init__(
        self,
        config: TurnServerConfig,
        ports: RelayPorts,
        *,
        stun: StunServer | None = None,
        listening: Iterable[Address] | None = None,
        rng: random.Random | None = None,
        nonce_key: bytes | None = None,
    ) -> None:
        self.config = config
        self.metrics = TurnMetrics()
        self._stun = stun
        if listening is None:
            listening = stun.addresses.sockets if stun is not None else ()
        self._listening = frozenset(listening)
        self._rng = rng if rng is not None else random.SystemRandom()
        self._nonce_key = nonce_key if nonce_key is not None else os.urandom(16)
        self._pool = PortPool(config.relay_ip, config.min_port, config.max_port, ports,
                              self._rng)
        self._advertised_ip = config.external_ip or config.relay_ip
        # Relayed addresses are what peers see (no NAT in front): one allocation's peer may be
        # another's relayed address, and a datagram between them can skip the kernel.
        self._loop_locally = self._advertised_ip == config.relay_ip
        self._denied = tuple(ipaddress.ip_network(n, strict=False) for n in config.denied_peers)
        self._by_flow: dict[FiveTuple, _Allocation] = {}
        self._by_udp: dict[tuple[Address, Address], _Allocation] = {}  # (client, server)
        self._by_relay: dict[Address, _Allocation] = {}
        self._per_node: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}  # bytes per node, one second's worth
        self._reservations: dict[bytes, _Reservation] = {}
        self._streams: dict[FiveTuple, StreamDecoder] = {}
        self._revoked: frozenset[str] = frozenset()
        self._timers: list[tuple[float, int, _Allocation | bytes]] = []
        self._seq = itertools.count()
        self.learned: list[LearnedRoute] | None = None
        """A list (the adapter sets one when it has a native data path): the routes the data
        path took since the adapter last emptied it."""
        self.routes_epoch = 0
        """Bumped when an allocation is created or deleted, or a permission or channel
        expires: learned routes from before may be wrong now (a relayed port freed and taken
        again, a wall clock stepped back), so the adapter forgets them all."""
        self._handlers: dict[int, Callable[[StunMessage, _Auth, FiveTuple, float],
                                            list[Output]]] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
        }

    # --- entry points -------------------------------------------------------------------------

    def handle_datagram(self, data: bytes, source: Address, local: Address,
                        now: float) -> list[Output]:
        """One UDP datagram that arrived on `local` (a listening or a relayed address)."""
        if self._timers and self._timers[0][0] <= now:
            self.handle_timer(now)
        allocation = self._by_relay.get(local)
        if allocation is not None:
            return self._from_peer(allocation, data, source, now)
        if local in self._listening:
            if is_channel_data(data):  # the hot path: no FiveTuple, no parsing beyond 4 bytes
                return self._client_channel_data(self._by_udp.get((source, local)), data, now)
            return self._from_client(data, FiveTuple(Transport.UDP, source, local), now)
        self.metrics.dropped_no_allocation += 1
        return []

    def handle_reads(self, reads: Iterable[Read], local: Address, now: float) -> list[Output]:
        """Everything one wake-up read from the socket on `local`: `(data, segment, source)`
        per read, where a `segment` > 0 means `data` holds datagrams of that size from
        `source` back to back (the kernel coalesced them, UDP GRO; the last may be shorter).

        Same effect as `handle_datagram` per datagram, in order (same checks, counters, drops
        and replies), but ChannelData from clients and datagrams from peers skip the per-
        datagram machinery (lookups once per read and channel, slices, no objects), and
        consecutive datagrams from one local address to one destination come back as one
        `TransmitBatch`. A read that was coalesced from a source keeps its datagrams' order."""
        if self._timers and self._timers[0][0] <= now:
            self.handle_timer(now)
        batcher = Batcher()
        others: list[Output] = []
        # A coalesced read is one GSO send of its source (or the tail of one): its datagrams
        # leave as runs of their own, never joined with other reads', so a unit the sender
        # chose stays one (a meshd tunnel message of several fragments, which the receiving
        # agent opens whole when one read brings it all).
        allocation = self._by_relay.get(local)
        if allocation is not None:
            for data, segment, source in reads:
                burst = 0 < segment < len(data)
                if burst:
                    batcher.end_run()
                self._peer_read(allocation, data, segment, source, now, batcher, others)
                if burst:
                    batcher.end_run()
        elif local in self._listening:
            for data, segment, source in reads:
                burst = 0 < segment < len(data)
                if burst:
                    batcher.end_run()
                self._client_read(data, segment, source, local, now, batcher, others)
                if burst:
                    batcher.end_run()
        else:
            for data, segment, _ in reads:
                self.metrics.dropped_no_allocation += read_count(len(data), segment)
        out = batcher.finish()
        for o in out:
            if isinstance(o, TransmitBatch):
                self.metrics.batches += 1
                self.metrics.batched_datagrams += o.count
        if not others:
            return list(out)
        return [*out, *others]

    def stream_received(self, flow: FiveTuple, data: bytes, now: float) -> list[Output]:
        """Bytes from a TCP client connection (RFC 8656 §3.1), in any chunking."""
        self.handle_timer(now)
        decoder = self._streams.setdefault(flow, StreamDecoder())
        decoder.receive_data(data)
        out: list[Output] = []
        while True:
            try:
                frame = decoder.next_frame()
            except StunParseError as exc:
                self.metrics.dropped_malformed += 1
                out.append(StreamClose(flow, str(exc)))
                self.connection_lost(flow, now)
                return out
            if frame is None:
                return out
            out.extend(self._from_client(frame, flow, now))

    def connection_lost(self, flow: FiveTuple, now: float) -> None:
        """A TCP client connection ended: its allocation goes with it (nothing could reach the
        client any more; RFC 8656 §3.1 ties the allocation to the connection's 5-tuple)."""
        self.handle_timer(now)
        self._streams.pop(flow, None)
        allocation = self._by_flow.get(flow)
        if allocation is not None:
            self.metrics.allocations_deleted += 1
            self._delete(allocation, "connection closed")

    def set_revoked_nodes(self, nodes: Iterable[str], now: float) -> list[Output]:
        """Stop serving these nodes (the whole list; nodes not in it are served again):
        delete their allocations now (their relayed ports are freed, their TCP connections
        closed) and refuse their requests with 403 from now on."""
        self.handle_timer(now)
        self._revoked = frozenset(nodes)
        out: list[Output] = []
        cut = [a for a in self._by_flow.values() if a.node in self._revoked]
        for allocation in cut:
            self.metrics.allocations_deleted += 1
            self._delete(allocation, "revoked")
            if allocation.flow.transport is Transport.TCP:
                out.append(StreamClose(allocation.flow, f"node {allocation.node} revoked"))
        event(log, logging.INFO, "turn.revoked", nodes=len(self._revoked), deleted=len(cut))
        return out

    def get_timer(self) -> float | None:
        """When the next allocation, permission, channel or reservation may expire."""
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        """Expire whatever is due at `now` (cheap when nothing is)."""
        while self._timers and self._timers[0][0] <= now:
            at, _, target = heapq.heappop(self._timers)
            if isinstance(target, bytes):
                reservation = self._reservations.get(target)
                if reservation is not None and reservation.expires <= now:
                    del self._reservations[target]
                    self._pool.release(reservation.port)
                continue
            if target.deleted or target.sweep_at != at:
                continue  # superseded by an earlier entry for the same allocation
            target.sweep_at = None
            self._sweep(target, now)

    # --- introspection ------------------------------------------------------------------------

    @property
    def allocations(self) -> int:
        """Allocations alive."""
        return len(self._by_flow)

    def allocation_for(self, flow: FiveTuple) -> Address | None:
        """The relayed address (as advertised) of `flow`'s allocation, if any."""
        allocation = self._by_flow.get(flow)
        return allocation.advertised if allocation is not None else None

    def samples(self) -> list[tuple[str, dict[str, str], int]]:
        """Prometheus samples (name, labels, value) of counters and gauges."""
        m = self.metrics
        out: list[tuple[str, dict[str, str], int]] = [
            ("meshd_relay_allocations", {}, len(self._by_flow)),
            ("meshd_relay_allocations_total", {}, m.allocations_total),
            ("meshd_relay_allocations_expired_total", {}, m.allocations_expired),
            ("meshd_relay_allocations_deleted_total", {}, m.allocations_deleted),
            ("meshd_relay_permissions", {},
             sum(len(a.permissions) for a in self._by_flow.values())),
            ("meshd_relay_channels", {}, sum(len(a.channels) for a in self._by_flow.values())),
            ("meshd_relay_requests_total", {}, m.requests),
            ("meshd_relay_auth_challenges_total", {}, m.auth_challenges),
            ("meshd_relay_auth_failures_total", {}, m.auth_failures),
            ("meshd_relay_stale_nonces_total", {}, m.stale_nonces),
            ("meshd_relay_bytes_total", {"direction": "in"}, m.bytes_in),
            ("meshd_relay_bytes_total", {"direction": "out"}, m.bytes_out),
            ("meshd_relay_datagrams_total", {"direction": "in"}, m.datagrams_in),
            ("meshd_relay_datagrams_total", {"direction": "out"}, m.datagrams_out),
            ("meshd_relay_dropped_total", {"reason": "no-permission"}, m.dropped_no_permission),
            ("meshd_relay_dropped_total", {"reason": "rate-limited"}, m.dropped_rate_limited),
            ("meshd_relay_dropped_total", {"reason": "malformed"}, m.dropped_malformed),
            ("meshd_relay_dropped_total", {"reason": "no-allocation"}, m.dropped_no_allocation),
            ("meshd_relay_coalesced_reads_total", {}, m.coalesced_reads),
            ("meshd_relay_batches_total", {}, m.batches),
            ("meshd_relay_batched_datagrams_total", {}, m.batched_datagrams),
            ("meshd_relay_local_datagrams_total", {}, m.relayed_locally),
        ]
        out.extend(("meshd_relay_errors_total", {"code": str(code)}, count)
                   for code, count in sorted(m.errors.items()))
        out.extend(("meshd_relay_node_allocations", {"node": node}, count)
                   for node, count in sorted(self._per_node.items()))
        return out

    # --- from clients -------------------------------------------------------------------------

    def _from_client(self, data: bytes, flow: FiveTuple, now: float) -> list[Output]:
        if is_channel_data(data):
            return self._client_channel_data(self._by_flow.get(flow), data, now)
        try:
            msg = parse_message(data)
        except StunParseError as exc:
            return self._drop_malformed(flow, str(exc))
        if msg.method == Method.BINDING:
            return self._binding(data, flow)
        if msg.message_class is MessageClass.INDICATION and msg.method == Method.SEND:
            return self._send_indication(msg, flow, now)
        if msg.message_class is not MessageClass.REQUEST:
            return self._drop_malformed(flow, f"unexpected {msg.message_class.name}")
        self.metrics.requests += 1
        handler = self._handlers.get(msg.method)
        if handler is None:
            return self._error(flow, msg, 400, f"method {msg.method:#x} not supported")
        auth = self._authenticate(data, msg, flow, now)
        if not isinstance(auth, _Auth):
            return auth
        if auth.node in self._revoked:
            return self._error(flow, msg, 403, f"node {auth.node} is revoked", key=auth.key)
        if msg.unknown_required:
            return self._error(flow, msg, 420, key=auth.key,
                               extra=(UnknownAttributes(msg.unknown_required),))
        return handler(msg, auth, flow, now)

    def _binding(self, data: bytes, flow: FiveTuple) -> list[Output]:
        if self._stun is None:
            return self._drop_malformed(flow, "Binding without a STUN server")
        transmits = self._stun.handle_datagram(data, flow.client, flow.server)
        if flow.transport is Transport.UDP:
            return list(transmits)
        # Over TCP the answer can only go back on the connection (no CHANGE-REQUEST).
        return [StreamWrite(flow, t.data) for t in transmits
                if t.source == flow.server and t.destination == flow.client]

    # --- authentication (RFC 8656 §5, RFC 5389 §10.2.2) ------------------------------------------

    def _authenticate(self, data: bytes, msg: StunMessage, flow: FiveTuple,
                      now: float) -> _Auth | list[Output]:
        if msg.integrity is None:
            self.metrics.auth_challenges += 1
            return self._challenge(flow, msg, 401, now)
        username, realm, nonce = msg.get(Username), msg.get(Realm), msg.get(Nonce)
        if username is None or realm is None or nonce is None:
            return self._error(flow, msg, 400, "USERNAME, REALM and NONCE are required")
        if not self._nonce_valid(nonce.value, flow, now):
            self.metrics.stale_nonces += 1
            return self._challenge(flow, msg, 438, now)
        try:
            expiry, node = parse_username(username.value)
        except ValueError:
            return self._auth_failed(flow, msg, now, "username is not <expiry>:<node>")
        if expiry < now:
            return self._auth_failed(flow, msg, now, "credential expired", node=node)
        if realm.value != self.config.realm:
            return self._auth_failed(flow, msg, now, f"wrong realm {realm.value!r}", node=node)
        for password in candidate_passwords(self.config.secrets, username.value):
            key = long_term_key(username.value, realm.value, password)
            if verify_integrity(data, key):
                return _Auth(username.value, node, key)
        return self._auth_failed(flow, msg, now, "MESSAGE-INTEGRITY mismatch", node=node)

    def _auth_failed(self, flow: FiveTuple, msg: StunMessage, now: float, reason: str,
                     node: str = "") -> list[Output]:
        self.metrics.auth_failures += 1
        event(log, logging.INFO, "turn.auth_failed", client=format_address(flow.client),
              node=node or "-", reason=reason)
        return self._challenge(flow, msg, 401, now)

    def _challenge(self, flow: FiveTuple, msg: StunMessage, code: int,
                   now: float) -> list[Output]:
        extra = (Realm(self.config.realm), Nonce(self._make_nonce(flow, now)))
        return self._error(flow, msg, code, extra=extra)

    def _make_nonce(self, flow: FiveTuple, now: float) -> bytes:
        expiry = f"{int(now + self.config.nonce_lifetime_s):x}"
        return f"{expiry}/{self._nonce_mac(expiry, flow)}".encode()

    def _nonce_mac(self, expiry: str, flow: FiveTuple) -> str:
        text = f"{expiry}/{flow.client[0]}".encode()
        return hmac.new(self._nonce_key, text, hashlib.sha256).hexdigest()[:2 * _NONCE_MAC_BYTES]

    def _nonce_valid(self, nonce: bytes, flow: FiveTuple, now: float) -> bool:
        try:
            expiry, _, mac = nonce.decode("ascii").partition("/")
            valid_until = int(expiry, 16)
        except (UnicodeDecodeError, ValueError):
            return False
        return valid_until >= now and hmac.compare_digest(mac, self._nonce_mac(expiry, flow))

    # --- Allocate (RFC 8656 §7.2) ---------------------------------------------------------------

    def _allocate(self, msg: StunMessage, auth: _Auth, flow: FiveTuple,
                  now: float) -> list[Output]:
        existing = self._by_flow.get(flow)
        if existing is not None:
            if existing.txid == msg.transaction_id and existing.node == auth.node:
                return [self._to_client(flow, existing.response)]  # a retransmission
            return self._error(flow, msg, 437, "5-tuple already has an allocation", key=auth.key)
        transport = msg.get(RequestedTransport)
        if transport is None:
            return self._error(flow, msg, 400, "REQUESTED-TRANSPORT missing", key=auth.key)
        if transport.protocol != PROTOCOL_UDP:
            return self._error(flow, msg, 442, key=auth.key)
        token, even = msg.get(ReservationToken), msg.get(EvenPort)
        family = msg.get(RequestedAddressFamily)
        if token is not None and (even is not None or family is not None):
            return self._error(flow, msg, 400, "RESERVATION-TOKEN with EVEN-PORT or "
                               "REQUESTED-ADDRESS-FAMILY", key=auth.key)
        wanted = FAMILY_IPV4 if family is None else family.family
        if wanted != self.config.family:
            return self._error(flow, msg, 440, key=auth.key)
        if self._per_node.get(auth.node, 0) >= self.config.quota_per_node:
            event(log, logging.WARNING, "turn.quota", node=auth.node,
                  client=format_address(flow.client), allocations=self._per_node[auth.node])
            return self._error(flow, msg, 486, key=auth.key)
        new_token: bytes | None = None
        if token is not None:
            reservation = self._reservations.pop(token.token, None)
            if reservation is None or reservation.expires <= now:
                return self._error(flow, msg, 508, "unknown or expired reservation",
                                   key=auth.key)
            port: int | None = reservation.port
        elif even is not None and even.reserve:
            port = self._pool.acquire_pair()
            if port is not None:
                new_token = self._rng.randbytes(8)
                expires = now + self.config.reservation_lifetime_s
                self._reservations[new_token] = _Reservation(port + 1, expires)
                heapq.heappush(self._timers, (expires, next(self._seq), new_token))
        else:
            port = self._pool.acquire(even=even is not None)
        if port is None:
            event(log, logging.WARNING, "turn.no_port", node=auth.node,
                  client=format_address(flow.client))
            return self._error(flow, msg, 508, "no relayed port free", key=auth.key)
        if msg.get(DontFragment) is not None:
            self._pool.set_dont_fragment(port)
        lifetime = self._lifetime(msg)
        advertised = (self._advertised_ip, port)
        attributes: list[Attribute] = [XorRelayedAddress(advertised), Lifetime(lifetime)]
        if new_token is not None:
            attributes.append(ReservationToken(new_token))
        attributes.append(XorMappedAddress(flow.client))
        response = self._encode(msg, MessageClass.SUCCESS, attributes, auth.key)
        allocation = _Allocation(
            flow=flow, username=auth.username, node=auth.node, port=port,
            relay=(self.config.relay_ip, port), advertised=advertised, expires=now + lifetime,
            txid=msg.transaction_id, response=response,
        )
        self._by_flow[flow] = allocation
        if flow.transport is Transport.UDP:
            self._by_udp[(flow.client, flow.server)] = allocation
        self._by_relay[allocation.relay] = allocation
        self._routes_changed()  # a relayed address of ours now: routes to it rewrite locally
        self._per_node[auth.node] = self._per_node.get(auth.node, 0) + 1
        self.metrics.allocations_total += 1
        self._schedule(allocation)
        event(log, logging.INFO, "turn.allocate", node=auth.node,
              client=format_address(flow.client), transport=flow.transport.name.lower(),
              relay=format_address(advertised), lifetime=lifetime)
        return [self._to_client(flow, response)]

    def _lifetime(self, msg: StunMessage) -> int:
        """RFC 8656 §7.2/§8.2: min(requested, maximum), but at least the default."""
        requested = msg.get(Lifetime)
        if requested is None:
            return self.config.default_lifetime_s
        return max(min(requested.seconds, self.config.max_lifetime_s),
                   self.config.default_lifetime_s)

    # --- Refresh (RFC 8656 §8.2) ------------------------------------------------------------

    def _refresh(self, msg: StunMessage, auth: _Auth, flow: FiveTuple,
                 now: float) -> list[Output]:
        allocation = self._owned(msg, auth, flow)
        if not isinstance(allocation, _Allocation):
            return allocation
        family = msg.get(RequestedAddressFamily)
        if family is not None and family.family != self.config.family:
            return self._error(flow, msg, 443, key=auth.key)
        requested = msg.get(Lifetime)
        if requested is not None and requested.seconds == 0:
            self.metrics.allocations_deleted += 1
            self._delete(allocation, "deleted by client")
            return self._success(flow, msg, [Lifetime(0)], auth.key)
        lifetime = self._lifetime(msg)
        allocation.expires = now + lifetime
        self._schedule(allocation)
        event(log, logging.DEBUG, "turn.refresh", node=auth.node,
              relay=format_address(allocation.advertised), lifetime=lifetime)
        return self._success(flow, msg, [Lifetime(lifetime)], auth.key)

    # --- CreatePermission (RFC 8656 §9.2) -------------------------------------------------------

    def _create_permission(self, msg: StunMessage, auth: _Auth, flow: FiveTuple,
                           now: float) -> list[Output]:
        allocation = self._owned(msg, auth, flow)
        if not isinstance(allocation, _Allocation):
            return allocation
        peers = msg.get_all(XorPeerAddress)
        if not peers:
            return self._error(flow, msg, 400, "XOR-PEER-ADDRESS missing", key=auth.key)
        for peer in peers:
            refused = self._check_peer(flow, msg, auth, peer.address)
            if refused:
                return refused
        ips = {p.address[0] for p in peers}
        if len(ips - allocation.permissions.keys()) + len(allocation.permissions) \
                > self.config.max_permissions:
            return self._error(flow, msg, 508, "too many permissions", key=auth.key)
        for ip in ips:
            allocation.permissions[ip] = now + self.config.permission_lifetime_s
        self._schedule(allocation)
        event(log, logging.DEBUG, "turn.permission", node=auth.node,
              relay=format_address(allocation.advertised), peers=",".join(sorted(ips)))
        return self._success(flow, msg, [], auth.key)

    # --- ChannelBind (RFC 8656 §12.2) ---------------------------------------------------------

    def _channel_bind(self, msg: StunMessage, auth: _Auth, flow: FiveTuple,
                      now: float) -> list[Output]:
        allocation = self._owned(msg, auth, flow)
        if not isinstance(allocation, _Allocation):
            return allocation
        number, peer = msg.get(ChannelNumber), msg.get(XorPeerAddress)
        if number is None or peer is None:
            return self._error(flow, msg, 400, "CHANNEL-NUMBER and XOR-PEER-ADDRESS required",
                               key=auth.key)
        channel, address = number.number, peer.address
        if not CHANNEL_MIN <= channel <= LEGACY_CHANNEL_MAX:
            # RFC 8656 §12 says 0x4000..0x4FFF; RFC 5766 clients use up to 0x7FFF (framing.py).
            return self._error(flow, msg, 400, "channel number out of 0x4000..0x7FFF",
                               key=auth.key)
        bound = allocation.channels.get(channel)
        if bound is not None and bound.peer != address:
            return self._error(flow, msg, 400, "channel bound to another peer", key=auth.key)
        if allocation.peer_channels.get(address, channel) != channel:
            return self._error(flow, msg, 400, "peer bound to another channel", key=auth.key)
        refused = self._check_peer(flow, msg, auth, address)
        if refused:
            return refused
        limit = self.config.max_permissions
        if (bound is None and len(allocation.channels) >= limit) or (
                address[0] not in allocation.permissions and len(allocation.permissions) >= limit):
            return self._error(flow, msg, 508, "too many channels or permissions", key=auth.key)
        allocation.channels[channel] = _Channel(address, now + self.config.channel_lifetime_s)
        allocation.peer_channels[address] = channel
        allocation.permissions[address[0]] = now + self.config.permission_lifetime_s
        self._schedule(allocation)
        event(log, logging.DEBUG, "turn.channel", node=auth.node,
              relay=format_address(allocation.advertised), channel=f"{channel:#06x}",
              peer=format_address(address))
        return self._success(flow, msg, [], auth.key)

    def _owned(self, msg: StunMessage, auth: _Auth, flow: FiveTuple) -> _Allocation | list[Output]:
        allocation = self._by_flow.get(flow)
        if allocation is None:
            return self._error(flow, msg, 437, "no allocation on this 5-tuple", key=auth.key)
        if allocation.node != auth.node:
            # RFC 8656 §5: the same credentials must be used over the allocation's life; we
            # compare the node, so a node's fresh REST credential may refresh its allocation.
            self.metrics.auth_failures += 1
            return self._error(flow, msg, 441, key=auth.key)
        return allocation

    def _check_peer(self, flow: FiveTuple, msg: StunMessage, auth: _Auth,
                    peer: Address) -> list[Output]:
        ip = ipaddress.ip_address(peer[0])
        if (FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6) != self.config.family:
            return self._error(flow, msg, 443, key=auth.key)
        if not self._peer_allowed(ip):
            event(log, logging.INFO, "turn.peer_refused", node=auth.node, peer=peer[0])
            return self._error(flow, msg, 403, f"peer {peer[0]} not allowed", key=auth.key)
        return []

    def _peer_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address(
                "255.255.255.255"):
            return False
        if ip.is_loopback and not self.config.allow_loopback_peers:
            return False
        return not any(ip in net for net in self._denied)

    # --- data (RFC 8656 §11, §12) ---------------------------------------------------------------

    def _send_indication(self, msg: StunMessage, flow: FiveTuple, now: float) -> list[Output]:
        allocation = self._by_flow.get(flow)
        if allocation is None:
            self.metrics.dropped_no_allocation += 1
            return []
        peer, data = msg.get(XorPeerAddress), msg.get(Data)
        if peer is None or data is None:
            return self._drop_malformed(flow, "Send without XOR-PEER-ADDRESS or DATA")
        return self._to_peer(allocation, peer.address, data.value, now)

    def _client_channel_data(self, allocation: _Allocation | None, data: bytes,
                             now: float) -> list[Output]:
        if allocation is None:
            self.metrics.dropped_no_allocation += 1
            return []
        # RFC 8656 §12.4 header, read in place (parse_channel_data without the object).
        if len(data) < CHANNEL_HEADER.size:
            return self._drop_malformed(allocation.flow, "ChannelData too short")
        number, length = CHANNEL_HEADER.unpack_from(data)
        if CHANNEL_HEADER.size + length > len(data):
            return self._drop_malformed(allocation.flow, "ChannelData length overruns")
        channel = allocation.channels.get(number)
        if channel is None or channel.expires <= now:
            self.metrics.dropped_no_permission += 1
            return []
        payload = data[CHANNEL_HEADER.size : CHANNEL_HEADER.size + length]
        return self._to_peer(allocation, channel.peer, payload, now)

    def _client_read(self, data: bytes, segment: int, source: Address, local: Address,
                     now: float, batcher: Batcher, others: list[Output]) -> None:
        """The datagrams of one read on a listening socket (RFC 8656 §12.4 fast path): the
        same checks as `_client_channel_data` + `_to_peer`, with the allocation and each
        channel's route looked up once per read; anything but ChannelData goes the slow way.
        Payloads for one route go out together (`_send_run`)."""
        size = len(data)
        limited = self.config.bytes_per_s_per_node > 0
        first = 0
        if segment <= 0 or segment >= size:
            segment = size or 1  # an empty datagram is one datagram too
        else:
            self.metrics.coalesced_reads += 1
            if not limited:
                first = self._client_uniform(data, segment, source, local, now, batcher,
                                             others)
        metrics = self.metrics
        unpack = CHANNEL_HEADER.unpack_from
        allocation: _Allocation | None = None
        looked_up = False
        number = -1  # the channel `route` belongs to (a read usually holds one channel only)
        route: tuple[Address, _Allocation | None] | None = None
        run: list[bytes] = []  # payloads for `route`, all of `run_length` bytes
        run_length = -1
        relayed = relayed_bytes = 0
        for start in range(first, size or 1, segment):
            end = start + segment if start + segment < size else size
            if not size or not 0x40 <= data[start] <= 0x7F:  # STUN, garbage: the slow path
                if run:
                    assert allocation is not None and route is not None
                    self._send_run(allocation, route, run, now, batcher, others)
                    run = []
                self._slow(self._from_client(data[start:end], FiveTuple(Transport.UDP, source,
                                                                        local), now),
                           batcher, others)
                looked_up, number = False, -1  # the request may have changed anything
                continue
            if not looked_up:
                allocation, looked_up = self._by_udp.get((source, local)), True
            if allocation is None:
                metrics.dropped_no_allocation += 1
                continue
            if end - start < 4:
                self._drop_malformed(allocation.flow, "ChannelData too short")
                continue
            channel, length = unpack(data, start)
            if start + 4 + length > end:
                self._drop_malformed(allocation.flow, "ChannelData length overruns")
                continue
            if channel != number:
                if run:
                    assert route is not None
                    self._send_run(allocation, route, run, now, batcher, others)
                    run = []
                number, route = channel, self._channel_route(allocation, channel, now)
                if route is not None and self.learned is not None and not limited:
                    self._learn_client(allocation, local, source, channel, route, now)
            if route is None:
                metrics.dropped_no_permission += 1
                continue
            if limited and not self._within_rate(allocation.node, length, now):
                continue
            if length != run_length:
                if run:
                    self._send_run(allocation, route, run, now, batcher, others)
                    run = []
                run_length = length
            run.append(data[start + 4 : start + 4 + length])
            relayed += 1
            relayed_bytes += length
        if run:
            assert allocation is not None and route is not None
            self._send_run(allocation, route, run, now, batcher, others)
        metrics.datagrams_out += relayed
        metrics.bytes_out += relayed_bytes

    def _client_uniform(self, data: bytes, segment: int, source: Address, local: Address,
                        now: float, batcher: Batcher, others: list[Output]) -> int:
        """The usual coalesced read: every full-size datagram is ChannelData with the same
        4-byte header (one channel, Length = segment - 4, no padding), and a shorter last one,
        if any, is ChannelData of that channel filling its datagram. Checked with four strided
        slices instead of a loop; then one lookup and one run for all of them, so the read
        leaves as one send (a GSO send stays one: a meshd tunnel message the receiving agent
        opens whole). Returns the bytes handled (0: not such a read, or nothing to do; the
        per-datagram loop takes the rest, e.g. a shorter last datagram of another shape)."""
        header = data[:4]
        count = len(data) // segment  # full-size datagrams
        # A segment under the 4-byte header cannot be ChannelData (a GRO read of tiny
        # datagrams, or a peer's garbage): the per-datagram loop drops those.
        if (count < 2 or segment < 4 or not 0x40 <= header[0] <= 0x7F
                or header[2] << 8 | header[3] != segment - 4):
            return 0
        end = count * segment
        for k in range(4):
            if data[k:end:segment] != header[k : k + 1] * count:
                return 0
        allocation = self._by_udp.get((source, local))
        if allocation is None:
            return 0  # counted by the loop
        number = header[0] << 8 | header[1]
        route = self._channel_route(allocation, number, now)
        if route is None:
            return 0
        if self.learned is not None:  # no rate limit here: the caller checked
            self._learn_client(allocation, local, source, number, route, now)
        tail = len(data) - end
        if tail and not (tail >= 4 and data[end : end + 2] == header[:2]
                         and data[end + 2] << 8 | data[end + 3] == tail - 4):
            tail = 0  # the loop takes it
        self.metrics.datagrams_out += count + (tail > 0)
        self.metrics.bytes_out += count * (segment - 4) + max(tail - 4, 0)
        if route[1] is not None and self._rewrite_locally(allocation, route[1], data, segment,
                                                          count, tail, now, batcher):
            return end + tail
        payloads = [data[i + 4 : i + segment] for i in range(0, end, segment)]
        if tail:
            payloads.append(data[end + 4 :])
        self._send_run(allocation, route, payloads, now, batcher, others)
        return end + tail

    def _rewrite_locally(self, allocation: _Allocation, target: _Allocation, data: bytes,
                         segment: int, count: int, tail: int, now: float,
                         batcher: Batcher) -> bool:
        """Relay to relay, the usual case: `count` ChannelData messages of one channel and size
        (and a shorter last one of `tail` bytes, 0: none) become `target`'s client's
        ChannelData by rewriting the 4 header bytes of each in a copy of the read (the payloads
        stay where they are). Only when `target` has a live channel
        and permission for `allocation`'s relayed address and a UDP client (and no rate limit
        applies: the caller checks); False leaves it to `_send_run`."""
        source = allocation.relay
        number = target.peer_channels.get(source)
        channel = target.channels.get(number) if number is not None else None
        if (channel is None or number is None or channel.expires <= now
                or target.flow.transport is not Transport.UDP
                or target.permissions.get(source[0], 0.0) <= now):
            return False
        out = bytearray(data)
        end = count * segment
        del out[end + tail :]
        header = CHANNEL_HEADER.pack(number, segment - 4)
        for k in range(4):
            out[k:end:segment] = header[k : k + 1] * count
        if tail:
            out[end : end + 4] = CHANNEL_HEADER.pack(number, tail - 4)
        metrics = self.metrics
        metrics.relayed_locally += count + (tail > 0)
        metrics.datagrams_in += count + (tail > 0)
        metrics.bytes_in += count * (segment - 4) + max(tail - 4, 0)
        batcher.add_block(target.flow.server, target.flow.client, out, segment)
        return True

    def _learn_client(self, allocation: _Allocation, local: Address, source: Address,
                      number: int, route: tuple[Address, _Allocation | None],
                      now: float) -> None:
        """Record what ChannelData on `number` from `source` does now (`route` is alive): its
        payloads go from the relayed address to the peer, or -- the peer being another
        relayed address of ours whose client has a channel and permission for us -- they go
        to that client as its ChannelData (what `_rewrite_locally` and `_from_peer_many`
        send). Anything else (a TCP client over there, no channel back) stays with the core."""
        assert self.learned is not None
        peer, target = route
        expires = min(allocation.expires, allocation.channels[number].expires,
                      allocation.permissions[peer[0]])
        if target is None:
            self.learned.append(LearnedRoute(local, source, number, allocation.relay, peer,
                                             None, expires))
            return
        back = target.peer_channels.get(allocation.relay)
        channel = target.channels.get(back) if back is not None else None
        if back is None or channel is None or target.flow.transport is not Transport.UDP:
            return
        expires = min(expires, target.expires, channel.expires,
                      target.permissions.get(allocation.relay[0], 0.0))
        if expires > now:
            self.learned.append(LearnedRoute(local, source, number, target.flow.server,
                                             target.flow.client, back, expires))

    def _channel_route(self, allocation: _Allocation, number: int,
                       now: float) -> tuple[Address, _Allocation | None] | None:
        """Where ChannelData on `number` goes now: (the bound peer, the allocation of this
        server whose relayed address that is, if any), or None when the channel (§12) or the
        peer's permission (§9) is not alive (drop: no open relay)."""
        channel = allocation.channels.get(number)
        if channel is None or channel.expires <= now:
            return None
        peer = channel.peer
        if allocation.permissions.get(peer[0], 0.0) <= now:
            return None
        return peer, self._by_relay.get(peer) if self._loop_locally else None

    def _send_run(self, allocation: _Allocation, route: tuple[Address, _Allocation | None],
                  payloads: list[bytes], now: float, batcher: Batcher,
                  others: list[Output]) -> None:
        """Payloads of one size from `allocation`'s relayed address to `route`'s peer. When
        the peer is another relayed address of this server (two relayed nodes talking), the
        datagrams go straight to that allocation's peer path: what the kernel would deliver
        to its socket, with the same checks, minus two system calls and a wake-up."""
        peer, target = route
        if target is None:
            batcher.add_many(allocation.relay, peer, payloads)
            return
        self.metrics.relayed_locally += len(payloads)
        self._from_peer_many(target, payloads, allocation.relay, now, batcher, others)

    def _peer_read(self, allocation: _Allocation, data: bytes, segment: int, source: Address,
                   now: float, batcher: Batcher, others: list[Output]) -> None:
        """The datagrams of one read on a relayed socket."""
        size = len(data)
        if 0 < segment < size:
            self.metrics.coalesced_reads += 1
            chunks = [data[i : i + segment] for i in range(0, size, segment)]
        else:
            chunks = [data]
        self._from_peer_many(allocation, chunks, source, now, batcher, others)

    def _from_peer_many(self, allocation: _Allocation, chunks: list[bytes], source: Address,
                        now: float, batcher: Batcher, others: list[Output]) -> None:
        """`_from_peer` for datagrams of one size (the last may be shorter) from one source:
        its checks once (they depend on the source only), then a ChannelData header in front
        of each (§12.4). Without a live channel, or to a TCP client, `_from_peer` itself (Data
        indications, padding)."""
        number = allocation.peer_channels.get(source)
        channel = allocation.channels.get(number) if number is not None else None
        flow = allocation.flow
        if (channel is None or number is None or channel.expires <= now
                or flow.transport is not Transport.UDP):
            for chunk in chunks:
                self._slow(self._from_peer(allocation, chunk, source, now), batcher, others)
            return
        metrics = self.metrics
        if allocation.permissions.get(source[0], 0.0) <= now:
            metrics.dropped_no_permission += len(chunks)  # RFC 8656 §11.3
            return
        if self.config.bytes_per_s_per_node > 0:
            node = allocation.node
            chunks = [c for c in chunks if self._within_rate(node, len(c), now)]
            if not chunks:
                return
        elif self.learned is not None:
            self.learned.append(LearnedRoute(
                allocation.relay, source, None, flow.server, flow.client, number,
                min(allocation.expires, channel.expires, allocation.permissions[source[0]])))
        size = len(chunks[0])
        full = CHANNEL_HEADER.pack(number, size)
        frames = [full + chunk for chunk in chunks]
        last = len(chunks[-1])
        if last != size:
            frames[-1] = CHANNEL_HEADER.pack(number, last) + chunks[-1]
        metrics.datagrams_in += len(chunks)
        metrics.bytes_in += size * (len(chunks) - 1) + last
        batcher.add_many(flow.server, flow.client, frames)

    @staticmethod
    def _slow(outputs: list[Output], batcher: Batcher, others: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Transmit) and o.ttl is None:
                batcher.add(o.source, o.destination, o.data)
            else:
                others.append(o)

    def _to_peer(self, allocation: _Allocation, peer: Address, data: bytes,
                 now: float) -> list[Output]:
        if allocation.permissions.get(peer[0], 0.0) <= now:
            self.metrics.dropped_no_permission += 1
            return []
        if not self._within_rate(allocation.node, len(data), now):
            return []
        self.metrics.bytes_out += len(data)
        self.metrics.datagrams_out += 1
        return [Transmit(allocation.relay, peer, data)]

    def _from_peer(self, allocation: _Allocation, data: bytes, source: Address,
                   now: float) -> list[Output]:
        if allocation.permissions.get(source[0], 0.0) <= now:
            self.metrics.dropped_no_permission += 1
            return []  # RFC 8656 §11.3: silently discarded
        if not self._within_rate(allocation.node, len(data), now):
            return []
        tcp = allocation.flow.transport is Transport.TCP
        number = allocation.peer_channels.get(source)
        channel = allocation.channels.get(number) if number is not None else None
        if channel is not None and number is not None and channel.expires > now:
            frame = encode_channel_data(number, data, pad=tcp)
        else:
            # An indication's transaction id only has to be there; a counter is cheaper
            # than randomness per datagram.
            indication = StunMessage(MessageClass.INDICATION, Method.DATA,
                                     next(self._seq).to_bytes(12, "big"),
                                     (XorPeerAddress(source), Data(data)))
            try:
                frame = encode_message(indication)
            except ValueError:  # too big for a STUN message; a channel would have fit
                self.metrics.dropped_malformed += 1
                return []
        self.metrics.bytes_in += len(data)
        self.metrics.datagrams_in += 1
        return [self._to_client(allocation.flow, frame)]

    def _within_rate(self, node: str, size: int, now: float) -> bool:
        rate = self.config.bytes_per_s_per_node
        if not rate:
            return True
        bucket = self._buckets.get(node)
        if bucket is None:
            bucket = self._buckets[node] = TokenBucket.full(rate, rate, now)
        if not bucket.take(now, size):
            self.metrics.dropped_rate_limited += 1
            return False
        return True

    # --- expiry ---------------------------------------------------------------------------------

    def _schedule(self, allocation: _Allocation) -> None:
        deadline = allocation.next_deadline()
        if allocation.sweep_at is None or deadline < allocation.sweep_at:
            allocation.sweep_at = deadline
            heapq.heappush(self._timers, (deadline, next(self._seq), allocation))

    def _sweep(self, allocation: _Allocation, now: float) -> None:
        if allocation.expires <= now:
            self.metrics.allocations_expired += 1
            self._delete(allocation, "expired")
            return
        gone = [ip for ip, t in allocation.permissions.items() if t <= now]
        for ip in gone:
            del allocation.permissions[ip]
        numbers = [n for n, c in allocation.channels.items() if c.expires <= now]
        for number in numbers:
            channel = allocation.channels.pop(number)
            allocation.peer_channels.pop(channel.peer, None)
        if gone or numbers:
            # Learned routes expire with these anyway; this covers a clock stepped back.
            self._routes_changed()
        self._schedule(allocation)

    def _routes_changed(self) -> None:
        """Routes learnt so far may be wrong from now on: the adapter forgets them all (and
        those not yet handed over go too); the next reads relearn what still holds."""
        self.routes_epoch += 1
        if self.learned:
            self.learned.clear()

    def _delete(self, allocation: _Allocation, reason: str) -> None:
        allocation.deleted = True
        self._routes_changed()
        del self._by_flow[allocation.flow]
        if allocation.flow.transport is Transport.UDP:
            del self._by_udp[(allocation.flow.client, allocation.flow.server)]
        del self._by_relay[allocation.relay]
        self._pool.release(allocation.port)
        left = self._per_node[allocation.node] - 1
        if left:
            self._per_node[allocation.node] = left
        else:
            del self._per_node[allocation.node]
            self._buckets.pop(allocation.node, None)
        event(log, logging.INFO, "turn.delete", node=allocation.node,
              relay=format_address(allocation.advertised), reason=reason)

    # --- responses ------------------------------------------------------------------------------

    def _encode(self, request: StunMessage, message_class: MessageClass,
                attributes: list[Attribute], key: bytes | None) -> bytes:
        attributes.append(Software(self.config.software))
        response = StunMessage(message_class, request.method, request.transaction_id,
                               tuple(attributes), fingerprint=request.fingerprint)
        return encode_message(response, key=key)

    def _success(self, flow: FiveTuple, request: StunMessage, attributes: list[Attribute],
                 key: bytes) -> list[Output]:
        return [self._to_client(flow, self._encode(request, MessageClass.SUCCESS, attributes,
                                                   key))]

    def _error(self, flow: FiveTuple, request: StunMessage, code: int, reason: str = "", *,
               key: bytes | None = None, extra: tuple[Attribute, ...] = ()) -> list[Output]:
        self.metrics.errors[code] = self.metrics.errors.get(code, 0) + 1
        if code not in (401, 438):
            event(log, logging.DEBUG, "turn.error", client=format_address(flow.client),
                  method=f"{request.method:#05x}", code=code, reason=reason or REASONS[code])
        attributes: list[Attribute] = [ErrorCode(code, reason or REASONS[code]), *extra]
        return [self._to_client(flow, self._encode(request, MessageClass.ERROR, attributes,
                                                   key))]

    def _to_client(self, flow: FiveTuple, data: bytes) -> Output:
        if flow.transport is Transport.UDP:
            return Transmit(flow.server, flow.client, data)
        return StreamWrite(flow, pad_for_stream(data))

    def _drop_malformed(self, flow: FiveTuple, reason: str) -> list[Output]:
        self.metrics.dropped_malformed += 1
        event(log, logging.DEBUG, "turn.drop", client=format_address(flow.client),
              reason=reason)
        return []
