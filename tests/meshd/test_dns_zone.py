"""meshd.dns.zone: names of a catalog, and reuse of unchanged Services across catalogs."""

from __future__ import annotations

from dataclasses import replace

from meshd.catalog import Catalog, Endpoint, Service, ServicePort
from meshd.dns import wire
from meshd.dns.zone import Zone, endpoint_label, reverse_name

HTTP = ServicePort("http", 80, "TCP", 8080)


def ep(ip: str, hostname: str | None = None) -> Endpoint:
    return Endpoint(ip, (("http", 8080, "TCP"),), True, "n1", None, hostname)


def catalog(*services: Service) -> Catalog:
    return Catalog({s.key: s for s in services}, {}, "n1", None)


WEB = Service("default", "web", ("10.96.0.10",), (HTTP,), (ep("10.244.0.5"),), None)
DB = Service("default", "db", (), (HTTP,), (ep("10.244.0.7", "db-0"), ep("10.244.0.8")), None)


def key(name: str) -> bytes:
    return wire.name_to_wire(wire.name_from_text(name))


def data(zone: Zone, name: str, qtype: int) -> list[str]:
    answer = zone.lookup(key(name), qtype)
    return [str(r.data) for r in answer.answer] if answer.rcode == wire.NOERROR else ["NX"]


def test_labels_and_reverse_names() -> None:
    assert endpoint_label(ep("10.1.2.3")) == b"10-1-2-3"
    assert endpoint_label(ep("fd00::1")) == b"fd00--1"
    assert endpoint_label(ep("10.1.2.3", "web-0")) == b"web-0"
    assert reverse_name("10.1.2.3") == (b"3", b"2", b"1", b"10", b"in-addr", b"arpa")
    assert len(reverse_name("fd00::1")) == 34


def test_previous_zone_is_reused_only_for_unchanged_services() -> None:
    first = Zone(catalog(WEB, DB), "cluster.local", ttl=5, negative_ttl=5)
    fewer = replace(DB, endpoints=DB.endpoints[:1])
    second = Zone(catalog(replace(WEB), fewer), "cluster.local", ttl=5, negative_ttl=5,
                  previous=first)
    fresh = Zone(catalog(WEB, fewer), "cluster.local", ttl=5, negative_ttl=5)
    for name, qtype in [("web.default.svc.cluster.local", wire.A),
                        ("db.default.svc.cluster.local", wire.A),
                        ("10-244-0-8.db.default.svc.cluster.local", wire.A),
                        ("_http._tcp.db.default.svc.cluster.local", wire.SRV),
                        ("8.0.244.10.in-addr.arpa", wire.PTR)]:
        assert data(second, name, qtype) == data(fresh, name, qtype), name
    assert data(second, "10-244-0-8.db.default.svc.cluster.local", wire.A) == ["NX"]
    assert not second.is_authoritative(key("8.0.244.10.in-addr.arpa"), False)
    # A different TTL means nothing can be reused.
    third = Zone(catalog(WEB), "cluster.local", ttl=30, negative_ttl=5, previous=second)
    assert third.lookup(key("web.default.svc.cluster.local"), wire.A).answer[0].ttl == 30


def test_services_with_impossible_names_are_skipped() -> None:
    odd = replace(WEB, name="Not.A.Label")
    zone = Zone(catalog(odd, DB), "cluster.local", ttl=5, negative_ttl=5)
    assert zone.skipped == ("default/Not.A.Label",)
    assert data(zone, "db.default.svc.cluster.local", wire.A) == ["ARecord(address='10.244.0.7')",
                                                                  "ARecord(address='10.244.0.8')"]
