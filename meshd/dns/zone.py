"""The cluster zone: every name the agent answers itself, built from a `Catalog` (pure).

Names served (Kubernetes DNS-based service discovery specification, schema 1.1.0), with
`<zone>` the cluster domain:

- `<svc>.<ns>.svc.<zone>` A/AAAA: each ClusterIP of that family (headless Services: each ready
  endpoint IP); CNAME `spec.externalName` for ExternalName Services.
- `<ep>.<svc>.<ns>.svc.<zone>` A/AAAA (headless): that endpoint's IP; `<ep>` is its `hostname`,
  else its IP with `.`/`:` replaced by `-`.
- `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports: target `<svc>.<ns>.svc.<zone>`
  and the Service port (ClusterIP), or each ready endpoint's `<ep>.<svc>...` and the endpoint's
  port (headless); the targets' A/AAAA in the additional section. SRV at `<svc>.<ns>.svc.<zone>`
  itself lists every port, named or not (as CoreDNS does).
- The reverse name (`in-addr.arpa`, `ip6.arpa`) of a ClusterIP or headless endpoint IP: PTR to
  the Service or endpoint name.
- `<zone>`: SOA and NS (`ns.dns.<zone>`); `dns-version.<zone>`: TXT `1.1.0`.

Anything else under `<zone>` is NXDOMAIN, except names that have names below them (`svc.<zone>`,
`<ns>.svc.<zone>`, `_tcp.<svc>...`): those exist and answer NODATA. Negative answers carry the
SOA in authority (its MINIMUM and TTL are the negative TTL). Reverse names we do not know are not
ours: the core forwards them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshd.catalog import Catalog, Endpoint, Service, ServicePort
from meshd.dns import wire
from meshd.dns.wire import (
    AAAARecord,
    ARecord,
    Name,
    NameRecord,
    Record,
    SOARecord,
    SRVRecord,
    TXTRecord,
)

SCHEMA_VERSION = b"1.1.0"
MAX_CNAME_CHAIN = 8
_SOA_TIMERS = (7200, 1800, 86400)  # refresh, retry, expire (CoreDNS' values)
_ADDRESS_TYPES = (wire.A, wire.AAAA)
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Answer:
    """What the zone says about one question."""

    rcode: int
    """NOERROR or NXDOMAIN (REFUSED for zone transfers)."""
    answer: tuple[Record, ...] = ()
    """Answer section."""
    authority: tuple[Record, ...] = ()
    """Authority section (the SOA on negative answers)."""
    additional: tuple[Record, ...] = ()
    """Additional section (addresses of SRV targets)."""
    chase: Name | None = None
    """An ExternalName pointed outside the zone: the answer so far is the CNAME chain, and the
    question must be continued with this name upstream."""


@dataclass
class _Node:
    rrsets: dict[int, dict[Record, None]] = field(default_factory=dict)  # ordered sets


_Entry = tuple[bool, bytes, Record | None]
"""(reverse tree?, lower-case wire name, record or None for "this name exists")."""


def endpoint_label(endpoint: Endpoint) -> bytes:
    """The label of an endpoint's own name: its hostname, else its IP with `-` separators
    (`10-244-1-7`, `fd00--7`), as CoreDNS names them."""
    if endpoint.hostname:
        return endpoint.hostname.encode("ascii")
    return endpoint.ip.replace(".", "-").replace(":", "-").encode("ascii")


@functools.lru_cache(maxsize=65536)
def reverse_name(ip: str) -> Name:
    """`10.0.0.1` → `1.0.0.10.in-addr.arpa` (and nibbles under `ip6.arpa` for IPv6)."""
    return wire.name_from_text(ipaddress.ip_address(ip).reverse_pointer)


class Zone:
    """The names of one catalog, ready for lookups by lower-case wire name."""

    def __init__(
        self,
        catalog: Catalog,
        domain: str,
        *,
        ttl: int,
        negative_ttl: int,
        serial: int = 1,
        ns_address: str | None = None,
        previous: Zone | None = None,
    ) -> None:
        """`previous`: the zone this one replaces; the records of Services that did not change
        are taken from it instead of being built again."""
        self.domain: Name = wire.name_from_text(domain)
        """The cluster domain's labels."""
        self.domain_key = wire.name_to_wire(self.domain)
        """The cluster domain in lower-case wire form."""
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._nodes: dict[bytes, _Node] = {}
        self._reverse: dict[bytes, _Node] = {}
        ns_name = (b"ns", b"dns", *self.domain)
        self.soa = Record(self.domain, negative_ttl, SOARecord(
            ns_name, (b"hostmaster", *self.domain), serial & 0xFFFFFFFF, *_SOA_TIMERS,
            negative_ttl))
        """The SOA record (also the authority of negative answers)."""
        apex: list[_Entry] = [(False, self.domain_key, self.soa),
                              (False, self.domain_key, Record(self.domain, ttl,
                                                              NameRecord(wire.NS, ns_name)))]
        if ns_address is not None and not ipaddress.ip_address(ns_address).is_unspecified:
            apex.append((False, wire.name_to_wire(ns_name[1:]), None))
            apex.append(_entry(_address_record(ns_name, ns_address, ttl)))
        apex.append(_entry(Record((b"dns-version", *self.domain), ttl,
                                  TXTRecord((SCHEMA_VERSION,)))))
        self._apply(apex)
        self._by_service: dict[str, tuple[Service, list[_Entry]]] = {}
        reuse = previous is not None and (previous.domain, previous.ttl) == (self.domain, ttl)
        skipped = []
        for service in catalog.services.values():
            old = previous._by_service.get(service.key) if reuse and previous else None
            if old is not None and (old[0] is service or old[0] == service):
                entries = old[1]
            elif _valid_names(service):
                entries = self._service_entries(service)
            else:
                skipped.append(service.key)
                continue
            self._by_service[service.key] = (service, entries)
            self._apply(entries)
        self.skipped: tuple[str, ...] = tuple(skipped)
        """Services whose names cannot be DNS names (the catalog builder reports them)."""

    # --- building -------------------------------------------------------------------------

    def _apply(self, entries: Iterable[_Entry]) -> None:
        nodes, reverse_nodes = self._nodes, self._reverse
        for reverse, key, record in entries:
            table = reverse_nodes if reverse else nodes
            node = table.get(key)
            if node is None:
                node = table[key] = _Node()
            if record is not None:
                node.rrsets.setdefault(record.rtype, {})[record] = None

    def _service_entries(self, service: Service) -> list[_Entry]:
        """Every name and record one Service defines (kept for the next zone to reuse)."""
        base: Name = (service.name.encode(), service.namespace.encode(), b"svc", *self.domain)
        base_key = wire.name_to_wire(base)
        ttl = self.ttl
        # The names above it exist (empty non-terminals): <ns>.svc.<zone> and svc.<zone>.
        out: list[_Entry] = [(False, base_key[len(base[0]) + 1 :], None),
                             (False, base_key[len(base[0]) + len(base[1]) + 2 :], None),
                             (False, base_key, None)]
        if service.external_name is not None:
            target = wire.name_from_text(service.external_name)
            out.append((False, base_key, Record(base, ttl, NameRecord(wire.CNAME, target))))
            return out
        ready = service.ready_endpoints() if service.headless else ()
        targets: list[tuple[Name, ServicePort | None, int]]
        if not service.headless:
            for ip in service.cluster_ips:
                out.append((False, base_key, _address_record(base, ip, ttl)))
                out.append(_entry(Record(reverse_name(ip), ttl, NameRecord(wire.PTR, base)),
                                  reverse=True))
            targets = [(base, port, port.port) for port in service.ports]
        else:
            owns = {e.ip: (endpoint_label(e), *base) for e in ready}
            for endpoint in ready:
                own = owns[endpoint.ip]
                out.append((False, base_key, _address_record(base, endpoint.ip, ttl)))
                out.append(_entry(_address_record(own, endpoint.ip, ttl)))
                out.append(_entry(Record(reverse_name(endpoint.ip), ttl,
                                         NameRecord(wire.PTR, own)), reverse=True))
            targets = [(owns[e.ip], port, number) for port in service.ports
                       for e in ready if (number := e.port_for(port)) is not None]
            if not service.ports:
                # Endpoint ports without Service ports (a headless Service whose endpoints
                # were written by hand) still get SRV records at the service name.
                targets = [(owns[e.ip], None, number) for e in ready for _, number, _ in e.ports]
        per_port: dict[ServicePort | None, int] = {}
        for _, port, _ in targets:
            per_port[port] = per_port.get(port, 0) + 1
        for target, port, number in targets:
            weight = 100 if not service.headless else max(1, 100 // per_port[port])
            srv = SRVRecord(0, weight, number, target)
            out.append((False, base_key, Record(base, ttl, srv)))
            if port is not None and port.name:
                name = _srv_name(port.name, port.protocol, base)
                out.append((False, wire.name_to_wire(name[1:]), None))
                out.append(_entry(Record(name, ttl, srv)))
        return out

    # --- lookups --------------------------------------------------------------------------

    def is_authoritative(self, key: bytes, in_domain: bool) -> bool:
        """True if we answer for this name: it is in the cluster domain (`in_domain`, from
        `Query.is_under`) or is the reverse name of an address we know."""
        return in_domain or key in self._reverse

    def lookup(self, key: bytes, qtype: int) -> Answer:
        """Answer a question for lower-case wire name `key` (which `is_authoritative`)."""
        if qtype in (wire.AXFR, wire.IXFR):
            return Answer(wire.REFUSED)
        reverse = self._reverse.get(key)
        if reverse is not None:
            return Answer(wire.NOERROR, _select(reverse, qtype))
        chain: list[Record] = []
        for _ in range(MAX_CNAME_CHAIN):
            node = self._nodes.get(key)
            if node is None:
                return Answer(wire.NXDOMAIN, tuple(chain), (self.soa,))
            cnames = node.rrsets.get(wire.CNAME)
            if cnames and qtype not in (wire.CNAME, wire.ANY):
                cname = next(iter(cnames))
                chain.append(cname)
                target = cname.data
                assert isinstance(target, NameRecord)
                key = wire.name_to_wire(target.target)
                if not _ends_with(target.target, self.domain):
                    return Answer(wire.NOERROR, tuple(chain), chase=target.target)
                continue
            records = _select(node, qtype)
            if not records:
                return Answer(wire.NOERROR, tuple(chain), (self.soa,))
            additional = self._additional(records) if qtype in (wire.SRV, wire.ANY) else ()
            return Answer(wire.NOERROR, (*chain, *records), (), additional)
        return Answer(wire.SERVFAIL, tuple(chain))  # a CNAME loop inside the zone

    def _additional(self, records: Iterable[Record]) -> tuple[Record, ...]:
        out: list[Record] = []
        seen: set[Record] = set()
        for record in records:
            if isinstance(record.data, SRVRecord):
                node = self._nodes.get(wire.name_to_wire(record.data.target))
                if node is not None:
                    for rtype in _ADDRESS_TYPES:
                        out.extend(r for r in node.rrsets.get(rtype, {}) if r not in seen)
                    seen.update(node.rrsets.get(rtype, {}))
        return tuple(out)


def _valid_names(service: Service) -> bool:
    labels = [service.name, service.namespace]
    labels += [e.hostname for e in service.endpoints if e.hostname]
    labels += [p.name for p in service.ports if p.name]
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    if service.external_name is not None:
        try:
            wire.name_from_text(service.external_name)
        except ValueError:
            return False
    return True


def _select(node: _Node, qtype: int) -> tuple[Record, ...]:
    if qtype == wire.ANY:
        return tuple(r for rrset in node.rrsets.values() for r in rrset)
    return tuple(node.rrsets.get(qtype, ()))


def _entry(record: Record, reverse: bool = False) -> _Entry:
    return (reverse, wire.name_to_wire(record.name), record)


def _ends_with(name: Name, suffix: Name) -> bool:
    return len(name) >= len(suffix) and tuple(label.lower() for label in
                                              name[len(name) - len(suffix):]) == suffix


def _address_record(name: Name, ip: str, ttl: int) -> Record:
    if ipaddress.ip_address(ip).version == 4:
        return Record(name, ttl, ARecord(ip))
    return Record(name, ttl, AAAARecord(ip))


def _srv_name(port: str, protocol: str, base: Name) -> Name:
    return (b"_" + port.encode(), b"_" + protocol.lower().encode(), *base)


