"""meshd.dns.core + zone: every record type, negative answers, truncation, forwarding, cache.

No sockets: queries are built and answers decoded with dnslib (an independent implementation);
upstream resolvers are played by the test, which answers the core's `UpstreamQuery` actions.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import dnslib  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.catalog import Catalog, Endpoint, Service, ServicePort
from meshd.dns import wire
from meshd.dns.config import DnsConfig
from meshd.dns.core import ClientReply, DnsCore, Outcome, UpstreamQuery
from meshd.dns.resolvconf import pod_search_domains

Client = tuple[str, int]
CLIENT: Client = ("10.244.0.9", 40000)
UP1, UP2, UP3 = ("192.0.2.1", 53), ("192.0.2.2", 53), ("192.0.2.3", 5353)
HTTP = ServicePort("http", 80, "TCP", 8080)
DNSP = ServicePort("dns", 53, "UDP", 5353)


def ep(ip: str, *, ready: bool = True, hostname: str | None = None, port: int = 8080) -> Endpoint:
    return Endpoint(ip, (("http", port, "TCP"),), ready, "n1", None, hostname)


def catalog(*services: Service, revision: str = "") -> Catalog:
    by_key = {s.key: s for s in services}
    by_ip = {ip: s for s in services for ip in s.cluster_ips}
    return Catalog(by_key, by_ip, "n1", None, revision)


WEB = Service("default", "web", ("10.96.0.10",), (HTTP, DNSP), (ep("10.244.1.5"),), None)
DUAL = Service("shop", "cart", ("10.96.0.20", "fd00:96::20"), (HTTP,), (), None)
UNNAMED = Service("default", "plain", ("10.96.0.30",), (ServicePort("", 8000, "TCP", 8000),),
                  (), None)
DB = Service("default", "db", (), (HTTP,), (
    ep("10.244.1.7", hostname="db-0", port=5432), ep("10.244.2.8", port=5433),
    ep("10.244.3.9", ready=False), ep("fd00::9")), None)
EXT_OUT = Service("default", "search", (), (), (), None, proxied=False,
                  external_name="www.example.org")
EXT_IN = Service("default", "alias", (), (), (), None, proxied=False,
                 external_name="web.default.svc.cluster.local")
CATALOG = catalog(WEB, DUAL, UNNAMED, DB, EXT_OUT, EXT_IN)


def make_core(config: DnsConfig | None = None, *, upstreams: tuple[Client, ...] = (UP1, UP2, UP3),
              cat: Catalog = CATALOG) -> DnsCore[Client]:
    return DnsCore(config or DnsConfig(), upstreams=upstreams, catalog=cat,
                   rng=random.Random(7))


def query(name: str, qtype: str = "A", *, edns: int | None = None, do: bool = False,
          qclass: str = "IN") -> dnslib.DNSRecord:
    q = dnslib.DNSRecord.question(name, qtype, qclass)
    if edns is not None:
        q.add_ar(dnslib.EDNS0(udp_len=edns, flags="do" if do else ""))
    return q


def ask(core: DnsCore[Client], name: str, qtype: str = "A", *, now: float = 0.0,
        tcp: bool = False, client: Client = CLIENT, **kwargs: Any) -> dnslib.DNSRecord:
    q = query(name, qtype, **kwargs)
    reply = core.handle_query(q.pack(), now, client, tcp=tcp)
    assert isinstance(reply, bytes), reply
    msg = dnslib.DNSRecord.parse(reply)
    assert msg.header.id == q.header.id and msg.header.qr
    assert str(msg.q.qname) == str(q.q.qname)  # the question as asked, case included
    return msg


def rrs(msg: dnslib.DNSRecord, section: str = "rr") -> list[tuple[str, str, int, str]]:
    return [(str(r.rname), dnslib.QTYPE.get(r.rtype), r.ttl, str(r.rdata))
            for r in getattr(msg, section) if r.rtype != dnslib.QTYPE.OPT]


def rcode(msg: dnslib.DNSRecord) -> str:
    return str(dnslib.RCODE.get(msg.header.rcode))


# --- names in the cluster domain --------------------------------------------------------------


def test_cluster_ip_a_record() -> None:
    msg = ask(make_core(), "web.default.svc.cluster.local")
    assert rcode(msg) == "NOERROR" and msg.header.aa and msg.header.rd and msg.header.ra
    assert rrs(msg) == [("web.default.svc.cluster.local.", "A", 5, "10.96.0.10")]


def test_case_insensitive_and_case_preserving() -> None:
    msg = ask(make_core(), "WeB.DEFAULT.Svc.Cluster.LOCAL")
    assert rrs(msg) == [("WeB.DEFAULT.Svc.Cluster.LOCAL.", "A", 5, "10.96.0.10")]


def test_aaaa() -> None:
    core = make_core()
    assert rrs(ask(core, "cart.shop.svc.cluster.local", "AAAA")) == [
        ("cart.shop.svc.cluster.local.", "AAAA", 5, "fd00:96::20")]
    assert rrs(ask(core, "cart.shop.svc.cluster.local", "A")) == [
        ("cart.shop.svc.cluster.local.", "A", 5, "10.96.0.20")]


def test_ipv4_service_aaaa_is_nodata_with_soa() -> None:
    msg = ask(make_core(), "web.default.svc.cluster.local", "AAAA")
    assert rcode(msg) == "NOERROR" and msg.header.aa and msg.rr == []
    assert rrs(msg, "auth") == [("cluster.local.", "SOA", 5, "ns.dns.cluster.local. "
                                 "hostmaster.cluster.local. 1 7200 1800 86400 5")]


def test_unknown_name_is_nxdomain_with_soa() -> None:
    core = make_core(DnsConfig(negative_ttl_s=30, ttl_s=7))
    for name in ("nope.default.svc.cluster.local", "web.other.svc.cluster.local",
                 "x.web.default.svc.cluster.local", "pod.cluster.local"):
        msg = ask(core, name)
        assert rcode(msg) == "NXDOMAIN" and msg.header.aa, name
        [(owner, rtype, ttl, data)] = rrs(msg, "auth")
        assert (owner, rtype, ttl) == ("cluster.local.", "SOA", 30)
        assert data.endswith(" 30")  # SOA MINIMUM: the negative caching TTL


@pytest.mark.parametrize("name", ["svc.cluster.local", "default.svc.cluster.local",
                                  "_tcp.web.default.svc.cluster.local", "cluster.local"])
def test_empty_non_terminals_are_nodata(name: str) -> None:
    msg = ask(make_core(), name)
    assert rcode(msg) == "NOERROR" and msg.rr == [] and len(msg.auth) == 1


def test_headless_service() -> None:
    core = make_core()
    assert rrs(ask(core, "db.default.svc.cluster.local")) == [
        ("db.default.svc.cluster.local.", "A", 5, "10.244.1.7"),
        ("db.default.svc.cluster.local.", "A", 5, "10.244.2.8")]  # not-ready 10.244.3.9 left out
    assert rrs(ask(core, "db.default.svc.cluster.local", "AAAA")) == [
        ("db.default.svc.cluster.local.", "AAAA", 5, "fd00::9")]
    assert rrs(ask(core, "db-0.db.default.svc.cluster.local")) == [
        ("db-0.db.default.svc.cluster.local.", "A", 5, "10.244.1.7")]
    assert rrs(ask(core, "10-244-2-8.db.default.svc.cluster.local")) == [
        ("10-244-2-8.db.default.svc.cluster.local.", "A", 5, "10.244.2.8")]
    assert rrs(ask(core, "fd00--9.db.default.svc.cluster.local", "AAAA")) == [
        ("fd00--9.db.default.svc.cluster.local.", "AAAA", 5, "fd00::9")]
    assert rcode(ask(core, "10-244-3-9.db.default.svc.cluster.local")) == "NXDOMAIN"


def test_srv_cluster_ip() -> None:
    core = make_core()
    msg = ask(core, "_http._tcp.web.default.svc.cluster.local", "SRV")
    assert rrs(msg) == [("_http._tcp.web.default.svc.cluster.local.", "SRV", 5,
                         "0 100 80 web.default.svc.cluster.local.")]
    assert rrs(msg, "ar") == [("web.default.svc.cluster.local.", "A", 5, "10.96.0.10")]
    msg = ask(core, "_dns._udp.web.default.svc.cluster.local", "SRV")
    assert rrs(msg)[0][3] == "0 100 53 web.default.svc.cluster.local."
    assert rcode(ask(core, "_dns._tcp.web.default.svc.cluster.local", "SRV")) == "NXDOMAIN"
    # Unnamed ports have no _port._proto name, but show at the service name itself.
    assert rrs(ask(core, "plain.default.svc.cluster.local", "SRV")) == [
        ("plain.default.svc.cluster.local.", "SRV", 5,
         "0 100 8000 plain.default.svc.cluster.local.")]


def test_srv_headless_targets_each_endpoint_with_its_port() -> None:
    msg = ask(make_core(), "_http._tcp.db.default.svc.cluster.local", "SRV")
    assert sorted(r[3] for r in rrs(msg)) == [
        "0 33 5432 db-0.db.default.svc.cluster.local.",
        "0 33 5433 10-244-2-8.db.default.svc.cluster.local.",
        "0 33 8080 fd00--9.db.default.svc.cluster.local."]
    assert sorted(r[3] for r in rrs(msg, "ar")) == ["10.244.1.7", "10.244.2.8", "fd00::9"]


def test_ptr() -> None:
    core = make_core()
    assert rrs(ask(core, "10.0.96.10.in-addr.arpa", "PTR")) == [
        ("10.0.96.10.in-addr.arpa.", "PTR", 5, "web.default.svc.cluster.local.")]
    assert rrs(ask(core, "7.1.244.10.in-addr.arpa", "PTR"))[0][3] == \
        "db-0.db.default.svc.cluster.local."
    v6 = dnslib.DNSLabel(".".join(reversed("fd00009600000000000000000000" "0020")) +
                         ".ip6.arpa")
    assert rrs(ask(core, str(v6), "PTR"))[0][3] == "cart.shop.svc.cluster.local."
    # A reverse name we do not know is not ours: forwarded.
    reply = make_core().handle_query(query("1.1.168.192.in-addr.arpa", "PTR").pack(), 0.0,
                                     CLIENT, tcp=False)
    assert reply is Outcome.PENDING


def test_external_name() -> None:
    core = make_core()
    msg = ask(core, "alias.default.svc.cluster.local")
    assert rrs(msg) == [
        ("alias.default.svc.cluster.local.", "CNAME", 5, "web.default.svc.cluster.local."),
        ("web.default.svc.cluster.local.", "A", 5, "10.96.0.10")]
    assert rrs(ask(core, "search.default.svc.cluster.local", "CNAME")) == [
        ("search.default.svc.cluster.local.", "CNAME", 5, "www.example.org.")]


def test_external_name_outside_the_zone_is_chased_upstream() -> None:
    core = make_core()
    q = query("Search.default.svc.cluster.local", edns=1232)
    assert core.handle_query(q.pack(), 0.0, CLIENT, tcp=False) is Outcome.PENDING
    [up] = core.pop_actions()
    assert isinstance(up, UpstreamQuery)
    upstream_q = dnslib.DNSRecord.parse(up.data)
    assert str(upstream_q.q.qname) == "www.example.org."
    answer = upstream_q.reply()
    answer.add_answer(dnslib.RR("www.example.org", rdata=dnslib.A("192.0.2.80"), ttl=60))
    core.receive_upstream(answer.pack(), up.upstream, 0.1)
    [reply] = core.pop_actions()
    assert isinstance(reply, ClientReply) and reply.client == CLIENT
    msg = dnslib.DNSRecord.parse(reply.data)
    assert msg.header.id == q.header.id and str(msg.q.qname) == "Search.default.svc.cluster.local."
    assert rrs(msg) == [
        ("Search.default.svc.cluster.local.", "CNAME", 5, "www.example.org."),
        ("www.example.org.", "A", 60, "192.0.2.80")]
    # The target's answer is cached: the next one is immediate.
    assert rrs(ask(core, "search.default.svc.cluster.local", edns=1232, now=10.1))[1][2] == 50


def test_apex_soa_ns_and_version() -> None:
    core = make_core(DnsConfig(address="169.254.96.16"))
    assert rrs(ask(core, "cluster.local", "SOA"))[0][1] == "SOA"
    msg = ask(core, "cluster.local", "NS")
    assert rrs(msg) == [("cluster.local.", "NS", 5, "ns.dns.cluster.local.")]
    assert rrs(ask(core, "ns.dns.cluster.local"))[0][3] == "169.254.96.16"
    assert rrs(ask(core, "dns-version.cluster.local", "TXT"))[0][3] == '"1.1.0"'


def test_any_and_zone_transfers() -> None:
    core = make_core()
    assert {r[1] for r in rrs(ask(core, "web.default.svc.cluster.local", "ANY"))} == {"A", "SRV"}
    assert rcode(ask(core, "cluster.local", "AXFR", tcp=True)) == "REFUSED"


def test_custom_domain_and_ttl() -> None:
    core = make_core(DnsConfig(domain="Edge.Example", ttl_s=30))
    assert rrs(ask(core, "web.default.svc.edge.example")) == [
        ("web.default.svc.edge.example.", "A", 30, "10.96.0.10")]
    assert core.handle_query(query("web.default.svc.cluster.local").pack(), 0.0, CLIENT,
                             tcp=False) is Outcome.PENDING  # not our domain: forwarded


def test_search_domain_expansion_like_a_stub_resolver() -> None:
    """A pod's resolver (ndots:5) tries each search domain in turn: `web` and `web.default`
    both end at `web.default.svc.cluster.local`; `web.default.default...` is NXDOMAIN."""
    core = make_core()
    search = pod_search_domains("default", "cluster.local")
    assert search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")

    def resolve(short: str) -> tuple[str, list[str]]:
        for domain in search:
            msg = ask(core, f"{short}.{domain}")
            if rcode(msg) == "NOERROR" and msg.rr:
                return f"{short}.{domain}", [r[3] for r in rrs(msg)]
            assert rcode(msg) == "NXDOMAIN"
        raise AssertionError(short)

    assert resolve("web") == ("web.default.svc.cluster.local", ["10.96.0.10"])
    assert resolve("web.default") == ("web.default.svc.cluster.local", ["10.96.0.10"])
    assert resolve("cart.shop") == ("cart.shop.svc.cluster.local", ["10.96.0.20"])


def test_catalog_swap_changes_answers() -> None:
    core = make_core()
    assert rrs(ask(core, "web.default.svc.cluster.local"))[0][3] == "10.96.0.10"
    moved = replace(WEB, cluster_ips=("10.96.0.99",))
    core.set_catalog(catalog(moved, revision="77"))
    assert rrs(ask(core, "web.default.svc.cluster.local"))[0][3] == "10.96.0.99"
    assert rcode(ask(core, "db.default.svc.cluster.local")) == "NXDOMAIN"
    assert rrs(ask(core, "cluster.local", "SOA"))[0][3].split()[2] == "77"  # serial = revision


def test_edns_echo_do_bit_and_badvers() -> None:
    core = make_core()
    msg = ask(core, "web.default.svc.cluster.local", edns=4096, do=True)
    [opt] = [r for r in msg.ar if r.rtype == dnslib.QTYPE.OPT]
    assert opt.rclass == 1232 and opt.ttl & 0x8000
    q = query("web.default.svc.cluster.local", edns=1232)
    q.ar[0].ttl = 1 << 16  # EDNS version 1
    reply = core.handle_query(q.pack(), 0.0, CLIENT, tcp=False)
    assert isinstance(reply, bytes)
    response = wire.scan_response(reply)
    assert response.rcode == wire.BADVERS
    assert core.stats.responses["BADVERS"] == 1


def test_other_opcodes_classes_and_responses() -> None:
    core = make_core()
    status = query("web.default.svc.cluster.local")
    status.header.opcode = 2
    reply = core.handle_query(status.pack(), 0.0, CLIENT, tcp=False)
    assert isinstance(reply, bytes)
    assert dnslib.DNSRecord.parse(reply).header.rcode == dnslib.RCODE.NOTIMP
    assert rcode(ask(core, "web.default.svc.cluster.local", qclass="CH")) == "REFUSED"
    response = query("web.default.svc.cluster.local").reply()
    assert core.handle_query(response.pack(), 0.0, CLIENT, tcp=False) is Outcome.DROPPED
    assert core.handle_query(b"\x00\x01garbage", 0.0, CLIENT, tcp=False) is Outcome.DROPPED
    assert core.stats.malformed == 2


# --- truncation -------------------------------------------------------------------------------

BIG = Service("default", "big", (), (HTTP,),
              tuple(ep(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(100)), None)


def test_large_answer_truncated_over_udp_full_over_tcp() -> None:
    core = make_core(cat=catalog(BIG))
    msg = ask(core, "big.default.svc.cluster.local")  # no EDNS: 512 bytes at most
    assert msg.header.tc and msg.rr == [] and rcode(msg) == "NOERROR"
    msg = ask(core, "big.default.svc.cluster.local", edns=4096)  # capped at ednsUdpSize 1232
    assert msg.header.tc and msg.rr == [] and len(msg.ar) == 1
    msg = ask(core, "big.default.svc.cluster.local", tcp=True)
    assert not msg.header.tc and len(msg.rr) == 100
    assert core.stats.truncated == 2
    roomy = make_core(DnsConfig(edns_udp_size=4096), cat=catalog(BIG))
    assert len(ask(roomy, "big.default.svc.cluster.local", edns=4096).rr) == 100


def test_repeated_questions_are_answered_from_the_reply_cache() -> None:
    core = make_core(cat=catalog(WEB, BIG))
    first = ask(core, "web.default.svc.cluster.local")
    again = ask(core, "web.default.svc.cluster.local")  # a new id, the same answer
    assert again.header.id != first.header.id and rrs(again) == rrs(first)
    nx = [ask(core, "nope.default.svc.cluster.local") for _ in range(3)]
    assert all(rcode(m) == "NXDOMAIN" for m in nx)
    for _ in range(2):  # truncation is remembered (and counted) too
        assert ask(core, "big.default.svc.cluster.local").header.tc
    assert core.stats.queries["A"] == 7 and core.stats.truncated == 2
    assert core.stats.responses == {"NOERROR": 4, "NXDOMAIN": 3}
    moved = replace(WEB, cluster_ips=("10.96.0.99",))
    core.set_catalog(catalog(moved))  # a new catalog forgets every stored reply
    assert rrs(ask(core, "web.default.svc.cluster.local"))[0][3] == "10.96.0.99"


# --- forwarding -------------------------------------------------------------------------------


def upstream_answer(up: UpstreamQuery, *records: dnslib.RR, rcode_: int = 0,
                    soa: tuple[int, int] | None = None, tc: bool = False) -> bytes:
    q = dnslib.DNSRecord.parse(up.data)
    reply = q.reply()
    reply.header.rcode = rcode_
    reply.header.tc = int(tc)
    for record in records:
        reply.add_answer(record)
    if soa is not None:
        ttl, minimum = soa
        reply.add_auth(dnslib.RR("example.org", dnslib.QTYPE.SOA, ttl=ttl, rdata=dnslib.SOA(
            "ns.example.org", "admin.example.org", (1, 2, 3, 4, minimum))))
    return bytes(reply.pack())


def forward(core: DnsCore[Client], name: str, qtype: str = "A", *, now: float = 0.0,
            client: Client = CLIENT, **kwargs: Any) -> tuple[dnslib.DNSRecord, UpstreamQuery]:
    q = query(name, qtype, **kwargs)
    assert core.handle_query(q.pack(), now, client, tcp=False) is Outcome.PENDING
    [up] = core.pop_actions()
    assert isinstance(up, UpstreamQuery)
    return q, up


def only_reply(core: DnsCore[Client]) -> tuple[Client, dnslib.DNSRecord]:
    [action] = core.pop_actions()
    assert isinstance(action, ClientReply)
    return action.client, dnslib.DNSRecord.parse(action.data)


def test_forward_and_cache_with_ttl_aging() -> None:
    core = make_core()
    q, up = forward(core, "WWW.example.org", now=100.0)
    assert up.upstream == UP1 and not up.tcp
    sent = dnslib.DNSRecord.parse(up.data)
    assert sent.header.id != q.header.id and sent.header.rd and str(sent.q.qname) == \
        "WWW.example.org."
    assert core.get_timer() == 101.0
    core.receive_upstream(upstream_answer(up, dnslib.RR("www.example.org",
                                                        rdata=dnslib.A("192.0.2.7"), ttl=30)),
                          UP1, 100.05)
    client, msg = only_reply(core)
    assert client == CLIENT and msg.header.id == q.header.id and str(msg.q.qname) == \
        "WWW.example.org."
    assert rrs(msg) == [("www.example.org.", "A", 30, "192.0.2.7")]
    assert core.get_timer() is None
    # From the cache, TTL aged by whole seconds held; expired after 30 s.
    msg = ask(core, "www.EXAMPLE.org", now=110.9)
    assert rrs(msg)[0][2] == 20 and str(msg.q.qname) == "www.EXAMPLE.org."
    assert core.stats.cache_hits == 1 and core.stats.forwarded == 1
    assert core.handle_query(query("www.example.org").pack(), 130.1, CLIENT,
                             tcp=False) is Outcome.PENDING
    assert core.stats.forwarded == 2


def test_negative_answers_are_cached_by_soa_minimum() -> None:
    core = make_core()
    _, up = forward(core, "missing.example.org")
    core.receive_upstream(upstream_answer(up, rcode_=3, soa=(900, 10)), UP1, 0.0)
    _, msg = only_reply(core)
    assert rcode(msg) == "NXDOMAIN"
    assert rcode(ask(core, "missing.example.org", now=9.5)) == "NXDOMAIN"
    assert core.handle_query(query("missing.example.org").pack(), 10.0, CLIENT,
                             tcp=False) is Outcome.PENDING
    # NODATA without an SOA is not cached at all.
    core = make_core()
    _, up = forward(core, "nodata.example.org", "AAAA")
    core.receive_upstream(upstream_answer(up), UP1, 0.0)
    only_reply(core)
    assert core.handle_query(query("nodata.example.org", "AAAA").pack(), 0.0, CLIENT,
                             tcp=False) is Outcome.PENDING


def test_cache_ttl_is_capped_and_bounded() -> None:
    core = make_core(DnsConfig(cache_max_ttl_s=60, cache_size=2))
    for i, name in enumerate(["a.example", "b.example", "c.example"]):
        _, up = forward(core, name)
        core.receive_upstream(upstream_answer(up, dnslib.RR(name, rdata=dnslib.A(f"192.0.2.{i}"),
                                                            ttl=86400)), UP1, 0.0)
        only_reply(core)
    assert len(core.cache) == 2
    assert rrs(ask(core, "c.example", now=59.0))[0][2] == 86400 - 59
    assert core.handle_query(query("c.example").pack(), 60.0, CLIENT, tcp=False) is \
        Outcome.PENDING
    assert core.handle_query(query("a.example").pack(), 1.0, CLIENT, tcp=False) is \
        Outcome.PENDING  # evicted (least recently used)


def test_timeout_moves_to_next_upstream_and_remembers_it() -> None:
    core = make_core(DnsConfig(upstream_timeout_s=0.5))
    _q, up = forward(core, "slow.example")
    assert up.upstream == UP1
    core.handle_timer(0.4)
    assert core.pop_actions() == []
    core.handle_timer(0.5)
    [retry] = core.pop_actions()
    assert isinstance(retry, UpstreamQuery) and retry.upstream == UP2 and retry.data == up.data
    # A late answer from the first upstream is still welcome.
    core.receive_upstream(upstream_answer(up, dnslib.RR("slow.example", rdata=dnslib.A(
        "192.0.2.9"))), UP1, 0.7)
    _, msg = only_reply(core)
    assert rrs(msg)[0][3] == "192.0.2.9"
    assert core.stats.upstream_timeouts == 1
    _, up = forward(core, "next.example", now=1.0)
    assert up.upstream == UP1  # it answered last


def test_error_rcodes_try_next_and_all_failing_gives_servfail() -> None:
    core = make_core()
    q, up = forward(core, "broken.example", edns=1232)
    core.receive_upstream(upstream_answer(up, rcode_=2), UP1, 0.0)
    [second] = core.pop_actions()
    assert isinstance(second, UpstreamQuery) and second.upstream == UP2
    core.receive_upstream(upstream_answer(second, rcode_=5), UP2, 0.0)
    [third] = core.pop_actions()
    assert isinstance(third, UpstreamQuery) and third.upstream == UP3
    core.handle_timer(10.0)
    _, msg = only_reply(core)
    assert rcode(msg) == "SERVFAIL" and msg.header.id == q.header.id
    assert any(r.rtype == dnslib.QTYPE.OPT for r in msg.ar)
    assert core.stats.servfail == 1 and core.stats.upstream_errors == 2
    assert core.in_flight == 0 and core.get_timer() is None
    # Each failure moved the preference on: UP1 → UP2 → UP3 → UP1.
    _, up = forward(core, "again.example", now=11.0)
    assert up.upstream == UP1


def test_truncated_upstream_answer_is_asked_again_over_tcp() -> None:
    core = make_core()
    _, up = forward(core, "big.example")
    core.receive_upstream(upstream_answer(up, tc=True), UP1, 0.0)
    [again] = core.pop_actions()
    assert isinstance(again, UpstreamQuery) and again.tcp and again.upstream == UP1
    records = [dnslib.RR("big.example", rdata=dnslib.A(f"192.0.2.{i}"), ttl=60)
               for i in range(60)]
    core.receive_upstream(upstream_answer(again, *records), UP1, 0.1, tcp=True)
    _, msg = only_reply(core)
    assert msg.header.tc and msg.rr == []  # still too big for this UDP client
    msg = ask(core, "big.example", tcp=True, now=1.1)
    assert len(msg.rr) == 60 and msg.rr[0].ttl == 59


def test_tcp_upstream_failure_moves_on() -> None:
    core = make_core()
    _, up = forward(core, "big.example")
    core.receive_upstream(upstream_answer(up, tc=True), UP1, 0.0)
    [again] = core.pop_actions()
    assert isinstance(again, UpstreamQuery)
    core.upstream_failed(again.ref, UP1, 0.2)
    [nxt] = core.pop_actions()
    assert isinstance(nxt, UpstreamQuery) and nxt.upstream == UP2 and not nxt.tcp


def test_identical_questions_share_one_upstream_query() -> None:
    core = make_core()
    q1, up = forward(core, "popular.example")
    q2 = query("POPULAR.example")
    assert core.handle_query(q2.pack(), 0.0, ("10.244.0.10", 1), tcp=True) is Outcome.PENDING
    assert core.pop_actions() == []
    core.receive_upstream(upstream_answer(up, dnslib.RR("popular.example",
                                                        rdata=dnslib.A("192.0.2.1"))), UP1, 0.0)
    replies = core.pop_actions()
    assert [r.client for r in replies if isinstance(r, ClientReply)] == [CLIENT,
                                                                         ("10.244.0.10", 1)]
    ids = [dnslib.DNSRecord.parse(r.data).header.id for r in replies
           if isinstance(r, ClientReply)]
    names = [str(dnslib.DNSRecord.parse(r.data).q.qname) for r in replies
             if isinstance(r, ClientReply)]
    assert ids == [q1.header.id, q2.header.id]
    assert names == ["popular.example.", "POPULAR.example."]
    assert core.stats.coalesced == 1


def test_unexpected_upstream_messages_are_ignored() -> None:
    core = make_core()
    _, up = forward(core, "x.example")
    good = upstream_answer(up, dnslib.RR("x.example", rdata=dnslib.A("192.0.2.1")))
    core.receive_upstream(good, ("203.0.113.66", 53), 0.0)  # not an upstream we asked
    core.receive_upstream(wire.with_id(good, (up.ref + 1) % 65536), UP1, 0.0)  # unknown id
    other = dnslib.DNSRecord.question("y.example")
    other.header.id = up.ref
    core.receive_upstream(other.reply().pack(), UP1, 0.0)  # another question
    core.receive_upstream(b"\x01\x02junk", UP1, 0.0)
    assert core.pop_actions() == [] and core.stats.upstream_invalid == 4
    core.receive_upstream(good, UP1, 0.0)
    only_reply(core)


def test_no_upstream_or_too_many_in_flight_gives_servfail() -> None:
    core = make_core(upstreams=())
    assert rcode(ask(core, "x.example")) == "SERVFAIL"
    core = make_core(DnsConfig(max_pending=1))
    forward(core, "one.example")
    assert rcode(ask(core, "two.example")) == "SERVFAIL"


def test_stats_samples() -> None:
    core = make_core()
    ask(core, "web.default.svc.cluster.local")
    ask(core, "nope.default.svc.cluster.local", "AAAA")
    samples = {(name, tuple(labels.items())): value for name, labels, value in
               core.stats.samples()}
    assert samples[("meshd_dns_queries_total", (("qtype", "A"),))] == 1
    assert samples[("meshd_dns_queries_total", (("qtype", "AAAA"),))] == 1
    assert samples[("meshd_dns_responses_total", (("rcode", "NXDOMAIN"),))] == 1
    assert samples[("meshd_dns_malformed_total", ())] == 0


# --- fuzzing ----------------------------------------------------------------------------------

VALID = [query("web.default.svc.cluster.local").pack(),
         query("_http._tcp.db.default.svc.cluster.local", "SRV", edns=1232).pack(),
         query("search.default.svc.cluster.local", edns=512, do=True).pack(),
         query("www.example.org", "AAAA").pack()]


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=120),
    st.tuples(st.sampled_from(VALID), st.integers(0, 200), st.binary(min_size=1, max_size=3))
    .map(lambda v: v[0][: v[1]] + v[2] + v[0][v[1] + len(v[2]):]),
    st.tuples(st.sampled_from(VALID), st.integers(0, 200)).map(lambda v: v[0][: v[1]]),
), st.booleans())
def test_fuzz_any_query_bytes(data: bytes, tcp: bool) -> None:
    core = make_core()
    reply = core.handle_query(data, 0.0, CLIENT, tcp=tcp)
    if isinstance(reply, bytes):
        # Whatever we send is a well-formed response (dnslib would refuse the odd question
        # name a fuzzed query can carry, which the reply echoes; our scanner checks structure).
        if wire.parse_header(reply).opcode == 0:
            wire.scan_response(reply)
        else:  # NOTIMP: a bare header
            assert wire.parse_header(reply).flags & wire.RCODE_MASK == wire.NOTIMP
        assert tcp or len(reply) <= 1232
    else:
        assert reply in (Outcome.PENDING, Outcome.DROPPED)
    for action in core.pop_actions():
        assert isinstance(action, UpstreamQuery)
        wire.parse_query(action.data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300), st.binary(min_size=1, max_size=3))
def test_fuzz_upstream_bytes(garbage: bytes, position: int, junk: bytes) -> None:
    core = make_core()
    _, up = forward(core, "search.default.svc.cluster.local")  # a chased ExternalName
    good = upstream_answer(up, dnslib.RR("www.example.org", rdata=dnslib.A("192.0.2.1")),
                           soa=(60, 60))
    mutated = good[:position] + junk + good[position + len(junk):]
    for data in (garbage, up.data, mutated, wire.with_id(garbage, up.ref)):
        core.receive_upstream(data, UP1, 0.0)
        core.receive_upstream(data, UP1, 0.0, tcp=True)
    for action in core.pop_actions():
        wire.scan_response(action.data) if isinstance(action, ClientReply) else \
            wire.parse_query(action.data)
