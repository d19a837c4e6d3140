"""Sans-I/O NAT behaviour discovery (RFC 5780 §4), driven by datagrams in and `now`.

Two local sockets. The *mapping* socket runs test I (a Binding request to the server's primary
address), the mapping tests II and III (§4.3) and the hairpin test (§4.5). The *filtering*
socket is fresh and only ever sends to the primary address, so the CHANGE-REQUEST tests of §4.4
see a filter opened towards the primary only (a mapping test sent to the alternate address would
otherwise have opened it).

Everything after test I runs concurrently, so a whole run takes about one give-up period.

    IDLE --start--> BINDING --answered--> PROBING --settled--> DONE
                       \\--unanswered | error--> FAILED

Model: aioquic's QuicConnection. The adapter calls `start(now)`, feeds `receive_datagram`,
sends `datagrams_to_send(now)`, and wakes at `get_timer()` to call `handle_timer(now)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from meshd.stun.codec import (
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    Method,
    OtherAddress,
    StunMessage,
    StunParseError,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.stun.transaction import ClientTransaction, RetransmitPolicy
from meshd.udp import Address, Transmit, format_address


class NetcheckFailed(Exception):
    """The check could not run: the STUN server is unreachable, unknown, or refused test I."""


class Phase(Enum):
    """Where the machine is (see TRANSITIONS)."""

    IDLE = "idle"
    BINDING = "binding"
    PROBING = "probing"
    DONE = "done"
    FAILED = "failed"


TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.IDLE, "start"): Phase.BINDING,
    (Phase.BINDING, "answered"): Phase.PROBING,
    (Phase.BINDING, "unanswered"): Phase.FAILED,
    (Phase.BINDING, "error"): Phase.FAILED,
    (Phase.PROBING, "settled"): Phase.DONE,
}


class Probe(Enum):
    """One request of the discovery procedure."""

    BINDING = "test I"
    MAPPING_ALT_IP = "mapping test II"
    MAPPING_ALT_ADDRESS = "mapping test III"
    FILTERING_CHANGE_IP_PORT = "filtering test II"
    FILTERING_CHANGE_PORT = "filtering test III"
    HAIRPIN = "hairpin test"


class Status(Enum):
    """How a probe ended."""

    ANSWERED = "answered"
    UNANSWERED = "unanswered"
    ERROR = "error"
    MISROUTED = "misrouted"  # only answers from an unexpected address arrived
    CANCELLED = "cancelled"  # the outcome no longer mattered


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe."""

    status: Status
    """How it ended."""
    mapped: Address | None = None
    """XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) of a success response."""
    other_address: Address | None = None
    """OTHER-ADDRESS of a success response."""
    error: ErrorCode | None = None
    """ERROR-CODE of an error response."""
    sent: int = 0
    """Copies of the request sent."""
    misrouted_from: Address | None = None
    """Source of an answer that came from the wrong address."""


@dataclass(frozen=True)
class Observations:
    """What the probes saw, before any classification."""

    server: Address
    """The server's primary address."""
    local: Address
    """The mapping socket's local address."""
    mapped: Address
    """Test I: the mapping socket's public (server-reflexive) address."""
    other_address: Address | None
    """The server's alternate address; None when it does not do RFC 5780."""
    mapped_alt_ip: Address | None
    """Mapping test II (alternate IP, primary port); None when not run or unanswered."""
    mapped_alt_address: Address | None
    """Mapping test III (alternate IP and port); None when not run, moot or unanswered."""
    filtering_change_ip_port: bool | None
    """Filtering test II answered (True) or not (False); None when not run or invalid."""
    filtering_change_port: bool | None
    """Filtering test III answered or not; None when not run, moot or invalid."""
    hairpin: bool | None
    """The hairpin request came back to us; None when not run."""
    ignored: int
    """Datagrams that were garbage or answered nothing we asked."""
    notes: tuple[str, ...]
    """Why something is unknown, in operator words."""


@dataclass
class _Pending:
    probe: Probe
    transaction: ClientTransaction
    expected_from: Address | None  # None for the hairpin probe
    misrouted_from: Address | None = None


def _random_transaction_id() -> bytes:
    return os.urandom(12)


class NetcheckMachine:
    """RFC 5780 §4 behaviour discovery against one server, from two local sockets."""

    def __init__(
        self,
        server: Address,
        mapping_local: Address,
        filtering_local: Address,
        *,
        policy: RetransmitPolicy | None = None,
        new_transaction_id: Callable[[], bytes] = _random_transaction_id,
    ) -> None:
        if mapping_local == filtering_local:
            raise ValueError("the mapping and filtering sockets must differ")
        self.server = server
        self.mapping_local = mapping_local
        self.filtering_local = filtering_local
        self.policy = policy or RetransmitPolicy()
        self.phase = Phase.IDLE
        self.ignored = 0
        """Garbage and unexpected datagrams received."""
        self.late = 0
        """Duplicate or late answers to probes already settled or cancelled."""
        self.results: dict[Probe, ProbeResult] = {}
        """Outcome per finished probe."""
        self._new_transaction_id = new_transaction_id
        self._pending: dict[bytes, _Pending] = {}
        self._finished: set[bytes] = set()
        self._failure: str | None = None
        self._notes: list[str] = []

    # --- inputs -------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin with test I: a Binding request from the mapping socket to the primary."""
        self._fire("start")
        self._send(Probe.BINDING, self.mapping_local, self.server, now)

    def receive_datagram(self, data: bytes, addr: Address, now: float, *, local: Address) -> None:
        """A datagram from `addr` arrived on the local socket `local`."""
        try:
            message = parse_message(data)
        except StunParseError:
            self.ignored += 1
            return
        pending = self._pending.get(message.transaction_id)
        if pending is None and message.transaction_id in self._finished:
            self.late += 1
            return
        if pending is None or pending.transaction.source != local:
            self.ignored += 1
            return
        if pending.probe is Probe.HAIRPIN:
            # §4.5: our own request, hairpinned by the NAT back to the mapping socket.
            if message.message_class is MessageClass.REQUEST:
                self._settle(pending, ProbeResult(Status.ANSWERED), now)
            else:
                self.ignored += 1
            return
        if message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR):
            self.ignored += 1
            return
        if addr != pending.expected_from:
            pending.misrouted_from = addr
            self.ignored += 1
            return
        if message.message_class is MessageClass.ERROR:
            error = message.get(ErrorCode) or ErrorCode(500, "no ERROR-CODE")
            self._settle(pending, ProbeResult(Status.ERROR, error=error), now)
            return
        mapped = _mapped(message)
        if mapped is None:
            self.ignored += 1
            return
        other = message.get(OtherAddress)
        result = ProbeResult(
            Status.ANSWERED, mapped=mapped, other_address=other.address if other else None
        )
        self._settle(pending, result, now)

    def handle_timer(self, now: float) -> None:
        """Give up on probes whose time is over (retransmissions go out via
        `datagrams_to_send`)."""
        for txid, pending in list(self._pending.items()):
            if txid in self._pending and pending.transaction.expired(now):
                misrouted = pending.misrouted_from is not None
                status = Status.MISROUTED if misrouted else Status.UNANSWERED
                self._settle(pending, ProbeResult(status, misrouted_from=pending.misrouted_from),
                             now)

    # --- outputs ------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """Requests and retransmissions due at `now`."""
        out: list[Transmit] = []
        for pending in self._pending.values():
            out += pending.transaction.datagrams_to_send(now)
        return out

    def get_timer(self) -> float | None:
        """When to call `handle_timer` next; None when nothing is in flight."""
        return min((p.transaction.get_timer() for p in self._pending.values()), default=None)

    @property
    def done(self) -> bool:
        """True when the run is over, successfully or not."""
        return self.phase in (Phase.DONE, Phase.FAILED)

    def observations(self) -> Observations:
        """What was seen. Raises `NetcheckFailed` when test I failed."""
        if self.phase is Phase.FAILED:
            raise NetcheckFailed(self._failure)
        if self.phase is not Phase.DONE:
            raise RuntimeError(f"netcheck is not finished (phase {self.phase.value})")
        binding = self.results[Probe.BINDING]
        assert binding.mapped is not None
        notes = list(self._notes)
        if self.ignored:
            notes.append(f"ignored {self.ignored} unexpected datagram(s)")
        return Observations(
            server=self.server,
            local=self.mapping_local,
            mapped=binding.mapped,
            other_address=self._other_address(),
            mapped_alt_ip=self._mapped_by(Probe.MAPPING_ALT_IP),
            mapped_alt_address=self._mapped_by(Probe.MAPPING_ALT_ADDRESS),
            filtering_change_ip_port=self._answered(Probe.FILTERING_CHANGE_IP_PORT),
            filtering_change_port=self._answered(Probe.FILTERING_CHANGE_PORT),
            hairpin=self._answered(Probe.HAIRPIN),
            ignored=self.ignored,
            notes=tuple(notes),
        )

    # --- internals ----------------------------------------------------------------------------

    def _fire(self, trigger: str) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, trigger)]
        except KeyError:
            raise RuntimeError(f"netcheck: {trigger!r} is invalid in phase {self.phase}") from None

    def _send(
        self,
        probe: Probe,
        source: Address,
        destination: Address,
        now: float,
        *,
        change: ChangeRequest | None = None,
        expected_from: Address | None = None,
    ) -> None:
        txid = self._new_transaction_id()
        attributes = (change,) if change else ()
        request = StunMessage(
            MessageClass.REQUEST, Method.BINDING, txid, attributes, fingerprint=True
        )
        transaction = ClientTransaction(
            txid, encode_message(request), source, destination, self.policy, now
        )
        expected = None if probe is Probe.HAIRPIN else (expected_from or destination)
        self._pending[txid] = _Pending(probe, transaction, expected)

    def _settle(self, pending: _Pending, result: ProbeResult, now: float) -> None:
        del self._pending[pending.transaction.transaction_id]
        self._finished.add(pending.transaction.transaction_id)
        sent = pending.transaction.sent
        self.results[pending.probe] = replace(result, sent=sent)
        if pending.probe is Probe.BINDING:
            self._binding_settled(result, sent, now)
            return
        self._note(pending.probe, self.results[pending.probe], pending.transaction.destination)
        self._cancel_moot()
        if self.phase is Phase.PROBING and not self._pending:
            self._fire("settled")

    def _binding_settled(self, result: ProbeResult, sent: int, now: float) -> None:
        server = format_address(self.server)
        if result.status is Status.ERROR:
            assert result.error is not None
            self._failure = (
                f"STUN server {server} answered error {result.error.code} ({result.error.reason})"
            )
            self._fire("error")
            return
        if result.status is not Status.ANSWERED:
            requests = "request" if sent == 1 else "requests"
            self._failure = (
                f"STUN server {server} did not answer "
                f"({sent} {requests} over {self.policy.give_up_s:g} s)"
            )
            if result.misrouted_from is not None:
                self._failure += f"; answers came from {format_address(result.misrouted_from)}"
            self._fire("unanswered")
            return
        self._fire("answered")
        assert result.mapped is not None
        self._send(Probe.HAIRPIN, self.mapping_local, result.mapped, now)
        other = self._other_address()
        if other is None:
            self._notes.append(
                f"STUN server {server} sent no usable OTHER-ADDRESS (no RFC 5780 support):"
                " mapping and filtering not tested"
            )
            return
        alt_ip = (other[0], self.server[1])
        self._send(Probe.MAPPING_ALT_IP, self.mapping_local, alt_ip, now)
        self._send(Probe.MAPPING_ALT_ADDRESS, self.mapping_local, other, now)
        self._send(
            Probe.FILTERING_CHANGE_IP_PORT, self.filtering_local, self.server, now,
            change=ChangeRequest(change_ip=True, change_port=True), expected_from=other,
        )
        self._send(
            Probe.FILTERING_CHANGE_PORT, self.filtering_local, self.server, now,
            change=ChangeRequest(change_ip=False, change_port=True),
            expected_from=(self.server[0], other[1]),
        )

    def _other_address(self) -> Address | None:
        other = self.results[Probe.BINDING].other_address
        if other is None or other[0] == self.server[0] or other[1] == self.server[1]:
            return None  # RFC 5780 §7.4: must differ from the primary in IP and port
        if (":" in other[0]) != (":" in self.server[0]):
            return None
        return other

    def _cancel_moot(self) -> None:
        alt_ip = self.results.get(Probe.MAPPING_ALT_IP)
        binding = self.results[Probe.BINDING]
        if alt_ip is not None and alt_ip.mapped is not None and alt_ip.mapped == binding.mapped:
            self._cancel(Probe.MAPPING_ALT_ADDRESS)  # endpoint-independent already (§4.3)
        change_both = self.results.get(Probe.FILTERING_CHANGE_IP_PORT)
        if change_both is not None and change_both.status is Status.ANSWERED:
            self._cancel(Probe.FILTERING_CHANGE_PORT)  # endpoint-independent already (§4.4)

    def _cancel(self, probe: Probe) -> None:
        for txid, pending in list(self._pending.items()):
            if pending.probe is probe:
                del self._pending[txid]
                self._finished.add(txid)
                self.results[probe] = ProbeResult(Status.CANCELLED, sent=pending.transaction.sent)

    def _note(self, probe: Probe, result: ProbeResult, destination: Address) -> None:
        if probe is Probe.HAIRPIN:
            return  # an unanswered hairpin probe is the answer "no"
        to = format_address(destination)
        if result.status is Status.ERROR and result.error is not None:
            self._notes.append(f"{probe.value} to {to}: error {result.error.code} "
                               f"({result.error.reason})")
        elif result.status is Status.MISROUTED and result.misrouted_from is not None:
            self._notes.append(
                f"{probe.value} to {to}: answered from {format_address(result.misrouted_from)},"
                " not the address asked for; the server may ignore CHANGE-REQUEST"
            )
        elif result.status is Status.UNANSWERED and probe in _MAPPING_PROBES:
            self._notes.append(f"{probe.value} to {to}: no answer")

    def _mapped_by(self, probe: Probe) -> Address | None:
        result = self.results.get(probe)
        return result.mapped if result is not None else None

    def _answered(self, probe: Probe) -> bool | None:
        result = self.results.get(probe)
        if result is None or result.status not in (Status.ANSWERED, Status.UNANSWERED):
            return None
        return result.status is Status.ANSWERED


_MAPPING_PROBES = (Probe.MAPPING_ALT_IP, Probe.MAPPING_ALT_ADDRESS)


def _mapped(message: StunMessage) -> Address | None:
    xor = message.get(XorMappedAddress)
    if xor is not None:
        return xor.address
    plain = message.get(MappedAddress)
    return plain.address if plain is not None else None
