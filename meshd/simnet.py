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
translation (inside addresses are public, inbound is still filtered). Optional extras: a UDP
mapping timeout (`timeout_s`, like conntrack's), `flush()` (like `conntrack -F`), NATs nested in
another NAT's inside network (double NAT), and `Transmit.ttl` (a datagram whose TTL runs out
after our own NAT(s) opens their mappings but never reaches the far side).
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
        timeout_s: float | None = None,
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
        self.timeout_s = timeout_s
        """Idle time after which a mapping (and its filter permits) is forgotten; None: never."""
        self._used: dict[Address, float] = {}  # external -> last time a datagram used it

    def is_inside(self, ip: str) -> bool:
        """`ip` is on the inside network."""
        return ipaddress.ip_address(ip) in self.inside

    def owns(self, ip: str) -> bool:
        """Datagrams to `ip` from outside are this device's to filter (and translate)."""
        return ip == self.public_ip if self.mapping is not None else self.is_inside(ip)

    def outbound(self, source: Address, destination: Address, now: float = 0.0) -> Address:
        """Translate an inside source for `destination` and open the filter towards it."""
        self._expire(now)
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
        self._used[external] = now
        return external

    def inbound(self, source: Address, external: Address, now: float = 0.0) -> Address | None:
        """The inside address for a datagram from `source` to `external`, None if filtered."""
        self._expire(now)
        internal = self._reverse.get(external)
        if internal is None:
            return None
        if self.filtering is ADF and (external, source[0]) not in self._permits:
            return None
        if self.filtering is APDF and (external, source) not in self._permits:
            return None
        self._used[external] = now
        return internal

    def hairpin_target(self, external: Address, now: float = 0.0) -> Address | None:
        """Where a hairpinned datagram to our own `external` address goes (no filtering)."""
        self._expire(now)
        return self._reverse.get(external) if self.hairpin else None

    def flush(self) -> None:
        """Forget every mapping and filter permit (`conntrack -F`). New mappings get new ports
        unless `preserve_ports`."""
        self._mappings.clear()
        self._reverse.clear()
        self._permits.clear()
        self._used.clear()

    def _expire(self, now: float) -> None:
        if self.timeout_s is None:
            return
        stale = {e for e, used in self._used.items() if now - used >= self.timeout_s}
        if not stale:
            return
        self._mappings = {k: e for k, e in self._mappings.items() if e not in stale}
        self._reverse = {e: i for e, i in self._reverse.items() if e not in stale}
        self._permits = {p for p in self._permits if p[0] not in stale}
        for external in stale:
            del self._used[external]

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
        duplicate: float = 0.0, internet_hops: int = 1,
    ) -> None:
        self.now = 0.0
        """Virtual time in seconds."""
        self.latency_s = latency_s
        self.loss = loss
        self.duplicate = duplicate
        self.internet_hops = internet_hops
        """Routers between the outermost NATs: a datagram needs a TTL above this (after its own
        NATs took one each) to cross the internet."""
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
        self._route(t.source, t.destination, t.data, t.ttl)

    def _route(self, source: Address, destination: Address, data: bytes,
               ttl: int | None) -> None:
        nat = next((n for n in self._nats if n.is_inside(source[0])), None)
        if nat is not None and nat.is_inside(destination[0]):
            # Same LAN; filtered only when the destination is another NAT's public side.
            guarded = any(n is not nat and n.mapping is not None and n.owns(destination[0])
                          for n in self._nats)
            self._queue_packet(source, destination, data, filtered=guarded)
            return
        if nat is not None and ttl is not None:
            if ttl <= 1:  # the NAT router would have to forward it: expired, no mapping made
                self._log(source, destination, data, "expired: ttl")
                return
            ttl -= 1
        if nat is not None and nat.mapping is not None and nat.owns(destination[0]):
            target = nat.hairpin_target(destination, self.now)  # RFC 4787 §6 hairpinning
            if target is None:
                self._log(source, destination, data, "dropped: no hairpin")
                return
            self._queue_packet(nat.outbound(source, destination, self.now), target, data,
                               filtered=False)
            return
        if nat is not None:
            source = nat.outbound(source, destination, self.now)
            if any(n is not nat and n.is_inside(source[0]) for n in self._nats):
                self._route(source, destination, data, ttl)  # double NAT: the next one out
                return
        if any(n.mapping is not None and n.is_inside(destination[0]) for n in self._nats):
            self._log(source, destination, data, "dropped: private address, not routed")
            return
        if ttl is not None and ttl <= self.internet_hops:
            self._log(source, destination, data, "expired: ttl")
            return
        self._queue_packet(source, destination, data, filtered=True)

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
        passed: list[SimNat] = []  # outer NAT first, then any NAT nested inside it
        while packet.filtered:
            nat = next((n for n in self._nats if n.owns(local[0]) and n not in passed), None)
            if nat is None:
                break
            inside = nat.inbound(packet.source, local, self.now)
            if inside is None:
                self._log(packet.source, local, packet.data, "dropped: filtered")
                return
            passed.append(nat)
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
