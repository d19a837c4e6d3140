"""meshd.dns.wire: RFC 1035 vectors, dnslib as an independent decoder/encoder, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import dnslib  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.dns import wire
from meshd.dns.wire import (
    AAAARecord,
    ARecord,
    DnsWireError,
    Edns,
    NameRecord,
    Record,
    SOARecord,
    SRVRecord,
    TXTRecord,
)

# RFC 1035 §4.1: a standard query for "F.ISI.ARPA" A IN, id 0x1234, RD set, written out by hand.
F_ISI_ARPA = (bytes.fromhex("1234 0100 0001 0000 0000 0000".replace(" ", ""))
              + b"\x01F\x03ISI\x04ARPA\x00" + b"\x00\x01\x00\x01")


def test_rfc1035_query_vector() -> None:
    query = wire.parse_query(F_ISI_ARPA)
    assert (query.id, query.flags, query.qtype, query.qclass) == (0x1234, wire.RD, 1, 1)
    assert query.qname == b"\x01F\x03ISI\x04ARPA\x00"
    assert query.key == b"\x01f\x03isi\x04arpa\x00"
    assert query.label_starts == (0, 2, 6)
    assert query.edns is None and query.udp_limit(1232) == 512
    assert query.is_under(b"\x04arpa\x00") and query.is_under(b"\x03isi\x04arpa\x00")
    assert not query.is_under(b"\x02si\x04arpa\x00")  # a suffix, but not at a label boundary
    assert query.question == F_ISI_ARPA[12:]


def test_parse_query_from_dnslib_with_edns() -> None:
    q = dnslib.DNSRecord.question("Web.Default.svc.cluster.local", "SRV")
    q.add_ar(dnslib.EDNS0(udp_len=4096, flags="do"))
    query = wire.parse_query(q.pack())
    assert query.id == q.header.id
    assert query.qtype == wire.SRV
    assert query.edns == Edns(4096, 0, True)
    assert query.udp_limit(1232) == 1232 and query.udp_limit(8192) == 4096
    assert wire.wire_to_name(query.qname) == (b"Web", b"Default", b"svc", b"cluster", b"local")
    small = dnslib.DNSRecord.question("a.b")
    small.add_ar(dnslib.EDNS0(udp_len=100))
    assert wire.parse_query(small.pack()).udp_limit(1232) == 512


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" * 11, "shorter than a header"),
        (F_ISI_ARPA[:4] + b"\x00\x00" + F_ISI_ARPA[6:12], "expected one question, got 0"),
        (F_ISI_ARPA[:4] + b"\x00\x02" + F_ISI_ARPA[6:], "expected one question, got 2"),
        (F_ISI_ARPA[:12] + b"\xc0\x0c\x00\x01\x00\x01", "compressed or extended label"),
        (F_ISI_ARPA[:12] + b"\x41abc", "compressed or extended label"),
        (F_ISI_ARPA[:-1], "question runs past the end"),
        (F_ISI_ARPA[:14], "question name runs past the end"),
        (F_ISI_ARPA[:12] + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63
         + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01", "longer than 255"),
        (F_ISI_ARPA[:10] + b"\x00\x02" + F_ISI_ARPA[12:]
         + (b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00") * 2, "more than one OPT"),
        (F_ISI_ARPA[:10] + b"\x00\x01" + F_ISI_ARPA[12:]
         + b"\x01x\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00", "OPT record with a name"),
        (F_ISI_ARPA[:10] + b"\x00\x01" + F_ISI_ARPA[12:] + b"\x00\x00\x29\x10\x00",
         "runs past the end"),
    ],
)
def test_parse_query_errors(data: bytes, message: str) -> None:
    with pytest.raises(DnsWireError, match=message):
        wire.parse_query(data)


def test_names() -> None:
    name = wire.name_from_text("Web.Default.svc.cluster.local.")
    assert name == (b"web", b"default", b"svc", b"cluster", b"local")
    assert wire.name_to_wire(name) == b"\x03web\x07default\x03svc\x07cluster\x05local\x00"
    assert wire.name_to_text(name) == "web.default.svc.cluster.local."
    assert wire.name_to_text((b"a.b", b"\x00")) == "a\\046b.\\000."
    assert wire.name_from_text(".") == ()
    for bad in ("a..b", "x" * 64 + ".com", "é.com", ".".join(["abcdefgh"] * 30)):
        with pytest.raises(ValueError):
            wire.name_from_text(bad)


def test_read_name_follows_pointers_and_refuses_loops() -> None:
    data = b"\x00" * 12 + b"\x03foo\x00" + b"\x03bar\xc0\x0c"
    assert wire.read_name(data, 17) == ((b"bar", b"foo"), 23)
    with pytest.raises(DnsWireError, match="pointer"):
        wire.read_name(b"\x00" * 12 + b"\xc0\x0c", 12)  # points at itself
    with pytest.raises(DnsWireError, match="pointer"):
        wire.read_name(b"\x00" * 12 + b"\xc0\x0e\x01a\x00", 12)  # forward pointer
    with pytest.raises(DnsWireError, match="truncated"):
        wire.read_name(b"\x00" * 12 + b"\xc0", 12)


ALL_RECORDS = (
    Record((b"web", b"svc", b"local"), 5, ARecord("10.96.0.10")),
    Record((b"web", b"svc", b"local"), 5, AAAARecord("fd00::10")),
    Record((b"alias", b"svc", b"local"), 5, NameRecord(wire.CNAME, (b"web", b"svc", b"local"))),
    Record((b"10", b"0", b"96", b"10", b"in-addr", b"arpa"), 5,
           NameRecord(wire.PTR, (b"web", b"svc", b"local"))),
    Record((b"_http", b"_tcp", b"web", b"svc", b"local"), 5,
           SRVRecord(0, 100, 80, (b"web", b"svc", b"local"))),
    Record((b"local",), 30, SOARecord((b"ns", b"local"), (b"hostmaster", b"local"), 7, 7200,
                                      1800, 86400, 30)),
    Record((b"local",), 5, NameRecord(wire.NS, (b"ns", b"local"))),
    Record((b"v", b"local"), 5, TXTRecord((b"1.1.0", b"x"))),
)


def test_encode_response_decodes_with_dnslib() -> None:
    qname = b"\x03WEB\x03svc\x05local\x00"
    data = wire.encode_response(id=7, flags=wire.QR | wire.AA | wire.RD, qname=qname,
                                qtype=wire.A, qclass=wire.CLASS_IN, answer=ALL_RECORDS[:5],
                                authority=ALL_RECORDS[5:7], additional=ALL_RECORDS[7:],
                                edns=Edns(1232, 0, True))
    msg = dnslib.DNSRecord.parse(data)
    assert msg.header.id == 7 and msg.header.aa and msg.header.rd and msg.header.qr
    assert str(msg.q.qname) == "WEB.svc.local."
    rendered = [(str(rr.rname), dnslib.QTYPE[rr.rtype], rr.ttl, str(rr.rdata))
                for rr in (*msg.rr, *msg.auth)]
    assert rendered == [
        ("WEB.svc.local.", "A", 5, "10.96.0.10"),  # compressed to the question: its case
        ("WEB.svc.local.", "AAAA", 5, "fd00::10"),
        ("alias.svc.local.", "CNAME", 5, "WEB.svc.local."),
        ("10.0.96.10.in-addr.arpa.", "PTR", 5, "WEB.svc.local."),
        ("_http._tcp.WEB.svc.local.", "SRV", 5, "0 100 80 web.svc.local."),
        ("local.", "SOA", 30, "ns.local. hostmaster.local. 7 7200 1800 86400 30"),
        ("local.", "NS", 5, "ns.local."),
    ]
    assert [str(r.rdata) for r in msg.ar if r.rtype == dnslib.QTYPE.TXT] == ['"1.1.0","x"']
    opt = next(r for r in msg.ar if r.rtype == dnslib.QTYPE.OPT)
    assert opt.rclass == 1232 and opt.ttl == 0x8000
    # SRV targets are never compressed (RFC 2782): the name is spelled out in full.
    assert b"\x03web\x03svc\x05local\x00" in data


def test_encode_query_and_header_only() -> None:
    data = wire.encode_query(id=9, flags=wire.RD, qname=b"\x01a\x00", qtype=wire.AAAA,
                             qclass=wire.CLASS_IN, edns=Edns(1232, 0, False))
    msg = dnslib.DNSRecord.parse(data)
    assert msg.header.id == 9 and msg.header.rd and str(msg.q.qname) == "a."
    assert msg.q.qtype == dnslib.QTYPE.AAAA and msg.ar[0].rclass == 1232
    assert wire.header_only(5, wire.QR | wire.NOTIMP) == struct.pack("!HHHHHH", 5, 0x8004, 0, 0,
                                                                     0, 0)
    assert wire.with_id(data, 0x0102)[:2] == b"\x01\x02"
    assert wire.type_name(wire.SRV) == "SRV" and wire.type_name(999) == "TYPE999"
    assert wire.rcode_name(3) == "NXDOMAIN" and wire.rcode_name(12) == "RCODE12"


def _dnslib_response() -> bytes:
    reply = dnslib.DNSRecord.question("www.example.org", "A").reply()
    reply.add_answer(dnslib.RR("www.example.org", dnslib.QTYPE.CNAME,
                               rdata=dnslib.CNAME("web.example.org"), ttl=300))
    reply.add_answer(dnslib.RR("web.example.org", rdata=dnslib.A("192.0.2.1"), ttl=60))
    reply.add_auth(dnslib.RR("example.org", dnslib.QTYPE.SOA, ttl=900, rdata=dnslib.SOA(
        "ns.example.org", "admin.example.org", (1, 2, 3, 4, 120))))
    reply.add_ar(dnslib.RR("ns.example.org", rdata=dnslib.A("192.0.2.53"), ttl=77))
    reply.add_ar(dnslib.RR("mx.example.org", dnslib.QTYPE.MX, rdata=dnslib.MX("web.example.org"),
                           ttl=5))
    reply.add_ar(dnslib.EDNS0(udp_len=1232))
    return bytes(reply.pack())


def test_scan_response_locates_ttls_and_soa_minimum() -> None:
    data = _dnslib_response()
    response = wire.scan_response(data)
    assert response.key == b"\x03www\x07example\x03org\x00"
    assert (response.qtype, response.qclass, response.rcode) == (wire.A, 1, wire.NOERROR)
    assert [r.rtype for r in response.answer] == [wire.CNAME, wire.A]
    assert [r.ttl for r in (*response.answer, *response.authority)] == [300, 60, 900]
    for record in (*response.answer, *response.authority, *response.additional):
        assert struct.unpack_from("!I", data, record.ttl_offset)[0] == record.ttl
    assert wire.soa_minimum(data, response.authority[0]) == 120
    assert response.edns == Edns(1232, 0, False)
    with pytest.raises(DnsWireError):
        wire.soa_minimum(data, response.answer[0])


def test_copy_record_decompresses_names() -> None:
    data = _dnslib_response()
    response = wire.scan_response(data)
    copies = [wire.copy_record(data, r) for r in (*response.answer, *response.authority,
                                                  *response.additional[:2])]
    rebuilt = wire.encode_response(id=1, flags=wire.QR, qname=b"\x01q\x00", qtype=wire.A,
                                   qclass=1, answer=copies)
    msg = dnslib.DNSRecord.parse(rebuilt)
    assert [str(r.rdata) for r in msg.rr] == [
        "web.example.org.", "192.0.2.1",
        "ns.example.org. admin.example.org. 1 2 3 4 120", "192.0.2.53", "10 web.example.org."]


def test_scan_response_errors() -> None:
    with pytest.raises(DnsWireError, match="not a response"):
        wire.scan_response(F_ISI_ARPA)
    data = _dnslib_response()
    with pytest.raises(DnsWireError):
        wire.scan_response(data[:-3])
    # A truncated answer is only read up to its question.
    cut = bytearray(data[:40])
    cut[2] |= 0x02
    assert wire.scan_response(bytes(cut)).truncated


# --- fuzzing ----------------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_fuzz_parsers_raise_only_wire_errors(data: bytes) -> None:
    for parse in (wire.parse_query, wire.scan_response):
        with contextlib.suppress(DnsWireError):
            parse(data)


@settings(max_examples=300)
@given(st.integers(0, 500), st.binary(min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_messages(position: int, junk: bytes, cut: bool) -> None:
    for base in (_dnslib_response(), F_ISI_ARPA):
        position %= len(base)
        data = base[:position] if cut else base[:position] + junk + base[position + len(junk):]
        try:
            response = wire.scan_response(data)
        except DnsWireError:
            continue
        for record in (*response.answer, *response.authority, *response.additional):
            with contextlib.suppress(DnsWireError):
                wire.copy_record(data, record)


@given(st.lists(st.sampled_from(ALL_RECORDS), max_size=12),
       st.sampled_from([b"\x03web\x03svc\x05local\x00", b"\x01x\x00", b"\x00"]))
def test_fuzz_encode_scan_roundtrip(records: list[Record], qname: bytes) -> None:
    data = wire.encode_response(id=3, flags=wire.QR, qname=qname, qtype=wire.A, qclass=1,
                                answer=records, edns=Edns(512, 0, False))
    response = wire.scan_response(data)
    assert [r.rtype for r in response.answer] == [r.rtype for r in records]
    assert [r.ttl for r in response.answer] == [r.ttl for r in records]
    assert len(dnslib.DNSRecord.parse(data).rr) == len(records)
