"""STUN client transactions over UDP: the retransmission schedule of RFC 5389 §7.2.1.

A request is sent at `start`, then again after RTO, 2·RTO, 4·RTO, ... until `transmissions`
copies are out; the transaction gives up `give_up_s` after the first send. RFC 5389's defaults
(RTO 0.5 s, 7 copies, 39.5 s) suit a phone waking up; meshd's are shorter because an operator is
waiting at a prompt and a lost NAT probe is a result, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.udp import Address, Transmit


@dataclass(frozen=True)
class RetransmitPolicy:
    """How often and how long a STUN request is retried."""

    initial_rto_s: float = 0.25
    """First retransmission timeout; doubles after every copy (RFC 5389 §7.2.1)."""
    transmissions: int = 4
    """Copies sent at most (RFC 5389's Rc)."""
    give_up_s: float = 2.5
    """Time from the first copy until the transaction counts as unanswered."""

    def __post_init__(self) -> None:
        if self.initial_rto_s <= 0 or self.give_up_s <= 0:
            raise ValueError("initialRtoS and giveUpS must be positive")
        if self.transmissions < 1:
            raise ValueError("transmissions must be at least 1")

    def send_times(self) -> list[float]:
        """Offsets from the first copy at which copies go out (within `give_up_s`)."""
        times = [self.initial_rto_s * (2**k - 1) for k in range(self.transmissions)]
        return [t for t in times if t < self.give_up_s]


class ClientTransaction:
    """One request in flight: when to (re)send it and when to give up. Sans-I/O."""

    def __init__(
        self,
        transaction_id: bytes,
        request: bytes,
        source: Address,
        destination: Address,
        policy: RetransmitPolicy,
        now: float,
    ) -> None:
        self.transaction_id = transaction_id
        self.request = request
        self.source = source
        self.destination = destination
        self.started = now
        self.deadline = now + policy.give_up_s
        """When the transaction counts as unanswered."""
        self.sent = 0
        """Copies sent so far."""
        self._schedule = [now + t for t in policy.send_times()]
        self._next = 0  # index of the next scheduled copy

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """The copy due at `now`, if any; a late caller gets one copy, not a burst."""
        due = 0
        while self._next < len(self._schedule) and self._schedule[self._next] <= now:
            self._next += 1
            due += 1
        if not due or self.expired(now):
            return []
        self.sent += 1
        return [Transmit(self.source, self.destination, self.request)]

    def get_timer(self) -> float:
        """The next retransmission or the give-up time, whichever is first."""
        if self._next < len(self._schedule):
            return min(self._schedule[self._next], self.deadline)
        return self.deadline

    def expired(self, now: float) -> bool:
        """True once `now` reaches the give-up time."""
        return now >= self.deadline
