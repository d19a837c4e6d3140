"""DNS wire format (RFC 1035 §4, EDNS(0) RFC 6891): pure parse/encode functions.

Only what a cluster DNS server and a forwarding cache need: parse a query (header, one
question, the OPT record), encode responses with name compression, and scan a response from an
upstream resolver (its question, rcode, and where every TTL sits so a cache can age them in
place). Parsers raise `DnsWireError` for anything malformed and nothing else.

Header (RFC 1035 §4.1.1), 12 bytes, big-endian:

                                    1  1  1  1  1  1
      0  1  2  3  4  5  6  7  8  9  0  1  2  3  4  5
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |                      ID                       |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |           QDCOUNT / ANCOUNT / NSCOUNT / ARCOUNT (16 bits each)
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+

Question: QNAME (labels, each a length byte 1..63 and that many bytes, ended by a zero byte),
QTYPE (16), QCLASS (16). Resource record: NAME (labels, or ended by a 2-byte compression pointer
`11xxxxxx xxxxxxxx` to an earlier offset), TYPE (16), CLASS (16), TTL (32), RDLENGTH (16), RDATA.

OPT pseudo-record (RFC 6891 §6.1.2): NAME is the root (one zero byte), TYPE 41, CLASS is the
requestor's UDP payload size, and TTL is split:

    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |   EXTENDED-RCODE      |       VERSION         |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |DO|                    Z                       |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+

Names are handled in wire form: a query's name is kept as the bytes it arrived in (so answers
echo the asker's case), and lookups use those bytes lower-cased (`bytes.lower()` folds exactly
the ASCII letters, which is DNS case-insensitivity, RFC 4343).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

# Types (RFC 1035 §3.2.2, RFC 3596, RFC 2782, RFC 6891).
A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
MX = 15
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1

TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", MX: "MX", TXT: "TXT",
              AAAA: "AAAA", SRV: "SRV", OPT: "OPT", 64: "SVCB", 65: "HTTPS", IXFR: "IXFR",
              AXFR: "AXFR", ANY: "ANY"}

# Response codes (RFC 1035 §4.1.1, RFC 6891 §9: BADVERS is an extended rcode).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL",
               NXDOMAIN: "NXDOMAIN", NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

# Header flag bits (in the 16-bit flags word).
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F

EDNS_DO = 0x8000  # in the low 16 bits of the OPT TTL
MIN_UDP_PAYLOAD = 512  # RFC 1035 §2.3.4; smaller EDNS sizes are treated as this (RFC 6891)
HEADER_LEN = 12
MAX_NAME_LEN = 255
MAX_MESSAGE = 65535

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_U16 = struct.Struct("!H")
_QUESTION = struct.Struct("!HH")
_U32 = struct.Struct("!I")

Name = tuple[bytes, ...]
"""A domain name as its labels, most specific first, without the root: (b"web", b"default",
b"svc", b"cluster", b"local"). Zone data uses lower-case labels."""


class DnsWireError(ValueError):
    """A message is malformed (the peer's fault); the message names what and where."""


# --- names ------------------------------------------------------------------------------------


def name_from_text(text: str) -> Name:
    """`web.default.svc.cluster.local.` → labels, lower-cased. Raises ValueError if it is not
    a valid name of ASCII labels (1..63 bytes each, 255 bytes in all on the wire)."""
    text = text[:-1] if text.endswith(".") else text
    if not text:
        return ()
    try:
        labels = tuple(label.encode("ascii").lower() for label in text.split("."))
    except UnicodeEncodeError:
        raise ValueError(f"not an ASCII name: {text!r}") from None
    if any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"bad label length in {text!r}")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_LEN:
        raise ValueError(f"name longer than 255 bytes: {text!r}")
    return labels


def name_to_text(name: Name) -> str:
    """Labels → `a.b.c.` (bytes outside printable ASCII, `.` and `\\` escaped as `\\DDD`)."""
    out = []
    for label in name:
        chars = []
        for byte in label:
            if byte in (0x2E, 0x5C) or not 0x21 <= byte <= 0x7E:
                chars.append(f"\\{byte:03d}")
            else:
                chars.append(chr(byte))
        out.append("".join(chars))
    return ".".join(out) + "."


def name_to_wire(name: Name) -> bytes:
    """Labels → uncompressed wire form (with the terminating zero byte)."""
    return b"".join(bytes((len(label),)) + label for label in name) + b"\x00"


def wire_to_name(wire: bytes) -> Name:
    """Uncompressed wire form (as `Query.qname`) → labels (case kept)."""
    labels = []
    offset = 0
    while wire[offset]:
        length = wire[offset]
        labels.append(wire[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return tuple(labels)


def read_name(data: bytes, offset: int) -> tuple[Name, int]:
    """Decode the (possibly compressed) name at `offset`: (labels as sent, offset after it)."""
    labels: list[bytes] = []
    end = -1
    total = 1
    jumps = 0
    while True:
        if offset >= len(data):
            raise DnsWireError(f"name runs past the end at offset {offset}")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(data):
                raise DnsWireError("truncated compression pointer")
            if end < 0:
                end = offset + 2
            target = _U16.unpack_from(data, offset)[0] & 0x3FFF
            jumps += 1
            if target >= offset or jumps > 64:
                raise DnsWireError(f"compression pointer loop or forward pointer at {offset}")
            offset = target
            continue
        if length & 0xC0:
            raise DnsWireError(f"unsupported label type {length >> 6} at offset {offset}")
        if length == 0:
            return tuple(labels), (end if end >= 0 else offset + 1)
        total += length + 1
        if total > MAX_NAME_LEN:
            raise DnsWireError("name longer than 255 bytes")
        if offset + 1 + length > len(data):
            raise DnsWireError(f"label runs past the end at offset {offset}")
        labels.append(data[offset + 1 : offset + 1 + length])
        offset += 1 + length


def skip_name(data: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at `offset`, checking its syntax."""
    total = 1
    while True:
        if offset >= len(data):
            raise DnsWireError(f"name runs past the end at offset {offset}")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(data):
                raise DnsWireError("truncated compression pointer")
            return offset + 2
        if length & 0xC0:
            raise DnsWireError(f"unsupported label type {length >> 6} at offset {offset}")
        if length == 0:
            return offset + 1
        total += length + 1
        if total > MAX_NAME_LEN:
            raise DnsWireError("name longer than 255 bytes")
        offset += 1 + length


def _read_qname(data: bytes, offset: int) -> tuple[int, tuple[int, ...]]:
    """(end offset, label start offsets relative to `offset`) of an uncompressed name."""
    starts: list[int] = []
    position = offset
    while True:
        if position >= len(data):
            raise DnsWireError("question name runs past the end")
        length = data[position]
        if length == 0:
            break
        if length & 0xC0:
            raise DnsWireError("compressed or extended label in the question")
        starts.append(position - offset)
        position += 1 + length
        if position - offset + 1 > MAX_NAME_LEN:
            raise DnsWireError("question name longer than 255 bytes")
    return position + 1, tuple(starts)


# --- messages in ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed 12-byte header."""

    id: int
    """Transaction id."""
    flags: int
    """The flags word: QR, opcode, AA, TC, RD, RA, AD, CD, rcode (see the constants)."""
    qdcount: int
    """Questions."""
    ancount: int
    """Answer records."""
    nscount: int
    """Authority records."""
    arcount: int
    """Additional records."""

    @property
    def opcode(self) -> int:
        """0 = QUERY."""
        return (self.flags & OPCODE_MASK) >> 11


def parse_header(data: bytes) -> Header:
    """The header of any message."""
    if len(data) < HEADER_LEN:
        raise DnsWireError(f"message of {len(data)} bytes is shorter than a header")
    return Header(*_HEADER.unpack_from(data))


@dataclass(frozen=True, slots=True)
class Edns:
    """The OPT record of a message."""

    udp_size: int
    """Requestor's UDP payload size (as sent; see `Query.udp_limit`)."""
    version: int
    """EDNS version (0 is the only one defined)."""
    do: bool
    """DNSSEC OK."""
    extended_rcode: int = 0
    """Upper 8 bits of the 12-bit rcode (responses)."""


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: what a server needs to answer it."""

    id: int
    """Transaction id."""
    flags: int
    """The query's flags word (RD and CD are echoed in the answer)."""
    qname: bytes
    """The question name in wire form exactly as sent (case kept)."""
    key: bytes
    """`qname` lower-cased: the lookup key."""
    label_starts: tuple[int, ...]
    """Offset of each label within `qname` (to test "is under domain D" at label bounds)."""
    qtype: int
    """Question type."""
    qclass: int
    """Question class."""
    edns: Edns | None
    """The OPT record, if any."""

    def udp_limit(self, server_max: int) -> int:
        """The largest UDP response this client takes (RFC 6891 §6.2.5): 512 without EDNS,
        else its advertised size (at least 512), capped at our own `server_max`."""
        if self.edns is None:
            return MIN_UDP_PAYLOAD
        return max(MIN_UDP_PAYLOAD, min(self.edns.udp_size, server_max))

    def is_under(self, domain_key: bytes) -> bool:
        """True if the name is `domain_key` (lower-case wire form) or below it."""
        key = self.key
        if not key.endswith(domain_key):
            return False
        start = len(key) - len(domain_key)
        return start == 0 or start in self.label_starts

    @property
    def question(self) -> bytes:
        """The question section as sent (name, type, class)."""
        return self.qname + _U16.pack(self.qtype) + _U16.pack(self.qclass)


def parse_query(data: bytes) -> Query:
    """A query with exactly one question and at most one OPT record in the additional section.
    The caller has checked the header (QR = 0, opcode QUERY). Bytes after the last record are
    ignored."""
    if len(data) < HEADER_LEN:
        raise DnsWireError(f"message of {len(data)} bytes is shorter than a header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qdcount != 1:
        raise DnsWireError(f"expected one question, got {qdcount}")
    end, starts = _read_qname(data, HEADER_LEN)
    if end + 4 > len(data):
        raise DnsWireError("question runs past the end")
    qtype, qclass = _QUESTION.unpack_from(data, end)
    qname = data[HEADER_LEN:end]
    edns = None
    if ancount or nscount or arcount:
        records, _ = walk_records(data, end + 4, ancount + nscount + arcount)
        for record in records[ancount + nscount :]:
            if record.rtype == OPT:
                if edns is not None:
                    raise DnsWireError("more than one OPT record")
                edns = _edns(data, record)
    return Query(ident, flags, qname, qname.lower(), starts, qtype, qclass, edns)


def _edns(data: bytes, record: RecordSpan) -> Edns:
    if data[record.offset] != 0:
        raise DnsWireError("OPT record with a name other than the root")
    ttl = record.ttl
    return Edns(record.rclass, (ttl >> 16) & 0xFF, bool(ttl & EDNS_DO), ttl >> 24)


@dataclass(frozen=True, slots=True)
class RecordSpan:
    """Where one resource record sits in a message."""

    offset: int
    """Start of its owner name."""
    rtype: int
    """TYPE."""
    rclass: int
    """CLASS."""
    ttl: int
    """TTL (for OPT: extended rcode, version and flags)."""
    ttl_offset: int
    """Offset of the 4-byte TTL field."""
    rdata_offset: int
    """Start of RDATA."""
    rdlength: int
    """RDATA length."""


def walk_records(data: bytes, offset: int, count: int) -> tuple[list[RecordSpan], int]:
    """The `count` records starting at `offset`, and the offset after them."""
    records = []
    for _ in range(count):
        start = offset
        offset = skip_name(data, offset)
        if offset + 10 > len(data):
            raise DnsWireError(f"record at offset {start} runs past the end")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, offset)
        rdata = offset + 10
        if rdata + rdlength > len(data):
            raise DnsWireError(f"RDATA of the record at offset {start} runs past the end")
        records.append(RecordSpan(start, rtype, rclass, ttl, offset + 4, rdata, rdlength))
        offset = rdata + rdlength
    return records, offset


@dataclass(frozen=True, slots=True)
class Response:
    """A scanned response (from an upstream resolver)."""

    header: Header
    """Its header."""
    key: bytes
    """The question name, lower-cased wire form."""
    qtype: int
    """Question type."""
    qclass: int
    """Question class."""
    answer: tuple[RecordSpan, ...]
    """Answer section."""
    authority: tuple[RecordSpan, ...]
    """Authority section."""
    additional: tuple[RecordSpan, ...]
    """Additional section (with the OPT record, if any)."""
    edns: Edns | None
    """The OPT record."""

    @property
    def rcode(self) -> int:
        """The full (extended) response code."""
        low = self.header.flags & RCODE_MASK
        return low | (self.edns.extended_rcode << 4) if self.edns is not None else low

    @property
    def truncated(self) -> bool:
        """TC: the answer did not fit; ask again over TCP."""
        return bool(self.header.flags & TC)


def scan_response(data: bytes) -> Response:
    """Check a response's structure and locate its parts; every record must be complete."""
    header = parse_header(data)
    if not header.flags & QR:
        raise DnsWireError("not a response (QR = 0)")
    if header.qdcount != 1:
        raise DnsWireError(f"expected one question, got {header.qdcount}")
    end, _ = _read_qname(data, HEADER_LEN)
    if end + 4 > len(data):
        raise DnsWireError("question runs past the end")
    qtype, qclass = struct.unpack_from("!HH", data, end)
    if header.flags & TC:
        records: list[RecordSpan] = []  # possibly cut short; only the question matters
    else:
        records, _ = walk_records(data, end + 4,
                                  header.ancount + header.nscount + header.arcount)
    answer = records[: header.ancount]
    authority = records[header.ancount : header.ancount + header.nscount]
    additional = records[header.ancount + header.nscount :]
    edns = None
    for record in additional:
        if record.rtype == OPT:
            edns = _edns(data, record)
    return Response(header, data[HEADER_LEN:end].lower(), qtype, qclass, tuple(answer),
                    tuple(authority), tuple(additional), edns)


def soa_minimum(data: bytes, record: RecordSpan) -> int:
    """The MINIMUM field of an SOA record (its last four RDATA bytes, RFC 1035 §3.3.13)."""
    if record.rtype != SOA or record.rdlength < 22:
        raise DnsWireError("not an SOA record")
    return int(_U32.unpack_from(data, record.rdata_offset + record.rdlength - 4)[0])


_COMPRESSIBLE = {NS, CNAME, PTR, 3, 4, 7, 8, 9}  # RFC 1035 types whose RDATA is one name


def copy_record(data: bytes, record: RecordSpan) -> RawRecord:
    """A record of message `data` as a standalone `RawRecord` (names decompressed, so it can be
    written into another message)."""
    name, _ = read_name(data, record.offset)
    start, length = record.rdata_offset, record.rdlength
    rdata = data[start : start + length]
    if record.rtype in _COMPRESSIBLE:
        target, end = read_name(data, start)
        _check_rdata_end(end, start + length)
        rdata = name_to_wire(target)
    elif record.rtype == SOA:
        mname, offset = read_name(data, start)
        rname, offset = read_name(data, offset)
        _check_rdata_end(offset + 20, start + length)
        rdata = name_to_wire(mname) + name_to_wire(rname) + data[offset : offset + 20]
    elif record.rtype in (MX, SRV):
        fixed = 2 if record.rtype == MX else 6
        if length < fixed + 1:
            raise DnsWireError("short MX/SRV RDATA")
        target, end = read_name(data, start + fixed)
        _check_rdata_end(end, start + length)
        rdata = data[start : start + fixed] + name_to_wire(target)
    return RawRecord(name, record.ttl, record.rtype, record.rclass, rdata)


def _check_rdata_end(end: int, expected: int) -> None:
    if end != expected:
        raise DnsWireError("RDATA length does not match its content")


# --- messages out -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ARecord:
    """A: an IPv4 address."""

    rtype: ClassVar[int] = A
    address: str
    """Dotted quad."""


@dataclass(frozen=True, slots=True)
class AAAARecord:
    """AAAA: an IPv6 address."""

    rtype: ClassVar[int] = AAAA
    address: str
    """IPv6 text form."""


@dataclass(frozen=True, slots=True)
class NameRecord:
    """CNAME, PTR or NS: one target name."""

    kind: int
    """CNAME, PTR or NS."""
    target: Name
    """The target."""


@dataclass(frozen=True, slots=True)
class SRVRecord:
    """SRV (RFC 2782)."""

    rtype: ClassVar[int] = SRV
    priority: int
    """Lower is tried first."""
    weight: int
    """Relative weight among equal priorities."""
    port: int
    """Port of the service on the target."""
    target: Name
    """Host offering it."""


@dataclass(frozen=True, slots=True)
class SOARecord:
    """SOA (RFC 1035 §3.3.13)."""

    rtype: ClassVar[int] = SOA
    mname: Name
    """Primary name server."""
    rname: Name
    """Mailbox of the person responsible."""
    serial: int
    """Zone serial."""
    refresh: int
    """Secondary refresh interval (s)."""
    retry: int
    """Secondary retry interval (s)."""
    expire: int
    """Secondary expiry (s)."""
    minimum: int
    """Negative caching TTL (RFC 2308)."""


@dataclass(frozen=True, slots=True)
class TXTRecord:
    """TXT: character strings of up to 255 bytes each."""

    rtype: ClassVar[int] = TXT
    strings: tuple[bytes, ...]
    """The strings."""


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record to write (class IN)."""

    name: Name
    """Owner name."""
    ttl: int
    """TTL in seconds."""
    data: ARecord | AAAARecord | NameRecord | SRVRecord | SOARecord | TXTRecord
    """Record data."""

    @property
    def rtype(self) -> int:
        """The record's TYPE."""
        return self.data.kind if isinstance(self.data, NameRecord) else self.data.rtype


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record copied from another message: owner name and RDATA already decompressed."""

    name: Name
    """Owner name (case as received)."""
    ttl: int
    """TTL in seconds."""
    rtype: int
    """TYPE."""
    rclass: int
    """CLASS."""
    rdata: bytes
    """RDATA, free of compression pointers."""


class _Writer:
    """Builds one message with name compression (RFC 1035 §4.1.4)."""

    def __init__(self, header: bytes) -> None:
        self.buf = bytearray(header)
        self.offsets: dict[Name, int] = {}

    def name(self, name: Name, compress: bool = True) -> None:
        buf = self.buf
        for i in range(len(name)):
            suffix = tuple(label.lower() for label in name[i:])
            if compress:
                pointer = self.offsets.get(suffix)
                if pointer is not None:
                    buf += _U16.pack(0xC000 | pointer)
                    return
            if len(buf) < 0x4000 and suffix not in self.offsets:
                self.offsets[suffix] = len(buf)
            buf.append(len(name[i]))
            buf += name[i]
        buf.append(0)

    def question(self, qname: bytes, qtype: int, qclass: int) -> None:
        self.name(wire_to_name(qname), compress=False)
        self.buf += _U16.pack(qtype) + _U16.pack(qclass)

    def record(self, record: Record | RawRecord) -> None:
        buf = self.buf
        self.name(record.name)
        if isinstance(record, RawRecord):
            buf += _RR_FIXED.pack(record.rtype, record.rclass, record.ttl, len(record.rdata))
            buf += record.rdata
            return
        data = record.data
        buf += _U16.pack(record.rtype) + _U16.pack(CLASS_IN) + _U32.pack(record.ttl)
        length_at = len(buf)
        buf += b"\x00\x00"
        if isinstance(data, ARecord | AAAARecord):
            buf += ipaddress.ip_address(data.address).packed
        elif isinstance(data, NameRecord):
            self.name(data.target)
        elif isinstance(data, SRVRecord):
            buf += struct.pack("!HHH", data.priority, data.weight, data.port)
            self.name(data.target, compress=False)  # RFC 2782: no compression in the target
        elif isinstance(data, SOARecord):
            self.name(data.mname)
            self.name(data.rname)
            buf += struct.pack("!IIIII", data.serial, data.refresh, data.retry, data.expire,
                               data.minimum)
        else:
            for string in data.strings:
                buf.append(len(string))
                buf += string
        _U16.pack_into(buf, length_at, len(buf) - length_at - 2)

    def opt(self, udp_size: int, do: bool, extended_rcode: int = 0) -> None:
        ttl = (extended_rcode << 24) | (EDNS_DO if do else 0)
        self.buf += b"\x00" + _RR_FIXED.pack(OPT, udp_size, ttl, 0)


def encode_response(
    *,
    id: int,
    flags: int,
    qname: bytes,
    qtype: int,
    qclass: int,
    answer: Sequence[Record | RawRecord] = (),
    authority: Sequence[Record | RawRecord] = (),
    additional: Sequence[Record | RawRecord] = (),
    edns: Edns | None = None,
) -> bytes:
    """A whole message. `flags` includes the low 4 rcode bits; an extended rcode (BADVERS)
    goes in `edns.extended_rcode`. Owner names equal to the question name are written as
    pointers to it, so they show the asker's case."""
    extra = 1 if edns is not None else 0
    header = _HEADER.pack(id, flags, 1, len(answer), len(authority), len(additional) + extra)
    writer = _Writer(header)
    writer.question(qname, qtype, qclass)
    for record in (*answer, *authority, *additional):
        writer.record(record)
    if edns is not None:
        writer.opt(edns.udp_size, edns.do, edns.extended_rcode)
    if len(writer.buf) > MAX_MESSAGE:
        raise ValueError(f"message of {len(writer.buf)} bytes exceeds 65535")
    return bytes(writer.buf)


def encode_query(
    *, id: int, flags: int, qname: bytes, qtype: int, qclass: int, edns: Edns | None = None
) -> bytes:
    """A query with one question (and an OPT record with `edns`)."""
    extra = 1 if edns is not None else 0
    writer = _Writer(_HEADER.pack(id, flags, 1, 0, 0, extra))
    writer.question(qname, qtype, qclass)
    if edns is not None:
        writer.opt(edns.udp_size, edns.do)
    return bytes(writer.buf)


def header_only(query_id: int, flags: int) -> bytes:
    """A response with no sections at all (for NOTIMP to an opcode we do not serve)."""
    return _HEADER.pack(query_id, flags, 0, 0, 0, 0)


def with_id(data: bytes, new_id: int) -> bytes:
    """`data` with another transaction id."""
    return _U16.pack(new_id) + data[2:]


def type_name(qtype: int) -> str:
    """`A`, `AAAA`, ... or `TYPE123` (RFC 3597 spelling)."""
    return TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    """`NOERROR`, `NXDOMAIN`, ... or `RCODE12`."""
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"
