"""meshd.stun.codec, TURN part (RFC 8656 §17-§18): wire layouts, RFC-derived vectors, a cross
check with aioice's independent codec, and fuzzing of the TURN attribute decoders."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.stun.codec import (
    FAMILY_IPV6,
    PROTOCOL_UDP,
    Attribute,
    AttrType,
    ChannelNumber,
    Data,
    DontFragment,
    EvenPort,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    StunMessage,
    StunParseError,
    Username,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_integrity,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


# RFC 5769 §2.2/§2.3: the transaction id and XOR'ed address values of the sample responses.
# XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS use the XOR-MAPPED-ADDRESS encoding (RFC 8656 §18.3,
# §18.5), so the same (address, transaction id) must give the same value bytes.
TXID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
XOR_V4 = hexbytes("00 01 a1 47 e1 12 a6 43")
XOR_V6 = hexbytes("00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9")
V4 = ("192.0.2.1", 32853)
V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def body(*attributes: Attribute, txid: bytes = TXID) -> bytes:
    return encode_message(StunMessage(MessageClass.REQUEST, Method.ALLOCATE, txid,
                                      attributes))[20:]


@pytest.mark.parametrize("kind", [XorPeerAddress, XorRelayedAddress])
def test_xor_addresses_match_rfc5769_values(kind: type[XorPeerAddress]) -> None:
    code = AttrType.XOR_PEER_ADDRESS if kind is XorPeerAddress else AttrType.XOR_RELAYED_ADDRESS
    assert body(kind(V4)) == struct.pack("!HH", code, 8) + XOR_V4
    assert body(kind(V6)) == struct.pack("!HH", code, 20) + XOR_V6


@pytest.mark.parametrize(
    ("attribute", "wire"),
    [
        (ChannelNumber(0x4001), "00 0c 00 04 40 01 00 00"),  # §18.1: number + RFFU
        (Lifetime(600), "00 0d 00 04 00 00 02 58"),  # §18.2
        (Data(b"abcde"), "00 13 00 05 61 62 63 64 65 00 00 00"),  # §18.4, padded
        (Data(b""), "00 13 00 00"),
        (Realm("example.org"), "00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00"),
        (Nonce(b"abc"), "00 15 00 03 61 62 63 00"),
        (RequestedAddressFamily(FAMILY_IPV6), "00 17 00 04 02 00 00 00"),  # §18.6
        (EvenPort(reserve=True), "00 18 00 01 80 00 00 00"),  # §18.7: R bit, padded
        (EvenPort(), "00 18 00 01 00 00 00 00"),
        (RequestedTransport(PROTOCOL_UDP), "00 19 00 04 11 00 00 00"),  # §18.8
        (DontFragment(), "00 1a 00 00"),  # §18.9
        (ReservationToken(bytes(range(8))), "00 22 00 08 00 01 02 03 04 05 06 07"),  # §18.10
    ],
)
def test_turn_attribute_wire_format(attribute: Attribute, wire: str) -> None:
    assert body(attribute) == hexbytes(wire)
    assert parse_message(encode_message(StunMessage(MessageClass.REQUEST, Method.ALLOCATE,
                                                    TXID, (attribute,)))).attributes == (
        attribute,)


@pytest.mark.parametrize(
    ("method", "message_class", "wire_type"),
    [
        (Method.ALLOCATE, MessageClass.REQUEST, 0x0003),
        (Method.ALLOCATE, MessageClass.SUCCESS, 0x0103),
        (Method.ALLOCATE, MessageClass.ERROR, 0x0113),
        (Method.REFRESH, MessageClass.REQUEST, 0x0004),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, MessageClass.REQUEST, 0x0008),
        (Method.CHANNEL_BIND, MessageClass.SUCCESS, 0x0109),
    ],
)
def test_turn_message_types(method: Method, message_class: MessageClass, wire_type: int) -> None:
    data = encode_message(StunMessage(message_class, method, TXID))
    assert struct.unpack_from("!H", data)[0] == wire_type
    msg = parse_message(data)
    assert (msg.method, msg.message_class) == (method, message_class)


def test_get_all_keeps_wire_order() -> None:
    peers = (XorPeerAddress(("192.0.2.1", 1)), XorPeerAddress(("192.0.2.2", 2)))
    msg = parse_message(encode_message(StunMessage(MessageClass.REQUEST,
                                                   Method.CREATE_PERMISSION, TXID,
                                                   (Lifetime(1), *peers))))
    assert msg.get_all(XorPeerAddress) == peers
    assert msg.get_all(Data) == ()


def with_attr(attr_type: int, value: bytes) -> bytes:
    tlv = struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    return struct.pack("!HHI", 3, len(tlv), 0x2112A442) + TXID + tlv


@pytest.mark.parametrize(
    ("attr_type", "value", "error"),
    [
        (AttrType.CHANNEL_NUMBER, b"\x40\x01", "CHANNEL-NUMBER"),
        (AttrType.LIFETIME, b"\x00\x00\x02", "LIFETIME"),
        (AttrType.REQUESTED_TRANSPORT, b"\x11", "REQUESTED-TRANSPORT"),
        (AttrType.REQUESTED_ADDRESS_FAMILY, b"\x01\x00", "REQUESTED-ADDRESS-FAMILY"),
        (AttrType.EVEN_PORT, b"", "EVEN-PORT"),
        (AttrType.EVEN_PORT, b"\x80\x00\x00\x00\x00", "EVEN-PORT"),
        (AttrType.DONT_FRAGMENT, b"\x00", "DONT-FRAGMENT"),
        (AttrType.RESERVATION_TOKEN, b"1234567", "RESERVATION-TOKEN"),
        (AttrType.REALM, b"\xff", "UTF-8"),
        (AttrType.REALM, b"r" * 764, "REALM"),
        (AttrType.NONCE, b"n" * 764, "NONCE"),
        (AttrType.XOR_PEER_ADDRESS, b"\x00\x01\x00", "too short"),
        (AttrType.XOR_RELAYED_ADDRESS, b"\x00\x09\x00\x01\x01\x02\x03\x04", "family"),
    ],
)
def test_malformed_turn_attributes(attr_type: int, value: bytes, error: str) -> None:
    with pytest.raises(StunParseError, match=error):
        parse_message(with_attr(attr_type, value))


def test_even_port_with_padded_length_is_accepted() -> None:
    msg = parse_message(with_attr(AttrType.EVEN_PORT, b"\x80\x00\x00\x00"))
    assert msg.get(EvenPort) == EvenPort(reserve=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChannelNumber(0x10000),
        lambda: Lifetime(-1),
        lambda: Lifetime(1 << 32),
        lambda: Data(bytes(0xFFFD)),
        lambda: Realm("r" * 764),
        lambda: Nonce(b"n" * 764),
        lambda: RequestedAddressFamily(256),
        lambda: RequestedTransport(-1),
        lambda: ReservationToken(b"short"),
        lambda: XorPeerAddress(("not-an-ip", 1)),
        lambda: XorRelayedAddress(("192.0.2.1", 65536)),
    ],
)
def test_local_misuse_is_value_error(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


# --- cross check with aioice (an independent STUN/TURN codec) -----------------------------------


def test_aioice_reads_ours_and_we_read_aioice() -> None:
    stun = pytest.importorskip("aioice.stun")
    key = long_term_key("1700000000:node", "edgeweave", "pw")
    ours = StunMessage(MessageClass.SUCCESS, Method.ALLOCATE, TXID, (
        XorRelayedAddress(V4), Lifetime(600), XorPeerAddress(V6), Data(b"\x00payload"),
        ChannelNumber(0x4abc), Realm("edgeweave"), Nonce(b"n0nce"),
        RequestedTransport(PROTOCOL_UDP), Username("1700000000:node"),
    ))
    theirs = stun.parse_message(encode_message(ours, key=key))
    assert theirs.message_method == stun.Method.ALLOCATE
    assert theirs.message_class == stun.Class.RESPONSE
    assert theirs.attributes["XOR-RELAYED-ADDRESS"] == V4
    assert theirs.attributes["XOR-PEER-ADDRESS"] == V6
    assert theirs.attributes["LIFETIME"] == 600
    assert theirs.attributes["DATA"] == b"\x00payload"
    assert theirs.attributes["CHANNEL-NUMBER"] == 0x4abc
    assert theirs.attributes["REALM"] == "edgeweave"
    assert theirs.attributes["NONCE"] == b"n0nce"
    assert theirs.attributes["REQUESTED-TRANSPORT"] == 0x11000000
    assert theirs.check_message_integrity(key)

    message = stun.Message(stun.Method.CHANNEL_BIND, stun.Class.REQUEST, transaction_id=TXID)
    message.attributes["CHANNEL-NUMBER"] = 0x4001
    message.attributes["XOR-PEER-ADDRESS"] = V6
    message.attributes["USERNAME"] = "1700000000:node"
    message.attributes["REALM"] = "edgeweave"
    message.attributes["NONCE"] = b"n0nce"
    message.add_message_integrity(key)
    data = bytes(message)
    msg = parse_message(data)
    assert (msg.method, msg.message_class) == (Method.CHANNEL_BIND, MessageClass.REQUEST)
    assert msg.get(ChannelNumber) == ChannelNumber(0x4001)
    assert msg.get(XorPeerAddress) == XorPeerAddress(V6)
    assert msg.get(Nonce) == Nonce(b"n0nce")
    assert msg.fingerprint
    assert verify_integrity(data, key)


# --- hypothesis ----------------------------------------------------------------------------------

addresses = st.tuples(st.ip_addresses().map(str), st.integers(0, 65535))
turn_attributes: st.SearchStrategy[Attribute] = st.one_of(
    st.integers(0, 0xFFFF).map(ChannelNumber),
    st.integers(0, 0xFFFFFFFF).map(Lifetime),
    addresses.map(XorPeerAddress),
    addresses.map(XorRelayedAddress),
    st.binary(max_size=64).map(Data),
    st.text(max_size=30).map(Realm),
    st.binary(max_size=30).map(Nonce),
    st.integers(0, 255).map(RequestedAddressFamily),
    st.booleans().map(EvenPort),
    st.integers(0, 255).map(RequestedTransport),
    st.just(DontFragment()),
    st.binary(min_size=8, max_size=8).map(ReservationToken),
)


@given(st.sampled_from(MessageClass), st.sampled_from(Method),
       st.binary(min_size=12, max_size=12), st.lists(turn_attributes, max_size=8))
def test_turn_roundtrip(message_class: MessageClass, method: Method, txid: bytes,
                        attributes: list[Attribute]) -> None:
    msg = StunMessage(message_class, method, txid, tuple(attributes))
    assert parse_message(encode_message(msg)) == msg


TURN_TYPES = [t for t in AttrType if 0x000C <= t <= 0x0022]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(TURN_TYPES), st.binary(max_size=24)), max_size=6))
def test_fuzz_turn_attribute_values(tlvs: list[tuple[int, bytes]]) -> None:
    # Valid framing, TURN types, random values: each decoder parses or raises StunParseError.
    raw = b"".join(struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4) for t, v in tlvs)
    data = struct.pack("!HHI", 0x0003, len(raw), 0x2112A442) + TXID + raw
    try:
        msg = parse_message(data)
    except StunParseError:
        return
    encode_message(msg)
