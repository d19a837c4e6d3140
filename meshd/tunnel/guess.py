"""Birthday-paradox port guessing: symmetric × port-restricted pairs go direct (issue 5 item 7).

A symmetric NAT (APDM) maps a new public port per destination, so the port-restricted (EIM +
APDF) peer cannot learn the port the symmetric side will use towards it, and its own filter
drops the symmetric side's checks from ports it never sent to. Both sides relay after the
normal round of checks. The guess phase opens the filters on both NATs by numbers:

- *hard side* (symmetric): K sockets of a node-wide pool (`GuessPool`), each sending a Binding
  indication to the easy side's server-reflexive address. That makes K mappings on the
  symmetric NAT, each of which lets the easy side's address in (APDF permits the destination
  it was opened towards).
- *easy side* (port-restricted): once told the mappings exist, authenticated Binding requests
  (real ICE checks) from its normal socket to the hard side's reflexive IP at N distinct random
  ports. Each one also opens the easy side's own filter for that port. With K mappings among
  the ~64 k ports, P(no hit) = (1 − K/64512)^N ≈ e^(−KN/64512): e^-8 for K=256, N=2048.
- a probe that hits pool socket x is answered from x; x's triggered check reaches the easy side
  through the filter the probe opened; regular nomination selects the pair, and the data plane
  sends from x (`Transmit.source`).

Who starts: the hard side, when a round of checks ends relayed (or later, while relayed, when
its backoff allows), at most one phase per round. It signals the peer (`{"kind": "guess"}`)
once its indications left, so the easy side's probes never race the mappings, whatever the
skew between the two sides' rounds. The easy side rate-limits phases it is asked for.

This module holds the tunables, the NAT-class rule, the probe port draw, the typed events and the
pool's bookkeeping; `PathMachine` runs the per-peer phase, `MeshNode` the pool, the adapter
(`meshd.tunnel.service`) opens and closes the sockets. Classes come from
`meshd.tunnel.natprobe` (`unknown` never guesses).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from meshd.netcheck.classify import NatType
from meshd.udp import Address

GUESS_SIGNAL_KIND = "guess"
"""`kind` of the signal with which the hard side tells the easy side its mappings exist."""


class GuessSide(Enum):
    """This node's part in a guess phase with one peer."""

    HARD = "hard"
    """Behind the symmetric NAT: opens the pool's mappings, answers the probe that hits."""
    EASY = "easy"
    """Behind the port-restricted NAT: sends the probes."""


@dataclass(frozen=True)
class PortGuessConfig:
    """Tunables of port guessing (tests shrink them; the agent sets enabled/sockets/probes)."""

    enabled: bool = True
    """Guess at all (symmetric × port-restricted pairs only)."""
    sockets: int = 256
    """K: pool sockets on the hard side (node-wide, shared by every peer it guesses with)."""
    probes: int = 2048
    """N: probes per phase on the easy side at most (stop at the first hit)."""
    probe_batch: int = 16
    """Probes sent together every `probe_interval_s`."""
    probe_interval_s: float = 0.01
    """Pacing of the probe batches (1600 probes/s with the defaults)."""
    lead_s: float = 0.05
    """Easy side: first probe this long after the hard side's signal."""
    easy_window_s: float = 3.0
    """Easy side: the phase (probes and their answers) ends this long after it started."""
    hard_window_s: float = 5.0
    """Hard side: the mappings are kept (and answered) this long after they were opened."""
    refresh_s: float = 10.0
    """Hard side: indications are re-sent this often while the phase lasts (conntrack forgets
    unreplied UDP after 30 s)."""
    backoff_initial_s: float = 30.0
    """Hard side: the next phase with a peer waits at least this long after one started."""
    backoff_max_s: float = 480.0
    """Cap of that wait (it doubles per phase without a hit)."""
    min_port: int = 1024
    """Lowest port probed."""
    max_port: int = 65535
    """Highest port probed."""

    def __post_init__(self) -> None:
        if not 1 <= self.sockets <= 65535:
            raise ValueError(f"sockets: {self.sockets} out of range (1..65535)")
        if not 1 <= self.probes <= 65535:
            raise ValueError(f"probes: {self.probes} out of range (1..65535)")
        if self.probe_batch < 1:
            raise ValueError(f"probe_batch must be at least 1, got {self.probe_batch}")
        for name, value in (("probe_interval_s", self.probe_interval_s),
                            ("easy_window_s", self.easy_window_s),
                            ("hard_window_s", self.hard_window_s),
                            ("refresh_s", self.refresh_s),
                            ("backoff_initial_s", self.backoff_initial_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.lead_s < 0:
            raise ValueError(f"lead_s must not be negative, got {self.lead_s}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        if not 1 <= self.min_port <= self.max_port <= 65535:
            raise ValueError(f"min_port..max_port: {self.min_port}..{self.max_port} out of "
                             "range (1 <= min_port <= max_port <= 65535)")


def guess_side(ours: str, theirs: str) -> GuessSide | None:
    """Our side of a guess with a peer, from both NAT classes (`NatType` values); None when the
    pair needs none (it goes direct anyway, or cannot: symmetric × symmetric) or a class is
    unknown."""
    if ours == NatType.SYMMETRIC and theirs == NatType.PORT_RESTRICTED:
        return GuessSide.HARD
    if ours == NatType.PORT_RESTRICTED and theirs == NatType.SYMMETRIC:
        return GuessSide.EASY
    return None


def probe_ports(rng: random.Random, count: int, low: int, high: int,
                exclude: frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct random ports in low..high (fewer if the range is smaller), none of
    `exclude` (the hard side's reflexive port: its mapping only lets the STUN server in)."""
    span = range(low, high + 1)
    wanted = min(count + len(exclude), len(span))
    return [p for p in rng.sample(span, wanted) if p not in exclude][:count]


# --- events (PathMachine) -----------------------------------------------------------------------


@dataclass(frozen=True)
class GuessStarted:
    """A guess phase with the peer started."""

    side: GuessSide
    """Our part in it."""
    now: float
    """When."""


@dataclass(frozen=True)
class GuessReady:
    """Hard side: the pool's indications to the peer left; tell the peer to probe now."""

    sockets: int
    """Pool sockets the indications left from."""
    now: float
    """When."""


@dataclass(frozen=True)
class GuessEnded:
    """A guess phase ended."""

    side: GuessSide
    """Our part in it."""
    hit: bool
    """A probe reached a pool socket (a guessed pair succeeded)."""
    probes: int
    """Probes this side sent in the phase (easy side; 0 on the hard side)."""
    now: float
    """When."""


# --- the node-wide pool (MeshNode) ---------------------------------------------------------------


@dataclass(frozen=True)
class GuessSocketsWanted:
    """The adapter should open `count` UDP sockets on the host address (port 0) and report
    them with `MeshNode.guess_sockets_opened`."""

    count: int
    """How many."""


@dataclass(frozen=True)
class GuessSocketsReleased:
    """The adapter should close these pool sockets (no selected path uses them, no peer is
    guessing)."""

    addresses: tuple[Address, ...]
    """Their local addresses."""


class GuessPool:
    """Which pool sockets a node holds and who needs them (bookkeeping only, no sockets)."""

    def __init__(self, size: int) -> None:
        self.size = size
        """K, the sockets asked for when the pool opens."""
        self.open: frozenset[Address] = frozenset()
        """The pool sockets the adapter reported open."""
        self.users: set[str] = set()
        """Peers in a hard-side phase."""
        self.requested = False
        """Sockets were asked for and not reported yet."""
        self.garbage = 0
        """Datagrams on pool sockets that nobody claimed."""

    def acquire(self, peer: str) -> int:
        """`peer` starts a phase: how many sockets to ask the adapter for now (0: none). The
        pool is topped up to K: sockets kept for guessed paths (`collect`) stay and serve the
        new phase too, but alone they would give it a K of one or two (a few % hit chance)."""
        self.users.add(peer)
        if self.requested or len(self.open) >= self.size:
            return 0
        self.requested = True
        return self.size - len(self.open)

    def opened(self, addresses: tuple[Address, ...]) -> None:
        """The adapter opened these (it may open fewer than asked, or none)."""
        self.requested = False
        self.open = self.open | frozenset(addresses)

    def release(self, peer: str) -> None:
        """`peer`'s phase ended."""
        self.users.discard(peer)

    def collect(self, in_use: set[Address]) -> tuple[Address, ...]:
        """Once nobody guesses: the sockets no selected path uses (forgotten here; the
        adapter closes them)."""
        if self.users or self.requested:
            return ()
        idle = tuple(sorted(a for a in self.open if a not in in_use))
        if idle:
            self.open = self.open - frozenset(idle)
        return idle
