"""meshd.dns.cache: TTLs from answers and SOAs, aging in place, bounds."""

from __future__ import annotations

import dnslib  # type: ignore[import-untyped]

from meshd.dns import wire
from meshd.dns.cache import AnswerCache, cache_ttl


def response(*answers: tuple[str, int], rcode: int = 0, soa: tuple[int, int] | None = None,
             extra_ttl: int | None = None) -> tuple[bytes, wire.Response]:
    reply = dnslib.DNSRecord.question("q.example").reply()
    reply.header.rcode = rcode
    for ip, ttl in answers:
        reply.add_answer(dnslib.RR("q.example", rdata=dnslib.A(ip), ttl=ttl))
    if soa is not None:
        reply.add_auth(dnslib.RR("example", dnslib.QTYPE.SOA, ttl=soa[0], rdata=dnslib.SOA(
            "ns.example", "admin.example", (1, 2, 3, 4, soa[1]))))
    if extra_ttl is not None:
        reply.add_ar(dnslib.RR("ns.example", rdata=dnslib.A("192.0.2.53"), ttl=extra_ttl))
    reply.add_ar(dnslib.EDNS0(udp_len=1232))
    data = bytes(reply.pack())
    return data, wire.scan_response(data)


def test_cache_ttl_rules() -> None:
    assert cache_ttl(*response(("192.0.2.1", 30), ("192.0.2.2", 20)), 3600, 300) == 20
    assert cache_ttl(*response(("192.0.2.1", 30)), 10, 300) == 10
    assert cache_ttl(*response(("192.0.2.1", 2**31)), 3600, 300) == 0  # RFC 2181: means 0
    assert cache_ttl(*response(rcode=3, soa=(60, 30)), 3600, 300) == 30
    assert cache_ttl(*response(rcode=3, soa=(20, 30)), 3600, 300) == 20
    assert cache_ttl(*response(soa=(600, 600)), 3600, 300) == 300  # NODATA, capped
    assert cache_ttl(*response(rcode=3), 3600, 300) == 0  # no SOA: not cached
    assert cache_ttl(*response(rcode=2, soa=(60, 60)), 3600, 300) == 0  # SERVFAIL never


def test_ttls_age_in_place_and_entries_expire() -> None:
    cache = AnswerCache(10, 3600, 300)
    data, scanned = response(("192.0.2.1", 30), extra_ttl=5)
    assert cache.put("k", data, scanned, 100.0)
    assert cache.get("k", 100.5) == data
    aged = dnslib.DNSRecord.parse(cache.get("k", 112.0))
    assert aged.rr[0].ttl == 18
    assert [r.ttl for r in aged.ar if r.rtype == dnslib.QTYPE.A] == [0]  # never below 0
    assert [r.ttl for r in aged.ar if r.rtype == dnslib.QTYPE.OPT] == [0]  # OPT untouched
    assert cache.get("k", 130.0) is None and len(cache) == 0


def test_bounded_lru_and_disabled() -> None:
    cache = AnswerCache(2, 3600, 300)
    data, scanned = response(("192.0.2.1", 30))
    for key in ("a", "b"):
        cache.put(key, data, scanned, 0.0)
    cache.get("a", 1.0)  # a is now the most recently used
    cache.put("c", data, scanned, 1.0)
    assert cache.get("b", 1.0) is None and cache.get("a", 1.0) is not None
    cache.clear()
    assert len(cache) == 0
    assert not AnswerCache(0, 3600, 300).put("a", data, scanned, 0.0)
