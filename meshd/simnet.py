"""An in-memory UDP internet with simulated NATs, seeded loss, and a virtual clock.

The harness for sans-I/O cores (style habit 7, after nebula's e2e router and trio's FakeNet):
endpoints are callbacks, time only moves when `advance` is called, and `trace` records the flow
it saw, one line per datagram, for a failing test to print.

    net = SimNetwork(seed=1, loss=0.1)
    net.add_nat(SimNat("203.0.113.1", "10.0.0.0/24", mapping=EIM, filtering=APDF))
    net.attach(("198.51.100.1", 3478), lambda data, src, local: server.handle(...))
    run_machine(net, machine)

A `SimNat` follows RFC 4787: mapping behaviour decides when a new public port is used, filtering
behaviour which inbound datagrams reach a mapping. `mapping=None` models a firewall without
translation (inside addresses are public, inbound is still filtered).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from meshd.netcheck.classify import Behaviour
from meshd.udp import Address, Transmit, format_address

Handler = Callable[[bytes, Address, Address], Iterable[Transmit]]
"""An endpoint: (data, source, local address) -> datagrams to send in reply."""

EIM = EIF = Behaviour.ENDPOINT_INDEPENDENT
ADM = ADF = Behaviour.ADDRESS_DEPENDENT
APDM = APDF = Behaviour.ADDRESS_AND_PORT_DEPENDENT


class SimNat:
    """One NAT (or, with `mapping=None`, a filtering firewall) in front of an inside network."""

    def __init__(
        self,
        public_ip: str,
        inside: str,
        *,
        mapping: Behaviour | None,
        filtering: Behaviour,
        hairpin: bool = False,
        preserve_ports: bool = False,
        first_port: int = 40000,
    ) -> None:
        self.public_ip = public_ip
        self.inside = ipaddress.ip_network(inside)
        self.mapping = mapping
        self.filtering = filtering
        self.hairpin = hairpin
        self.preserve_ports = preserve_ports
        self._next_port = first_port
        self._mappings: dict[tuple[object, ...], Address] = {}
        self._reverse: dict[Address, Address] = {}  # external -> internal
        self._permits: set[tuple[Address, object]] = set()  # (external, remote ip or addr)

    def is_inside(self, ip: str) -> bool:
        """`ip` is on the inside network."""
        return ipaddress.ip_address(ip) in self.inside

    def owns(self, ip: str) -> bool:
        """Datagrams to `ip` from outside are this device's to filter (and translate)."""
        return ip == self.public_ip if self.mapping is not None else self.is_inside(ip)

    def outbound(self, source: Address, destination: Address) -> Address:
        """Translate an inside source for `destination` and open the filter towards it."""
        external = source
        if self.mapping is not None:
            key: tuple[object, ...] = {
                EIM: (source,),
                ADM: (source, destination[0]),
                APDM: (source, destination),
            }[self.mapping]
            if key not in self._mappings:
                self._mappings[key] = self._allocate(source[1])
            external = self._mappings[key]
        self._reverse[external] = source
        self._permits.add((external, destination[0]))
        self._permits.add((external, destination))
        return external

    def inbound(self, source: Address, external: Address) -> Address | None:
        """The inside address for a datagram from `source` to `external`, None if filtered."""
        internal = self._reverse.get(external)
        if internal is None:
            return None
        if self.filtering is ADF and (external, source[0]) not in self._permits:
            return None
        if self.filtering is APDF and (external, source) not in self._permits:
            return None
        return internal

    def hairpin_target(self, external: Address) -> Address | None:
        """Where a hairpinned datagram to our own `external` address goes (no filtering)."""
        return self._reverse.get(external) if self.hairpin else None

    def _allocate(self, wanted: int) -> Address:
        used = {port for ip, port in self._reverse}
        if self.preserve_ports and wanted not in used:
            return (self.public_ip, wanted)
        while self._next_port in used:
            self._next_port += 1
        self._next_port += 1
        return (self.public_ip, self._next_port - 1)


@dataclass(order=True)
class _Packet:
    at: float
    seq: int
    source: Address = field(compare=False)
    destination: Address = field(compare=False)
    data: bytes = field(compare=False)
    filtered: bool = field(compare=False)  # passes the destination's NAT filter on arrival


class SimNetwork:
    """Moves datagrams between attached endpoints through `SimNat`s in virtual time."""

    def __init__(
        self, *, seed: int = 0, latency_s: float = 0.01, loss: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        self.now = 0.0
        """Virtual time in seconds."""
        self.latency_s = latency_s
        self.loss = loss
        self.duplicate = duplicate
        self.trace: list[str] = []
        """One line per datagram sent, dropped or delivered."""
        self._rng = random.Random(seed)
        self._nats: list[SimNat] = []
        self._handlers: dict[Address, Handler] = {}
        self._queue: list[_Packet] = []
        self._seq = 0

    def add_nat(self, nat: SimNat) -> SimNat:
        """Put `nat` in front of its inside network."""
        self._nats.append(nat)
        return nat

    def attach(self, address: Address, handler: Handler) -> None:
        """Deliver datagrams for `address` to `handler`."""
        self._handlers[address] = handler

    def send(self, t: Transmit) -> None:
        """Send one datagram now: translate, maybe lose or duplicate it, queue its arrival."""
        nat = next((n for n in self._nats if n.is_inside(t.source[0])), None)
        if nat is not None and nat.is_inside(t.destination[0]):
            self._queue_packet(t.source, t.destination, t.data, filtered=False)  # same LAN
        elif nat is not None and nat.mapping is not None and nat.owns(t.destination[0]):
            target = nat.hairpin_target(t.destination)  # RFC 4787 §6 hairpinning
            if target is None:
                self._log(t.source, t.destination, t.data, "dropped: no hairpin")
                return
            self._queue_packet(nat.outbound(t.source, t.destination), target, t.data,
                               filtered=False)
        else:
            source = nat.outbound(t.source, t.destination) if nat is not None else t.source
            self._queue_packet(source, t.destination, t.data, filtered=True)

    def next_time(self) -> float | None:
        """When the next datagram arrives, if any is in flight."""
        return self._queue[0].at if self._queue else None

    def advance(self, until: float) -> None:
        """Deliver every datagram due by `until`, in order, then set `now` to `until`."""
        while self._queue and self._queue[0].at <= until:
            packet = heapq.heappop(self._queue)
            self.now = packet.at
            self._deliver(packet)
        self.now = max(self.now, until)

    def _queue_packet(self, source: Address, destination: Address, data: bytes, *,
                      filtered: bool) -> None:
        if self._rng.random() < self.loss:
            self._log(source, destination, data, "lost")
            return
        copies = 2 if self._rng.random() < self.duplicate else 1
        for copy in range(copies):
            self._seq += 1
            at = self.now + self.latency_s * (1 + copy)
            heapq.heappush(self._queue, _Packet(at, self._seq, source, destination, data,
                                                filtered))

    def _deliver(self, packet: _Packet) -> None:
        local = packet.destination
        nat = next((n for n in self._nats if n.owns(local[0])), None)
        if packet.filtered and nat is not None:
            inside = nat.inbound(packet.source, local)
            if inside is None:
                self._log(packet.source, local, packet.data, "dropped: filtered")
                return
            local = inside
        handler = self._handlers.get(local)
        if handler is None:
            self._log(packet.source, local, packet.data, "dropped: nobody listens")
            return
        self._log(packet.source, local, packet.data, "delivered")
        for reply in handler(packet.data, packet.source, local):
            self.send(reply)

    def _log(self, source: Address, destination: Address, data: bytes, what: str) -> None:
        self.trace.append(
            f"{self.now:8.3f}  {format_address(source):>22} -> "
            f"{format_address(destination):<22} {len(data):4d} B  {what}"
        )


class Machine(Protocol):
    """The aioquic-style surface `run_machine` drives."""

    def datagrams_to_send(self, now: float) -> list[Transmit]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    @property
    def done(self) -> bool: ...


def run_machine(net: SimNetwork, machine: Machine, *, limit_s: float = 600.0) -> None:
    """Run `machine` (whose endpoints are attached to `net`) until it is done, jumping virtual
    time from event to event. Raises RuntimeError if it stalls or exceeds `limit_s`."""
    deadline = net.now + limit_s
    while not machine.done:
        for t in machine.datagrams_to_send(net.now):
            net.send(t)
        timer = machine.get_timer()
        events = [x for x in (timer, net.next_time()) if x is not None]
        if not events:
            raise RuntimeError("machine is waiting for nothing")
        if min(events) > deadline:
            raise RuntimeError(f"machine not done after {limit_s} s of virtual time")
        net.advance(min(events))
        if timer is not None and net.now >= timer:
            machine.handle_timer(net.now)
