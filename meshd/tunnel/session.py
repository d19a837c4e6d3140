"""The tunnel's crypto session with one peer node: handshakes, keys, rekeys, packets. Sans-I/O.

Driven like aioquic's QuicConnection: `encrypt(packets, now)` returns transport datagrams for
IP packets read from the TUN device; `receive(datagram, now)` / `receive_batch(...)` take what
arrived from the peer (on whatever path: direct or relayed) and return events (decrypted
packets, handshake results, drops); `datagrams_to_send(now)` drains the handshake messages,
keepalives and queued packets the session produced; `get_timer()` / `handle_timer(now)` drive
retries, rekeys and expiry. `now` is seconds on the caller's monotonic clock; wall-clock time
(certificate validity, handshake timestamps) is `now + wall_offset`.

Keys come from Noise IK handshakes (`meshd.tunnel.noise`) whose payloads carry node certificates
(`meshd.tunnel.identity`). Up to three keypairs are live, as in WireGuard's design:

- current  -- sends; receives.
- previous -- the one `current` replaced; still receives datagrams that were in flight.
- next     -- made by answering the peer's initiation; receives, but sends only once the peer
              used it (key confirmation: an initiation alone may be a replay or the peer may
              never have seen our answer). Then it becomes current.

Handshake phases (TRANSITIONS is the whole table, retries and `close()` included):

    IDLE        --send-->            INITIATING   packets (or start_handshake), no keys
    IDLE        --initiation-->      RESPONDED    answered; the peer's first datagram confirms
    INITIATING  --response-->        ESTABLISHED
    INITIATING  --initiation-->      RESPONDED    simultaneous: the peer's handshake won
    RESPONDED   --confirmed-->       ESTABLISHED
    RESPONDED   --confirm_timeout--> INITIATING   packets wait and no confirmation came
    ESTABLISHED --rekey-->           REKEYING     keys old or used up; sending goes on
    REKEYING    --response | initiation | confirmed--> ESTABLISHED
    ESTABLISHED --expired--> IDLE                 REKEYING --expired--> INITIATING
    INITIATING  --give_up--> IDLE                 REKEYING --give_up--> ESTABLISHED

Simultaneous initiations: the side with the lower static public key keeps its own handshake and
ignores the peer's; the other side answers the peer's (and drops its own), so both agree. (Not
when our initiation targets another static key than the peer's: ours cannot succeed then.)

Rekey: the initiator of the current keys rekeys on send after `rekey_after_time`, either side
after `rekey_after_messages`; keys are refused after `reject_after_time` / messages. Counters
are checked against a sliding replay window (`meshd.tunnel.replay`).
"""

from __future__ import annotations

import functools
import random
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshd.tunnel.fastpath import FastRoute, FastStats, Replay, new_counter, new_replay_window
from meshd.tunnel.identity import IdentityClaim, LocalIdentity, Peer, PeerRejected, PeerVerifier
from meshd.tunnel.noise import HandshakeIK, NoiseError, TransportKeys
from meshd.tunnel.offload import PLAIN_HEADER, VNET_HDR_LEN, OffloadError, check_frame, to_packets
from meshd.tunnel.replay import ReplayWindow
from meshd.tunnel.wire import (
    CAP_FRAGMENTS,
    DATA_HEADER,
    DATA_OVERHEAD,
    FRAGMENT_HEADER,
    FRAGMENT_PART,
    MAX_FRAGMENTS,
    MAX_MESSAGE,
    TYPE_DATA,
    TYPE_FRAGMENT,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    HandshakePayload,
    Initiation,
    OverlayAddress,
    Response,
    TunnelParseError,
    encode_initiation,
    encode_payload,
    encode_response,
    parse_initiation,
    parse_payload,
    parse_response,
    stamp_capabilities,
    timestamp_capabilities,
)

PROLOGUE = b"edgeweave tunnel v1"
"""Noise prologue: both sides must agree on it, so it pins the protocol version."""

_NONCE = struct.Struct("<4xQ")
_HEADER_SIZE = DATA_HEADER.size
_FRAGMENT_SIZE = FRAGMENT_HEADER.size


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelConfig:
    """Timers and limits of a session (defaults after WireGuard's, retries faster)."""

    handshake_retry: float = 1.0
    """Seconds before the first retry of an unanswered initiation; doubles per retry."""
    handshake_retry_max: float = 5.0
    """Upper bound of the retry interval (WireGuard's REKEY_TIMEOUT)."""
    handshake_jitter: float = 0.333
    """Up to this many seconds are added at random to every retry interval."""
    handshake_give_up: float = 90.0
    """Stop retrying this long after the first initiation (WireGuard's REKEY_ATTEMPT_TIME)."""
    confirm_timeout: float = 5.0
    """A responder with packets waiting that sees no confirmation this long initiates itself."""
    rekey_after_time: float = 120.0
    """The initiator of the current keys starts a new handshake on send after this age."""
    reject_after_time: float = 180.0
    """Keys this old are neither used nor accepted."""
    rekey_after_messages: int = 2**60
    """Start a new handshake once this many packets were sent with the current keys."""
    reject_after_messages: int = 2**64 - 2**13 - 1
    """Never send or accept counters at or above this."""
    keepalive_timeout: float = 10.0
    """Margin before `reject_after_time` at which a receiving initiator rekeys."""
    persistent_keepalive: float | None = None
    """Send an empty datagram after this many seconds without sending (NAT bindings);
    None: only when keys need confirming."""
    replay_window: int = 2048
    """Bits of the replay bitmap (a power of two multiple of 64)."""
    max_queued_packets: int = 1024
    """Packets kept while no keys are usable; the oldest are dropped beyond this."""
    check_inner_source: bool = True
    """Drop decrypted packets whose IP source is not the peer's verified overlay address."""
    fragments: bool = True
    """Announce `CAP_FRAGMENTS` in handshakes, and send offload frames as fragmented 0xE4
    messages to peers that announced it (False: behave like an agent without them)."""
    fragment_part: int = FRAGMENT_PART
    """Ciphertext bytes per fragment (all but the last); sets the datagram size."""
    max_partial_messages: int = 32
    """Fragmented messages being reassembled per session at once (the oldest is dropped
    beyond this): with 64 KB messages, 2 MB of buffer per peer at most."""
    reassembly_timeout: float = 1.0
    """A message not complete this long after its first fragment is dropped (TCP has
    retransmitted it by then)."""

    def __post_init__(self) -> None:
        times = (
            self.handshake_retry, self.handshake_retry_max, self.handshake_give_up,
            self.confirm_timeout, self.rekey_after_time, self.reject_after_time,
        )
        if min(times) <= 0 or self.handshake_jitter < 0:
            raise ValueError("times must be positive")
        if self.rekey_after_time >= self.reject_after_time:
            raise ValueError("rekey_after_time must be below reject_after_time")
        if not 0 < self.rekey_after_messages < self.reject_after_messages <= 2**64 - 1:
            raise ValueError("need 0 < rekey_after_messages < reject_after_messages < 2**64")
        if self.persistent_keepalive is not None and self.persistent_keepalive <= 0:
            raise ValueError("persistent_keepalive must be positive or None")
        if self.max_queued_packets < 0:
            raise ValueError("max_queued_packets must not be negative")
        ReplayWindow(self.replay_window)  # validates the size
        if self.fragment_part * MAX_FRAGMENTS < MAX_MESSAGE or self.fragment_part > 0xFFFF:
            raise ValueError(f"fragment_part must be {-(-MAX_MESSAGE // MAX_FRAGMENTS)}..65535")
        if self.max_partial_messages < 1 or self.reassembly_timeout <= 0:
            raise ValueError("max_partial_messages and reassembly_timeout must be positive")


# -- events --------------------------------------------------------------------------------------


class RejectReason(Enum):
    """Why a datagram from the network was dropped."""

    MALFORMED = "malformed"
    """Not a tunnel message, or one that does not parse."""
    UNKNOWN_INDEX = "unknown-index"
    """No live keys or pending handshake have that receiver index (stale or forged)."""
    REPLAYED = "replayed"
    """The counter was already accepted, or is older than the replay window."""
    AUTH_FAILED = "auth-failed"
    """The AEAD tag does not verify: altered in flight, or not made with our keys."""
    KEY_EXPIRED = "key-expired"
    """Sent with keys past `reject_after_time` or `reject_after_messages`."""
    HANDSHAKE_INVALID = "handshake-invalid"
    """A handshake message fails Noise authentication (altered, or not for our static key)."""
    PEER_REFUSED = "peer-refused"
    """The certificate, attestation or overlay address claim was refused by the verifier."""
    WRONG_PEER = "wrong-peer"
    """Authenticated, but as another node than the one this session is for."""
    STALE_INITIATION = "stale-initiation"
    """An initiation not newer than the last accepted one from that peer (a replay)."""
    SPOOFED_SOURCE = "spoofed-source"
    """A decrypted packet that is not IP from the peer's own overlay address."""


@dataclass(frozen=True)
class HandshakeComplete:
    """New keys with the peer are confirmed and in use."""

    peer: str
    """The peer's node name (verified through its certificate)."""
    overlay: OverlayAddress
    """The peer's verified overlay address."""
    initiator: bool
    """This side sent the initiation."""
    rekey: bool
    """Keys were already in use before (a rekey, not a first handshake)."""


@dataclass(frozen=True)
class DecryptedPackets:
    """IP packets from the peer, authenticated and in arrival order; write them to the TUN."""

    peer: str
    """The peer's node name."""
    packets: tuple[bytes, ...]
    """Whole IP packets."""


@dataclass(frozen=True)
class Rejected:
    """Datagrams dropped for one reason in one call (counted, one event per reason)."""

    peer: str | None
    """The session's peer, or None when no session could be told (endpoint level)."""
    reason: RejectReason
    """Why."""
    count: int
    """How many datagrams."""
    detail: str = ""
    """Human-readable detail of the last one (e.g. why a certificate was refused)."""


@dataclass(frozen=True)
class HandshakeFailed:
    """No handshake succeeded within `handshake_give_up`; queued packets were dropped."""

    peer: str
    """The peer's node name."""
    attempts: int
    """Initiations sent."""
    dropped_packets: int
    """Queued packets thrown away."""


Event = HandshakeComplete | DecryptedPackets | Rejected | HandshakeFailed


@dataclass(frozen=True)
class SessionStats:
    """Counters for metrics and `meshd status`."""

    state: str
    packets_sent: int
    bytes_sent: int
    packets_received: int
    bytes_received: int
    keepalives_sent: int
    keepalives_received: int
    initiations_sent: int
    handshakes_completed: int
    initiations_ignored: int
    """Peer initiations ignored because ours won the simultaneous-initiation tie-break."""
    queued_dropped: int
    rejected: dict[str, int] = field(default_factory=dict)
    """Dropped datagrams per `RejectReason` value."""
    messages_sent: int = 0
    """Fragmented (0xE4) messages sent; each carried one offload frame."""
    messages_received: int = 0
    """Fragmented messages reassembled and authenticated."""
    messages_incomplete: int = 0
    """Fragmented messages dropped before all fragments came (timeout or too many at once)."""
    peer_fragments: bool = False
    """The current keys' peer announced `CAP_FRAGMENTS` (it is sent 0xE4 messages)."""
    messages_whole: int = 0
    """Of `messages_received`, those that came as one coalesced read and were taken whole
    (`receive_message`, no per-fragment work)."""


# -- the state machine ---------------------------------------------------------------------------


class State(Enum):
    """Handshake phase of a session (see TRANSITIONS)."""

    IDLE = "idle"
    """No usable keys, no handshake in flight."""
    INITIATING = "initiating"
    """No usable keys; our initiation is in flight (retried on the timer)."""
    RESPONDED = "responded"
    """No usable keys; we answered the peer's initiation and wait for its first datagram."""
    ESTABLISHED = "established"
    """Confirmed keys send."""
    REKEYING = "rekeying"
    """Confirmed keys send, and our initiation for fresh ones is in flight."""


class Trigger(Enum):
    """What moves the state machine."""

    SEND = "send"
    """Packets to send (or `start_handshake`) and no usable keys."""
    INITIATION = "initiation"
    """We answered a valid initiation from the peer."""
    RESPONSE = "response"
    """A valid response completed our handshake."""
    CONFIRMED = "confirmed"
    """The peer's first datagram under keys we answered with."""
    RETRY = "retry"
    """Our initiation went unanswered; a fresh one is sent."""
    GIVE_UP = "give_up"
    """`handshake_give_up` passed without an answer."""
    CONFIRM_TIMEOUT = "confirm_timeout"
    """Answered keys stayed unconfirmed while packets wait: initiate ourselves."""
    REKEY = "rekey"
    """The current keys are due for renewal."""
    NO_REPLY = "no_reply"
    """Data went out and nothing authenticated came back for keepalive_timeout +
    handshake_retry_max (15 s): the peer may have lost our keys (WireGuard's new-handshake
    timer)."""
    EXPIRED = "expired"
    """The current keys reached `reject_after_time` or `reject_after_messages`."""
    CLOSE = "close"
    """`close()`: every key and handshake forgotten."""


TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.IDLE, Trigger.SEND): State.INITIATING,
    (State.IDLE, Trigger.INITIATION): State.RESPONDED,
    (State.IDLE, Trigger.CONFIRMED): State.ESTABLISHED,  # answered keys outlived the current
    (State.INITIATING, Trigger.RESPONSE): State.ESTABLISHED,
    (State.INITIATING, Trigger.INITIATION): State.RESPONDED,  # we lost the tie-break
    (State.INITIATING, Trigger.CONFIRMED): State.ESTABLISHED,
    (State.INITIATING, Trigger.RETRY): State.INITIATING,
    (State.INITIATING, Trigger.GIVE_UP): State.IDLE,
    (State.RESPONDED, Trigger.CONFIRMED): State.ESTABLISHED,
    (State.RESPONDED, Trigger.INITIATION): State.RESPONDED,  # a newer one replaces ours
    (State.RESPONDED, Trigger.CONFIRM_TIMEOUT): State.INITIATING,
    (State.RESPONDED, Trigger.EXPIRED): State.IDLE,
    (State.ESTABLISHED, Trigger.REKEY): State.REKEYING,
    (State.ESTABLISHED, Trigger.NO_REPLY): State.REKEYING,
    (State.ESTABLISHED, Trigger.INITIATION): State.ESTABLISHED,  # the peer rekeys
    (State.ESTABLISHED, Trigger.CONFIRMED): State.ESTABLISHED,
    (State.ESTABLISHED, Trigger.EXPIRED): State.IDLE,
    (State.REKEYING, Trigger.RESPONSE): State.ESTABLISHED,
    (State.REKEYING, Trigger.INITIATION): State.ESTABLISHED,  # we lost the tie-break
    (State.REKEYING, Trigger.CONFIRMED): State.ESTABLISHED,
    (State.REKEYING, Trigger.RETRY): State.REKEYING,
    (State.REKEYING, Trigger.GIVE_UP): State.ESTABLISHED,  # current keys still valid
    (State.REKEYING, Trigger.EXPIRED): State.INITIATING,
    **{(state, Trigger.CLOSE): State.IDLE for state in State},
}


# -- keys and indexes ----------------------------------------------------------------------------


class IndexTable:
    """The receiver indexes of one node, unique across its sessions (the endpoint shares one)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._owners: dict[int, TunnelSession] = {}

    def allocate(self, owner: TunnelSession) -> int:
        while True:
            index = self._rng.getrandbits(32)
            if index not in self._owners:
                self._owners[index] = owner
                return index

    def release(self, index: int) -> None:
        self._owners.pop(index, None)

    def owner(self, index: int) -> TunnelSession | None:
        return self._owners.get(index)

    def __len__(self) -> int:
        return len(self._owners)


class _Keypair:
    """Transport keys from one handshake."""

    __slots__ = (
        "counter", "created", "fragments", "frame_source_slice", "initiator", "local_index",
        "overlay", "peer_static", "receive_key", "receiver", "reject_at", "rekey_at",
        "remote_index", "replay", "send_key", "sender", "source", "source_slice",
        "source_version",
    )

    def __init__(
        self, keys: TransportKeys, *, initiator: bool, local_index: int, remote_index: int,
        overlay: OverlayAddress, now: float, config: TunnelConfig, peer_static: bytes,
        capabilities: int = 0,
    ) -> None:
        self.sender = ChaCha20Poly1305(keys.send)
        self.peer_static = peer_static
        self.receiver = ChaCha20Poly1305(keys.receive)
        self.send_key = keys.send
        self.receive_key = keys.receive
        """Raw keys, for the native fast path (`meshd.tunnel.fastpath`)."""
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = now
        self.rekey_at = now + config.rekey_after_time
        self.reject_at = now + config.reject_after_time
        self.counter = new_counter()
        """The next send counter; `take` reserves them (the fast path sends with it too)."""
        self.replay = new_replay_window(config.replay_window,
                                        limit=config.reject_after_messages)
        self.overlay = overlay
        self.source = overlay.packed
        self.source_version = overlay.version
        self.source_slice = slice(12, 16) if overlay.version == 4 else slice(8, 24)
        shift = VNET_HDR_LEN
        self.frame_source_slice = slice(self.source_slice.start + shift,
                                        self.source_slice.stop + shift)
        self.fragments = config.fragments and bool(capabilities & CAP_FRAGMENTS)
        """The peer announced fragments and we use them: frames go out as 0xE4 messages."""


class _Partial:
    """A fragmented message being reassembled."""

    __slots__ = ("count", "created", "missing", "parts", "size")

    def __init__(self, count: int, now: float) -> None:
        self.count = count
        self.created = now
        self.missing = count
        self.parts: list[bytes | memoryview | None] = [None] * count
        self.size = 0


@dataclass
class _Pending:
    """Our initiation in flight."""

    handshake: HandshakeIK
    index: int
    first_sent: float
    attempts: int
    retry_at: float


@dataclass(frozen=True)
class OpenedInitiation:
    """An initiation that decrypted and whose identity claim was verified."""

    sender_index: int
    """The initiator's index for this handshake."""
    node: str
    """The initiator's verified node name."""
    static_public: bytes
    """The initiator's static key."""
    payload: HandshakePayload
    """What the initiator said about itself."""
    handshake: HandshakeIK
    """The responder side, ready for `write_message_2`."""


class HandshakeRefused(Exception):
    """A handshake message was dropped (a remote error); `reason` says why."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        """The drop reason to count."""
        self.detail = detail
        """Human-readable detail."""


def open_initiation(
    local: LocalIdentity, verifier: PeerVerifier, datagram: bytes, wall_now: float
) -> OpenedInitiation:
    """Decrypt a handshake initiation addressed to `local` and verify the initiator's identity.
    Raises HandshakeRefused for anything the peer got wrong."""
    try:
        initiation = parse_initiation(datagram)
    except TunnelParseError as exc:
        raise HandshakeRefused(RejectReason.MALFORMED, str(exc)) from None
    handshake = HandshakeIK.responder(local.static_key, PROLOGUE)
    try:
        raw = handshake.read_message_1(initiation.noise_message)
    except NoiseError as exc:
        raise HandshakeRefused(RejectReason.HANDSHAKE_INVALID, str(exc)) from None
    static_public = handshake.remote_static
    assert static_public is not None
    payload, node = _verify_payload(verifier, raw, static_public, wall_now)
    return OpenedInitiation(initiation.sender_index, node, static_public, payload, handshake)


def _verify_payload(
    verifier: PeerVerifier, raw: bytes, static_public: bytes, wall_now: float
) -> tuple[HandshakePayload, str]:
    try:
        payload = parse_payload(raw)
    except TunnelParseError as exc:
        raise HandshakeRefused(RejectReason.MALFORMED, str(exc)) from None
    claim = IdentityClaim(payload.certificate, payload.signature, static_public, payload.overlay)
    try:
        node = verifier(claim, wall_now)
    except PeerRejected as exc:
        raise HandshakeRefused(
            RejectReason.PEER_REFUSED, f"{type(exc).__name__}: {exc}"
        ) from None
    return payload, node


# -- the session ---------------------------------------------------------------------------------


class TunnelSession:
    """The crypto session between this node and one peer node."""

    def __init__(
        self,
        local: LocalIdentity,
        peer: Peer,
        verifier: PeerVerifier,
        *,
        config: TunnelConfig | None = None,
        rng: random.Random | None = None,
        wall_offset: float = 0.0,
        indexes: IndexTable | None = None,
    ) -> None:
        """`rng` draws indexes and retry jitter (keys always come from the OS); `wall_offset`
        turns `now` into Unix time; `indexes` is shared by all sessions of an endpoint."""
        self.local = local
        self.peer = peer
        """The peer as we currently know it (the static key may be updated by a handshake)."""
        self.config = config or TunnelConfig()
        self.state = State.IDLE
        self.history: deque[tuple[State, Trigger, State]] = deque(maxlen=32)
        """The last transitions taken (for tests and `meshd status`)."""
        self.peer_overlay: OverlayAddress | None = None
        """The peer's overlay address, once verified."""
        self._verifier = verifier
        self._rng = rng if rng is not None else random.Random()
        self._wall_offset = wall_offset
        self._indexes = indexes if indexes is not None else IndexTable(self._rng)
        self._current: _Keypair | None = None
        self._previous: _Keypair | None = None
        self._next: _Keypair | None = None
        self._by_index: dict[int, _Keypair] = {}
        self._pending: _Pending | None = None
        self.frames_out = False
        """Decrypted packets come out as offload frames (virtio_net_hdr + packet, for a TUN
        device with IFF_VNET_HDR) instead of plain IP packets."""
        self._queue: deque[bytes] = deque()
        self._partials: dict[tuple[int, int], _Partial] = {}
        self._outbox: list[bytes] = []
        self._events: list[Event] = []
        self._last_sent = -float("inf")
        self._unanswered_since: float | None = None
        """First data sent after the last authenticated receive (the new-handshake timer)."""
        self._unanswered_receive: float | None = None
        """First data received after our last send (the passive keepalive timer)."""
        self._own_timestamp = 0
        self._peer_timestamps: dict[bytes, int] = {}  # newest accepted, per initiator key
        self._ever_keyed = False
        self._counts = dict.fromkeys(
            ("packets_sent", "bytes_sent", "packets_received", "bytes_received",
             "keepalives_sent", "keepalives_received", "initiations_sent",
             "handshakes_completed", "initiations_ignored", "queued_dropped", "messages_sent",
             "messages_received", "messages_incomplete", "messages_whole", "offload_errors"), 0)
        self._rejected: dict[RejectReason, int] = {}
        self._receive_rekey_margin = (
            self.config.keepalive_timeout + self.config.handshake_retry_max
        )

    # -- sending (the hot path) ------------------------------------------------------------------

    def encrypt(self, packets: Sequence[bytes], now: float) -> list[bytes]:
        """Transport datagrams for `packets`, to send now. Packets that cannot be sent yet are
        queued (a handshake starts; they come out of `datagrams_to_send` later)."""
        kp = self._current
        if (
            kp is None
            or now >= kp.reject_at
            or kp.counter.value + len(packets) > self.config.reject_after_messages
        ):
            return self._encrypt_slow(packets, now)
        self._maybe_rekey(kp, now)
        return self._seal(kp, packets, now)

    def encrypt_frames(self, frames: Sequence[bytes], now: float) -> list[bytes]:
        """Transport datagrams for offload frames (virtio_net_hdr + packet, as a TUN device with
        IFF_VNET_HDR reads them): each frame one AEAD message in 0xE4 fragments when the peer
        announced them, else its complete packets (GSO and checksums done in software) as
        0xE3 datagrams, queued like `encrypt`'s when no keys are usable."""
        kp = self._current
        if (
            kp is None
            or not kp.fragments
            or now >= kp.reject_at
            or kp.counter.value + len(frames) > self.config.reject_after_messages
        ):
            return self.encrypt(self._plain(frames), now)
        self._maybe_rekey(kp, now)
        return self._seal_frames(kp, frames, now)

    def _plain(self, frames: Iterable[bytes]) -> list[bytes]:
        packets: list[bytes] = []
        for frame in frames:
            try:
                packets += to_packets(frame)
            except OffloadError:  # the local kernel handed us something we cannot split
                self._counts["offload_errors"] += 1
        return packets

    def _maybe_rekey(self, kp: _Keypair, now: float) -> None:
        if (
            (kp.counter.value >= self.config.rekey_after_messages
             or (kp.initiator and now >= kp.rekey_at))
            and self._pending is None
            and not self._fresh_keys_coming(now)
        ):
            self._fire(Trigger.REKEY)
            self._initiate(now)

    def _seal_frames(self, kp: _Keypair, frames: Sequence[bytes], now: float) -> list[bytes]:
        seal = kp.sender.encrypt
        header = FRAGMENT_HEADER.pack
        nonce = _NONCE.pack
        index = kp.remote_index
        part = self.config.fragment_part
        counter = start = kp.counter.take(len(frames))
        out: list[bytes] = []
        append = out.append
        size = 0
        for frame in frames:
            if len(frame) > MAX_MESSAGE - 16:  # longer than any TUN read: not a frame
                self._counts["offload_errors"] += 1
                counter += 1  # taken: a gap the receiver sees as loss
                start += 1
                continue
            sealed = seal(nonce(counter), frame, None)
            length = len(sealed)
            if length <= part:
                append(header(TYPE_FRAGMENT, index, counter, 0, 1) + sealed)
            else:
                count = -(-length // part)
                view = memoryview(sealed)
                for k in range(count):
                    append(header(TYPE_FRAGMENT, index, counter, k, count)
                           + view[k * part:(k + 1) * part])
            counter += 1
            size += len(frame) - VNET_HDR_LEN
        counts = self._counts
        counts["messages_sent"] += counter - start
        counts["packets_sent"] += counter - start
        counts["bytes_sent"] += size
        if out:
            self._last_sent = now
            self._unanswered_receive = None
            if self._unanswered_since is None:
                self._unanswered_since = now
        return out

    def _fresh_keys_coming(self, now: float) -> bool:
        """We just answered the peer's initiation: its keys replace the current ones as soon as
        the peer uses them, so a handshake of our own would only cross it."""
        nxt = self._next
        return nxt is not None and now - nxt.created < self.config.confirm_timeout

    def _seal(
        self, kp: _Keypair, packets: Sequence[bytes], now: float, *, keepalive: bool = False
    ) -> list[bytes]:
        seal = kp.sender.encrypt
        header = DATA_HEADER.pack
        nonce = _NONCE.pack
        index = kp.remote_index
        counter = start = kp.counter.take(len(packets))
        out: list[bytes] = []
        append = out.append
        size = 0
        for packet in packets:
            append(header(TYPE_DATA, index, counter) + seal(nonce(counter), packet, None))
            counter += 1
            size += len(packet)
        counts = self._counts
        if keepalive:
            counts["keepalives_sent"] += counter - start
        else:
            counts["packets_sent"] += counter - start
            counts["bytes_sent"] += size
            if self._unanswered_since is None and out:
                self._unanswered_since = now
        if out:
            self._last_sent = now
            self._unanswered_receive = None
        return out

    def _encrypt_slow(self, packets: Sequence[bytes], now: float) -> list[bytes]:
        self._expire(now)
        out: list[bytes] = []
        kp = self._current
        if kp is not None:
            room = max(0, self.config.reject_after_messages - kp.counter.value)
            out = self._seal(kp, packets[:room], now)
            packets = packets[room:]
            if packets:
                self._expire_current()
        if packets:
            self._enqueue(packets)
            if self.state is State.IDLE:
                self._fire(Trigger.SEND)
                self._initiate(now)
        return out

    def _enqueue(self, packets: Iterable[bytes]) -> None:
        queue = self._queue
        queue.extend(packets)
        excess = len(queue) - self.config.max_queued_packets
        for _ in range(max(0, excess)):
            queue.popleft()
        self._counts["queued_dropped"] += max(0, excess)

    def start_handshake(self, now: float) -> None:
        """Make keys now rather than on the first packet (e.g. once a path is chosen); does
        nothing unless the session is IDLE."""
        if self.state is State.IDLE:
            self._fire(Trigger.SEND)
            self._initiate(now)

    def send_keepalive(self, now: float) -> None:
        """Queue an empty datagram (NAT binding refresh, or proof of life) if keys allow."""
        kp = self._current
        if kp is not None and now < kp.reject_at:
            self._outbox.extend(self._seal(kp, (b"",), now, keepalive=True))

    @property
    def partial_messages(self) -> int:
        """Fragmented messages being reassembled now (at most `max_partial_messages`)."""
        return len(self._partials)

    @property
    def has_output(self) -> bool:
        """`datagrams_to_send` would return something."""
        return bool(self._outbox)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Handshake messages, keepalives and formerly queued packets, in order."""
        out, self._outbox = self._outbox, []
        return out

    # -- receiving (the hot path) ----------------------------------------------------------------

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        """Handle one datagram from the peer."""
        return self.receive_batch((datagram,), now)

    def receive_batch(self, datagrams: Iterable[bytes], now: float) -> list[Event]:
        """Handle datagrams from the peer; decrypted packets come out as one event (plain IP
        packets, or offload frames when `frames_out` is set)."""
        return self._receive(datagrams, now, [], True)

    def receive_into(self, datagrams: Iterable[bytes], now: float,
                     packets: list[bytes]) -> list[Event]:
        """`receive_batch` for the data path: decrypted packets are appended to `packets`
        instead of coming as a `DecryptedPackets` event (no event object per batch); the other
        events are the same."""
        return self._receive(datagrams, now, packets, False)

    def receive_one(self, datagram: bytes, now: float, packets: list[bytes]) -> bool:
        """The common case of a lone datagram, the short way (an interactive packet: its
        round trip pays this per hop): a data datagram or a one-fragment message under the
        current keys, fresh, authentic, a well-formed packet from the peer's address. Its
        packet is appended to `packets` and the counters move as `receive_into` would move
        them; True. Anything else (a handshake, keepalive, other keys, a replay, a forgery, a
        bad frame): False with nothing changed — then `receive_into` handles it."""
        kind = datagram[0]
        if kind == TYPE_FRAGMENT:
            if len(datagram) <= _FRAGMENT_SIZE or datagram[13] != 0 or datagram[14] != 1:
                return False
            start = _FRAGMENT_SIZE
        elif kind == TYPE_DATA and len(datagram) > DATA_OVERHEAD:
            start = _HEADER_SIZE
        else:
            return False
        _, index, counter = DATA_HEADER.unpack_from(datagram)  # 0xE4 starts the same way
        kp = self._current
        if kp is None or kp.local_index != index or now >= kp.reject_at:
            return False
        replay = kp.replay
        if not replay.check(counter):
            return False
        try:
            packet = kp.receiver.decrypt(_NONCE.pack(counter), datagram[start:], None)
        except InvalidTag:
            return False
        check_source = self.config.check_inner_source
        frames_out = self.frames_out
        out: list[bytes]
        if start == _FRAGMENT_SIZE:  # an offload frame
            try:
                check_frame(packet)
            except OffloadError:
                return False
            if check_source and (packet[kp.frame_source_slice] != kp.source
                                 or packet[VNET_HDR_LEN] >> 4 != kp.source_version):
                return False
            if frames_out:
                out = [packet]
            else:
                try:
                    out = to_packets(packet)
                except OffloadError:
                    return False
        else:
            if check_source and (packet[kp.source_slice] != kp.source
                                 or packet[0] >> 4 != kp.source_version):
                return False
            out = [PLAIN_HEADER + packet if frames_out else packet]
        if not replay.mark(counter):  # the fast path delivered another copy meanwhile
            return False
        packets += out
        counts = self._counts
        if start == _FRAGMENT_SIZE:
            counts["messages_received"] += 1
        counts["packets_received"] += len(out)
        counts["bytes_received"] += sum(map(len, out)) - (
            VNET_HDR_LEN * len(out) if frames_out else 0)
        self._after_receive(now, data=True)
        return True

    def _receive(self, datagrams: Iterable[bytes], now: float, packets: list[bytes],
                 emit: bool) -> list[Event]:
        start = len(packets)
        append = packets.append
        drops: dict[RejectReason, tuple[int, str]] = {}
        by_index, nxt = self._by_index, self._next
        check_source = self.config.check_inner_source
        frames_out = self.frames_out
        nonce = _NONCE.pack
        unpack = DATA_HEADER.unpack_from
        unpack_fragment = FRAGMENT_HEADER.unpack_from
        keepalives = messages = 0
        # The keys of the previous datagram and what the loop needs of them: a batch is
        # nearly always for one keypair, so attribute lookups happen once per batch.
        kp: _Keypair | None = None
        last_index = -1
        replay: Replay = _NO_KEYS
        check = replay.check
        mark = replay.mark
        decrypt = _no_decrypt
        source_slice, frame_slice, source, version = slice(0), slice(0), b"", 0
        for datagram in datagrams:
            kind = datagram[0] if datagram else -1
            if kind == TYPE_DATA and len(datagram) >= DATA_OVERHEAD:
                _, index, counter = unpack(datagram)
                count = 0
            elif kind == TYPE_FRAGMENT and len(datagram) > _FRAGMENT_SIZE:
                _, index, counter, part, count = unpack_fragment(datagram)
                if not part < count <= MAX_FRAGMENTS:
                    _count(drops, RejectReason.MALFORMED, f"fragment {part} of {count}")
                    continue
            else:
                try:
                    self._receive_handshake(datagram, now)
                except HandshakeRefused as exc:
                    _count(drops, exc.reason, exc.detail)
                by_index, nxt = self._by_index, self._next  # keys may have changed
                last_index = -1
                continue
            if index != last_index:
                kp = by_index.get(index)
                if kp is None:
                    _count(drops, RejectReason.UNKNOWN_INDEX)
                    continue
                if now >= kp.reject_at:
                    _count(drops, RejectReason.KEY_EXPIRED)
                    continue
                last_index = index
                replay = kp.replay
                check, mark, decrypt = replay.check, replay.mark, kp.receiver.decrypt
                source_slice, source, version = kp.source_slice, kp.source, kp.source_version
                frame_slice = kp.frame_source_slice
            if not check(counter):
                _count(drops, RejectReason.REPLAYED if counter < replay.limit
                       else RejectReason.KEY_EXPIRED)
                continue
            if not count:
                sealed = datagram[_HEADER_SIZE:]
            elif count == 1:
                sealed = datagram[_FRAGMENT_SIZE:]
            else:
                joined = self._reassemble(index, counter, part, count, datagram, now, drops)
                if joined is None:
                    continue
                sealed = joined
            try:
                packet = decrypt(nonce(counter), sealed, None)
            except InvalidTag:
                _count(drops, RejectReason.AUTH_FAILED)
                continue
            if not mark(counter):  # the fast path delivered another copy meanwhile
                _count(drops, RejectReason.REPLAYED)
                continue
            if kp is nxt:
                assert kp is not None
                self._confirm(kp, now)
                by_index, nxt = self._by_index, self._next
            if not packet:
                keepalives += 1
            elif count:  # an offload frame
                messages += 1
                try:
                    check_frame(packet)
                except OffloadError as exc:
                    _count(drops, RejectReason.MALFORMED, f"offload frame: {exc}")
                    continue
                if check_source and (packet[frame_slice] != source
                                     or packet[VNET_HDR_LEN] >> 4 != version):
                    _count(drops, RejectReason.SPOOFED_SOURCE, "inner source is not the peer's")
                elif frames_out:
                    append(packet)
                else:
                    try:
                        packets += to_packets(packet)
                    except OffloadError as exc:
                        _count(drops, RejectReason.MALFORMED, f"offload frame: {exc}")
            elif check_source and (packet[source_slice] != source or packet[0] >> 4 != version):
                _count(drops, RejectReason.SPOOFED_SOURCE, "inner source is not the peer's")
            else:
                append(PLAIN_HEADER + packet if frames_out else packet)
        return self._received(packets, start, drops, keepalives, messages, now, emit)

    def _received(self, packets: list[bytes], start: int,
                  drops: dict[RejectReason, tuple[int, str]], keepalives: int, messages: int,
                  now: float, emit: bool) -> list[Event]:
        """Count what a receive call delivered (`packets[start:]`) and dropped; its events
        (with the packets as one `DecryptedPackets` when `emit`)."""
        counts = self._counts
        new = len(packets) - start
        if new:
            counts["packets_received"] += new
            counts["bytes_received"] += sum(map(len, packets[start:] if start else packets)) - (
                VNET_HDR_LEN * new if self.frames_out else 0)
        counts["keepalives_received"] += keepalives
        counts["messages_received"] += messages
        if new or keepalives:
            self._after_receive(now, data=bool(new))
        events = self._take_events()
        if new and emit:
            events.append(DecryptedPackets(self.peer.node, tuple(packets[start:])))
        for reason, (count, detail) in drops.items():
            self._rejected[reason] = self._rejected.get(reason, 0) + count
            events.append(Rejected(self.peer.node, reason, count, detail))
        return events

    def receive_message(self, data: bytes, segment: int, now: float,
                        packets: list[bytes] | None = None) -> list[Event] | None:
        """One coalesced read (UDP GRO: datagrams of `segment` bytes back to back, the last
        may be shorter) that holds exactly the fragments of one message for this session, in
        order: checked and joined with a constant number of C-level operations, no Python work
        per fragment. None, with nothing changed, when the read is anything else (fragments of
        several messages or sessions, unknown keys, a counter already seen, a message partly
        reassembled already): then hand its datagrams to `receive_batch`, which gives the same
        result for the whole message; this only takes the short way. With `packets` the frame
        is appended there instead of coming as an event (`receive_into`)."""
        size = len(data)
        if segment <= _FRAGMENT_SIZE or size <= segment or data[0] != TYPE_FRAGMENT:
            return None
        n = -(-size // segment)
        if n > MAX_FRAGMENTS or size - (n - 1) * segment <= _FRAGMENT_SIZE:
            return None
        _, index, counter, part, count = FRAGMENT_HEADER.unpack_from(data)
        if part != 0 or count != n:
            return None
        kp = self._by_index.get(index)
        if (kp is None or now >= kp.reject_at or not kp.replay.check(counter)
                or (index, counter) in self._partials or size - _FRAGMENT_SIZE * n > MAX_MESSAGE):
            return None
        headers, payloads = _message_slices(segment, n)
        view = memoryview(data)
        expected = bytearray(data[:_FRAGMENT_SIZE] * n)
        expected[_FRAGMENT_SIZE - 2::_FRAGMENT_SIZE] = _PARTS[:n]
        if b"".join(map(view.__getitem__, headers)) != expected:
            return None
        # The per-fragment path would have opened a reassembly entry for this message (expiring
        # old ones, evicting the oldest when full) and closed it at the last fragment.
        partials = self._partials
        self._expire_partials(now)
        if len(partials) >= self.config.max_partial_messages:
            del partials[next(iter(partials))]
            self._counts["messages_incomplete"] += 1
        drops: dict[RejectReason, tuple[int, str]] = {}
        emit = packets is None
        if packets is None:
            packets = []
        start = len(packets)
        keepalives = messages = 0
        try:
            packet = kp.receiver.decrypt(_NONCE.pack(counter),
                                         b"".join(map(view.__getitem__, payloads)), None)
        except InvalidTag:
            _count(drops, RejectReason.AUTH_FAILED)
            return self._received(packets, start, drops, 0, 0, now, emit)
        if not kp.replay.mark(counter):
            _count(drops, RejectReason.REPLAYED)
            return self._received(packets, start, drops, 0, 0, now, emit)
        if kp is self._next:
            self._confirm(kp, now)
        if not packet:
            keepalives = 1
        else:
            messages = 1
            self._counts["messages_whole"] += 1
            self._deliver_frame(kp, packet, packets, drops)
        return self._received(packets, start, drops, keepalives, messages, now, emit)

    def _deliver_frame(self, kp: _Keypair, frame: bytes, packets: list[bytes],
                       drops: dict[RejectReason, tuple[int, str]]) -> None:
        """An authenticated offload frame from the peer: checked, then delivered (as itself, or
        as its packets for a TUN device without offloads). `receive_batch` inlines this."""
        try:
            check_frame(frame)
        except OffloadError as exc:
            _count(drops, RejectReason.MALFORMED, f"offload frame: {exc}")
            return
        if self.config.check_inner_source and (frame[kp.frame_source_slice] != kp.source
                                               or frame[VNET_HDR_LEN] >> 4 != kp.source_version):
            _count(drops, RejectReason.SPOOFED_SOURCE, "inner source is not the peer's")
        elif self.frames_out:
            packets.append(frame)
        else:
            try:
                packets += to_packets(frame)
            except OffloadError as exc:
                _count(drops, RejectReason.MALFORMED, f"offload frame: {exc}")

    def _reassemble(
        self, index: int, counter: int, part: int, count: int, datagram: bytes, now: float,
        drops: dict[RejectReason, tuple[int, str]],
    ) -> bytes | None:
        """Keep one fragment; the whole ciphertext once the message's last one came. Memory
        stays bounded: `max_partial_messages` per session, `MAX_MESSAGE` bytes each."""
        partials = self._partials
        key = (index, counter)
        entry = partials.get(key)
        if entry is None:
            self._expire_partials(now)
            if len(partials) >= self.config.max_partial_messages:
                del partials[next(iter(partials))]  # the oldest
                self._counts["messages_incomplete"] += 1
            entry = partials[key] = _Partial(count, now)
        elif entry.count != count:
            _count(drops, RejectReason.MALFORMED, "fragment count differs within a message")
            return None
        parts = entry.parts
        if parts[part] is not None:
            _count(drops, RejectReason.REPLAYED, "duplicate fragment")
            return None
        piece = memoryview(datagram)[_FRAGMENT_SIZE:]
        entry.size += len(piece)
        if entry.size > MAX_MESSAGE:
            del partials[key]
            self._counts["messages_incomplete"] += 1
            _count(drops, RejectReason.MALFORMED, "fragmented message too long")
            return None
        parts[part] = piece
        entry.missing -= 1
        if entry.missing:
            return None
        del partials[key]
        return b"".join(parts)  # type: ignore[arg-type]  # no None left

    def _expire_partials(self, now: float) -> None:
        partials = self._partials
        limit = now - self.config.reassembly_timeout
        while partials:
            key = next(iter(partials))
            if partials[key].created > limit:
                break
            del partials[key]
            self._counts["messages_incomplete"] += 1

    def _after_receive(self, now: float, *, data: bool) -> None:
        """Something authenticated arrived: what we sent was answered (the new-handshake timer
        stops), data wants a passive keepalive unless we send first; a receiving initiator
        renews keys before the peer would stop accepting them."""
        self._unanswered_since = None
        if data and self._unanswered_receive is None:
            self._unanswered_receive = now
        kp = self._current
        if (
            kp is not None
            and kp.initiator
            and self._pending is None
            and now >= max(kp.rekey_at, kp.reject_at - self._receive_rekey_margin)
            and not self._fresh_keys_coming(now)
        ):
            self._fire(Trigger.REKEY)
            self._initiate(now)

    # -- handshakes ------------------------------------------------------------------------------

    def _receive_handshake(self, datagram: bytes, now: float) -> None:
        kind = datagram[0] if datagram else None
        if kind == TYPE_INITIATION:
            opened = open_initiation(
                self.local, self._verifier, datagram, now + self._wall_offset
            )
            self._accept(opened, now)
        elif kind == TYPE_RESPONSE:
            self._receive_response(datagram, now)
        else:
            raise HandshakeRefused(RejectReason.MALFORMED, "not a tunnel message")

    def accept_initiation(self, opened: OpenedInitiation, now: float) -> list[Event]:
        """Answer a verified initiation (the endpoint opens initiations, then routes them here by
        node); a refusal comes back as a Rejected event."""
        try:
            self._accept(opened, now)
        except HandshakeRefused as exc:
            self._rejected[exc.reason] = self._rejected.get(exc.reason, 0) + 1
            self._events.append(Rejected(self.peer.node, exc.reason, 1, exc.detail))
        return self._take_events()

    def _accept(self, opened: OpenedInitiation, now: float) -> None:
        if opened.node != self.peer.node:
            raise HandshakeRefused(
                RejectReason.WRONG_PEER,
                f"initiation from node {opened.node}, this session is for {self.peer.node}",
            )
        timestamps = self._peer_timestamps
        if opened.payload.timestamp_ns <= timestamps.get(opened.static_public, -1):
            raise HandshakeRefused(RejectReason.STALE_INITIATION, "initiation timestamp not newer")
        pending = self._pending
        if (
            pending is not None
            and pending.handshake.remote_static == opened.static_public  # ours can succeed
            and self.local.static_public < opened.static_public
        ):
            self._counts["initiations_ignored"] += 1  # our own initiation wins the tie-break
            return
        timestamps.pop(opened.static_public, None)
        timestamps[opened.static_public] = opened.payload.timestamp_ns
        while len(timestamps) > _TIMESTAMP_KEYS:  # forget the least recently used keys
            del timestamps[next(iter(timestamps))]
        self._drop_pending()
        index = self._indexes.allocate(self)
        payload = self._payload(now)
        message = opened.handshake.write_message_2(encode_payload(payload))
        kp = _Keypair(
            opened.handshake.keys(), initiator=False, local_index=index,
            remote_index=opened.sender_index, overlay=opened.payload.overlay, now=now,
            config=self.config, peer_static=opened.static_public,
            capabilities=timestamp_capabilities(opened.payload.timestamp_ns),
        )
        if self._next is not None:
            self._indexes.release(self._next.local_index)
        self._next = kp
        self._reindex()
        self._outbox.append(encode_response(Response(index, opened.sender_index, message)))
        self._fire(Trigger.INITIATION)

    def _receive_response(self, datagram: bytes, now: float) -> None:
        try:
            response = parse_response(datagram)
        except TunnelParseError as exc:
            raise HandshakeRefused(RejectReason.MALFORMED, str(exc)) from None
        pending = self._pending
        if pending is None or response.receiver_index != pending.index:
            raise HandshakeRefused(RejectReason.UNKNOWN_INDEX, "no handshake with that index")
        try:
            raw = pending.handshake.read_message_2(response.noise_message)
        except NoiseError as exc:
            raise HandshakeRefused(RejectReason.HANDSHAKE_INVALID, str(exc)) from None
        responder_static = pending.handshake.remote_static  # what Noise authenticated
        assert responder_static is not None
        payload, node = _verify_payload(
            self._verifier, raw, responder_static, now + self._wall_offset
        )
        if node != self.peer.node:
            raise HandshakeRefused(
                RejectReason.WRONG_PEER,
                f"responder is node {node}, this session is for {self.peer.node}",
            )
        self._pending = None
        kp = _Keypair(
            pending.handshake.keys(), initiator=True, local_index=pending.index,
            remote_index=response.sender_index, overlay=payload.overlay, now=now,
            config=self.config, peer_static=responder_static,
            capabilities=timestamp_capabilities(payload.timestamp_ns),
        )
        self._install(kp, now, initiator=True)
        self._fire(Trigger.RESPONSE)
        if not self._flush(kp, now):
            self.send_keepalive(now)  # confirms the keys to the responder

    def _confirm(self, kp: _Keypair, now: float) -> None:
        """The peer sent with keys we answered with: they become current. Only now, with the
        initiator proven alive, does a new static key of the peer replace the known one (a
        replayed old initiation cannot move us back to an old key)."""
        if kp.peer_static != self.peer.static_public:
            self.peer = Peer(self.peer.node, kp.peer_static)
        self._next = None
        self._drop_pending()
        self._install(kp, now, initiator=False)
        self._fire(Trigger.CONFIRMED)
        self._flush(kp, now)

    def _install(self, kp: _Keypair, now: float, *, initiator: bool) -> None:
        if self._previous is not None:
            self._indexes.release(self._previous.local_index)
        self._previous, self._current = self._current, kp
        self._reindex()
        rekey = self._ever_keyed
        self._ever_keyed = True
        overlay = kp.overlay
        self.peer_overlay = overlay
        self._counts["handshakes_completed"] += 1
        self._unanswered_since = None  # the peer answered: it holds keys with us
        self._events.append(HandshakeComplete(self.peer.node, overlay, initiator, rekey))

    def _flush(self, kp: _Keypair, now: float) -> bool:
        if not self._queue:
            return False
        queued, self._queue = list(self._queue), deque()
        self._outbox.extend(self._seal(kp, queued, now))
        return True

    def _initiate(self, now: float) -> None:
        """Send a fresh initiation (a retry is a new handshake: new ephemeral, index, time)."""
        previous = self._pending
        if previous is not None:
            self._indexes.release(previous.index)
        handshake = HandshakeIK.initiator(self.local.static_key, self.peer.static_public, PROLOGUE)
        index = self._indexes.allocate(self)
        message = handshake.write_message_1(encode_payload(self._payload(now)))
        attempts = previous.attempts + 1 if previous is not None else 1
        first = previous.first_sent if previous is not None else now
        delay = min(
            self.config.handshake_retry * 2 ** (attempts - 1), self.config.handshake_retry_max
        )
        retry_at = now + delay + self._rng.uniform(0, self.config.handshake_jitter)
        self._pending = _Pending(handshake, index, first, attempts, retry_at)
        self._outbox.append(encode_initiation(Initiation(index, message)))
        self._counts["initiations_sent"] += 1

    def _payload(self, now: float) -> HandshakePayload:
        wall_ns = int((now + self._wall_offset) * 1e9)
        capabilities = CAP_FRAGMENTS if self.config.fragments else 0
        self._own_timestamp = stamp_capabilities(wall_ns, self._own_timestamp, capabilities)
        return HandshakePayload(
            self.local.overlay, self._own_timestamp, self.local.certificate, self.local.signature
        )

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._indexes.release(self._pending.index)
            self._pending = None

    # -- timers ----------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` should run next, or None."""
        deadlines = [kp.reject_at for kp in (self._current, self._previous, self._next) if kp]
        if self._pending is not None:
            deadlines.append(self._pending.retry_at)
        if self.state is State.RESPONDED and self._queue and self._next is not None:
            deadlines.append(self._next.created + self.config.confirm_timeout)
        interval = self.config.persistent_keepalive
        if interval is not None and self._current is not None:
            deadlines.append(self._last_sent + interval)
        if self._current is not None:
            if self._unanswered_receive is not None:  # passive keepalive
                deadlines.append(self._unanswered_receive + self.config.keepalive_timeout)
            if self._unanswered_since is not None and self._pending is None:
                deadlines.append(self._unanswered_since + self._receive_rekey_margin)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Event]:
        """Retries, give-ups, key expiry and keepalives due at `now`."""
        self._expire(now)
        self._expire_partials(now)
        pending = self._pending
        if pending is not None and now >= pending.retry_at:
            if now - pending.first_sent >= self.config.handshake_give_up:
                self._drop_pending()
                dropped = len(self._queue)
                self._queue.clear()
                self._counts["queued_dropped"] += dropped
                self._fire(Trigger.GIVE_UP)
                self._events.append(HandshakeFailed(self.peer.node, pending.attempts, dropped))
            else:
                self._fire(Trigger.RETRY)
                self._initiate(now)
        nxt = self._next
        if (
            self.state is State.RESPONDED
            and self._queue
            and nxt is not None
            and now >= nxt.created + self.config.confirm_timeout
        ):
            self._fire(Trigger.CONFIRM_TIMEOUT)
            self._initiate(now)
        interval = self.config.persistent_keepalive
        if interval is not None and self._current is not None and now >= self._last_sent + interval:
            self.send_keepalive(now)
        self._reply_timers(now)
        return self._take_events()

    def _reply_timers(self, now: float) -> None:
        """WireGuard's passive keepalive and new-handshake timers (whitepaper §6.5): data
        received and nothing sent for keepalive_timeout → an empty datagram, so a one-way
        flow's sender hears back; data sent and nothing authenticated received for
        keepalive_timeout + handshake_retry_max → a fresh handshake (the peer may have lost
        our keys without anyone telling us: e.g. it dropped us and took us back)."""
        if self._current is None:
            return
        since = self._unanswered_receive
        if since is not None and now >= since + self.config.keepalive_timeout:
            self.send_keepalive(now)  # clears it
        since = self._unanswered_since
        if (since is not None and now >= since + self._receive_rekey_margin
                and self._pending is None and self.state is State.ESTABLISHED
                and not self._fresh_keys_coming(now)):
            self._unanswered_since = None  # the handshake's answer is the reply we wait for
            self._fire(Trigger.NO_REPLY)
            self._initiate(now)

    def _expire(self, now: float) -> None:
        if self._previous is not None and now >= self._previous.reject_at:
            self._indexes.release(self._previous.local_index)
            self._previous = None
            self._reindex()
        if self._next is not None and now >= self._next.reject_at:
            self._indexes.release(self._next.local_index)
            self._next = None
            self._reindex()
            if self.state is State.RESPONDED:
                self._fire(Trigger.EXPIRED)
        if self._current is not None and now >= self._current.reject_at:
            self._expire_current()
        if self.state is State.IDLE and self._queue:  # packets wait for keys nobody makes
            self._fire(Trigger.SEND)
            self._initiate(now)

    def _expire_current(self) -> None:
        assert self._current is not None
        self._indexes.release(self._current.local_index)
        self._current = None
        self._reindex()
        self._fire(Trigger.EXPIRED)

    # -- misc ------------------------------------------------------------------------------------

    def update_peer(self, peer: Peer) -> None:
        """The registry has news about the peer (a new static key after a reinstall)."""
        if peer.node != self.peer.node:
            raise ValueError("a session's peer node never changes")
        self.peer = peer

    def close(self) -> None:
        """Forget all keys and pending handshakes (the peer left the mesh)."""
        for kp in (self._current, self._previous, self._next):
            if kp is not None:
                self._indexes.release(kp.local_index)
        self._current = self._previous = self._next = None
        self._drop_pending()
        self._queue.clear()
        self._partials.clear()
        self._reindex()
        self._unanswered_since = self._unanswered_receive = None
        self._fire(Trigger.CLOSE)

    def fast_route(self, now: float, endpoint: tuple[str, int] | None,
                   channel: int | None = None) -> FastRoute | None:
        """What the native fast path needs to carry this session's data: the current keys
        while they need no Python (no rekey due, not expired), for an IPv4 peer; None
        otherwise. `endpoint`: the direct path's remote address, or with `channel` our TURN
        server (a relayed path through that channel); None to receive only."""
        kp = self._current
        if kp is None or kp.source_version != 4 or now >= kp.reject_at:
            return None
        config = self.config
        # The initiator rekeys on send from rekey_at (`_maybe_rekey`) and on receive from the
        # later of rekey_at and reject_at - margin (`_after_receive`); the responder never
        # rekeys on time: its keys serve until they expire.
        if kp.initiator:
            send_until = kp.rekey_at
            receive_until = max(kp.rekey_at, kp.reject_at - self._receive_rekey_margin)
        else:
            send_until = receive_until = kp.reject_at
        return FastRoute(
            overlay=kp.source, remote_index=kp.remote_index, send_key=kp.send_key,
            counter=kp.counter,
            send_limit=min(config.rekey_after_messages, config.reject_after_messages),
            send_fragments=kp.fragments, local_index=kp.local_index,
            receive_key=kp.receive_key, replay=kp.replay, endpoint=endpoint,
            send_until=send_until, receive_until=receive_until,
            channel=channel if endpoint is not None else None)

    def fast_account(self, stats: FastStats) -> None:
        """Count what the fast path carried for this session (keepalive timers see it) and
        what it dropped as forged (`auth-failed`, as `receive` would have counted it)."""
        if stats.auth_failed:
            reason = RejectReason.AUTH_FAILED
            self._rejected[reason] = self._rejected.get(reason, 0) + stats.auth_failed
        counts = self._counts
        counts["packets_sent"] += stats.tx_packets
        counts["bytes_sent"] += stats.tx_bytes
        counts["packets_received"] += stats.rx_packets
        counts["bytes_received"] += stats.rx_bytes
        # The reply timers (`_reply_timers`) from the thread's last send and receive times.
        last_rx, last_tx = stats.last_rx, stats.last_tx
        if stats.rx_packets and last_rx is not None:
            if self._unanswered_since is not None and last_rx >= self._unanswered_since:
                self._unanswered_since = None
            if self._unanswered_receive is None and (last_tx is None or last_rx > last_tx):
                self._unanswered_receive = last_rx
        if last_tx is not None:
            self._last_sent = max(self._last_sent, last_tx)
            if self._unanswered_receive is not None and last_tx >= self._unanswered_receive:
                self._unanswered_receive = None
            if (stats.tx_packets and self._unanswered_since is None
                    and (last_rx is None or last_tx > last_rx)):
                self._unanswered_since = last_tx

    @property
    def can_send(self) -> bool:
        """Keys are confirmed: `encrypt` sends at once instead of queueing."""
        return self._current is not None

    def stats(self) -> SessionStats:
        """A snapshot of the counters."""
        c = self._counts
        return SessionStats(
            state=self.state.value,
            packets_sent=c["packets_sent"],
            bytes_sent=c["bytes_sent"],
            packets_received=c["packets_received"],
            bytes_received=c["bytes_received"],
            keepalives_sent=c["keepalives_sent"],
            keepalives_received=c["keepalives_received"],
            initiations_sent=c["initiations_sent"],
            handshakes_completed=c["handshakes_completed"],
            initiations_ignored=c["initiations_ignored"],
            queued_dropped=c["queued_dropped"],
            rejected={r.value: n for r, n in self._rejected.items()},
            messages_sent=c["messages_sent"],
            messages_received=c["messages_received"],
            messages_incomplete=c["messages_incomplete"],
            peer_fragments=self._current is not None and self._current.fragments,
            messages_whole=c["messages_whole"],
        )

    def _fire(self, trigger: Trigger) -> None:
        before = self.state
        try:
            self.state = TRANSITIONS[(before, trigger)]
        except KeyError:
            raise AssertionError(f"no transition from {before} on {trigger}") from None
        self.history.append((before, trigger, self.state))

    def _reindex(self) -> None:
        self._by_index = {
            kp.local_index: kp for kp in (self._current, self._previous, self._next) if kp
        }

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


_NO_KEYS = ReplayWindow(128)
_TIMESTAMP_KEYS = 4  # initiator static keys whose newest timestamp a session remembers


def _no_decrypt(nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
    raise AssertionError("no keys selected")


_PARTS = bytes(range(MAX_FRAGMENTS))
"""The fragment index bytes of a whole message, in order."""


@functools.lru_cache(maxsize=64)
def _message_slices(segment: int, n: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(headers, ciphertext parts) of a coalesced read of `n` fragments of `segment` bytes."""
    starts = range(0, n * segment, segment)
    return (tuple(slice(k, k + _FRAGMENT_SIZE) for k in starts),
            tuple(slice(k + _FRAGMENT_SIZE, k + segment) for k in starts))


def _count(
    drops: dict[RejectReason, tuple[int, str]], reason: RejectReason, detail: str = ""
) -> None:
    count, _ = drops.get(reason, (0, ""))
    drops[reason] = (count + 1, detail)

