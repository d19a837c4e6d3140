"""STUN messages (RFC 5389), the RFC 5780 NAT-discovery attributes and the TURN (RFC 8656)
methods and attributes: pure parse/encode. One codec for every STUN-family attribute; the
ChannelData framing TURN adds beside STUN lives in `meshd.turn.framing`.

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
MAX_REALM_NONCE = 763  # bytes, REALM and NONCE (RFC 5389 §15.7-15.8: < 128 characters)
FAMILY_IPV4 = 0x01  # address family codes (RFC 5389 §15.1, RFC 8656 §18.6)
FAMILY_IPV6 = 0x02
PROTOCOL_UDP = 17  # REQUESTED-TRANSPORT value for UDP relaying (RFC 8656 §18.8)


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
    ALLOCATE = 0x003  # RFC 8656 §17 (TURN methods): request/response only
    REFRESH = 0x004  # request/response only
    SEND = 0x006  # indication only
    DATA = 0x007  # indication only
    CREATE_PERMISSION = 0x008  # request/response only
    CHANNEL_BIND = 0x009  # request/response only


class AttrType(IntEnum):
    """Attribute type codes: RFC 5389 §18.2, RFC 5780 §9.1 and RFC 8656 §18."""

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C  # RFC 8656 §18.1
    LIFETIME = 0x000D  # RFC 8656 §18.2
    XOR_PEER_ADDRESS = 0x0012  # RFC 8656 §18.3
    DATA = 0x0013  # RFC 8656 §18.4
    REALM = 0x0014  # RFC 5389 §15.7
    NONCE = 0x0015  # RFC 5389 §15.8
    XOR_RELAYED_ADDRESS = 0x0016  # RFC 8656 §18.5
    REQUESTED_ADDRESS_FAMILY = 0x0017  # RFC 8656 §18.6
    EVEN_PORT = 0x0018  # RFC 8656 §18.7
    REQUESTED_TRANSPORT = 0x0019  # RFC 8656 §18.8
    DONT_FRAGMENT = 0x001A  # RFC 8656 §18.9
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022  # RFC 8656 §18.10
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


# --- TURN attributes (RFC 8656 §18) ----------------------------------------------------------
#
# CHANNEL-NUMBER (§18.1), REQUESTED-ADDRESS-FAMILY (§18.6), REQUESTED-TRANSPORT (§18.8):
#
#     0                   1                   2                   3
#     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#    |        Channel Number         |         RFFU = 0              |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#    |    Family     |            Reserved (24 bits)                 |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#    |    Protocol   |                    RFFU                       |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# LIFETIME (§18.2) is a 32-bit number of seconds; EVEN-PORT (§18.7) one byte whose top bit R
# asks for the next port to be reserved (the value is padded to 4 bytes like any other);
# DONT-FRAGMENT (§18.9) is empty; RESERVATION-TOKEN (§18.10) is 8 opaque bytes;
# XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS (§18.3, §18.5) are encoded like XOR-MAPPED-ADDRESS.


@dataclass(frozen=True)
class ChannelNumber:
    """CHANNEL-NUMBER (RFC 8656 §18.1): the channel a ChannelBind request binds."""

    number: int
    """16 bits; TURN binds 0x4000..0x4FFF (a server answers 400 to anything else)."""

    def __post_init__(self) -> None:
        if not 0 <= self.number <= 0xFFFF:
            raise ValueError(f"channel number out of range: {self.number}")


@dataclass(frozen=True)
class Lifetime:
    """LIFETIME (RFC 8656 §18.2): seconds until the allocation expires; 0 deletes it."""

    seconds: int
    """Unsigned 32-bit."""

    def __post_init__(self) -> None:
        if not 0 <= self.seconds <= 0xFFFFFFFF:
            raise ValueError(f"lifetime out of range: {self.seconds}")


@dataclass(frozen=True)
class XorPeerAddress:
    """XOR-PEER-ADDRESS (RFC 8656 §18.3): a peer's address as the server sees it."""

    address: Address
    """The peer (IP and port; permissions only look at the IP)."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class Data:
    """DATA (RFC 8656 §18.4): the application payload of a Send or Data indication."""

    value: bytes
    """The payload, without padding."""

    def __post_init__(self) -> None:
        if len(self.value) > 0xFFFF - 3:
            raise ValueError("DATA longer than an attribute can hold")


@dataclass(frozen=True)
class Realm:
    """REALM (RFC 5389 §15.7): the long-term credential realm."""

    value: str
    """UTF-8 text, at most 763 bytes encoded."""

    def __post_init__(self) -> None:
        if len(self.value.encode()) > MAX_REALM_NONCE:
            raise ValueError(f"REALM longer than {MAX_REALM_NONCE} bytes")


@dataclass(frozen=True)
class Nonce:
    """NONCE (RFC 5389 §15.8): the server's opaque nonce, echoed back by the client."""

    value: bytes
    """Opaque bytes (quoted-string characters in practice), at most 763."""

    def __post_init__(self) -> None:
        if len(self.value) > MAX_REALM_NONCE:
            raise ValueError(f"NONCE longer than {MAX_REALM_NONCE} bytes")


@dataclass(frozen=True)
class XorRelayedAddress:
    """XOR-RELAYED-ADDRESS (RFC 8656 §18.5): the address the server allocated for the client."""

    address: Address
    """The relayed transport address peers send to."""

    def __post_init__(self) -> None:
        _check_address(self.address)


@dataclass(frozen=True)
class RequestedAddressFamily:
    """REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6): the family of the relayed address wanted."""

    family: int
    """`FAMILY_IPV4` (0x01) or `FAMILY_IPV6` (0x02); other values parse (a server answers
    440)."""

    def __post_init__(self) -> None:
        if not 0 <= self.family <= 0xFF:
            raise ValueError(f"address family out of range: {self.family}")


@dataclass(frozen=True)
class EvenPort:
    """EVEN-PORT (RFC 8656 §18.7): ask for an even relayed port."""

    reserve: bool = False
    """R bit: also reserve the next-higher port (answered with a RESERVATION-TOKEN)."""


@dataclass(frozen=True)
class RequestedTransport:
    """REQUESTED-TRANSPORT (RFC 8656 §18.8): the transport of the relayed address."""

    protocol: int
    """IANA protocol number; `PROTOCOL_UDP` (17) is the only one RFC 8656 allocates."""

    def __post_init__(self) -> None:
        if not 0 <= self.protocol <= 0xFF:
            raise ValueError(f"protocol out of range: {self.protocol}")


@dataclass(frozen=True)
class DontFragment:
    """DONT-FRAGMENT (RFC 8656 §18.9): send to peers with the IP DF bit set. No value."""


@dataclass(frozen=True)
class ReservationToken:
    """RESERVATION-TOKEN (RFC 8656 §18.10): names a port the server holds for a later
    Allocate."""

    token: bytes
    """8 opaque bytes."""

    def __post_init__(self) -> None:
        if len(self.token) != 8:
            raise ValueError("RESERVATION-TOKEN must be 8 bytes")


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
    | ChannelNumber
    | Lifetime
    | XorPeerAddress
    | Data
    | Realm
    | Nonce
    | XorRelayedAddress
    | RequestedAddressFamily
    | EvenPort
    | RequestedTransport
    | DontFragment
    | ReservationToken
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

    def get_all(self, kind: type[A]) -> tuple[A, ...]:
        """Every attribute of class `kind`, in wire order (CreatePermission may carry several
        XOR-PEER-ADDRESS, RFC 8656 §9.1)."""
        return tuple(a for a in self.attributes if isinstance(a, kind))

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


def _decode_channel_number(value: bytes) -> ChannelNumber:
    return ChannelNumber(struct.unpack_from("!H", _decode_fixed(value, 4, "CHANNEL-NUMBER"))[0])


def _decode_lifetime(value: bytes) -> Lifetime:
    return Lifetime(struct.unpack("!I", _decode_fixed(value, 4, "LIFETIME"))[0])


def _decode_even_port(value: bytes) -> EvenPort:
    # One byte (R + 7 RFFU bits); a few implementations send the padded 4 bytes as the length.
    if not 1 <= len(value) <= 4:
        raise StunParseError(f"EVEN-PORT must be 1 byte, got {len(value)}")
    return EvenPort(reserve=bool(value[0] & 0x80))


def _decode_dont_fragment(value: bytes) -> DontFragment:
    _decode_fixed(value, 0, "DONT-FRAGMENT")
    return DontFragment()


def _decode_nonce(value: bytes) -> Nonce:
    if len(value) > MAX_REALM_NONCE:
        raise StunParseError(f"NONCE longer than {MAX_REALM_NONCE} bytes")
    return Nonce(value)


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
    AttrType.CHANNEL_NUMBER: lambda v, t: _decode_channel_number(v),
    AttrType.LIFETIME: lambda v, t: _decode_lifetime(v),
    AttrType.XOR_PEER_ADDRESS: lambda v, t: XorPeerAddress(_decode_address(v, _xor_mask(t))),
    AttrType.DATA: lambda v, t: Data(v),
    AttrType.REALM: lambda v, t: Realm(_decode_text(v, MAX_REALM_NONCE, "REALM")),
    AttrType.NONCE: lambda v, t: _decode_nonce(v),
    AttrType.XOR_RELAYED_ADDRESS: lambda v, t: XorRelayedAddress(
        _decode_address(v, _xor_mask(t))),
    AttrType.REQUESTED_ADDRESS_FAMILY: lambda v, t: RequestedAddressFamily(
        _decode_fixed(v, 4, "REQUESTED-ADDRESS-FAMILY")[0]),
    AttrType.EVEN_PORT: lambda v, t: _decode_even_port(v),
    AttrType.REQUESTED_TRANSPORT: lambda v, t: RequestedTransport(
        _decode_fixed(v, 4, "REQUESTED-TRANSPORT")[0]),
    AttrType.DONT_FRAGMENT: lambda v, t: _decode_dont_fragment(v),
    AttrType.RESERVATION_TOKEN: lambda v, t: ReservationToken(
        _decode_fixed(v, 8, "RESERVATION-TOKEN")),
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
        case ChannelNumber(number):
            return AttrType.CHANNEL_NUMBER, struct.pack("!HH", number, 0)
        case Lifetime(seconds):
            return AttrType.LIFETIME, struct.pack("!I", seconds)
        case XorPeerAddress(address):
            return AttrType.XOR_PEER_ADDRESS, _encode_address(address, _xor_mask(transaction_id))
        case Data(value):
            return AttrType.DATA, value
        case Realm(value):
            return AttrType.REALM, value.encode()
        case Nonce(value):
            return AttrType.NONCE, value
        case XorRelayedAddress(address):
            return AttrType.XOR_RELAYED_ADDRESS, _encode_address(
                address, _xor_mask(transaction_id))
        case RequestedAddressFamily(family):
            return AttrType.REQUESTED_ADDRESS_FAMILY, struct.pack("!B3x", family)
        case EvenPort(reserve):
            return AttrType.EVEN_PORT, bytes([0x80 if reserve else 0])
        case RequestedTransport(protocol):
            return AttrType.REQUESTED_TRANSPORT, struct.pack("!B3x", protocol)
        case DontFragment():
            return AttrType.DONT_FRAGMENT, b""
        case ReservationToken(token):
            return AttrType.RESERVATION_TOKEN, token
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


# --- ICE attributes (RFC 8445 §7.1.1, §16.1) --------------------------------------------------
#
# Connectivity checks carry four attributes that only ICE agents understand:
#
#     PRIORITY (0x0024)         | priority (32 bits) |      the sender's candidate as prflx
#     USE-CANDIDATE (0x0025)    | (no value)         |      the controlling agent nominates
#     ICE-CONTROLLED (0x8029)   | tie-breaker (64 bits) |   the sender's role
#     ICE-CONTROLLING (0x802A)  | tie-breaker (64 bits) |
#
# They stay `UnknownAttribute`s inside `StunMessage` on purpose: `parse_message` and the STUN
# server keep RFC 5389 behaviour (a plain STUN server must answer 420 to a PRIORITY it does not
# implement, RFC 5389 §7.3.1). ICE code builds them with `IceAttributes.to_attributes` and reads
# them with `parse_ice_attributes`.


class IceAttrType(IntEnum):
    """ICE attribute type codes (RFC 8445 §16.1)."""

    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


@dataclass(frozen=True)
class IceAttributes:
    """The ICE attributes of one connectivity check (absent ones are None/False)."""

    priority: int | None = None
    """PRIORITY: the priority a peer-reflexive candidate learnt from this check gets."""
    use_candidate: bool = False
    """USE-CANDIDATE: the controlling agent nominates the pair this check runs on."""
    controlling: int | None = None
    """ICE-CONTROLLING tie-breaker: the sender believes it is the controlling agent."""
    controlled: int | None = None
    """ICE-CONTROLLED tie-breaker: the sender believes it is the controlled agent."""

    def __post_init__(self) -> None:
        if self.priority is not None and not 0 <= self.priority <= 0xFFFFFFFF:
            raise ValueError(f"PRIORITY out of range: {self.priority}")
        for breaker in (self.controlling, self.controlled):
            if breaker is not None and not 0 <= breaker <= 0xFFFFFFFFFFFFFFFF:
                raise ValueError(f"tie-breaker out of range: {breaker}")

    def to_attributes(self) -> tuple[UnknownAttribute, ...]:
        """The attributes to put in a `StunMessage`, in RFC 8445 order."""
        out: list[UnknownAttribute] = []
        if self.priority is not None:
            out.append(UnknownAttribute(IceAttrType.PRIORITY, struct.pack("!I", self.priority)))
        if self.use_candidate:
            out.append(UnknownAttribute(IceAttrType.USE_CANDIDATE, b""))
        if self.controlling is not None:
            out.append(UnknownAttribute(IceAttrType.ICE_CONTROLLING,
                                        struct.pack("!Q", self.controlling)))
        if self.controlled is not None:
            out.append(UnknownAttribute(IceAttrType.ICE_CONTROLLED,
                                        struct.pack("!Q", self.controlled)))
        return tuple(out)


_ICE_SIZES: dict[int, int] = {
    IceAttrType.PRIORITY: 4,
    IceAttrType.USE_CANDIDATE: 0,
    IceAttrType.ICE_CONTROLLED: 8,
    IceAttrType.ICE_CONTROLLING: 8,
}


def parse_ice_attributes(message: StunMessage) -> IceAttributes:
    """The ICE attributes of `message` (first of each type wins); `StunParseError` when one has
    the wrong length."""
    found: dict[int, bytes] = {}
    for attribute in message.attributes:
        if isinstance(attribute, UnknownAttribute) and attribute.type in _ICE_SIZES:
            found.setdefault(attribute.type, attribute.value)
    for code, value in found.items():
        _decode_fixed(value, _ICE_SIZES[code], IceAttrType(code).name.replace("_", "-"))

    def number(code: IceAttrType) -> int | None:
        value = found.get(code)
        return int.from_bytes(value, "big") if value is not None else None

    return IceAttributes(
        priority=number(IceAttrType.PRIORITY),
        use_candidate=IceAttrType.USE_CANDIDATE in found,
        controlling=number(IceAttrType.ICE_CONTROLLING),
        controlled=number(IceAttrType.ICE_CONTROLLED),
    )
