"""Sans-I/O load balancing over the catalog's Services (reference: docs/reference/meshd-proxy.md).

The proxy asks `LoadBalancer.pick(service, port, client_ip, now)` for an ordered list of
candidate backends, dials them in order, and reports back: `report_success` (records session
affinity / hash stickiness and clears the backend's health record) or `report_failure` (passive
health: the backend is ejected for a backoff period). No sockets, no clocks: `now` is a
parameter, randomness is an injectable `random.Random`.

Policies, per Service port:

- `round-robin` (default): a rotation over the ready backends sorted by address. The cursor is
  the address of the last backend picked, not an index, so swapping in a new endpoint table
  keeps the rotation where it was for the backends that survive.
- `random`: a uniform sample without replacement.
- `consistent-hash`: a hash ring with `virtualNodes` points per backend, keyed by client IP.
  Removing other backends never moves a client; adding backends would move the clients whose
  ring arc the newcomer takes, so a bounded, expiring memory (`hashStickyS`) keeps a client on
  the backend it last used while that backend is still there.
- `sessionAffinity: ClientIP` (any policy): the backend a client last connected to is tried first
  while it is in the table, healthy, and the client came back within the Service's timeout
  (sliding, as kube-proxy's `recent` match does). The table is an LRU with a size bound.

Passive health: a failed dial ejects the backend for `ejectionBaseS`, multiplied by
`ejectionMultiplier` on every consecutive failure up to `ejectionMaxS`. When the period is over
the backend is offered to one caller again (a re-probe; others skip it for `probeTimeoutS`); a
success forgets its history, a failure ejects it for longer. When every backend is ejected the
least recently ejected come first rather than none at all.

Backends are identified by (node, IP, port): pod IPs overlap between edge nodes (every Docker
bridge is 172.17.0.0/16), so the IP alone does not name a pod.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Iterable

from meshd.catalog import Endpoint, LbPolicy, Service, ServicePort

BackendKey = tuple[str, str, int]
"""(node or "", IP, port): what names one backend across catalog swaps."""

PickerKey = tuple[str, int, str]
"""(Service "namespace/name", Service port, protocol): one load-balancing table."""


@dataclasses.dataclass(frozen=True)
class LbConfig:
    """`proxy.lb:` — load-balancing and passive-health tunables."""

    max_candidates: int = 3
    """Backends returned per pick: the first is dialed, the others are tried in order if it
    fails."""
    ejection_base_s: float = 1.0
    """Seconds a backend is ejected after its first failed dial."""
    ejection_multiplier: float = 2.0
    """Factor applied to the ejection period on every consecutive failure."""
    ejection_max_s: float = 30.0
    """Cap of the ejection period."""
    probe_timeout_s: float = 2.0
    """After an ejection ends, one caller re-probes the backend; others skip it this long."""
    virtual_nodes: int = 64
    """Points per backend on the consistent-hash ring."""
    hash_sticky_s: float = 3600.0
    """Consistent hash: seconds a client stays on the backend it used while that backend
    lasts, even if a newly added backend takes over its arc of the ring (0: ring only)."""
    affinity_max_entries: int = 65536
    """Bound of the client tables (session affinity and hash stickiness, each)."""
    health_max_entries: int = 65536
    """Bound of the health table (backends with a failure on record)."""

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ValueError(f"maxCandidates: expected at least 1, got {self.max_candidates}")
        if not 0 < self.ejection_base_s <= self.ejection_max_s:
            raise ValueError("ejectionBaseS: expected 0 < ejectionBaseS <= ejectionMaxS")
        if self.ejection_multiplier < 1:
            raise ValueError("ejectionMultiplier: expected at least 1")
        if self.probe_timeout_s <= 0:
            raise ValueError("probeTimeoutS: expected a positive number")
        if not 1 <= self.virtual_nodes <= 1024:
            raise ValueError(f"virtualNodes: expected 1..1024, got {self.virtual_nodes}")
        if self.hash_sticky_s < 0:
            raise ValueError("hashStickyS: expected 0 or more")
        for name, value in (("affinityMaxEntries", self.affinity_max_entries),
                            ("healthMaxEntries", self.health_max_entries)):
            if value < 1:
                raise ValueError(f"{name}: expected at least 1, got {value}")

    def ejection_period(self, failures: int) -> float:
        """Seconds of ejection after `failures` consecutive failed dials (failures >= 1)."""
        period = self.ejection_base_s * self.ejection_multiplier ** min(failures - 1, 64)
        return min(period, self.ejection_max_s)


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """One dialable backend of a Service port."""

    ip: str
    """The endpoint's (pod's) IP."""
    port: int
    """The backend port serving the Service port."""
    endpoint: Endpoint
    """The endpoint from the catalog (node, target pod) for the dialer."""
    key: BackendKey
    """(node or "", ip, port): identity across catalog swaps and in the health table."""


@dataclasses.dataclass(slots=True)
class _Health:
    failures: int  # consecutive failed dials
    ejected_at: float  # when the current/last ejection began
    until: float  # end of the current ejection
    probing_until: float = 0.0  # a re-probe is under way until then


@dataclasses.dataclass(slots=True)
class _Sticky:
    backend: BackendKey
    last: float  # last successful connection
    timeout: float  # seconds of validity after `last`


class _StickyTable:
    """client → backend, LRU-ordered by last use, bounded, entries expiring."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[PickerKey, str], _Sticky] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[PickerKey, str], now: float) -> BackendKey | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry.last > entry.timeout:
            del self._entries[key]
            return None
        return entry.backend

    def put(self, key: tuple[PickerKey, str], backend: BackendKey, now: float,
            timeout: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Sticky(backend, now, timeout)
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        else:
            entry.backend, entry.last, entry.timeout = backend, now, timeout
            self._entries.move_to_end(key)

    def expire(self, now: float) -> int:
        """Drop entries from the least recently used end while they are expired."""
        dropped = 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last <= entry.timeout:
                break
            del self._entries[key]
            dropped += 1
        return dropped

    def services(self) -> set[str]:
        """The Service keys with entries."""
        return {k[0][0] for k in self._entries}

    def drop_service(self, service_key: str) -> None:
        for key in [k for k in self._entries if k[0][0] == service_key]:
            del self._entries[key]


def _hash64(text: str) -> int:
    """A stable 64-bit hash (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _order_key(backend: Backend) -> tuple[int, int, str]:
    try:
        ip = int(ipaddress.ip_address(backend.ip))
    except ValueError:
        ip = 0
    return (ip, backend.port, backend.key[0])


class _Picker:
    """The state of one Service port: its backends as of the last table, cursor, ring."""

    __slots__ = ("backends", "by_key", "cursor", "order", "ring_backends", "ring_hashes",
                 "source")

    def __init__(self) -> None:
        self.source: tuple[Endpoint, ...] | None = None
        self.backends: list[Backend] = []
        self.by_key: dict[BackendKey, Backend] = {}
        self.order: list[tuple[int, int, str]] = []
        self.cursor: tuple[int, int, str] | None = None  # order key of the last pick
        self.ring_hashes: list[int] = []
        self.ring_backends: list[Backend] = []

    def refresh(self, endpoints: tuple[Endpoint, ...], port: ServicePort) -> None:
        """Adopt a new endpoint table (cheap when it is the same object as last time)."""
        if endpoints is self.source:
            return
        if self.source is not None and endpoints == self.source:
            self.source = endpoints
            return
        self.source = endpoints
        backends = []
        seen: set[BackendKey] = set()
        for ep in endpoints:
            if not ep.ready:
                continue
            number = ep.port_for(port)
            if number is None:
                continue
            key = (ep.node or "", ep.ip, number)
            if key in seen:
                continue
            seen.add(key)
            backends.append(Backend(ep.ip, number, ep, key))
        backends.sort(key=_order_key)
        self.backends = backends
        self.by_key = {b.key: b for b in backends}
        self.order = [_order_key(b) for b in backends]
        self.ring_hashes = []
        self.ring_backends = []

    def ring(self, virtual_nodes: int) -> tuple[list[int], list[Backend]]:
        if not self.ring_hashes and self.backends:
            points = sorted(
                (_hash64(f"{b.key[0]}/{b.ip}:{b.port}#{i}"), n)
                for n, b in enumerate(self.backends) for i in range(virtual_nodes))
            self.ring_hashes = [h for h, _ in points]
            self.ring_backends = [self.backends[n] for _, n in points]
        return self.ring_hashes, self.ring_backends


class LoadBalancer:
    """Per-Service-port pickers, session affinity and passive health for one proxy."""

    def __init__(self, config: LbConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or LbConfig()
        self._rng = rng or random.Random()
        self._pickers: dict[PickerKey, _Picker] = {}
        self._health: OrderedDict[BackendKey, _Health] = OrderedDict()
        self._affinity = _StickyTable(self.config.affinity_max_entries)
        self._hash_memory = _StickyTable(self.config.affinity_max_entries)

    # -- picking -------------------------------------------------------------------------

    def backends(self, service: Service, port: ServicePort) -> list[Backend]:
        """The ready backends of `service`'s `port`, sorted by address (for status output)."""
        return list(self._picker(service, port).backends)

    def pick(self, service: Service, port: ServicePort, client_ip: str,
             now: float) -> list[Backend]:
        """Up to `maxCandidates` backends to dial, in order; empty when there are none."""
        picker = self._picker(service, port)
        if not picker.backends:
            return []
        limit = self.config.max_candidates
        first: Backend | None = None
        pkey: PickerKey = (service.key, port.port, port.protocol)
        if service.session_affinity_timeout_s is not None:
            first = self._remembered(self._affinity, picker, (pkey, client_ip), now)
        if first is None and service.lb_policy == "consistent-hash" and self.config.hash_sticky_s:
            first = self._remembered(self._hash_memory, picker, (pkey, client_ip), now)
        policy: LbPolicy = service.lb_policy
        if policy == "random":
            out = self._random(picker, now, limit, first)
        elif policy == "consistent-hash":
            out = self._hashed(picker, client_ip, now, limit, first)
        else:
            out = self._round_robin(picker, now, limit, first)
        if not out:
            out = self._least_recently_ejected(picker, limit)
        for backend in out:
            health = self._health.get(backend.key)
            if health is not None and health.until <= now:
                health.probing_until = now + self.config.probe_timeout_s
        return out

    def _picker(self, service: Service, port: ServicePort) -> _Picker:
        key = (service.key, port.port, port.protocol)
        picker = self._pickers.get(key)
        if picker is None:
            picker = self._pickers[key] = _Picker()
        picker.refresh(service.endpoints, port)
        return picker

    def _usable(self, key: BackendKey, now: float) -> bool:
        health = self._health.get(key)
        if health is None:
            return True
        return health.until <= now and health.probing_until <= now

    def _remembered(self, table: _StickyTable, picker: _Picker, key: tuple[PickerKey, str],
                    now: float) -> Backend | None:
        backend_key = table.get(key, now)
        if backend_key is None:
            return None
        backend = picker.by_key.get(backend_key)
        if backend is None or not self._usable(backend_key, now):
            return None
        return backend

    def _round_robin(self, picker: _Picker, now: float, limit: int,
                     first: Backend | None) -> list[Backend]:
        backends = picker.backends
        n = len(backends)
        start = 0 if picker.cursor is None else bisect.bisect_right(picker.order, picker.cursor)
        out = [first] if first is not None else []
        for i in range(n):
            if len(out) >= limit:
                break
            backend = backends[(start + i) % n]
            if backend is not first and self._usable(backend.key, now):
                out.append(backend)
        if out and first is None:
            picker.cursor = _order_key(out[0])
        return out

    def _random(self, picker: _Picker, now: float, limit: int,
                first: Backend | None) -> list[Backend]:
        usable = [b for b in picker.backends if b is not first and self._usable(b.key, now)]
        head = [first] if first is not None else []
        return head + self._rng.sample(usable, min(limit - len(head), len(usable)))

    def _hashed(self, picker: _Picker, client_ip: str, now: float, limit: int,
                first: Backend | None) -> list[Backend]:
        hashes, ring = picker.ring(self.config.virtual_nodes)
        out = [first] if first is not None else []
        seen: set[BackendKey] = {first.key} if first is not None else set()
        start = bisect.bisect_left(hashes, _hash64(client_ip))
        total = len(ring)
        for i in range(total):
            if len(out) >= limit or len(seen) == len(picker.backends):
                break
            backend = ring[(start + i) % total]
            if backend.key in seen:
                continue
            seen.add(backend.key)
            if self._usable(backend.key, now):
                out.append(backend)
        return out

    def _least_recently_ejected(self, picker: _Picker, limit: int) -> list[Backend]:
        def began(backend: Backend) -> float:
            health = self._health.get(backend.key)
            return health.ejected_at if health is not None else float("-inf")

        return sorted(picker.backends, key=began)[:limit]

    # -- outcomes ------------------------------------------------------------------------

    def report_success(self, service: Service, port: ServicePort, client_ip: str,
                       backend: Backend, now: float) -> None:
        """A dial to `backend` worked: forget its failures, remember it for the client."""
        self._health.pop(backend.key, None)
        pkey: PickerKey = (service.key, port.port, port.protocol)
        if service.session_affinity_timeout_s is not None:
            self._affinity.put((pkey, client_ip), backend.key, now,
                               float(service.session_affinity_timeout_s))
        if service.lb_policy == "consistent-hash" and self.config.hash_sticky_s:
            self._hash_memory.put((pkey, client_ip), backend.key, now, self.config.hash_sticky_s)

    def report_failure(self, backend: Backend | BackendKey, now: float) -> bool:
        """A dial to `backend` failed; True when this ejected it (False: already ejected)."""
        key = backend.key if isinstance(backend, Backend) else backend
        health = self._health.get(key)
        if health is not None and health.until > now:
            return False
        failures = 1 if health is None else health.failures + 1
        until = now + self.config.ejection_period(failures)
        if health is None:
            self._health[key] = _Health(failures, now, until)
            if len(self._health) > self.config.health_max_entries:
                self._health.popitem(last=False)
        else:
            health.failures, health.ejected_at, health.until = failures, now, until
            health.probing_until = 0.0
            self._health.move_to_end(key)
        return True

    def ejected(self, now: float) -> dict[BackendKey, float]:
        """Backends ejected at `now` and when their ejection ends (for status and metrics)."""
        return {k: h.until for k, h in self._health.items() if h.until > now}

    def is_ejected(self, backend: Backend | BackendKey, now: float) -> bool:
        """Whether `backend` is inside an ejection period at `now`."""
        key = backend.key if isinstance(backend, Backend) else backend
        health = self._health.get(key)
        return health is not None and health.until > now

    # -- housekeeping --------------------------------------------------------------------

    def retain(self, services: Iterable[Service]) -> None:
        """Forget the tables of Services no longer present (call after a catalog swap)."""
        keep = {s.key for s in services}
        for key in [k for k in self._pickers if k[0] not in keep]:
            del self._pickers[key]
        for table in (self._affinity, self._hash_memory):
            for service_key in table.services() - keep:
                table.drop_service(service_key)

    def expire(self, now: float) -> None:
        """Drop expired client entries and health records that no longer matter."""
        self._affinity.expire(now)
        self._hash_memory.expire(now)
        forget_after = self.config.ejection_max_s * 2
        for key in [k for k, h in self._health.items() if now - h.until > forget_after]:
            del self._health[key]

    def table_sizes(self) -> dict[str, int]:
        """Entries per internal table (to show the bounds hold)."""
        return {"pickers": len(self._pickers), "affinity": len(self._affinity),
                "hash_memory": len(self._hash_memory), "health": len(self._health)}
