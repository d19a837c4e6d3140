"""The per-peer path machine: ICE-style connectivity checks, nomination, keepalives, consent
and relay fallback, sans-I/O (RFC 8445 checks with our own timers; RFC 7675-style consent).

One `PathMachine` per peer. Inputs: the local candidates and relay (`set_local_candidates`),
the peer's description from the server (`set_remote_candidates`), STUN datagrams that arrived
(`receive`), data the data plane sent (`data_sent`/`transmit`) and time (`handle_timer`).
Outputs: datagrams (`datagrams_to_send`), typed events (`next_event`), the next deadline
(`get_timer`) and the path the data plane should use now (`current_path`).

States (`TRANSITIONS` is the whole table):

    IDLE --start--> CHECKING --selected--> DIRECT --dead | restart--> CHECKING
                       |  \\--no direct--> RELAYED --restart (retry, new candidates)--> CHECKING
                       \\--no path--> FAILED --restart--> CHECKING
    RELAYED | FAILED --selected--> DIRECT      (the controlling peer nominated a pair)
    RELAYED --relay lost--> FAILED             (a relayed candidate went away)

The *path* is separate from the state: while CHECKING (and in RELAYED) the path is the relay
whenever both sides have a relayed candidate, so the first byte never waits for punching; it
becomes the selected direct pair on DIRECT and falls back to the relay the moment a direct pair
dies. `PathChanged` reports every change.

Timers (all in `PunchConfig`): checks leave paced (`pacing_s`) from both sides at once and are
retransmitted on a capped exponential schedule; the controlling side nominates (regular
nomination) the best valid pair; a round without a direct pair ends after `round_timeout_s`
(relay decided ≤ 6 s); consent checks every ~`consent_interval_s` on the selected pair while the
data plane sends, faster (`consent_retry_s`) once one goes unanswered, and a path with no answer
for `dead_after_s` is dead; Binding indications keep NAT mappings alive every `keepalive_s`
of silence; a relayed (or failed) controlling side retries direct with exponential backoff.

Nomination is *regular* (RFC 8445 §8.1.1; aggressive nomination is deprecated): the controlling
side, once a pair works and no better one is pending (or `nomination_wait_s` passed), repeats
the check with USE-CANDIDATE; both sides select exactly that pair, so both keep the same NAT
mappings alive and run consent on the same flow. It costs one round trip (tens of ms), well
inside the 1 s budget; aggressive nomination could leave the two sides on different pairs.

Port guessing (`meshd.tunnel.guess`; symmetric × port-restricted, `set_guess_side`): the hard
(symmetric) side starts a phase when a round ends relayed (one per round, with its own
backoff), sends a Binding indication from every pool socket (`set_guess_bases`: local bases,
never advertised) to the peer's reflexive address and reports `GuessReady`; the easy side, cued
through the server, probes the hard side's reflexive IP at random ports with real checks
(`probe_guess`, transaction ids only). A hit is an ordinary pair afterwards: the answer makes a
peer-reflexive candidate, the hard side's triggered check from the pool socket follows, and
regular nomination selects it (RELAYED --selected--> DIRECT). The state table does not change.

Restarts: a dead path or a retry bumps our generation (`DescriptionChanged`, to be signaled);
credentials stay those of the peer session, so checks keep working even while the server is
unreachable. A peer's higher generation restarts our checks too (while already checking, only
failed pairs are retried). Only the controlling side runs the retry timer, so one signaled
restart moves both sides at once.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from edgeweave.log import event
from meshd.stun.codec import (
    IceAttributes,
    MessageClass,
    Method,
    StunMessage,
    StunParseError,
    Username,
    XorMappedAddress,
    encode_message,
    parse_ice_attributes,
    parse_message,
    short_term_key,
    verify_integrity,
)
from meshd.tunnel.candidates import (
    MAX_CANDIDATES,
    Candidate,
    CandidateKind,
    CandidatePair,
    Description,
    PairKey,
    Role,
    candidate_priority,
    form_pairs,
    foundation,
    pair_priority,
    role_for,
)
from meshd.tunnel.guess import (
    GuessEnded,
    GuessReady,
    GuessSide,
    GuessStarted,
    PortGuessConfig,
    probe_ports,
)
from meshd.udp import Address, Transmit, format_address

log = logging.getLogger("meshd.tunnel.punch")

_ICE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_MAX_EARLY = 16  # checks remembered from a peer whose description has not arrived yet


@dataclass(frozen=True)
class PunchConfig:
    """Every timer of the path machine. Tests shorten them here, never by patching."""

    pacing_s: float = 0.02
    """Ta: at most one new check per this interval, across all pairs (RFC 8445 §14.2)."""
    check_rto_s: float = 0.1
    """First retransmission timeout of a check; doubles per copy up to `check_rto_max_s`."""
    check_rto_max_s: float = 0.4
    """Cap of a check's retransmission timeout (keeps probing while the peer's NAT opens)."""
    check_timeout_s: float = 5.0
    """A pair without an answer for this long has failed."""
    round_timeout_s: float = 5.5
    """A round of checks that found no direct pair by then ends: relay (or failed)."""
    nomination_wait_s: float = 0.1
    """Controlling side: how long a valid pair waits for better pairs still being checked."""
    keepalive_s: float = 25.0
    """Send a Binding indication on the selected pair after this much silence (below NAT UDP
    timeouts: Linux conntrack forgets an unreplied flow after 30 s)."""
    consent_interval_s: float = 2.0
    """Consent check period on the selected pair while it carries data (±`consent_jitter`)."""
    consent_retry_s: float = 0.5
    """Consent check period once the last one went unanswered."""
    consent_jitter: float = 0.2
    """Relative randomisation of `consent_interval_s` (RFC 7675 §5.1 asks for some)."""
    dead_after_s: float = 7.0
    """No consent answer for this long (while data flows) and the direct path is dead."""
    consent_idle_s: float | None = 30.0
    """Consent checks run while the data plane sent data within this; None: always. Idle
    paths only get keepalives; the first datagram after idleness restarts consent."""
    retry_initial_s: float = 2.0
    """First delay before a relayed (or failed) pair retries direct; doubles per retry."""
    retry_max_s: float = 60.0
    """Cap of the retry delay."""
    retry_jitter: float = 0.1
    """Relative randomisation of retry delays."""
    prepunch_ttl: int | None = None
    """TTL of the pre-punch datagrams sent when a round starts (open our own NAT mappings, die
    before the peer's NAT so it never holds a clashing conntrack entry); None: no pre-punch.
    2 suits one NAT with a router between the NATs; the adapter must honour `Transmit.ttl`."""
    prepunch_lead_s: float = 0.05
    """Checks start this long after the pre-punch."""
    max_pairs: int = 64
    """Check-list size limit (RFC 8445 §6.1.2.5 suggests 100)."""
    guess: PortGuessConfig = field(default_factory=PortGuessConfig)
    """Birthday-paradox port guessing (`meshd.tunnel.guess`)."""

    def __post_init__(self) -> None:
        positive = {
            "pacing_s": self.pacing_s, "check_rto_s": self.check_rto_s,
            "check_rto_max_s": self.check_rto_max_s, "check_timeout_s": self.check_timeout_s,
            "round_timeout_s": self.round_timeout_s, "keepalive_s": self.keepalive_s,
            "consent_interval_s": self.consent_interval_s,
            "consent_retry_s": self.consent_retry_s, "dead_after_s": self.dead_after_s,
            "retry_initial_s": self.retry_initial_s, "retry_max_s": self.retry_max_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.consent_idle_s is not None and self.consent_idle_s <= 0:
            raise ValueError("consent_idle_s must be positive or None")
        if self.nomination_wait_s < 0 or self.prepunch_lead_s < 0:
            raise ValueError("nomination_wait_s and prepunch_lead_s must not be negative")
        if not (0 <= self.consent_jitter < 1 and 0 <= self.retry_jitter < 1):
            raise ValueError("jitters must be in [0, 1)")
        if self.prepunch_ttl is not None and not 1 <= self.prepunch_ttl <= 255:
            raise ValueError(f"prepunch_ttl must be 1..255, got {self.prepunch_ttl}")
        if self.max_pairs < 1:
            raise ValueError("max_pairs must be at least 1")


class State(Enum):
    """Where the machine is (see TRANSITIONS)."""

    IDLE = "idle"
    CHECKING = "checking"
    DIRECT = "direct"
    RELAYED = "relayed"
    FAILED = "failed"


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "start"): State.CHECKING,
    (State.CHECKING, "selected"): State.DIRECT,
    (State.CHECKING, "no direct"): State.RELAYED,
    (State.CHECKING, "no path"): State.FAILED,
    (State.CHECKING, "restart"): State.CHECKING,
    (State.DIRECT, "selected"): State.DIRECT,  # the controlling peer nominated another pair
    (State.DIRECT, "dead"): State.CHECKING,
    (State.DIRECT, "restart"): State.CHECKING,
    (State.RELAYED, "selected"): State.DIRECT,
    (State.RELAYED, "relay lost"): State.FAILED,
    (State.RELAYED, "restart"): State.CHECKING,
    (State.FAILED, "selected"): State.DIRECT,
    (State.FAILED, "restart"): State.CHECKING,
}
"""(state, trigger) -> next state; any other combination is a bug (RuntimeError)."""


class PairState(Enum):
    """A candidate pair's check state (RFC 8445 §6.1.2.6, without freezing: one component)."""

    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PathKind(Enum):
    """How data reaches the peer right now."""

    DIRECT = "direct"
    RELAY = "relay"
    NONE = "none"


@dataclass(frozen=True)
class Path:
    """Where the data plane sends the peer's datagrams."""

    kind: PathKind
    """Direct pair, relay, or nothing yet."""
    local: Address | None
    """Direct: the local socket to send from. Relay: our relayed address (send through the
    `RelayLink`). None without a path."""
    remote: Address | None
    """Direct: the peer's address. Relay: the peer's relayed address."""
    rtt: float | None
    """Last measured round-trip time of this path in seconds; None before any answer."""


NO_PATH = Path(PathKind.NONE, None, None, None)


class RelayLink(Protocol):
    """The machine's whole view of a relay allocation (TURN, or a test relay).

    Outbound: every datagram the machine (or the data plane, via `PathMachine.transmit`) sends
    from `relayed_address` is handed to `send_via_relay`, which returns the datagram to put on
    the host socket (a TURN Send indication or ChannelData towards the server). Inbound: the
    relay client unwraps what the server forwards and calls `PathMachine.receive(data, source=
    the peer's address as the relay saw it, local=relayed_address)`. Permissions/channels for
    the peer's relayed address are the relay client's job."""

    @property
    def relayed_address(self) -> Address:
        """Our address on the relay, advertised as the relayed candidate."""
        ...

    def send_via_relay(self, data: bytes, peer: Address) -> Transmit:
        """The host-socket datagram that makes the relay send `data` to `peer`."""
        ...


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathChanged:
    """The data plane must send on another path from now on (keep accepting the old one)."""

    old: Path
    """The path used until now."""
    new: Path
    """The path to use from now on."""
    now: float
    """When it changed."""


@dataclass(frozen=True)
class StateChanged:
    """A transition of the state table."""

    old: State
    """State before."""
    new: State
    """State after."""
    trigger: str
    """The TRANSITIONS trigger that moved it."""
    now: float
    """When."""


@dataclass(frozen=True)
class PeerReflexiveLearnt:
    """A peer-reflexive candidate was learnt from a check (RFC 8445 §7.2.5.3.1, §7.3.1.3)."""

    candidate: Candidate
    """The candidate (kind PRFLX)."""
    remote: bool
    """True: the peer's address as our checks' sender saw it; False: ours as the peer saw it."""
    now: float
    """When."""


@dataclass(frozen=True)
class ChecksFailed:
    """A round of checks ended without a working direct pair."""

    generation: int
    """Our description generation of the round."""
    pairs: int
    """Direct pairs that were checked."""
    relayed: bool
    """The relay carries the data meanwhile (state RELAYED, not FAILED)."""
    now: float
    """When."""


@dataclass(frozen=True)
class ChecksRestarted:
    """Checks start again; the agent should refresh its server-reflexive candidates (the NAT
    mapping may have changed) and call `set_local_candidates`."""

    generation: int
    """Our description generation after the restart."""
    reason: str
    """"dead path", "retry", "peer restart", "peer session" or "new candidates"."""
    now: float
    """When."""


@dataclass(frozen=True)
class DescriptionChanged:
    """Our description changed: send it to the peer through the server."""

    description: Description
    """Credentials, generation and candidates (`encode_description` for the wire)."""
    now: float
    """When."""


Event = PathChanged | StateChanged | PeerReflexiveLearnt | ChecksFailed | ChecksRestarted \
    | DescriptionChanged | GuessStarted | GuessReady | GuessEnded


@dataclass(slots=True)
class PunchMetrics:
    """Counters an exporter reads (plain ints, one machine per peer)."""

    attempts: int = 0
    """Rounds of checks started (punch attempts)."""
    successes: int = 0
    """Rounds that ended with a direct pair."""
    failures: int = 0
    """Rounds that ended without one."""
    restarts: int = 0
    """Local restarts (dead path or retry); each bumps the generation."""
    dead_paths: int = 0
    """Direct paths declared dead by consent."""
    checks_sent: int = 0
    """Check, nomination and consent requests sent, retransmissions included."""
    checks_received: int = 0
    """Authenticated checks from the peer answered."""
    keepalives_sent: int = 0
    """Binding indications sent on the selected pair."""
    prepunches_sent: int = 0
    """TTL-limited pre-punch datagrams sent."""
    prflx_learnt: int = 0
    """Peer-reflexive candidates learnt (both sides)."""
    ignored: int = 0
    """STUN datagrams for us that failed authentication or made no sense."""
    role_conflicts: int = 0
    """Checks from a peer claiming our role (dropped; roles come from node names)."""
    stale_descriptions: int = 0
    """Peer descriptions older than the one we have."""
    time_to_direct_s: float | None = None
    """Start of the last successful round to its direct selection. A round starts once this
    side holds both its own candidates and the peer's description: the figure counts from
    "candidates exchanged", not from the agent's start or gathering."""
    time_to_relay_s: float | None = None
    """Start of the last round that ended relayed to that decision (the round timeout at the
    latest, earlier when every direct pair failed first)."""
    guess_phases: int = 0
    """Port-guessing phases started (either side)."""
    guess_probes: int = 0
    """Guess probes sent (easy side)."""
    guess_hits: int = 0
    """Phases that ended with a guessed pair selected."""
    guess_refused: int = 0
    """Guess cues from the peer we did not act on (not our pair, too soon, already direct)."""


# --- internals --------------------------------------------------------------------------------


class _Purpose(Enum):
    CHECK = "check"
    NOMINATE = "nominate"
    CONSENT = "consent"


@dataclass
class _Pair:
    pair: CandidatePair
    state: PairState = PairState.WAITING
    nominated: bool = False  # controlled side: the peer sent USE-CANDIDATE on it
    rtt: float | None = None


@dataclass
class _Check:
    txid: bytes
    key: PairKey
    request: bytes
    purpose: _Purpose
    last_sent: float
    next_send: float | None
    rto: float
    deadline: float


@dataclass
class _Guess:
    """One guess phase (see `meshd.tunnel.guess`)."""

    side: GuessSide
    started: float
    until: float
    """The phase ends then (without a hit)."""
    ready: bool = False
    """Hard side: the pool's indications went out."""
    refresh_at: float = math.inf
    """Hard side: next re-send of the indications."""
    base: Address | None = None
    """Easy side: the socket the probes leave from."""
    target_ip: str = ""
    """Easy side: the hard side's reflexive IP."""
    ports: tuple[int, ...] = ()
    """Easy side: the ports to probe, in order."""
    sent: int = 0
    """Easy side: probes sent so far."""
    next_probe_at: float | None = None
    """Easy side: next batch (None: all sent, or stopped at a hit)."""


@dataclass(frozen=True)
class _Early:
    local: Address
    source: Address
    sender_ufrag: str
    ice: IceAttributes


def _ice_string(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_ICE_ALPHABET) for _ in range(length))


class PathMachine:
    """Path selection towards one peer. Sans-I/O; every entry point takes `now` (seconds)."""

    def __init__(
        self,
        local_node: str,
        peer_node: str,
        *,
        role: Role | None = None,
        config: PunchConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.local_node = local_node
        self.peer_node = peer_node
        self.role = role if role is not None else role_for(local_node, peer_node)
        self.config = config or PunchConfig()
        # Credentials and transaction ids must be unpredictable; tests pass a seeded Random.
        self._rng: random.Random = rng if rng is not None else random.SystemRandom()
        self.ufrag = _ice_string(self._rng, 8)
        """Our ICE username fragment for this peer session."""
        self.pwd = _ice_string(self._rng, 24)
        """Our ICE password: the peer keys its checks to us with it."""
        self.tiebreaker = self._rng.getrandbits(64)
        """Sent in ICE-CONTROLLING/CONTROLLED (roles never conflict: names decide them)."""
        self.state = State.IDLE
        """Current state of TRANSITIONS."""
        self.generation = 0
        """Our description generation; bumped by every local restart."""
        self.metrics = PunchMetrics()
        self._key = short_term_key(self.pwd)
        self._local: tuple[Candidate, ...] = ()
        self._relay: RelayLink | None = None
        self._local_prflx: dict[Address, Candidate] = {}
        self._remote: Description | None = None
        self._remote_key = b""
        self._remote_prflx: dict[Address, Candidate] = {}
        self._pairs: dict[PairKey, _Pair] = {}
        self._checks: dict[bytes, _Check] = {}
        self._triggered: deque[PairKey] = deque()
        self._early: list[_Early] = []
        self._selected: PairKey | None = None
        self._nominating: bytes | None = None
        self._events: deque[Event] = deque()
        self._outbox: list[Transmit] = []
        self._path = NO_PATH
        self._rtt: float | None = None  # of the selected pair
        self._round_started = 0.0
        self._round_deadline: float | None = None
        self._next_check_at = 0.0
        self._first_valid_at: float | None = None
        self._retry_at: float | None = None
        self._retry_delay = self.config.retry_initial_s
        self._last_proof = 0.0
        self._consent_started = 0.0
        self._consent_next = 0.0
        self._last_sent = 0.0  # last datagram we sent on the selected pair
        self._last_data = -math.inf  # last data the data plane sent
        self.guess_side: GuessSide | None = None
        """Our part in port guessing with this peer (`set_guess_side`); None: no guessing."""
        self._guess: _Guess | None = None
        self._guess_bases: dict[Address, Candidate] = {}  # pool sockets (hard side)
        self._guessed: set[PairKey] = set()  # pairs a guess found
        self._probes: dict[bytes, float] = {}  # easy side: probe txid -> sent at
        self._guess_round = -1  # `metrics.attempts` of the last hard-side phase
        self._guess_not_before = -math.inf
        self._guess_delay = self.config.guess.backoff_initial_s

    # --- inputs -------------------------------------------------------------------------------

    def local_description(self) -> Description:
        """What the peer needs from us (also delivered as `DescriptionChanged` events)."""
        return Description(self.ufrag, self.pwd, self.generation, self._local)

    def set_local_candidates(self, candidates: tuple[Candidate, ...] | list[Candidate],
                             now: float, *, relay: RelayLink | None = None) -> None:
        """Our host, server-reflexive and relayed candidates (`candidates.gather`), and the
        relay allocation a relayed candidate belongs to. Call again whenever they change."""
        cands = tuple(candidates)
        if len(cands) > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} candidates")
        for c in cands:
            if c.kind is CandidateKind.PRFLX:
                raise ValueError("peer-reflexive candidates are learnt, not set")
            if c.kind is CandidateKind.RELAY and (relay is None
                                                  or relay.relayed_address != c.address):
                raise ValueError("a relayed candidate needs the RelayLink of its allocation")
        if cands == self._local and relay is self._relay:
            return
        self._local, self._relay = cands, relay
        self._emit(DescriptionChanged(self.local_description(), now))
        self._candidates_changed(now, "new candidates")
        self._relay_check(now)
        self._refresh_path(now)

    def set_remote_candidates(self, description: Description, now: float) -> None:
        """The peer's description as relayed by the server (`parse_description`). A higher
        generation is a peer restart; other credentials are a new peer session; a lower
        generation is stale and ignored."""
        old = self._remote
        same_session = old is not None and (old.ufrag, old.pwd) == (description.ufrag,
                                                                    description.pwd)
        if same_session and old is not None and description.generation < old.generation:
            self.metrics.stale_descriptions += 1
            return
        restart = same_session and old is not None and description.generation > old.generation
        self._remote = description
        self._remote_key = short_term_key(description.pwd)
        if not same_session:
            self._remote_prflx.clear()
            self._pairs.clear()
            self._selected = None
            self._guessed.clear()
            if self._guess is not None:
                self._end_guess(now, hit=False)
        if not self._local:
            self._refresh_path(now)
            return
        if self.state is State.IDLE:
            self._rebuild_pairs()
            self._fire("start", now)
            self._begin_round(now)
        elif (restart and self.state is State.DIRECT and self.role is Role.CONTROLLED
              and self._selected is not None):
            # The controlling peer restarted; its checks (maybe already its nomination, when
            # the signal was slower than the checks) drive the new round. Keep the selected
            # pair and answer: restarting here would end our round relayed while the peer
            # stays direct. Consent still declares a dead pair dead.
            self._rebuild_pairs()
            self._emit(ChecksRestarted(self.generation, "peer restart", now))
        elif not same_session or (restart and self.state is not State.CHECKING):
            self._rebuild_pairs()
            self._fire("restart", now)
            self._begin_round(now)
            reason = "peer restart" if same_session else "peer session"
            self._emit(ChecksRestarted(self.generation, reason, now))
        elif restart:  # already checking: keep what the round found, retry what failed
            self._rebuild_pairs()
            for pair in self._pairs.values():
                if pair.state is PairState.FAILED:
                    pair.state = PairState.WAITING
            self._extend_round(now)
            self._emit(ChecksRestarted(self.generation, "peer restart", now))
        else:
            self._candidates_changed(now, "new candidates")
        self._replay_early(now)
        self._relay_check(now)
        self._refresh_path(now)

    def receive(self, data: bytes, source: Address, local: Address, now: float) -> bool:
        """A datagram from `source` arrived on our socket (or relayed address) `local`. True
        when it was STUN for this machine: a check (answered), a response to one of our
        requests, or a keepalive. Never raises for peer input; garbage is dropped and
        counted."""
        try:
            message = parse_message(data)
        except StunParseError:
            return False
        if message.method != Method.BINDING:
            return False
        try:
            if message.message_class is MessageClass.REQUEST:
                return self._on_request(data, message, source, local, now)
            if message.message_class is MessageClass.SUCCESS:
                return self._on_success(data, message, source, local, now)
            if message.message_class is MessageClass.ERROR:
                return self._on_error(message)
            return message.fingerprint and not message.attributes  # our keepalive indication
        finally:
            self._refresh_path(now)

    def data_sent(self, now: float) -> None:
        """The data plane sent a datagram to the peer on `current_path()` (`transmit` calls
        this): it keeps consent checks running and counts as keepalive traffic."""
        if not self._consent_active(now):
            self._consent_started = now
            self._consent_next = now
        self._last_data = now
        if self.state is State.DIRECT:
            self._last_sent = now

    def transmit(self, data: bytes, now: float) -> Transmit | None:
        """The datagram that carries `data` to the peer on the current path (through the relay
        when relayed); None when there is no path yet."""
        path = self.current_path()
        if path.local is None or path.remote is None:
            return None
        self.data_sent(now)
        return self._transmit_from(path.local, path.remote, data)

    def transmit_many(self, datas: list[bytes], now: float) -> list[Transmit]:
        """`transmit` for a batch: one path decision for all of them (the hot loop); empty
        when there is no path yet."""
        path = self.current_path()
        local, remote = path.local, path.remote
        if local is None or remote is None or not datas:
            return []
        self.data_sent(now)
        if self._relay is not None and local == self._relay.relayed_address:
            via = self._relay.send_via_relay
            return [via(data, remote) for data in datas]
        return [Transmit(local, remote, data) for data in datas]

    def handle_timer(self, now: float) -> None:
        """Expire checks, end rounds, nominate, detect dead paths, retry. Datagrams that fall
        due go out via `datagrams_to_send`."""
        for txid, check in list(self._checks.items()):
            if now >= check.deadline:
                self._check_expired(txid, check)
        if self.state is not State.IDLE:
            self._maybe_nominate(now)
        if self.state is State.CHECKING:
            self._maybe_conclude(now)
        elif self.state is State.DIRECT:
            if self._consent_active(now) and now >= self._dead_at():
                self.metrics.dead_paths += 1
                self._restart(now, "dead", "dead path")
        elif self._retry_at is not None and now >= self._retry_at:
            self._restart(now, "restart", "retry")
        guess = self._guess
        if guess is not None and now >= guess.until:
            self._end_guess(now, hit=False)
        if self.state is State.RELAYED:
            self._maybe_guess(now)
        self._refresh_path(now)

    # --- port guessing (meshd.tunnel.guess) ---------------------------------------------------

    def set_guess_side(self, side: GuessSide | None, now: float) -> None:
        """Our part in port guessing with this peer, from both NAT classes (`guess_side`);
        None stops guessing. The hard side starts a phase when a round ends relayed (or
        now, if relayed and due)."""
        side = side if self.config.guess.enabled else None
        if side is self.guess_side:
            return
        self.guess_side = side
        if self._guess is not None and self._guess.side is not side:
            self._end_guess(now, hit=False)
        if self.state is State.RELAYED:
            self._maybe_guess(now)

    def set_guess_bases(self, addresses: tuple[Address, ...] | list[Address] | frozenset[Address],
                        now: float) -> None:
        """The node's open pool sockets: local bases for checks (never advertised). Pairs on
        sockets that closed are dropped. A hard-side phase waiting for them sends its
        indications now (then `GuessReady`)."""
        kind = CandidateKind.HOST
        priority = candidate_priority(kind, 0)  # below every advertised candidate
        new = {a: Candidate(kind, a, priority, foundation(kind, a[0])) for a in addresses}
        gone = set(self._guess_bases) - set(new)
        if gone:
            self._pairs = {k: p for k, p in self._pairs.items()
                           if k[0] not in gone or k == self._selected}
            self._checks = {t: c for t, c in self._checks.items() if c.key[0] not in gone}
            self._triggered = deque(k for k in self._triggered if k[0] not in gone)
        self._guess_bases = new
        guess = self._guess
        if guess is not None and guess.side is GuessSide.HARD and not guess.ready and new:
            self._indicate(guess, now, self._outbox)

    def probe_guess(self, now: float) -> bool:
        """Easy side: the peer's cue (its mappings exist): probe its reflexive IP at random
        ports. False (counted in `metrics.guess_refused`) when we are not the easy side, a
        phase runs, the pair is direct, or the last phase was too recent (a peer cannot make
        us spray probes at will)."""
        base = next((c.base_address for c in self._local if c.kind is CandidateKind.SRFLX),
                    None)
        targets = [c.address for c in self._guess_targets()
                   if base is not None and (":" in c.address[0]) == (":" in base[0])]
        if (self.guess_side is not GuessSide.EASY or self._guess is not None
                or self.state in (State.IDLE, State.DIRECT) or base is None or not targets
                or now < self._guess_not_before):
            self.metrics.guess_refused += 1
            return False
        cfg = self.config.guess
        target_ip = targets[0][0]
        known = frozenset(port for ip, port in targets if ip == target_ip)
        ports = probe_ports(self._rng, cfg.probes, cfg.min_port, cfg.max_port, known)
        self._guess = _Guess(GuessSide.EASY, now, now + cfg.easy_window_s, base=base,
                             target_ip=target_ip, ports=tuple(ports),
                             next_probe_at=now + cfg.lead_s)
        self._guess_not_before = now + cfg.backoff_initial_s / 2
        self._started_guess(now)
        return True

    @property
    def guessing(self) -> bool:
        """A guess phase is under way."""
        return self._guess is not None

    @property
    def path_guessed(self) -> bool:
        """The selected direct pair was found by port guessing."""
        key = self._selected
        return (self.state is State.DIRECT and key is not None
                and (key in self._guessed or key[0] in self._guess_bases))

    # --- outputs ------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """Answers, checks (paced), retransmissions, consent checks, keepalives due now."""
        out, self._outbox = self._outbox, []
        for check in list(self._checks.values()):
            if check.next_send is not None and check.next_send <= now:
                out.append(self._transmit_from(check.key[0], check.key[1], check.request))
                self.metrics.checks_sent += 1
                check.last_sent = now
                check.rto = min(check.rto * 2, self.config.check_rto_max_s)
                later = now + check.rto
                check.next_send = later if later < check.deadline else None
        if self._next_check_at <= now:
            key = self._next_pair()
            if key is not None:
                out.append(self._start_check(key, _Purpose.CHECK, now))
                self._next_check_at = now + self.config.pacing_s
        if self.state is State.DIRECT and self._selected is not None:
            local, remote = self._selected
            if self._consent_active(now) and now >= self._consent_next:
                out.append(self._start_check(self._selected, _Purpose.CONSENT, now))
                self._consent_next = now + self.config.consent_retry_s
                self._last_sent = now
            if now >= self._last_sent + self.config.keepalive_s:
                indication = StunMessage(MessageClass.INDICATION, Method.BINDING,
                                         self._rng.randbytes(12), fingerprint=True)
                out.append(self._transmit_from(local, remote, encode_message(indication)))
                self.metrics.keepalives_sent += 1
                self._last_sent = now
        guess = self._guess
        if guess is not None:
            if guess.next_probe_at is not None and now >= guess.next_probe_at:
                self._send_probes(guess, now, out)
            elif guess.ready and now >= guess.refresh_at:
                self._indicate(guess, now, out)
        return out

    def get_timer(self) -> float | None:
        """When to call `handle_timer` (and `datagrams_to_send`) next; None: nothing pending."""
        times: list[float] = []
        for check in self._checks.values():
            times.append(check.deadline)
            if check.next_send is not None:
                times.append(check.next_send)
        if self._has_check_to_start():
            times.append(self._next_check_at)
        wait = self._nomination_wait()
        if wait is not None:
            times.append(wait)
        if self.state is State.CHECKING and self._round_deadline is not None:
            times.append(self._round_deadline)
        elif self.state is State.DIRECT:
            idle = self.config.consent_idle_s
            active_until = math.inf if idle is None else self._last_data + idle
            times += [t for t in (self._consent_next, self._dead_at()) if t < active_until]
            times.append(self._last_sent + self.config.keepalive_s)
        elif self._retry_at is not None and self.state is not State.IDLE:
            times.append(self._retry_at)
        guess = self._guess
        if guess is not None:
            times.append(guess.until)
            if guess.next_probe_at is not None:
                times.append(guess.next_probe_at)
            elif guess.ready:
                times.append(guess.refresh_at)
        else:
            due = self._guess_due()
            if due is not None:
                times.append(due)
        return min(times) if times else None

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def current_path(self) -> Path:
        """Where the data plane sends now: the selected direct pair, else the relay pair,
        else nothing."""
        if self.state is State.DIRECT and self._selected is not None:
            return Path(PathKind.DIRECT, self._selected[0], self._selected[1], self._rtt)
        relay = self._relay_pair()
        if relay is not None:
            return Path(PathKind.RELAY, relay.pair.key[0], relay.pair.key[1], relay.rtt)
        return NO_PATH

    def pairs(self) -> list[tuple[CandidatePair, PairState]]:
        """The check list, highest priority first (for `status` and tests)."""
        ordered = sorted(self._pairs.values(), key=lambda p: -p.pair.priority)
        return [(p.pair, p.state) for p in ordered]

    # --- rounds -------------------------------------------------------------------------------

    def _fire(self, trigger: str, now: float) -> None:
        try:
            new = TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise RuntimeError(f"punch: {trigger!r} is invalid in state {self.state}") from None
        old, self.state = self.state, new
        self._emit(StateChanged(old, new, trigger, now))
        event(log, logging.INFO if old is not new else logging.DEBUG, "punch.state",
              node=self.local_node, peer=self.peer_node, old=old.value, new=new.value,
              trigger=trigger, generation=self.generation)

    def _begin_round(self, now: float) -> None:
        """Every pair back to WAITING, checks from now on (after a pre-punch)."""
        self.metrics.attempts += 1
        self._round_started = now
        self._round_deadline = now + self.config.round_timeout_s
        self._first_valid_at = None
        self._retry_at = None
        self._selected = None
        self._nominating = None
        self._checks.clear()
        self._triggered.clear()
        for pair in self._pairs.values():
            pair.state, pair.nominated = PairState.WAITING, False
        self._next_check_at = now
        ttl = self.config.prepunch_ttl
        if ttl is not None:
            self._prepunch(ttl)
            self._next_check_at = now + self.config.prepunch_lead_s

    def _extend_round(self, now: float) -> None:
        if self._round_deadline is not None:
            self._round_deadline = max(self._round_deadline, now + self.config.round_timeout_s)

    def _restart(self, now: float, trigger: str, reason: str) -> None:
        """A local restart: new generation, the peer hears of it through the server."""
        self.generation += 1
        self.metrics.restarts += 1
        self._fire(trigger, now)
        self._begin_round(now)
        self._emit(ChecksRestarted(self.generation, reason, now))
        self._emit(DescriptionChanged(self.local_description(), now))

    def _candidates_changed(self, now: float, reason: str) -> None:
        if self._remote is None or not self._local:
            return
        if self.state is State.IDLE:
            self._rebuild_pairs()
            self._fire("start", now)
            self._begin_round(now)
            self._replay_early(now)
            return
        added = self._rebuild_pairs()
        if not added:
            return
        if self.state in (State.RELAYED, State.FAILED):
            self._fire("restart", now)
            self._begin_round(now)
            self._emit(ChecksRestarted(self.generation, reason, now))
        elif self.state is State.CHECKING:
            self._extend_round(now)

    def _relay_check(self, now: float) -> None:
        if self.state is State.RELAYED and self._relay_pair() is None:
            self._fire("relay lost", now)

    def _maybe_conclude(self, now: float) -> None:
        direct = [p for p in self._pairs.values() if not p.pair.relayed]
        pending = (self._nominating is not None or bool(self._triggered)
                   or any(p.state is not PairState.FAILED for p in direct))
        if pending and (self._round_deadline is None or now < self._round_deadline):
            return
        for txid, check in list(self._checks.items()):
            pair = self._pairs.get(check.key)
            if pair is None or not pair.pair.relayed:  # the relay pair's RTT check may go on
                del self._checks[txid]
        self._nominating = None
        self._triggered.clear()
        for pair in direct:
            if pair.state is not PairState.SUCCEEDED:
                pair.state = PairState.FAILED
        self.metrics.failures += 1
        relayed = self._relay_pair() is not None
        if relayed:
            self.metrics.time_to_relay_s = now - self._round_started
        self._fire("no direct" if relayed else "no path", now)
        self._emit(ChecksFailed(self.generation, len(direct), relayed, now))
        if self.role is Role.CONTROLLING:
            jitter = 1 + self.config.retry_jitter * (2 * self._rng.random() - 1)
            self._retry_at = now + self._retry_delay * jitter
            self._retry_delay = min(self._retry_delay * 2, self.config.retry_max_s)
        if relayed:
            self._maybe_guess(now)

    def _select(self, key: PairKey, now: float) -> None:
        pair = self._pairs[key]
        if pair.pair.relayed or key == self._selected:
            return
        was_direct = self.state is State.DIRECT
        self._fire("selected", now)
        self._selected = key
        self._nominating = None
        self._checks.clear()
        self._triggered.clear()
        self._rtt = pair.rtt
        if not was_direct:
            self.metrics.successes += 1
            self.metrics.time_to_direct_s = now - self._round_started
        self._retry_delay = self.config.retry_initial_s
        self._retry_at = None
        self._round_deadline = None
        self._last_proof = self._consent_started = self._last_sent = now
        self._consent_next = now + self._consent_interval()
        if self._guess is not None:
            # The round had ended relayed: a pair proven during the phase was found by the
            # probes, also when one hit the mapping of our tunnel socket, not a pool socket's.
            self._guessed.add(key)
            self._end_guess(now, hit=True)

    # --- checks -------------------------------------------------------------------------------

    def _rebuild_pairs(self) -> bool:
        """Re-form the check list from both candidate sets; keep the state of known pairs.
        True when a pair was added."""
        assert self._remote is not None
        remote = list(self._remote.candidates)
        known = {c.address for c in remote}
        remote += [c for a, c in self._remote_prflx.items() if a not in known]
        pairs: dict[PairKey, _Pair] = {}
        added = False
        for formed in form_pairs(self._local, remote, self.role, self.config.max_pairs):
            old = self._pairs.get(formed.key)
            if old is None:
                added = True
                pairs[formed.key] = _Pair(formed)
            else:
                old.pair = formed
                pairs[formed.key] = old
        if self._selected is not None and self._selected not in pairs:
            pairs[self._selected] = self._pairs[self._selected]
        for key, old_pair in self._pairs.items():  # pool pairs are never formed: keep them
            if key[0] in self._guess_bases and key not in pairs:
                pairs[key] = old_pair
        self._pairs = pairs
        return added

    def _next_pair(self) -> PairKey | None:
        while self._triggered:
            key = self._triggered.popleft()
            pair = self._pairs.get(key)
            if pair is not None and pair.state is PairState.WAITING:
                return key
        if self.state is not State.CHECKING:
            return None
        waiting = [p for p in self._pairs.values() if p.state is PairState.WAITING]
        if not waiting:
            return None
        return max(waiting, key=lambda p: (p.pair.priority, p.pair.key)).pair.key

    def _has_check_to_start(self) -> bool:
        if any(self._pairs[k].state is PairState.WAITING for k in self._triggered
               if k in self._pairs):
            return True
        return self.state is State.CHECKING and any(
            p.state is PairState.WAITING for p in self._pairs.values())

    def _start_check(self, key: PairKey, purpose: _Purpose, now: float) -> Transmit:
        pair = self._pairs[key]
        local_preference = (pair.pair.local.priority >> 8) & 0xFFFF
        txid, data = self._request(local_preference, purpose is _Purpose.NOMINATE)
        if purpose is _Purpose.CONSENT:  # one copy each; the next one is the retransmission
            check = _Check(txid, key, data, purpose, now, None, 0.0,
                           now + self.config.dead_after_s)
        else:
            if pair.state is not PairState.SUCCEEDED:
                pair.state = PairState.IN_PROGRESS
            rto = self.config.check_rto_s
            check = _Check(txid, key, data, purpose, now, now + rto, rto,
                           now + self.config.check_timeout_s)
        self._checks[txid] = check
        if purpose is _Purpose.NOMINATE:
            self._nominating = txid
        self.metrics.checks_sent += 1
        return self._transmit_from(key[0], key[1], data)

    def _request(self, local_preference: int, nominate: bool) -> tuple[bytes, bytes]:
        """(transaction id, datagram) of a check: RFC 8445 §7.2.2 attributes, short-term
        credentials (USERNAME "theirs:ours", MESSAGE-INTEGRITY with the peer's password)."""
        assert self._remote is not None
        controlling = self.role is Role.CONTROLLING
        ice = IceAttributes(
            priority=candidate_priority(CandidateKind.PRFLX, local_preference),
            use_candidate=nominate,
            controlling=self.tiebreaker if controlling else None,
            controlled=None if controlling else self.tiebreaker,
        )
        txid = self._rng.randbytes(12)
        username = Username(f"{self._remote.ufrag}:{self.ufrag}")
        request = StunMessage(MessageClass.REQUEST, Method.BINDING, txid,
                              (username, *ice.to_attributes()), fingerprint=True)
        return txid, encode_message(request, key=self._remote_key)

    def _check_expired(self, txid: bytes, check: _Check) -> None:
        del self._checks[txid]
        if check.purpose is _Purpose.CONSENT:
            return  # consent is judged by _dead_at
        pair = self._pairs.get(check.key)
        if check.purpose is _Purpose.NOMINATE:
            self._nominating = None
            if pair is not None:
                pair.state = PairState.FAILED  # the pair stopped working
        elif pair is not None and pair.state is PairState.IN_PROGRESS:
            pair.state = PairState.FAILED

    def _maybe_nominate(self, now: float) -> None:
        """Regular nomination (RFC 8445 §8.1.1) by the controlling side."""
        if (self.role is not Role.CONTROLLING or self._nominating is not None
                or self.state in (State.IDLE, State.DIRECT)):
            return
        best = self._best_valid()
        if best is None:
            return
        wait = self._nomination_wait()
        if wait is not None and now < wait:
            return
        self._outbox.append(self._start_check(best.pair.key, _Purpose.NOMINATE, now))

    def _best_valid(self) -> _Pair | None:
        valid = [p for p in self._pairs.values()
                 if p.state is PairState.SUCCEEDED and not p.pair.relayed]
        return max(valid, key=lambda p: (p.pair.priority, p.pair.key)) if valid else None

    def _nomination_wait(self) -> float | None:
        """Until when the controlling side waits for better pairs still being checked."""
        if (self.role is not Role.CONTROLLING or self._nominating is not None
                or self.state in (State.IDLE, State.DIRECT) or self._first_valid_at is None):
            return None
        best = self._best_valid()
        if best is None:
            return None
        better = any(p.state in (PairState.WAITING, PairState.IN_PROGRESS)
                     and not p.pair.relayed and p.pair.priority > best.pair.priority
                     for p in self._pairs.values())
        return self._first_valid_at + self.config.nomination_wait_s if better else None

    def _prepunch(self, ttl: int) -> None:
        assert self._remote is not None
        bases = {c.base_address for c in self._local if c.kind is not CandidateKind.RELAY}
        targets = {c.address for c in self._remote.candidates if c.kind is not CandidateKind.RELAY}
        targets |= set(self._remote_prflx)
        for base in sorted(bases):
            for target in sorted(targets):
                if (":" in base[0]) != (":" in target[0]):
                    continue
                message = StunMessage(MessageClass.INDICATION, Method.BINDING,
                                      self._rng.randbytes(12), fingerprint=True)
                self._outbox.append(Transmit(base, target, encode_message(message), ttl))
                self.metrics.prepunches_sent += 1

    # --- port guessing internals ---------------------------------------------------------------

    def _guess_targets(self) -> list[Candidate]:
        """The peer's server-reflexive candidates: the easy side's address the pool opens
        mappings towards, or the hard side's reflexive IP the probes go to."""
        if self._remote is None:
            return []
        return [c for c in self._remote.candidates if c.kind is CandidateKind.SRFLX]

    def _guess_due(self) -> float | None:
        """Hard side: when the next phase may start (None: not now, whatever the time). One
        phase per round at most, and not before the backoff since the last one."""
        if (self.guess_side is not GuessSide.HARD or self._guess is not None
                or self.state is not State.RELAYED or self._guess_round == self.metrics.attempts
                or not self._guess_targets()):
            return None
        return max(self._guess_not_before, self._round_started)

    def _maybe_guess(self, now: float) -> None:
        due = self._guess_due()
        if due is None or now < due:
            return
        cfg = self.config.guess
        self._guess_round = self.metrics.attempts
        self._guess_not_before = now + self._guess_delay
        self._guess_delay = min(self._guess_delay * 2, cfg.backoff_max_s)
        self._guess = _Guess(GuessSide.HARD, now, now + cfg.hard_window_s)
        self._started_guess(now)

    def _started_guess(self, now: float) -> None:
        assert self._guess is not None
        self.metrics.guess_phases += 1
        self._emit(GuessStarted(self._guess.side, now))
        event(log, logging.INFO, "punch.guess_start", node=self.local_node, peer=self.peer_node,
              side=self._guess.side.value, target=self._guess.target_ip or "-",
              probes=len(self._guess.ports), generation=self.generation)

    def _end_guess(self, now: float, *, hit: bool) -> None:
        guess, self._guess = self._guess, None
        if guess is None:
            return
        self._probes.clear()
        if hit:
            self.metrics.guess_hits += 1
            self._guess_delay = self.config.guess.backoff_initial_s
            self._guess_not_before = -math.inf
        self._emit(GuessEnded(guess.side, hit, guess.sent, now))
        event(log, logging.INFO, "punch.guess_end", node=self.local_node, peer=self.peer_node,
              side=guess.side.value, hit=hit, probes=guess.sent,
              took=round(now - guess.started, 3))

    def _indicate(self, guess: _Guess, now: float, out: list[Transmit]) -> None:
        """Hard side: a Binding indication from every pool socket to the peer's reflexive
        address(es): one APDM mapping each, letting exactly that address in."""
        targets = [c.address for c in self._guess_targets()]
        sent = 0
        for base in sorted(self._guess_bases):
            for target in targets:
                if (":" in base[0]) != (":" in target[0]):
                    continue
                message = StunMessage(MessageClass.INDICATION, Method.BINDING,
                                      self._rng.randbytes(12), fingerprint=True)
                out.append(Transmit(base, target, encode_message(message)))
                sent += 1
        guess.refresh_at = now + self.config.guess.refresh_s
        if not guess.ready and sent:
            guess.ready = True
            guess.until = now + self.config.guess.hard_window_s
            self._emit(GuessReady(len(self._guess_bases), now))

    def _send_probes(self, guess: _Guess, now: float, out: list[Transmit]) -> None:
        """Easy side: the next batch of probes (ICE checks to guessed ports)."""
        cfg = self.config.guess
        base = guess.base
        assert base is not None
        mine = self._local_candidate(base)
        local_preference = (mine.priority >> 8) & 0xFFFF if mine is not None else 65535
        batch = guess.ports[guess.sent:guess.sent + cfg.probe_batch]
        for port in batch:
            txid, data = self._request(local_preference, False)
            self._probes[txid] = now
            out.append(Transmit(base, (guess.target_ip, port), data))
        guess.sent += len(batch)
        self.metrics.guess_probes += len(batch)
        guess.next_probe_at = (now + cfg.probe_interval_s if guess.sent < len(guess.ports)
                               else None)

    def _on_probe_answer(self, data: bytes, message: StunMessage, source: Address,
                         local: Address, now: float) -> bool:
        """Easy side: a probe hit a pool socket. The guessed address becomes a peer-reflexive
        remote candidate and its pair SUCCEEDED (RFC 8445 §7.2.5.3); nomination follows."""
        sent = self._probes[message.transaction_id]
        guess = self._guess
        if message.integrity is None or not verify_integrity(data, self._remote_key):
            self.metrics.ignored += 1
            return True
        if guess is None or guess.base != local or source[0] != guess.target_ip:
            self.metrics.ignored += 1  # not from where we probed: let it be
            return True
        self._probes.clear()
        guess.next_probe_at = None  # stop at the first hit
        pair = self._pair_for(local, source, candidate_priority(CandidateKind.PRFLX, 0), now)
        if pair is None:
            return True
        self._guessed.add(pair.pair.key)
        event(log, logging.INFO, "punch.guess_hit", node=self.local_node, peer=self.peer_node,
              remote=format_address(source), probes=guess.sent,
              took=round(now - guess.started, 3))
        pair.state, pair.rtt = PairState.SUCCEEDED, now - sent
        mapped = message.get(XorMappedAddress)
        if mapped is not None:
            self._learn_local(mapped.address, pair, now)
        if self._first_valid_at is None:
            self._first_valid_at = now
        if self.role is Role.CONTROLLED:
            if pair.nominated:
                self._select(pair.pair.key, now)
        else:
            self._maybe_nominate(now)
        return True

    # --- received STUN ------------------------------------------------------------------------

    def _on_request(self, data: bytes, message: StunMessage, source: Address, local: Address,
                    now: float) -> bool:
        username = message.get(Username)
        if username is None:
            return False
        ours, _, theirs = username.value.partition(":")
        if ours != self.ufrag:
            return False
        if not message.fingerprint or not verify_integrity(data, self._key):
            self.metrics.ignored += 1
            return True
        try:
            ice = parse_ice_attributes(message)
        except StunParseError:
            self.metrics.ignored += 1
            return True
        if not ice.priority or not self._local_candidate(local):
            self.metrics.ignored += 1
            return True
        if (ice.controlling if self.role is Role.CONTROLLING else ice.controlled) is not None:
            self.metrics.role_conflicts += 1
            return True
        response = StunMessage(MessageClass.SUCCESS, Method.BINDING, message.transaction_id,
                               (XorMappedAddress(source),), fingerprint=True)
        self._outbox.append(self._transmit_from(local, source,
                                                encode_message(response, key=self._key)))
        self.metrics.checks_received += 1
        if self._remote is None or theirs != self._remote.ufrag or self.state is State.IDLE:
            if len(self._early) < _MAX_EARLY:
                self._early.append(_Early(local, source, theirs, ice))
            return True
        self._on_check(local, source, ice, now)
        return True

    def _replay_early(self, now: float) -> None:
        early, self._early = self._early, []
        for check in early:
            if self._remote is not None and check.sender_ufrag == self._remote.ufrag:
                self._on_check(check.local, check.source, check.ice, now)

    def _on_check(self, local: Address, source: Address, ice: IceAttributes,
                  now: float) -> None:
        """An authenticated check from the peer (RFC 8445 §7.3.1.4: triggered checks)."""
        assert ice.priority
        pair = self._pair_for(local, source, ice.priority, now)
        if pair is None:
            return
        nominated = ice.use_candidate and self.role is Role.CONTROLLED
        if self.state is State.DIRECT and (not nominated or pair.pair.key == self._selected):
            return
        if nominated:
            pair.nominated = True
        if pair.state is PairState.SUCCEEDED:
            if nominated:
                self._select(pair.pair.key, now)
            return
        if pair.state in (PairState.WAITING, PairState.FAILED):
            pair.state = PairState.WAITING
            if pair.pair.key not in self._triggered:
                self._triggered.append(pair.pair.key)

    def _on_success(self, data: bytes, message: StunMessage, source: Address, local: Address,
                    now: float) -> bool:
        check = self._checks.get(message.transaction_id)
        if check is None:
            if message.transaction_id in self._probes:
                return self._on_probe_answer(data, message, source, local, now)
            return False
        if message.integrity is None or not verify_integrity(data, self._remote_key):
            self.metrics.ignored += 1
            return True
        if (local, source) != check.key:
            self.metrics.ignored += 1  # not symmetric (RFC 8445 §7.2.5.2.1): let it time out
            return True
        del self._checks[check.txid]
        rtt = now - check.last_sent
        if check.purpose is _Purpose.CONSENT:
            if check.key == self._selected:
                self._last_proof = now
                self._rtt = rtt
                self._consent_next = max(now, check.last_sent + self._consent_interval())
            return True
        pair = self._pairs.get(check.key)
        if pair is None:
            return True
        pair.state, pair.rtt = PairState.SUCCEEDED, rtt
        mapped = message.get(XorMappedAddress)
        if mapped is not None:
            self._learn_local(mapped.address, pair, now)
        if pair.pair.relayed:
            return True
        if self._first_valid_at is None:
            self._first_valid_at = now
        if check.purpose is _Purpose.NOMINATE:
            self._nominating = None
            if self.state is not State.IDLE:
                self._select(check.key, now)
        elif self.role is Role.CONTROLLED:
            if pair.nominated:
                self._select(check.key, now)
        else:
            self._maybe_nominate(now)
        return True

    def _on_error(self, message: StunMessage) -> bool:
        # Error responses carry no proof we can rely on (401s have no MESSAGE-INTEGRITY): the
        # pair simply times out. They are ours when they answer one of our transactions.
        return message.transaction_id in self._checks

    # --- candidates and pairs -----------------------------------------------------------------

    def _local_candidate(self, base: Address) -> Candidate | None:
        hosts = [c for c in self._local if c.kind is CandidateKind.HOST and c.address == base]
        if hosts:
            return hosts[0]
        found = next((c for c in self._local if c.base_address == base), None)
        return found if found is not None else self._guess_bases.get(base)

    def _remote_candidate(self, address: Address) -> Candidate | None:
        assert self._remote is not None
        found = next((c for c in self._remote.candidates if c.address == address), None)
        return found if found is not None else self._remote_prflx.get(address)

    def _pair_for(self, local: Address, source: Address, priority: int,
                  now: float) -> _Pair | None:
        existing = self._pairs.get((local, source))
        if existing is not None:
            return existing
        mine = self._local_candidate(local)
        if mine is None:
            return None
        theirs = self._remote_candidate(source)
        if theirs is None:
            if len(self._remote_prflx) >= MAX_CANDIDATES:
                return None
            kind = CandidateKind.PRFLX
            theirs = Candidate(kind, source, priority, foundation(kind, source[0]))
            self._remote_prflx[source] = theirs
            self.metrics.prflx_learnt += 1
            self._emit(PeerReflexiveLearnt(theirs, True, now))
            event(log, logging.INFO, "punch.prflx", node=self.local_node, peer=self.peer_node,
                  side="remote", address=format_address(source))
        if (mine.kind is CandidateKind.RELAY) != (theirs.kind is CandidateKind.RELAY):
            return None
        if mine.ipv6 != theirs.ipv6 or len(self._pairs) >= self.config.max_pairs:
            return None
        g, d = ((mine.priority, theirs.priority) if self.role is Role.CONTROLLING
                else (theirs.priority, mine.priority))
        pair = _Pair(CandidatePair(mine, theirs, pair_priority(g, d)))
        self._pairs[pair.pair.key] = pair
        guess = self._guess
        if local in self._guess_bases:
            self._guessed.add(pair.pair.key)
        elif (guess is not None and guess.side is GuessSide.EASY
              and theirs.kind is CandidateKind.PRFLX and source[0] == guess.target_ip):
            # A check from a port we probed: a hit whose answer was lost or is still on its
            # way (the hard side's triggered check overtook it). Stop probing.
            self._guessed.add(pair.pair.key)
            guess.next_probe_at = None
        return pair

    def _learn_local(self, mapped: Address, pair: _Pair, now: float) -> None:
        if mapped in self._local_prflx or any(c.address == mapped for c in self._local) \
                or len(self._local_prflx) >= MAX_CANDIDATES:
            return
        kind = CandidateKind.PRFLX
        local_preference = (pair.pair.local.priority >> 8) & 0xFFFF
        base = pair.pair.local.base_address
        candidate = Candidate(kind, mapped, candidate_priority(kind, local_preference),
                              foundation(kind, base[0]), base)
        self._local_prflx[mapped] = candidate
        self.metrics.prflx_learnt += 1
        self._emit(PeerReflexiveLearnt(candidate, False, now))

    def _relay_pair(self) -> _Pair | None:
        if self._relay is None:
            return None
        relayed = [p for p in self._pairs.values() if p.pair.relayed]
        return max(relayed, key=lambda p: (p.pair.priority, p.pair.key)) if relayed else None

    # --- helpers ------------------------------------------------------------------------------

    def _transmit_from(self, local: Address, remote: Address, data: bytes) -> Transmit:
        if self._relay is not None and local == self._relay.relayed_address:
            return self._relay.send_via_relay(data, remote)
        return Transmit(local, remote, data)

    def _consent_active(self, now: float) -> bool:
        idle = self.config.consent_idle_s
        return idle is None or now - self._last_data < idle

    def _consent_interval(self) -> float:
        jitter = 1 + self.config.consent_jitter * (2 * self._rng.random() - 1)
        return self.config.consent_interval_s * jitter

    def _dead_at(self) -> float:
        return max(self._last_proof, self._consent_started) + self.config.dead_after_s

    def _emit(self, item: Event) -> None:
        self._events.append(item)

    def _refresh_path(self, now: float) -> None:
        path = self.current_path()
        if (path.kind, path.local, path.remote) == (self._path.kind, self._path.local,
                                                    self._path.remote):
            self._path = path
            return
        old, self._path = self._path, path
        self._emit(PathChanged(old, path, now))
        event(log, logging.INFO, "punch.path", node=self.local_node, peer=self.peer_node,
              kind=path.kind.value,
              local=format_address(path.local) if path.local else "-",
              remote=format_address(path.remote) if path.remote else "-",
              generation=self.generation)
