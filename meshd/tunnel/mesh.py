"""One agent's tunnel, sans-I/O: `MeshNode` composes the control client's view of the mesh,
candidate gathering (STUN, TURN), one `PathMachine` per peer and the `TunnelEndpoint`, all over
one UDP socket.

Inputs (every entry point takes `now`, the monotonic clock the adapter runs on):

- `control_event(ev, now)`: what `ControlClient.next_event()` returned (welcome, peer table,
  signals, TURN credentials). Signals go out through `ControlClient.send_signal` (the adapter
  flushes the client's commands afterwards).
- `receive_reads([(data, segment, source), ...], now)`: reads of the tunnel socket (one
  datagram each, or with UDP GRO several of `segment` bytes; `receive_batch` takes plain
  `(datagram, source)` pairs). Returns the IP packets to write to the TUN device.
- `send_packets(packets, now)`: IP packets read from the TUN device. Returns the datagrams that
  carry them (direct or through the relay).
- `handle_timer(now)` at `get_timer()`.

Outputs: `datagrams_to_send(now)` (checks, STUN/TURN requests, handshakes, keepalives; drain it
after every input), `next_event()` (`PeerPathChanged`, `PeerUp`, `PeerDown`), `peer_status()`
and `metrics`.

Demultiplexing of the socket (RFC 7983 by the first byte):

    0x00-0x03 STUN   from the STUN server   -> ReflexiveQuery (srflx gathering)
                     from the TURN server   -> TurnClient (allocation, Data indications)
                     from anyone else       -> the PathMachine whose check/response it is
    0x40-0x7F ChannelData from the TURN server -> peer by channel -> demultiplexed again with
                                                  local = our relayed address
    0xE1-0xE4 tunnel -> TunnelEndpoint (sessions by receiver index; any path of the peer)

Gathering: a host candidate (the socket's address), a server-reflexive one (`ReflexiveQuery` to
the server's STUN port) and a relayed one (`TurnClient` with the control channel's credentials)
are published together once both queries ended; the relay pair carries data from the first
byte and the path machines upgrade to a direct pair when checks prove one. A lost or refused
allocation is retried with backoff; a restart of checks re-runs the STUN query.

Port guessing (`meshd.tunnel.guess`, symmetric × port-restricted pairs once relayed): the NAT
classes (ours from `ControlClient.effective_nat`: our probe's, else the class the server stored
and sent in the welcome; `nat_changed`; the peer's from the peer table) give
each path machine its side; a hard-side phase takes the node-wide socket pool, which the adapter
opens on `GuessSocketsWanted` (`guess_sockets_opened`) and closes on `GuessSocketsReleased`;
pool sockets' reads come in through `receive_pool_reads`, and `Transmit.source` says which
socket a datagram leaves from. The hard side cues the easy one with the signal
`{"kind": "guess"}` once its indications left.

Who may use which overlay address comes from the control channel's peer table only: the
`CAPeerVerifier` is asked with it, and decrypted packets must come from the peer's address.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeweave.log import event
from edgeweave.ratelimit import KeyedBuckets, TokenBucket
from meshd.control.client import (
    ControlClient,
    ControlEvent,
    ControlNotReady,
    CredentialsRefreshed,
    Disconnected,
    PeersChanged,
    SignalReceived,
    Welcomed,
    effective_turn_servers,
)
from meshd.control.wire import PeerInfo, TurnGrant
from meshd.stun.codec import Data, MessageClass, Method, StunMessage, XorPeerAddress, encode_message
from meshd.tunnel.candidates import (
    Candidate,
    CandidateKind,
    Description,
    DescriptionError,
    ReflexiveQuery,
    encode_description,
    gather,
    parse_description,
)
from meshd.tunnel.endpoint import TunnelEndpoint
from meshd.tunnel.fastpath import FastRoute, FastStats
from meshd.tunnel.guess import (
    GUESS_SIGNAL_KIND,
    GuessEnded,
    GuessPool,
    GuessReady,
    GuessSide,
    GuessSocketsReleased,
    GuessSocketsWanted,
    GuessStarted,
    guess_side,
)
from meshd.tunnel.identity import CAPeerVerifier, CertificateKey, LocalIdentity, Peer
from meshd.tunnel.noise import TAGLEN
from meshd.tunnel.offload import VNET_HDR_LEN
from meshd.tunnel.punch import (
    ChecksRestarted,
    DescriptionChanged,
    PathChanged,
    PathKind,
    PathMachine,
    PunchConfig,
    State,
    StateChanged,
)
from meshd.tunnel.session import (
    DecryptedPackets,
    HandshakeComplete,
    HandshakeFailed,
    Rejected,
    RejectReason,
    TunnelConfig,
)
from meshd.tunnel.wire import (
    DATA_OVERHEAD,
    FRAGMENT_HEADER,
    TYPE_DATA,
    TYPE_FRAGMENT,
    TYPE_INITIATION,
    OverlayAddress,
)
from meshd.turn.client import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    ChannelBound,
    ClientState,
    DataReceived,
    TurnClient,
    TurnClientConfig,
)
from meshd.turn.server import Transport
from meshd.udp import Address, Read, Transmit, format_address, split_read

log = logging.getLogger("meshd.tunnel")

_FRAGMENT_BYTE = bytes((TYPE_FRAGMENT,))
_PACKET_DST = slice(16, 20)  # IPv4 destination address
_FRAME_DST = slice(VNET_HDR_LEN + 16, VNET_HDR_LEN + 20)
SIGNAL_KIND = "ice"
"""`kind` of the signals that carry a `Description` (`{"kind": "ice", "description": {...}}`)."""


@dataclass(frozen=True)
class MeshConfig:
    """Tunables of one node's mesh (tests shorten them)."""

    stun_server: Address
    """The server's STUN address (srflx gathering); also the TURN server when the grant names
    none."""
    punch: PunchConfig = field(default_factory=PunchConfig)
    """Path machine timers (keepalive etc.)."""
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    """Crypto session timers."""
    turn: TurnClientConfig = field(default_factory=TurnClientConfig)
    """The relay client's settings."""
    relay: bool = True
    """Allocate on the TURN server (relay candidates)."""
    relay_retry_s: float = 2.0
    """First retry of a failed or lost allocation; doubles up to `relay_retry_max_s`."""
    relay_retry_max_s: float = 30.0
    """Longest wait between allocation attempts."""
    relay_keepalive_s: float = 5.0
    """A Binding indication to the TURN server this often keeps our NAT's mapping towards it
    (the relay's way back to us) open, and reopens it within this time after NAT state loss."""
    initiations_per_source_s: float = 2.0
    """Handshake initiations taken from one source address per second (burst
    `initiation_source_burst`). An initiation costs the responder X25519 operations and maybe a
    certificate check (~1 ms) before it can tell garbage from a peer: the limits keep a flood
    from taking the data plane's CPU. Peers initiate on rekey (every 2 min) and on retries
    (after 1 s, doubling to 5 s), below them."""
    initiation_source_burst: float = 5.0
    """Initiations one source may send back to back."""
    initiations_per_s: float = 100.0
    """Initiations taken per second from all sources together (burst `initiation_burst`)."""
    initiation_burst: float = 200.0
    """Initiations taken back to back from all sources together."""
    initiation_sources: int = 4096
    """Source addresses whose initiation rate is tracked (least recently seen go first)."""


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerPathChanged:
    """The path to a peer changed."""

    peer: str
    """The peer node."""
    old: str
    """Previous path kind (direct / relay / none)."""
    new: str
    """New path kind."""
    remote: str
    """The peer's address on the new path ("" without one)."""
    at: float
    """When (`now` clock)."""


@dataclass(frozen=True)
class PeerUp:
    """A handshake with the peer completed (keys are fresh)."""

    peer: str
    """The peer node."""
    rekey: bool
    """It replaced earlier keys."""


@dataclass(frozen=True)
class PeerDown:
    """Handshakes with the peer gave up."""

    peer: str
    """The peer node."""
    dropped_packets: int
    """Queued packets lost with it."""


@dataclass(frozen=True)
class ReflexiveChanged:
    """Our server-reflexive address changed (first learnt, or a new NAT mapping): the NAT
    classification (`meshd.tunnel.natprobe`) may be stale."""

    address: Address
    """The new address."""


MeshEvent = PeerPathChanged | PeerUp | PeerDown | ReflexiveChanged | GuessSocketsWanted \
    | GuessSocketsReleased


@dataclass
class MeshMetrics:
    """Counters the agent exports (`meshd_tunnel_*`)."""

    punch_attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    """Rounds of checks started, per (our NAT class, the peer's NAT class)."""
    punch_successes: dict[tuple[str, str], int] = field(default_factory=dict)
    """Rounds that found a direct pair, per NAT class pair as counted at the round's start."""
    time_to_direct_s: dict[str, float] = field(default_factory=dict)
    """Last round start → direct selection, per peer."""
    relay_bytes_out: int = 0
    """Bytes sent through the relay (encapsulated datagrams)."""
    relay_bytes_in: int = 0
    """Bytes received through the relay."""
    direct_bytes_out: int = 0
    """Bytes sent on direct paths."""
    rekeys: int = 0
    """Handshakes that replaced keys."""
    handshakes: int = 0
    """Handshakes completed."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Tunnel datagrams dropped, per reason (`replayed`, `auth-failed`, `spoofed-source` ...)."""
    no_route: int = 0
    """TUN packets to no known overlay address."""
    no_path: int = 0
    """Datagrams for a peer without any path (dropped)."""
    garbage: int = 0
    """Socket datagrams nobody claimed."""
    signals_sent: int = 0
    """Descriptions signaled."""
    bad_signals: int = 0
    """Signals from peers that did not parse."""
    allocations: int = 0
    """Relay allocations made."""
    guess_phases: dict[str, int] = field(default_factory=dict)
    """Port-guessing phases started, per side (`hard`: symmetric, `easy`: port-restricted)."""
    guess_hits: dict[str, int] = field(default_factory=dict)
    """Phases that ended with a guessed pair selected, per side."""
    guess_probes: int = 0
    """Guess probes sent (easy side)."""
    guess_pool_garbage: int = 0
    """Datagrams on pool sockets nobody claimed (dropped)."""


@dataclass(frozen=True)
class PeerStatus:
    """One row of `meshd status`'s peer table."""

    node: str
    overlay: str
    online: bool
    state: str
    """Path machine state (idle, checking, direct, relayed, failed)."""
    path: str
    """direct / relay / none."""
    endpoint: str
    """The peer's address on the path (its relayed address when relayed)."""
    rtt_ms: float | None
    bytes_in: int
    bytes_out: int
    last_handshake: float | None
    """Unix time of the last completed handshake."""
    time_to_direct_s: float | None
    session: str
    """Crypto session state."""
    time_to_relay_s: float | None = None
    """Round start → decided relayed, of the last round that ended relayed."""
    nat: str = "unknown"
    """The peer's NAT class as it published it (`unknown` until it does)."""
    guessed: bool = False
    """The direct path was found by port guessing (`meshd.tunnel.guess`)."""
    local: str = ""
    """Where the path leaves from: direct, our socket (the tunnel socket, or a guess-pool
    socket on a guessed path); relay, our relayed address."""

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "overlay": self.overlay, "online": self.online,
                "state": self.state, "path": self.path, "endpoint": self.endpoint,
                "rttMs": self.rtt_ms, "bytesIn": self.bytes_in, "bytesOut": self.bytes_out,
                "lastHandshake": self.last_handshake, "timeToDirectS": self.time_to_direct_s,
                "timeToRelayS": self.time_to_relay_s, "session": self.session, "nat": self.nat,
                "guessed": self.guessed, "local": self.local}


class _TurnLink:
    """`RelayLink` over the node's `TurnClient`: ChannelData once a channel is bound, a Send
    indication before."""

    def __init__(self, turn: TurnClient, relayed: Address, metrics: MeshMetrics) -> None:
        self.turn = turn
        self._relayed = relayed
        self._metrics = metrics
        self.channel_of: dict[Address, bytes] = {}  # peer -> 4-byte ChannelData header prefix
        self.peer_of: dict[int, Address] = {}
        self._txid = 0

    @property
    def relayed_address(self) -> Address:
        return self._relayed

    def bound(self, peer: Address, channel: int) -> None:
        self.channel_of[peer] = channel.to_bytes(2, "big")
        self.peer_of[channel] = peer

    def send_via_relay(self, data: bytes, peer: Address) -> Transmit:
        header = self.channel_of.get(peer)
        if header is not None:
            frame = header + len(data).to_bytes(2, "big") + data
        else:
            self._txid += 1
            txid = (0x5EED << 64 | self._txid).to_bytes(12, "big")
            frame = encode_message(StunMessage(MessageClass.INDICATION, Method.SEND, txid,
                                               (XorPeerAddress(peer), Data(data))))
        self._metrics.relay_bytes_out += len(frame)
        return Transmit(self.turn.local, self.turn.server, frame)


@dataclass
class _Peer:
    info: PeerInfo
    machine: PathMachine
    remote: Description | None = None
    """The peer's last description."""
    bound: tuple[int, Description] | None = None
    """(allocation, description) whose relayed candidate has a channel."""
    last_handshake: float | None = None
    path: str = "none"
    last_data: float = -1e9
    """When `send_packets` last sent to the peer."""
    direct: tuple[Address, Address] | None = None
    """(local, remote) of the direct path from the machine's last `PathChanged` (None: not
    direct, or not from our socket): `send_packets` addresses datagrams itself then, as
    `PathMachine.transmit_many` would (every machine input ends with `PathChanged` when the
    path moved, and the node drains those right after)."""
    nat_pair: tuple[str, str] = ("unknown", "unknown")
    """(our NAT class, the peer's) when the current round of checks started."""


class MeshNode:
    """One node's tunnel; see the module doc."""

    def __init__(
        self,
        control: ControlClient,
        local: Address,
        *,
        certificate: x509.Certificate,
        certificate_key: CertificateKey,
        ca_certificate: x509.Certificate,
        static_key: X25519PrivateKey,
        config: MeshConfig,
        rng: random.Random | None = None,
        wall_offset: float = 0.0,
        host_addresses: Sequence[Address] = (),
    ) -> None:
        self.control = control
        """The control channel core (signals go out through it)."""
        self.local = local
        """The tunnel socket's address (host candidate, source of every Transmit)."""
        self.config = config
        self.metrics = MeshMetrics()
        self.node: str | None = None
        """This node's name, once welcomed."""
        self.overlay: ipaddress.IPv4Interface | None = None
        """Our overlay address, once welcomed."""
        self.endpoint: TunnelEndpoint | None = None
        """The crypto sessions (after the welcome)."""
        self._cert, self._cert_key, self._static = certificate, certificate_key, static_key
        self._verifier = CAPeerVerifier(ca_certificate, self._overlay_of)
        self._rng = rng if rng is not None else random.SystemRandom()
        self._wall_offset = wall_offset
        self._hosts = tuple(host_addresses) or (local,)
        self._peers: dict[str, _Peer] = {}
        self._route: dict[bytes, str] = {}  # overlay address (packed) -> node
        self._pending_remote: dict[str, Mapping[str, Any]] = {}
        self._outbox: list[Transmit] = []
        self._tun_out: list[bytes] = []
        self._tun_frames = False
        self._data_only = True
        self._events: deque[MeshEvent] = deque()
        self._control_host = config.stun_server[0]
        self._grant: TurnGrant | None = None
        self._query: ReflexiveQuery | None = None
        self._srflx: tuple[Address, Address, Address] | None = None
        self._turn: TurnClient | None = None
        self._link: _TurnLink | None = None
        self._relay_retry_at: float | None = None
        self._relay_delay = config.relay_retry_s
        self._gathered = False
        self._link_changed = False
        self._relay_keepalive_at: float | None = None
        self._pool = GuessPool(config.punch.guess.sockets)
        self._initiation_sources: KeyedBuckets[Address] = KeyedBuckets(
            config.initiations_per_source_s, config.initiation_source_burst,
            config.initiation_sources)
        self._initiations = TokenBucket.full(config.initiations_per_s, config.initiation_burst,
                                             0.0)
        self._nat_seen = control.effective_nat  # the class the guess sides were set from

    # --- inputs: control ------------------------------------------------------------------------

    def control_event(self, ev: ControlEvent, now: float) -> None:
        """One event of the control client."""
        if isinstance(ev, Welcomed):
            self._welcomed(ev, now)
        elif isinstance(ev, PeersChanged):
            self._peers_changed(ev.peers, ev.removed, now)
        elif isinstance(ev, SignalReceived):
            self._signal(ev.peer, ev.payload, now)
        elif isinstance(ev, CredentialsRefreshed):
            self._grant = ev.turn
            if self._turn is not None:
                self._turn.update_credentials(ev.turn.credentials())
        elif isinstance(ev, Disconnected):
            event(log, logging.INFO, "tunnel.control_lost", node=self.node, reason=ev.reason)

    def _welcomed(self, ev: Welcomed, now: float) -> None:
        first = self.endpoint is None
        self.node = ev.node
        if ev.turn is not None:
            self._grant = ev.turn
            if self._turn is not None:
                self._turn.update_credentials(ev.turn.credentials())
        if first or self.overlay != ev.overlay:
            self.overlay = ev.overlay
            identity = LocalIdentity.create(self._static, self._cert, self._cert_key,
                                            ev.overlay.ip)
            self.endpoint = TunnelEndpoint(identity, self._verifier, config=self.config.tunnel,
                                           rng=self._rng, wall_offset=self._wall_offset,
                                           accept_unknown_peers=False)
            self.endpoint.frames_out = self._tun_frames
            for name, peer in self._peers.items():
                self.endpoint.add_peer(Peer(name, peer.info.static_key))
            event(log, logging.INFO, "tunnel.welcome", node=ev.node, overlay=ev.overlay,
                  local=format_address(self.local))
        if first:
            self._start_gathering(now)
        else:  # the server may have lost signals while we were away: tell peers again
            if self.config.relay and ev.sessions > 1 and self._turn is not None:
                # The server may have restarted (allocations are not kept across restarts):
                # allocate afresh; the old allocation is deleted if it still exists.
                old = self._turn
                old.close(now)
                self._outbox += old.datagrams_to_send(now)
                self._start_allocation(now)
            for name, peer in self._peers.items():
                if peer.info.online and peer.machine.local_description().candidates:
                    self._send_description(name, peer.machine, now)
        if self.control.effective_nat != self._nat_seen:  # a stored class came with the welcome
            self.nat_changed(now)

    def _peers_changed(self, peers: Mapping[str, PeerInfo], removed: Iterable[str],
                       now: float) -> None:
        for name in removed:
            self._drop_peer(name, now)
        for name, info in peers.items():
            if name == self.node:
                continue
            peer = self._peers.get(name)
            if peer is None:
                machine = PathMachine(self.node or "", name, config=self.config.punch,
                                      rng=random.Random(self._rng.getrandbits(64)))
                peer = _Peer(info, machine)
                self._peers[name] = peer
                self._update_guess_side(peer, now)
                if self._gathered:
                    machine.set_local_candidates(self._candidates(), now, relay=self._link)
                self._drain_machine(name, peer, now)
                event(log, logging.INFO, "tunnel.peer_added", node=self.node, peer=name,
                      overlay=info.overlay, online=info.online)
            else:
                came_online = info.online and not peer.info.online
                if peer.info.overlay != info.overlay:
                    self._route.pop(peer.info.overlay.packed, None)
                    # Keys carry the overlay the handshake proved (inner source check, fast
                    # path routes): the next packet handshakes for the new address.
                    if self.endpoint is not None:
                        self.endpoint.remove_peer(name)
                peer.info = info
                self._update_guess_side(peer, now)
                if came_online and peer.machine.local_description().candidates:
                    self._send_description(name, peer.machine, now)
                self._drain_machine(name, peer, now)
            self._route[info.overlay.packed] = name
            if self.endpoint is not None:
                self.endpoint.add_peer(Peer(name, info.static_key))
            stashed = self._pending_remote.pop(name, None)
            if stashed is not None:
                self._signal(name, stashed, now)

    def _drop_peer(self, name: str, now: float) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        self._pool.release(name)
        self._pool_gc(now)
        self._route.pop(peer.info.overlay.packed, None)
        if self.endpoint is not None:
            self.endpoint.remove_peer(name)
        event(log, logging.INFO, "tunnel.peer_removed", node=self.node, peer=name)

    def _signal(self, name: str, payload: Mapping[str, Any], now: float) -> None:
        kind = payload.get("kind")
        if kind == GUESS_SIGNAL_KIND:  # the hard side's mappings exist: probe now
            guessing = self._peers.get(name)
            if guessing is not None:
                guessing.machine.probe_guess(now)
                self._drain_machine(name, guessing, now)
            return
        if kind != SIGNAL_KIND:
            self.metrics.bad_signals += 1
            return
        peer = self._peers.get(name)
        if peer is None:  # not in our table yet: keep the latest one
            self._pending_remote[name] = payload
            return
        try:
            description = parse_description(payload.get("description"))
        except DescriptionError as exc:
            self.metrics.bad_signals += 1
            event(log, logging.WARNING, "tunnel.bad_signal", node=self.node, peer=name,
                  error=exc)
            return
        new_session = peer.remote is None or description.ufrag != peer.remote.ufrag
        peer.remote = description
        peer.machine.set_remote_candidates(description, now)
        if new_session and peer.machine.local_description().candidates:
            # The peer (re)started: it may never have seen our description.
            self._send_description(name, peer.machine, now)
        self._drain_machine(name, peer, now)

    def _send_description(self, name: str, machine: PathMachine, now: float) -> None:
        payload = {"kind": SIGNAL_KIND,
                   "description": encode_description(machine.local_description())}
        try:
            self.control.send_signal(name, payload, now)
        except ControlNotReady:
            return  # sent again after the next welcome
        self.metrics.signals_sent += 1

    # --- gathering ------------------------------------------------------------------------------

    def _start_gathering(self, now: float) -> None:
        self._start_query(now)
        if self.config.relay:
            self._start_allocation(now)

    def _start_query(self, now: float) -> None:
        if self._query is not None and not self._query.done:
            return
        self._query = ReflexiveQuery(self.local, self.config.stun_server, now,
                                     new_transaction_id=lambda: self._rng.randbytes(12))

    def _turn_server(self) -> Address | None:
        if self._grant is None:
            return None
        for server in effective_turn_servers(self._grant, self._control_host):
            if server.transport == "udp":
                try:
                    ipaddress.ip_address(server.host)
                except ValueError:
                    continue
                return (server.host, server.port)
        return None

    def _start_allocation(self, now: float) -> None:
        server = self._turn_server()
        if server is None or self._grant is None:
            return
        self._relay_retry_at = None
        self._turn = TurnClient(server, self._grant.credentials(), local=self.local,
                                config=self.config.turn,
                                rng=random.Random(self._rng.getrandbits(64)))
        self._turn.allocate(now)

    def _relay_settled(self) -> bool:
        return (not self.config.relay or self._turn is None
                or self._turn.state is not ClientState.ALLOCATING)

    def _maybe_publish(self, now: float) -> None:
        """Publish candidates once the STUN query ended and the allocation settled."""
        if self._query is None or not self._query.done or not self._relay_settled():
            return
        srflx = self._query.candidate()
        if self._gathered and srflx == self._srflx and not self._link_changed:
            return
        if srflx is not None and srflx != self._srflx:
            self._events.append(ReflexiveChanged(srflx[0]))
        self._srflx = srflx
        self._gathered, self._link_changed = True, False
        cands = self._candidates()
        event(log, logging.INFO, "tunnel.candidates", node=self.node,
              candidates=" ".join(f"{c.kind.value}:{format_address(c.address)}" for c in cands))
        for name, peer in self._peers.items():
            peer.machine.set_local_candidates(cands, now, relay=self._link)
            self._drain_machine(name, peer, now)

    def _candidates(self) -> tuple[Candidate, ...]:
        relayed = [] if self._link is None else [(self._link.relayed_address,
                                                  self._link.turn.server)]
        return gather(list(self._hosts), [self._srflx] if self._srflx else [], relayed)

    def _turn_events(self, now: float) -> None:
        turn = self._turn
        if turn is None:
            return
        while (ev := turn.next_event()) is not None:
            if isinstance(ev, DataReceived):
                if self._link is not None:
                    self.metrics.relay_bytes_in += len(ev.data)
                    self._inner(ev.data, ev.peer, self._link.relayed_address, now)
            elif isinstance(ev, ChannelBound):
                if self._link is not None:
                    self._link.bound(ev.peer, ev.channel)
            elif isinstance(ev, Allocated):
                self.metrics.allocations += 1
                self._relay_delay = self.config.relay_retry_s
                self._link = _TurnLink(turn, ev.relayed, self.metrics)
                self._link_changed = True
                self._relay_keepalive_at = now + self.config.relay_keepalive_s
                event(log, logging.INFO, "tunnel.relay_allocated", node=self.node,
                      relayed=format_address(ev.relayed), mapped=format_address(ev.mapped))
                for peer in self._peers.values():
                    self._bind_peer_relay(peer, now)
            elif isinstance(ev, AllocationFailed | AllocationLost):
                event(log, logging.WARNING, "tunnel.relay_lost", node=self.node,
                      reason=ev.reason, retry_s=self._relay_delay)
                self._turn, self._link = None, None
                self._link_changed = True
                self._relay_retry_at = now + self._relay_delay
                self._relay_delay = min(self._relay_delay * 2, self.config.relay_retry_max_s)
                self._maybe_publish(now)
                return

    def _bind_peer_relay(self, peer: _Peer, now: float) -> None:
        """Channel (and permission) for the peer's relayed candidate, so the relay pair works
        from the first byte."""
        if self._turn is None or self._turn.state is not ClientState.ALLOCATED:
            return
        if peer.remote is None or peer.bound == (self.metrics.allocations, peer.remote):
            return
        peer.bound = (self.metrics.allocations, peer.remote)
        for cand in peer.remote.candidates:
            if cand.kind is CandidateKind.RELAY and not cand.ipv6:
                self._turn.bind_channel(cand.address, now)

    # --- inputs: socket and TUN -----------------------------------------------------------------

    def data_only(self) -> bool:
        """Since the last `datagrams_to_send`, `send_packets` and `receive_batch` only moved data:
        no STUN, relay control, handshake or path event, no session output, no first send after
        a quiet spell. Then an adapter may skip the full round (`datagrams_to_send`,
        `next_event`, `get_timer`), which costs more than the data with many peers; every other
        input needs it."""
        endpoint = self.endpoint
        return self._data_only and (endpoint is None or not endpoint.output_pending)

    @property
    def tun_frames(self) -> bool:
        """The TUN device runs with IFF_VNET_HDR: `send_packets` takes offload frames
        (virtio_net_hdr + packet, `meshd.tunnel.offload`) and `receive_batch` returns them."""
        return self._tun_frames

    @tun_frames.setter
    def tun_frames(self, value: bool) -> None:
        self._tun_frames = value
        if self.endpoint is not None:
            self.endpoint.frames_out = value

    def receive_batch(self, datagrams: Iterable[tuple[bytes, Address]], now: float) -> list[bytes]:
        """Datagrams from the socket; returns the IP packets for the TUN device."""
        return self.receive_reads([(data, 0, source) for data, source in datagrams], now)

    def receive_reads(self, reads: Sequence[Read], now: float,
                      local: Address | None = None) -> list[bytes]:
        """Reads from the socket (`meshd.udp.Read`: one datagram, or with UDP GRO several of
        `segment` bytes from one source back to back); returns the IP packets (offload frames
        with `tun_frames`) for the TUN device. A coalesced read of 0xE4 fragments goes to the
        endpoint whole (one message: no per-fragment work); other reads are split. `local`:
        the socket they arrived on when not the tunnel socket (`receive_pool_reads`)."""
        endpoint = self.endpoint
        tun_out = self._tun_out  # decrypted packets go straight here (no event objects)
        if len(reads) == 1 and endpoint is not None:  # a lone datagram: the short way
            read, segment, _ = reads[0]
            if not segment and read and TYPE_DATA <= read[0] <= TYPE_FRAGMENT:
                events = endpoint.receive_one_into(read, now, tun_out)
                if events:
                    self._endpoint_events(events, now)
                self._tun_out = []
                return tun_out
        tunnel: list[bytes] = []
        turn = self._turn
        link = self._link
        if local is None:
            local = self.local
            turn_server = turn.server if turn is not None else None
        else:
            turn_server = None  # the relay only ever talks to the tunnel socket
        for read, segment, source in reads:
            if segment:
                if read[:1] == _FRAGMENT_BYTE and endpoint is not None:
                    if tunnel:
                        self._endpoint_events(endpoint.receive_into(tunnel, now, tun_out), now)
                        tunnel = []
                    self._endpoint_events(
                        endpoint.receive_read_into(read, segment, now, tun_out), now)
                    continue
                datagrams: Iterable[bytes] = split_read(read, segment)
            else:
                datagrams = (read,)
            for data in datagrams:
                if not data:
                    continue
                first = data[0]
                if 0xE1 <= first <= 0xE4:
                    if first != TYPE_INITIATION or self._admit_initiation(source, now):
                        tunnel.append(data)
                elif 0x40 <= first <= 0x7F and source == turn_server and link is not None:
                    peer = link.peer_of.get(int.from_bytes(data[:2], "big"))
                    length = int.from_bytes(data[2:4], "big")
                    if peer is None or len(data) < 4 + length:
                        self.metrics.garbage += 1
                        continue
                    self.metrics.relay_bytes_in += len(data)
                    inner = data[4:4 + length]
                    if inner and 0xE1 <= inner[0] <= 0xE4:
                        if inner[0] != TYPE_INITIATION or self._admit_initiation(peer, now):
                            tunnel.append(inner)
                    else:
                        self._data_only = False
                        self._inner(inner, peer, link.relayed_address, now)
                else:
                    self._data_only = False
                    self._stun(data, source, local, now)
        if tunnel and endpoint is not None:
            events = endpoint.receive_into(tunnel, now, tun_out)
            if events:
                self._endpoint_events(events, now)
        out, self._tun_out = self._tun_out, []
        return out

    def receive_pool_reads(self, local: Address, reads: Sequence[Read],
                           now: float) -> list[bytes]:
        """`receive_reads` for reads of pool socket `local` (port guessing): checks of the
        peer whose probe hit it, then its tunnel data. Anything else is dropped and counted in
        `guess_pool_garbage` (unclaimed STUN, tunnel datagrams the endpoint rejected), as are
        reads for a socket the pool no longer holds."""
        if local not in self._pool.open:
            self._pool.garbage += len(reads)
            self.metrics.guess_pool_garbage += len(reads)
            return []
        m = self.metrics
        before = m.garbage + sum(m.rejected.values())
        out = self.receive_reads(reads, now, local)
        dropped = m.garbage + sum(m.rejected.values()) - before
        self._pool.garbage += dropped
        self.metrics.guess_pool_garbage += dropped
        return out

    def guess_sockets_opened(self, addresses: Sequence[Address], now: float) -> None:
        """The adapter opened these pool sockets (after `GuessSocketsWanted`; maybe fewer
        than asked, maybe none). Hard-side phases send their indications from them."""
        self._pool.opened(tuple(addresses))
        event(log, logging.INFO, "tunnel.guess_pool", node=self.node,
              sockets=len(self._pool.open), asked=self._pool.size)
        for name, peer in self._peers.items():
            if peer.machine.guess_side is GuessSide.HARD:
                peer.machine.set_guess_bases(self._pool.open, now)
                self._drain_machine(name, peer, now)
        self._pool_gc(now)

    def nat_changed(self, now: float) -> None:
        """Our NAT class changed (`ControlClient.report_nat`, or a stored class from the
        welcome): which peers we guess with."""
        self._nat_seen = self.control.effective_nat
        for name, peer in self._peers.items():
            self._update_guess_side(peer, now)
            self._drain_machine(name, peer, now)

    @property
    def guess_pool(self) -> GuessPool:
        """The port-guessing pool's bookkeeping (open sockets, users)."""
        return self._pool

    def _update_guess_side(self, peer: _Peer, now: float) -> None:
        peer.machine.set_guess_side(guess_side(*self._nat_pair(peer)), now)

    def _pool_gc(self, now: float) -> None:
        """Close pool sockets once nobody guesses, but those a selected path sends from."""
        if not self._pool.open:
            return
        in_use: set[Address] = set()
        for peer in self._peers.values():
            path = peer.machine.current_path()
            if path.kind is PathKind.DIRECT and path.local is not None:
                in_use.add(path.local)
        released = self._pool.collect(in_use)
        if not released:
            return
        self._events.append(GuessSocketsReleased(released))
        event(log, logging.INFO, "tunnel.guess_pool_release", node=self.node,
              closed=len(released), kept=len(self._pool.open))
        for peer in self._peers.values():
            peer.machine.set_guess_bases(self._pool.open, now)

    def _inner(self, data: bytes, source: Address, local: Address, now: float) -> None:
        """A datagram the relay forwarded from `source` to our relayed address."""
        if data and 0xE1 <= data[0] <= 0xE4:
            if data[0] == TYPE_INITIATION and not self._admit_initiation(source, now):
                return
            if self.endpoint is not None:
                self._endpoint_events(self.endpoint.receive_batch([data], now), now)
            return
        self._stun(data, source, local, now)

    def _admit_initiation(self, source: Address, now: float) -> bool:
        """A handshake initiation from `source` is within the per-source and overall limits
        (`MeshConfig.initiations_per_source_s` and friends); else it is dropped and counted
        (`rejected["initiation-rate"]`) before it costs any cryptography."""
        if self._initiation_sources.take(source, now) and self._initiations.take(now):
            return True
        rejected = self.metrics.rejected
        rejected["initiation-rate"] = rejected.get("initiation-rate", 0) + 1
        return False

    def _stun(self, data: bytes, source: Address, local: Address, now: float) -> None:
        if data[0] > 3:
            self.metrics.garbage += 1
            return
        if local == self.local:
            if self._query is not None and self._query.receive(data, source, local, now):
                self._maybe_publish(now)
                return
            if self._turn is not None and source == self._turn.server:
                self._turn.handle_datagram(data, source, now)
                self._turn_events(now)
                self._maybe_publish(now)
                return
        for name, peer in self._peers.items():
            if peer.machine.receive(data, source, local, now):
                self._drain_machine(name, peer, now)
                return
        self.metrics.garbage += 1

    def send_packets(self, packets: Sequence[bytes], now: float) -> list[Transmit]:
        """IP packets (offload frames when `tun_frames`) from the TUN device → datagrams to
        send now."""
        out: list[Transmit] = []
        endpoint = self.endpoint
        if endpoint is None:
            self.metrics.no_route += len(packets)
            return out
        route = self._route
        frames = self._tun_frames
        at, dst = (VNET_HDR_LEN, _FRAME_DST) if frames else (0, _PACKET_DST)
        groups: Mapping[str, Sequence[bytes]]
        if len(packets) == 1:  # a lone packet (interactive traffic): no grouping
            packet = packets[0]
            node = (route.get(packet[dst]) if len(packet) > at and packet[at] >> 4 == 4
                    else None)
            if node is None:
                self.metrics.no_route += 1
                return out
            groups = {node: packets}
        else:
            lists: dict[str, list[bytes]] = {}
            for packet in packets:
                node = (route.get(packet[dst]) if len(packet) > at and packet[at] >> 4 == 4
                        else None)
                if node is None:
                    self.metrics.no_route += 1
                    continue
                group = lists.get(node)
                if group is None:
                    lists[node] = [packet]
                else:
                    group.append(packet)
            groups = lists
        for node, batch in groups.items():
            peer = self._peers[node]
            if now - peer.last_data > 1.0:  # consent checks may start again: full round
                self._data_only = False
            peer.last_data = now
            datagrams = (endpoint.encrypt_frames(node, batch, now) if frames
                         else endpoint.encrypt(node, batch, now))
            direct = peer.direct
            if direct is not None and datagrams:
                peer.machine.data_sent(now)
                local, remote = direct
                sent = [Transmit(local, remote, d) for d in datagrams]
            else:
                sent = peer.machine.transmit_many(datagrams, now)
            if len(sent) < len(datagrams):
                self.metrics.no_path += len(datagrams) - len(sent)
            elif peer.path == "direct":
                self.metrics.direct_bytes_out += sum(map(len, datagrams))
            out += sent
        return out

    # --- the native fast path (meshd.tunnel.fastpath) -----------------------------------------

    def fast_routes(self, now: float) -> dict[str, FastRoute]:
        """Per peer with usable keys, what the fast path may carry for it: its current keys,
        and where to send: the remote address of its direct path when that leaves from the
        tunnel socket; on a relayed path the peer's relayed address when we send to it from
        the tunnel socket, or our TURN server and the channel bound to the peer's relayed
        address when we send through our UDP allocation (guessed paths, Send indications and
        TURN over TCP stay Python's). The adapter installs these after every
        full round; they change only with handshakes, expiry and path changes."""
        endpoint = self.endpoint
        routes: dict[str, FastRoute] = {}
        if endpoint is None:
            return routes
        for name, peer in self._peers.items():
            session = endpoint.session(name)
            if session is None:
                continue
            direct = peer.direct
            remote = direct[1] if direct is not None and direct[0] == self.local else None
            channel: int | None = None
            if remote is None and (relayed := self._relay_route(peer)) is not None:
                remote, channel = relayed
            route = session.fast_route(now, remote, channel)
            # Only while the keys' overlay address is still the peer's in the registry: after
            # a move the old address may belong to another node (send_packets follows the
            # registry; the thread would follow the keys until the next handshake).
            if route is not None and self._route.get(route.overlay) == name:
                routes[name] = route
        return routes

    def _relay_route(self, peer: _Peer) -> tuple[Address, int | None] | None:
        """Where the fast path sends on `peer`'s relayed path: (the peer's relayed address,
        None) when we send to it from the tunnel socket (the peer's relay wraps it); (our TURN
        server, channel) when we send through a channel bound on our allocation, which the
        tunnel socket holds over UDP; else None (Send indications, TURN over TCP)."""
        path = peer.machine.current_path()
        if path.kind is not PathKind.RELAY or path.remote is None:
            return None
        if path.local == self.local:
            return path.remote, None
        link = self._link
        if (link is None or path.local != link.relayed_address or link.turn.local != self.local
                or link.turn.config.transport is not Transport.UDP):
            return None
        header = link.channel_of.get(path.remote)
        return None if header is None else (link.turn.server, int.from_bytes(header, "big"))

    def fast_stats(self, name: str, stats: FastStats) -> None:
        """What the fast path carried for `name` since its last report: counted as if
        `send_packets`/`receive_reads` had moved it (session counters and keepalive timers,
        consent checks on the direct path, direct byte metrics), and the forged datagrams it
        dropped as `rejected["auth-failed"]`, the figure the Python path keeps for them."""
        if stats.auth_failed:
            rejected, reason = self.metrics.rejected, RejectReason.AUTH_FAILED.value
            rejected[reason] = rejected.get(reason, 0) + stats.auth_failed
            event(log, logging.DEBUG, "tunnel.rejected", node=self.node, peer=name,
                  reason="auth-failed", count=stats.auth_failed, by="fast path")
        peer = self._peers.get(name)
        session = self.endpoint.session(name) if self.endpoint is not None else None
        if peer is None or session is None:
            return
        session.fast_account(stats)
        if stats.last_tx is not None:
            peer.machine.data_sent(stats.last_tx)
            peer.last_data = max(peer.last_data, stats.last_tx)
        if peer.path in ("direct", "relay"):
            frames = self._tun_frames and session.stats().peer_fragments
            overhead = FRAGMENT_HEADER.size + TAGLEN + VNET_HDR_LEN if frames else DATA_OVERHEAD
            if peer.path == "direct":
                self.metrics.direct_bytes_out += stats.tx_bytes + overhead * stats.tx_packets
            else:  # what _TurnLink counts: datagrams in ChannelData through our allocation
                relayed = self._relay_route(peer)
                out = overhead + (4 if relayed is not None and relayed[1] is not None else 0)
                self.metrics.relay_bytes_out += stats.tx_bytes + out * stats.tx_packets
                # Relayed datagrams reach us in ChannelData from our server (received-only
                # intervals count too: no early return above).
                self.metrics.relay_bytes_in += stats.rx_bytes + (overhead + 4) * stats.rx_packets

    def _transmit(self, peer: _Peer, datagram: bytes, now: float, out: list[Transmit]) -> None:
        t = peer.machine.transmit(datagram, now)
        if t is None:
            self.metrics.no_path += 1
            return
        if peer.path == "direct":
            self.metrics.direct_bytes_out += len(datagram)
        out.append(t)

    # --- timers and outputs ---------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Run whatever fell due."""
        if self._query is not None and not self._query.done:
            self._query.handle_timer(now)
            self._maybe_publish(now)
        if self._turn is not None:
            self._turn.handle_timer(now)
            self._turn_events(now)
            self._maybe_publish(now)
        if self._relay_retry_at is not None and now >= self._relay_retry_at:
            self._start_allocation(now)
        if self._relay_keepalive_at is not None and now >= self._relay_keepalive_at:
            self._relay_keepalive_at = None
            if self._link is not None:
                indication = StunMessage(MessageClass.INDICATION, Method.BINDING,
                                         self._rng.randbytes(12), fingerprint=True)
                self._outbox.append(Transmit(self.local, self._link.turn.server,
                                             encode_message(indication)))
                self._relay_keepalive_at = now + self.config.relay_keepalive_s
        for name, peer in self._peers.items():
            timer = peer.machine.get_timer()
            if timer is not None and now >= timer:
                peer.machine.handle_timer(now)
            self._drain_machine(name, peer, now)
        if self.endpoint is not None:
            timer = self.endpoint.get_timer()
            if timer is not None and now >= timer:
                self._endpoint_events(self.endpoint.handle_timer(now), now)

    def get_timer(self) -> float | None:
        """When to call `handle_timer` next."""
        times = [self._relay_retry_at, self._relay_keepalive_at]
        if self._query is not None:
            times.append(self._query.get_timer())
        if self._turn is not None:
            times.append(self._turn.get_timer())
        times += [peer.machine.get_timer() for peer in self._peers.values()]
        if self.endpoint is not None:
            times.append(self.endpoint.get_timer())
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """Everything but data: STUN, TURN, checks, handshakes, keepalives."""
        self._data_only = True
        out, self._outbox = self._outbox, []
        if self._query is not None:
            out += self._query.datagrams_to_send(now)
        if self._turn is not None:
            out += self._turn.datagrams_to_send(now)
            self._turn_events(now)
        for name, peer in self._peers.items():
            out += peer.machine.datagrams_to_send(now)
            self._drain_machine(name, peer, now)
        if self.endpoint is not None:
            for node, datagram in self.endpoint.datagrams_to_send(now):
                target = self._peers.get(node)
                if target is not None:
                    self._transmit(target, datagram, now, out)
        if self._outbox:
            out += self._outbox
            self._outbox = []
        return out

    def next_event(self) -> MeshEvent | None:
        """The oldest event not yet taken."""
        return self._events.popleft() if self._events else None

    # --- event plumbing -------------------------------------------------------------------------

    def _nat_pair(self, peer: _Peer) -> tuple[str, str]:
        """Labels of the punch metrics: the outcome depends on both NATs (design §6)."""
        ours = self.control.effective_nat
        return (ours.nat_type if ours is not None else "unknown",
                peer.info.nat.nat_type if peer.info.nat is not None else "unknown")

    def _drain_machine(self, name: str, peer: _Peer, now: float) -> None:
        machine = peer.machine
        while (ev := machine.next_event()) is not None:
            if isinstance(ev, DescriptionChanged):
                self._send_description(name, machine, now)
            elif isinstance(ev, PathChanged):
                old, new = ev.old.kind.value, ev.new.kind.value
                peer.path = new
                path_local, path_remote = ev.new.local, ev.new.remote
                peer.direct = ((path_local, path_remote) if ev.new.kind is PathKind.DIRECT
                               and (path_local in self._hosts or path_local in self._pool.open)
                               and path_remote is not None else None)
                remote = format_address(ev.new.remote) if ev.new.remote else ""
                if ev.new.kind is PathKind.DIRECT:
                    pair = peer.nat_pair  # the round's, so successes never outnumber attempts
                    successes = self.metrics.punch_successes
                    successes[pair] = successes.get(pair, 0) + 1
                    if machine.metrics.time_to_direct_s is not None:
                        self.metrics.time_to_direct_s[name] = machine.metrics.time_to_direct_s
                self._events.append(PeerPathChanged(name, old, new, remote, now))
                event(log, logging.INFO, "tunnel.path", node=self.node, peer=name, old=old,
                      new=new, remote=remote, ttd=machine.metrics.time_to_direct_s,
                      guessed=machine.path_guessed)
                self._pool_gc(now)
            elif isinstance(ev, ChecksRestarted):
                event(log, logging.INFO, "tunnel.checks_restarted", node=self.node, peer=name,
                      reason=ev.reason)
                self._start_query(now)  # the NAT mapping may have changed
            elif isinstance(ev, StateChanged) and ev.new is State.CHECKING:
                pair = peer.nat_pair = self._nat_pair(peer)
                self.metrics.punch_attempts[pair] = self.metrics.punch_attempts.get(pair, 0) + 1
                machine.set_guess_side(guess_side(*pair), now)
            elif isinstance(ev, GuessStarted):
                side = ev.side.value
                self.metrics.guess_phases[side] = self.metrics.guess_phases.get(side, 0) + 1
                if ev.side is GuessSide.HARD:
                    count = self._pool.acquire(name)
                    if count:
                        self._events.append(GuessSocketsWanted(count))
                    elif self._pool.open:
                        machine.set_guess_bases(self._pool.open, now)
            elif isinstance(ev, GuessReady):
                try:  # the easy side probes once it hears the mappings exist
                    self.control.send_signal(name, {"kind": GUESS_SIGNAL_KIND}, now)
                    self.metrics.signals_sent += 1
                except ControlNotReady:
                    pass  # no cue, no probes: the phase ends unanswered and backs off
            elif isinstance(ev, GuessEnded):
                self.metrics.guess_probes += ev.probes
                if ev.hit:
                    side = ev.side.value
                    self.metrics.guess_hits[side] = self.metrics.guess_hits.get(side, 0) + 1
                if ev.side is GuessSide.HARD:
                    self._pool.release(name)
                    self._pool_gc(now)
        if self._turn is not None and self._turn.state is ClientState.ALLOCATED:
            self._bind_peer_relay(peer, now)

    def _endpoint_events(self, events: list[Any], now: float) -> None:
        for ev in events:
            if isinstance(ev, DecryptedPackets):
                self._tun_out.extend(ev.packets)
                continue
            if not isinstance(ev, Rejected):
                self._data_only = False
            if isinstance(ev, Rejected):
                reason = ev.reason.value
                self.metrics.rejected[reason] = self.metrics.rejected.get(reason, 0) + ev.count
                event(log, logging.DEBUG, "tunnel.rejected", node=self.node, peer=ev.peer,
                      reason=reason, count=ev.count)
            elif isinstance(ev, HandshakeComplete):
                self.metrics.handshakes += 1
                if ev.rekey:
                    self.metrics.rekeys += 1
                known = self._peers.get(ev.peer)
                if known is not None:
                    known.last_handshake = now + self._wall_offset
                self._events.append(PeerUp(ev.peer, ev.rekey))
                if not ev.rekey:
                    event(log, logging.INFO, "tunnel.peer_up", node=self.node, peer=ev.peer,
                          initiator=ev.initiator)
            elif isinstance(ev, HandshakeFailed):
                self._events.append(PeerDown(ev.peer, ev.dropped_packets))
                event(log, logging.WARNING, "tunnel.peer_down", node=self.node, peer=ev.peer,
                      attempts=ev.attempts)

    def _overlay_of(self, node: str) -> list[OverlayAddress]:
        info = self.control.peers.get(node)
        return [] if info is None else [info.overlay]

    # --- status ---------------------------------------------------------------------------------

    def peer_status(self) -> list[PeerStatus]:
        """One row per peer, by name."""
        rows = []
        for name in sorted(self._peers):
            peer = self._peers[name]
            path = peer.machine.current_path()
            session = self.endpoint.session(name) if self.endpoint is not None else None
            stats = session.stats() if session is not None else None
            rows.append(PeerStatus(
                node=name, overlay=str(peer.info.overlay), online=peer.info.online,
                state=peer.machine.state.value, path=path.kind.value,
                endpoint=format_address(path.remote) if path.remote else "",
                rtt_ms=None if path.rtt is None else round(path.rtt * 1000, 3),
                bytes_in=stats.bytes_received if stats else 0,
                bytes_out=stats.bytes_sent if stats else 0,
                last_handshake=peer.last_handshake,
                time_to_direct_s=peer.machine.metrics.time_to_direct_s,
                session=stats.state if stats else "none",
                time_to_relay_s=peer.machine.metrics.time_to_relay_s,
                nat=peer.info.nat.nat_type if peer.info.nat is not None else "unknown",
                guessed=peer.machine.path_guessed,
                local=format_address(path.local) if path.local else ""))
        return rows

    def peer_overlay(self, node: str) -> ipaddress.IPv4Address | None:
        """`node`'s overlay address when it is online and not us."""
        peer = self._peers.get(node)
        return peer.info.overlay if peer is not None and peer.info.online else None

    @property
    def reflexive_address(self) -> Address | None:
        """Our server-reflexive address, once the STUN query answered."""
        return None if self._srflx is None else self._srflx[0]

    @property
    def relayed_address(self) -> Address | None:
        """Our relayed candidate, if allocated."""
        return None if self._link is None else self._link.relayed_address

    def close(self, now: float) -> None:
        """Delete the relay allocation (send `datagrams_to_send` once more)."""
        if self._turn is not None:
            self._turn.close(now)
