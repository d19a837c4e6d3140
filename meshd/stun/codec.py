"""STUN messages (RFC 5389) and the RFC 5780 NAT-discovery attributes: pure parse/encode.

Header (RFC 5389 §6), 20 bytes, then zero or more attributes:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |0 0|     STUN Message Type     |         Message Length        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                   Magic Cookie (0x2112A442)                   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                     Transaction ID (96 bits)                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Message Type interleaves the 12-bit method (M) with the 2-bit class (C):

     13 12 11 10  9  8  7  6  5  4  3  2  1  0
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |M |M |M |M |M |C1|M |M |M |C0|M |M |M |M |
    |11|10|9 |8 |7 |  |6 |5 |4 |  |3 |2 |1 |0 |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+

Attribute (RFC 5389 §15), value padded to a multiple of 4 bytes:

    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Type                  |            Length             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Value (variable)                ....
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Any bytes given to `parse_message` either parse or raise `StunParseError` (a remote error).
Invalid values given to the dataclasses or `encode_message` raise `ValueError` (local misuse).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from meshd.udp import Address

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E  # RFC 5389 §15.5: "STUN" xor'ed into the CRC-32
HEADER = struct.Struct("!HHI12s")
ATTR_HEADER = struct.Struct("!HH")
MAX_USERNAME = 513  # bytes, RFC 5389 §15.3
MAX_TEXT = 763  # bytes, SOFTWARE and reason phrase (RFC 5389 §15.6, §15.10)


class StunParseError(Exception):
    """The peer sent bytes that are not a valid STUN message (a remote error: drop it)."""


class MessageClass(IntEnum):
    """The two class bits (RFC 5389 §6)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(IntEnum):
    """STUN methods this code knows by name; others parse as plain ints."""

    BINDING = 0x001


class AttrType(IntEnum):
    """Attribute type codes: RFC 5389 §18.2 and RFC 5780 §9.1."""

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


def _check_address(address: Address) -> None:
    ipaddress.ip_address(address[0])  # ValueError for anything but an IP literal
    if not 0 <= address[1] <= 0xFFFF:
        raise ValueError(f"port out of range: {address[1]}")


@dataclass(frozen=True)
class MappedAddress:
    """MAPPED-ADDRESS (RFC 5389 §15.1): the reflexive address, not obfuscated."""

    address: Address
    """The client's address as the server saw it."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class XorMappedAddress:
    """XOR-MAPPED-ADDRESS (RFC 5389 §15.2): the reflexive address, XOR'ed on the wire."""

    address: Address
    """The client's address as the server saw it."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class ResponseOrigin:
    """RESPONSE-ORIGIN (RFC 5780 §7.3): the address the response was sent from."""

    address: Address
    """Source address of this response."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class OtherAddress:
    """OTHER-ADDRESS (RFC 5780 §7.4): the server's alternate IP and alternate port."""

    address: Address
    """Differs from the address the request arrived on in both IP and port."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class Username:
    """USERNAME (RFC 5389 §15.3)."""

    value: str
    """UTF-8 text, at most 513 bytes encoded."""

    def __post_init__(self) -> None:
        if len(self.value.encode()) > MAX_USERNAME:
            raise ValueError(f"USERNAME longer than {MAX_USERNAME} bytes")


@dataclass(frozen=True)
class ErrorCode:
    """ERROR-CODE (RFC 5389 §15.6)."""

    code: int
    """300..699, e.g. 420."""
    reason: str = ""
    """Human-readable reason phrase."""

    def __post_init__(self) -> None:
        if not 300 <= self.code <= 699:
            raise ValueError(f"error code out of range 300..699: {self.code}")
        if len(self.reason.encode()) > MAX_TEXT:
            raise ValueError(f"reason phrase longer than {MAX_TEXT} bytes")


@dataclass(frozen=True)
class UnknownAttributes:
    """UNKNOWN-ATTRIBUTES (RFC 5389 §15.9): what a 420 response did not understand."""

    types: tuple[int, ...]
    """The attribute type codes."""

    def __post_init__(self) -> None:
        if any(not 0 <= t <= 0xFFFF for t in self.types):
            raise ValueError("attribute type out of range")


@dataclass(frozen=True)
class Software:
    """SOFTWARE (RFC 5389 §15.10)."""

    text: str
    """Product name and version."""

    def __post_init__(self) -> None:
        if len(self.text.encode()) > MAX_TEXT:
            raise ValueError(f"SOFTWARE longer than {MAX_TEXT} bytes")


@dataclass(frozen=True)
class ChangeRequest:
    """CHANGE-REQUEST (RFC 5780 §7.2): ask the server to answer from another IP and/or port."""

    change_ip: bool
    """Flag A: answer from the alternate IP."""
    change_port: bool
    """Flag B: answer from the alternate port."""


@dataclass(frozen=True)
class ResponsePort:
    """RESPONSE-PORT (RFC 5780 §7.5): send the response to this port of the source IP."""

    port: int
    """Destination port for the response."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")


@dataclass(frozen=True)
class Padding:
    """PADDING (RFC 5780 §7.6): filler; only its length matters."""

    length: int
    """Number of value bytes (sent as zeros)."""

    def __post_init__(self) -> None:
        if not 0 <= self.length <= 0xFFFF - 3:
            raise ValueError(f"PADDING length out of range: {self.length}")


@dataclass(frozen=True)
class UnknownAttribute:
    """Any attribute this codec does not interpret, kept verbatim."""

    type: int
    """The type code; below 0x8000 means comprehension-required (RFC 5389 §15)."""
    value: bytes
    """The value without padding."""

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF or len(self.value) > 0xFFFF - 3:
            raise ValueError("attribute type or length out of range")
        if self.type in _DECODERS or self.type in _TRAILERS:
            raise ValueError(f"attribute 0x{self.type:04x} is known; use its class")

    @property
    def comprehension_required(self) -> bool:
        """True when a receiver that does not know it must reject the message (420)."""
        return self.type < 0x8000


Attribute = (
    MappedAddress
    | XorMappedAddress
    | ResponseOrigin
    | OtherAddress
    | Username
    | ErrorCode
    | UnknownAttributes
    | Software
    | ChangeRequest
    | ResponsePort
    | Padding
    | UnknownAttribute
)

A = TypeVar("A")


@dataclass(frozen=True)
class StunMessage:
    """One STUN message. MESSAGE-INTEGRITY and FINGERPRINT are trailers, not `attributes`."""

    message_class: MessageClass
    """Request, indication, success or error response."""
    method: int
    """12-bit method; `Method.BINDING` for everything this project sends."""
    transaction_id: bytes
    """12 bytes chosen by the requester, echoed in the response."""
    attributes: tuple[Attribute, ...] = ()
    """In wire order; anything after MESSAGE-INTEGRITY is ignored (RFC 5389 §15.4)."""
    integrity: bytes | None = None
    """HMAC-SHA1 received in MESSAGE-INTEGRITY (check with `verify_integrity`); ignored by
    `encode_message`, which adds one only when given a key."""
    fingerprint: bool = False
    """Parsed: a FINGERPRINT was present and correct (a wrong one is a parse error).
    Encoded: append a FINGERPRINT."""

    def __post_init__(self) -> None:
        if len(self.transaction_id) != 12:
            raise ValueError("transaction id must be 12 bytes")
        if not 0 <= self.method <= 0xFFF:
            raise ValueError(f"method out of range: {self.method}")
        if self.integrity is not None and len(self.integrity) != 20:
            raise ValueError("MESSAGE-INTEGRITY must be 20 bytes")

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of class `kind` (later duplicates are ignored), or None."""
        for attribute in self.attributes:
            if isinstance(attribute, kind):
                return attribute
        return None

    @property
    def unknown_required(self) -> tuple[int, ...]:
        """Types of unknown comprehension-required attributes (a server answers 420)."""
        return tuple(
            a.type
            for a in self.attributes
            if isinstance(a, UnknownAttribute) and a.comprehension_required
        )


def short_term_key(password: str) -> bytes:
    """HMAC key for short-term credentials (RFC 5389 §15.4). SASLprep is not applied; it is
    the identity for the ASCII passwords this project generates."""
    return password.encode()


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """HMAC key for long-term credentials: MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


# --- message type ---------------------------------------------------------------------------


def _encode_type(method: int, message_class: int) -> int:
    return (
        (method & 0x00F)
        | (method & 0x070) << 1
        | (method & 0xF80) << 2
        | (message_class & 0b01) << 4
        | (message_class & 0b10) << 7
    )


def _decode_type(value: int) -> tuple[int, MessageClass]:
    method = (value & 0x000F) | (value >> 1) & 0x0070 | (value >> 2) & 0x0F80
    message_class = (value >> 4) & 0b01 | (value >> 7) & 0b10
    return method, MessageClass(message_class)


# --- attribute values -----------------------------------------------------------------------
#
# MAPPED-ADDRESS family (also RESPONSE-ORIGIN, OTHER-ADDRESS; RFC 5389 §15.1):
#
#     0                   1                   2                   3
#     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#    |0 0 0 0 0 0 0 0|    Family     |           Port                |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#    |                 Address (32 bits or 128 bits)                 |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# XOR-MAPPED-ADDRESS (§15.2) XORs the port with the cookie's top 16 bits and the address
# with the cookie (IPv4) or cookie || transaction id (IPv6).

_FAMILIES = {1: 4, 2: 16}  # family code -> address length


def _encode_address(address: Address, mask: bytes | None) -> bytes:
    ip = ipaddress.ip_address(address[0])
    raw = ip.packed
    port = address[1]
    if mask is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, port) + raw


def _decode_address(value: bytes, mask: bytes | None) -> Address:
    if len(value) < 4:
        raise StunParseError(f"address attribute too short ({len(value)} bytes)")
    _, family, port = struct.unpack_from("!BBH", value)
    size = _FAMILIES.get(family)
    if size is None:
        raise StunParseError(f"unknown address family {family}")
    raw = value[4:]
    if len(raw) != size:
        raise StunParseError(f"address length {len(raw)} does not match family {family}")
    if mask is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    return (str(ip), port)


def _xor_mask(transaction_id: bytes) -> bytes:
    return struct.pack("!I", MAGIC_COOKIE) + transaction_id


def _decode_text(value: bytes, limit: int, what: str) -> str:
    if len(value) > limit:
        raise StunParseError(f"{what} longer than {limit} bytes")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise StunParseError(f"{what} is not UTF-8") from None


def _decode_error_code(value: bytes) -> ErrorCode:
    # | reserved (21 bits) | class (3) | number (8) | reason phrase ... (RFC 5389 §15.6)
    if len(value) < 4:
        raise StunParseError("ERROR-CODE too short")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunParseError(f"bad ERROR-CODE class {klass} number {number}")
    return ErrorCode(klass * 100 + number, _decode_text(value[4:], MAX_TEXT, "reason phrase"))


def _decode_unknown_attributes(value: bytes) -> UnknownAttributes:
    if len(value) % 2:
        raise StunParseError("UNKNOWN-ATTRIBUTES length is odd")
    return UnknownAttributes(struct.unpack(f"!{len(value) // 2}H", value))


def _decode_fixed(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise StunParseError(f"{what} must be {size} bytes, got {len(value)}")
    return value


def _decode_response_port(value: bytes) -> ResponsePort:
    # | port (16) | padding (16) | (RFC 5780 §7.5)
    return ResponsePort(struct.unpack_from("!H", _decode_fixed(value, 4, "RESPONSE-PORT"))[0])


def _decode_change_request(value: bytes) -> ChangeRequest:
    # | 0 ... 0 |A|B|0| : A = change IP (0x4), B = change port (0x2) (RFC 5780 §7.2)
    (flags,) = struct.unpack("!I", _decode_fixed(value, 4, "CHANGE-REQUEST"))
    return ChangeRequest(change_ip=bool(flags & 0x4), change_port=bool(flags & 0x2))


Decoder = Callable[[bytes, bytes], Attribute]  # (value, transaction id) -> attribute

_DECODERS: dict[int, Decoder] = {
    AttrType.MAPPED_ADDRESS: lambda v, t: MappedAddress(_decode_address(v, None)),
    AttrType.XOR_MAPPED_ADDRESS: lambda v, t: XorMappedAddress(_decode_address(v, _xor_mask(t))),
    AttrType.RESPONSE_ORIGIN: lambda v, t: ResponseOrigin(_decode_address(v, None)),
    AttrType.OTHER_ADDRESS: lambda v, t: OtherAddress(_decode_address(v, None)),
    AttrType.USERNAME: lambda v, t: Username(_decode_text(v, MAX_USERNAME, "USERNAME")),
    AttrType.ERROR_CODE: lambda v, t: _decode_error_code(v),
    AttrType.UNKNOWN_ATTRIBUTES: lambda v, t: _decode_unknown_attributes(v),
    AttrType.SOFTWARE: lambda v, t: Software(_decode_text(v, MAX_TEXT, "SOFTWARE")),
    AttrType.CHANGE_REQUEST: lambda v, t: _decode_change_request(v),
    AttrType.RESPONSE_PORT: lambda v, t: _decode_response_port(v),
    AttrType.PADDING: lambda v, t: Padding(len(v)),
}
_TRAILERS = {AttrType.MESSAGE_INTEGRITY, AttrType.FINGERPRINT}


def _encode_value(attribute: Attribute, transaction_id: bytes) -> tuple[int, bytes]:
    match attribute:
        case MappedAddress(address):
            return AttrType.MAPPED_ADDRESS, _encode_address(address, None)
        case XorMappedAddress(address):
            return AttrType.XOR_MAPPED_ADDRESS, _encode_address(address, _xor_mask(transaction_id))
        case ResponseOrigin(address):
            return AttrType.RESPONSE_ORIGIN, _encode_address(address, None)
        case OtherAddress(address):
            return AttrType.OTHER_ADDRESS, _encode_address(address, None)
        case Username(value):
            return AttrType.USERNAME, value.encode()
        case ErrorCode(code, reason):
            head = struct.pack("!HBB", 0, code // 100, code % 100)
            return AttrType.ERROR_CODE, head + reason.encode()
        case UnknownAttributes(types):
            return AttrType.UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(types)}H", *types)
        case Software(text):
            return AttrType.SOFTWARE, text.encode()
        case ChangeRequest(change_ip, change_port):
            return AttrType.CHANGE_REQUEST, struct.pack("!I", change_ip << 2 | change_port << 1)
        case ResponsePort(port):
            return AttrType.RESPONSE_PORT, struct.pack("!HH", port, 0)
        case Padding(length):
            return AttrType.PADDING, bytes(length)
        case UnknownAttribute(type_, value):
            return type_, value
    raise TypeError(f"not a STUN attribute: {attribute!r}")


def _tlv(attr_type: int, value: bytes) -> bytes:
    return ATTR_HEADER.pack(attr_type, len(value)) + value + bytes(-len(value) % 4)


# --- messages -------------------------------------------------------------------------------


def encode_message(message: StunMessage, *, key: bytes | None = None) -> bytes:
    """The wire form of `message`; with `key`, adds MESSAGE-INTEGRITY (RFC 5389 §15.4), and
    FINGERPRINT (§15.5) last when `message.fingerprint`."""
    msg_type = _encode_type(message.method, message.message_class)
    txid = message.transaction_id
    body = b"".join(_tlv(*_encode_value(a, txid)) for a in message.attributes)

    def header(length: int) -> bytes:
        if length > 0xFFFF:
            raise ValueError(f"STUN message too long ({length} bytes of attributes)")
        return HEADER.pack(msg_type, length, MAGIC_COOKIE, txid)

    if key is not None:
        # The HMAC covers the header with a length that already counts MESSAGE-INTEGRITY.
        mac = hmac.new(key, header(len(body) + 24) + body, hashlib.sha1).digest()
        body += _tlv(AttrType.MESSAGE_INTEGRITY, mac)
    if message.fingerprint:
        crc = zlib.crc32(header(len(body) + 8) + body) ^ FINGERPRINT_XOR
        body += _tlv(AttrType.FINGERPRINT, struct.pack("!I", crc))
    return header(len(body)) + body


def _walk(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Check the header and yield (offset, type, value) for every attribute."""
    if len(data) < HEADER.size:
        raise StunParseError(f"too short for a STUN header ({len(data)} bytes)")
    msg_type, length, cookie, _ = HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunParseError("first two bits are not zero: not STUN")
    if cookie != MAGIC_COOKIE:
        raise StunParseError(f"bad magic cookie 0x{cookie:08x}")
    if length % 4 or HEADER.size + length != len(data):
        raise StunParseError(f"message length {length} does not match datagram ({len(data)})")
    offset = HEADER.size
    while offset < len(data):
        attr_type, attr_len = ATTR_HEADER.unpack_from(data, offset)
        start = offset + ATTR_HEADER.size
        end = start + attr_len + (-attr_len % 4)
        if end > len(data):
            raise StunParseError(f"attribute 0x{attr_type:04x} overruns the message")
        yield offset, attr_type, data[start : start + attr_len]
        offset = end


def parse_message(data: bytes) -> StunMessage:
    """Parse one STUN datagram; raise `StunParseError` for anything malformed, including a
    FINGERPRINT that is wrong or not last."""
    attributes: list[Attribute] = []
    integrity: bytes | None = None
    fingerprint = False
    txid = data[8:20]
    for offset, attr_type, value in _walk(data):
        if fingerprint:
            raise StunParseError("attribute after FINGERPRINT")
        if attr_type == AttrType.FINGERPRINT:
            (crc,) = struct.unpack("!I", _decode_fixed(value, 4, "FINGERPRINT"))
            if crc != zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR:
                raise StunParseError("FINGERPRINT mismatch")
            fingerprint = True
        elif integrity is not None:
            continue  # RFC 5389 §15.4: ignore all but FINGERPRINT after MESSAGE-INTEGRITY
        elif attr_type == AttrType.MESSAGE_INTEGRITY:
            integrity = _decode_fixed(value, 20, "MESSAGE-INTEGRITY")
        else:
            decoder = _DECODERS.get(attr_type)
            attributes.append(
                decoder(value, txid) if decoder else UnknownAttribute(attr_type, value)
            )
    method, message_class = _decode_type(HEADER.unpack_from(data)[0])
    return StunMessage(message_class, method, txid, tuple(attributes), integrity, fingerprint)


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True when `data` carries a MESSAGE-INTEGRITY that matches `key` (RFC 5389 §15.4);
    False when it is absent or wrong; `StunParseError` when `data` is not STUN."""
    for offset, attr_type, value in _walk(data):
        if attr_type == AttrType.MESSAGE_INTEGRITY:
            if len(value) != 20:
                return False
            header = data[:2] + struct.pack("!H", offset - HEADER.size + 24) + data[4:20]
            mac = hmac.new(key, header + data[HEADER.size : offset], hashlib.sha1).digest()
            return hmac.compare_digest(mac, value)
    return False
