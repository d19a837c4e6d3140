"""meshd.stun.codec: RFC 5769 test vectors, error cases, and hypothesis fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.stun.codec import (
    Attribute,
    AttrType,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    Method,
    Nonce,
    OtherAddress,
    Padding,
    Realm,
    ResponseOrigin,
    ResponsePort,
    Software,
    StunMessage,
    StunParseError,
    UnknownAttribute,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    encode_message,
    long_term_key,
    parse_message,
    short_term_key,
    verify_integrity,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


# RFC 5769 §2.1-2.4, typed in from the RFC.
PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
TXID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SAMPLE_REQUEST = hexbytes("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")
SAMPLE_IPV4_RESPONSE = hexbytes("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")
SAMPLE_IPV6_RESPONSE = hexbytes("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")
SAMPLE_LONG_TERM_REQUEST = hexbytes("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
                53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
""")
VECTORS = [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE]


# --- RFC 5769 vectors -------------------------------------------------------------------------


def test_sample_request() -> None:
    msg = parse_message(SAMPLE_REQUEST)
    assert (msg.message_class, msg.method, msg.transaction_id) == (
        MessageClass.REQUEST, Method.BINDING, TXID
    )
    assert msg.get(Software) == Software("STUN test client")
    assert msg.get(Username) == Username("evtj:h6vY")
    assert msg.unknown_required == (0x0024,)  # PRIORITY; ICE-CONTROLLED 0x8029 is optional
    assert UnknownAttribute(0x8029, hexbytes("93 2f f9 b1 51 26 3b 36")) in msg.attributes
    assert msg.fingerprint
    assert msg.integrity == SAMPLE_REQUEST[-28:-8]
    assert verify_integrity(SAMPLE_REQUEST, short_term_key(PASSWORD))


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_sample_responses(vector: bytes, mapped: tuple[str, int]) -> None:
    msg = parse_message(vector)
    assert msg.message_class is MessageClass.SUCCESS
    assert msg.transaction_id == TXID
    assert msg.attributes == (Software("test vector"), XorMappedAddress(mapped))
    assert msg.fingerprint
    assert verify_integrity(vector, short_term_key(PASSWORD))
    # Our XOR-MAPPED-ADDRESS encoding matches the vector's bytes exactly.
    ours = encode_message(StunMessage(MessageClass.SUCCESS, 1, TXID, (XorMappedAddress(mapped),)))
    start = 20 + 16
    assert ours[20:] == vector[start : start + len(ours) - 20]


def test_sample_long_term_request() -> None:
    msg = parse_message(SAMPLE_LONG_TERM_REQUEST)
    assert msg.get(Username) == Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9")
    assert msg.get(Realm) == Realm("example.org")
    assert msg.get(Nonce) == Nonce(b"f//499k954d6OL34oL9FSTvy64sA")
    assert msg.unknown_required == ()
    assert not msg.fingerprint
    # The password "The<U+00AD>M<U+00AA>tr<U+2168>" after SASLprep is "TheMatrIX".
    key = long_term_key("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org", "TheMatrIX")
    assert verify_integrity(SAMPLE_LONG_TERM_REQUEST, key)


@pytest.mark.parametrize("vector", VECTORS)
def test_vectors_reject_wrong_key_and_corruption(vector: bytes) -> None:
    assert not verify_integrity(vector, short_term_key("wrong"))
    corrupted = bytearray(vector)
    corrupted[30] ^= 0x01  # inside SOFTWARE
    with pytest.raises(StunParseError, match="FINGERPRINT mismatch"):
        parse_message(bytes(corrupted))


def test_reencoded_sample_request_verifies() -> None:
    msg = parse_message(SAMPLE_REQUEST)
    key = short_term_key(PASSWORD)
    data = encode_message(msg, key=key)
    assert verify_integrity(data, key)
    again = parse_message(data)
    assert again.attributes == msg.attributes
    assert again.fingerprint


# --- header and attribute details --------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_class", "wire_type"),
    [
        (MessageClass.REQUEST, 0x0001),
        (MessageClass.INDICATION, 0x0011),
        (MessageClass.SUCCESS, 0x0101),
        (MessageClass.ERROR, 0x0111),
    ],
)
def test_message_type_bits(message_class: MessageClass, wire_type: int) -> None:
    data = encode_message(StunMessage(message_class, Method.BINDING, TXID))
    assert struct.unpack_from("!H", data)[0] == wire_type
    assert parse_message(data).message_class is message_class


def test_method_bits_roundtrip_all_methods() -> None:
    for method in range(0x1000):
        msg = StunMessage(MessageClass.ERROR, method, TXID)
        assert parse_message(encode_message(msg)).method == method


def test_rfc5780_attributes_wire_format() -> None:
    msg = StunMessage(
        MessageClass.REQUEST, Method.BINDING, TXID,
        (ChangeRequest(change_ip=True, change_port=True), ResponsePort(5000), Padding(8)),
    )
    data = encode_message(msg)
    assert data[20:] == hexbytes("""
        00 03 00 04 00 00 00 06
        00 27 00 04 13 88 00 00
        00 26 00 08 00 00 00 00 00 00 00 00
    """)
    assert parse_message(data) == msg


def test_error_and_unknown_attributes_wire_format() -> None:
    msg = StunMessage(
        MessageClass.ERROR, Method.BINDING, TXID,
        (ErrorCode(420, "Unknown Attribute"), UnknownAttributes((0x0003, 0x0024))),
    )
    data = encode_message(msg)
    assert data[20:28] == hexbytes("00 09 00 15 00 00 04 14")
    assert data[-8:] == hexbytes("00 0a 00 04 00 03 00 24")
    assert parse_message(data) == msg


def test_attributes_after_integrity_are_ignored() -> None:
    key = b"k"
    base = encode_message(StunMessage(MessageClass.REQUEST, 1, TXID, (Software("a"),)), key=key)
    extra = struct.pack("!HH", AttrType.USERNAME, 4) + b"user"
    data = bytearray(base + extra)
    struct.pack_into("!H", data, 2, len(data) - 20)
    msg = parse_message(bytes(data))
    assert msg.attributes == (Software("a"),)
    assert msg.integrity is not None


def test_duplicate_attribute_first_wins() -> None:
    msg = StunMessage(MessageClass.SUCCESS, 1, TXID,
                      (MappedAddress(("1.2.3.4", 1)), MappedAddress(("5.6.7.8", 2))))
    assert parse_message(encode_message(msg)).get(MappedAddress) == MappedAddress(("1.2.3.4", 1))


def valid(*attributes: Attribute, fingerprint: bool = False) -> bytes:
    return encode_message(StunMessage(MessageClass.REQUEST, 1, TXID, attributes,
                                      fingerprint=fingerprint))


def with_attr(attr_type: int, value: bytes) -> bytes:
    body = struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    return struct.pack("!HHI", 1, len(body), 0x2112A442) + TXID + body


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "too short"),
        (valid()[:19], "too short"),
        (b"\x80" + valid()[1:], "first two bits"),
        (valid()[:4] + b"\x00\x00\x00\x00" + valid()[8:], "magic cookie"),
        (valid() + b"\x00\x00\x00\x00", "does not match"),
        (valid(Software("abcd"))[:-4], "does not match"),
        (with_attr(AttrType.MAPPED_ADDRESS, b"\x00\x03\x00\x01\x01\x02\x03\x04"), "family"),
        (with_attr(AttrType.MAPPED_ADDRESS, b"\x00\x01\x00\x01\x01\x02\x03"), "length"),
        (with_attr(AttrType.XOR_MAPPED_ADDRESS, b"\x00\x02"), "too short"),
        (with_attr(AttrType.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00"), "odd"),
        (with_attr(AttrType.ERROR_CODE, b"\x00\x00\x07\x00"), "ERROR-CODE"),
        (with_attr(AttrType.ERROR_CODE, b"\x00\x00\x04\x64"), "ERROR-CODE"),
        (with_attr(AttrType.USERNAME, b"\xff\xfe"), "UTF-8"),
        (with_attr(AttrType.CHANGE_REQUEST, b"\x00\x00\x06"), "CHANGE-REQUEST"),
        (with_attr(AttrType.RESPONSE_PORT, b"\x00"), "RESPONSE-PORT"),
        (with_attr(AttrType.MESSAGE_INTEGRITY, b"\x00" * 19), "MESSAGE-INTEGRITY"),
        (with_attr(AttrType.FINGERPRINT, b"\x00" * 4), "FINGERPRINT mismatch"),
        (valid(fingerprint=True) + b"", ""),  # valid: sanity check of the helper
    ],
)
def test_malformed(data: bytes, error: str) -> None:
    if not error:
        parse_message(data)
        return
    with pytest.raises(StunParseError, match=error):
        parse_message(data)


def test_attribute_overrunning_message() -> None:
    data = bytearray(with_attr(AttrType.SOFTWARE, b"abcd"))
    struct.pack_into("!H", data, 22, 200)
    with pytest.raises(StunParseError, match="overruns"):
        parse_message(bytes(data))


def test_fingerprint_must_be_last() -> None:
    data = valid(fingerprint=True) + struct.pack("!HH", AttrType.SOFTWARE, 0)
    data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
    with pytest.raises(StunParseError):  # the length change also breaks the CRC; either way
        parse_message(data)


def test_verify_integrity_without_integrity_is_false() -> None:
    assert not verify_integrity(valid(Software("x")), b"key")
    with pytest.raises(StunParseError):
        verify_integrity(b"garbage", b"key")


@pytest.mark.parametrize(
    "make",
    [
        lambda: StunMessage(MessageClass.REQUEST, 1, b"short"),
        lambda: StunMessage(MessageClass.REQUEST, 0x1000, TXID),
        lambda: ErrorCode(200),
        lambda: Username("x" * 514),
        lambda: Software("x" * 764),
        lambda: MappedAddress(("not-an-ip", 1)),
        lambda: XorMappedAddress(("1.2.3.4", 70000)),
        lambda: ResponsePort(-1),
        lambda: UnknownAttribute(AttrType.SOFTWARE, b""),
        lambda: UnknownAttributes((0x10000,)),
    ],
)
def test_local_misuse_is_value_error(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_too_long_message_is_value_error() -> None:
    msg = StunMessage(MessageClass.REQUEST, 1, TXID, (Padding(0xFFF0), Padding(0xFFF0)))
    with pytest.raises(ValueError, match="too long"):
        encode_message(msg)


# --- hypothesis -------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.tuples(ipv4 | ipv6, st.integers(0, 65535))
text = st.text(max_size=40)
attribute_strategy: st.SearchStrategy[Attribute] = st.one_of(
    addresses.map(MappedAddress),
    addresses.map(XorMappedAddress),
    addresses.map(ResponseOrigin),
    addresses.map(OtherAddress),
    text.map(Username),
    st.builds(ErrorCode, st.integers(300, 699), text),
    st.lists(st.integers(0, 0xFFFF), max_size=6).map(lambda t: UnknownAttributes(tuple(t))),
    text.map(Software),
    st.builds(ChangeRequest, st.booleans(), st.booleans()),
    st.integers(0, 65535).map(ResponsePort),
    st.integers(0, 64).map(Padding),
    st.builds(
        UnknownAttribute,
        st.integers(0, 0xFFFF).filter(lambda t: t not in set(AttrType)),
        st.binary(max_size=24),
    ),
)
messages = st.builds(
    StunMessage,
    st.sampled_from(MessageClass),
    st.integers(0, 0xFFF),
    st.binary(min_size=12, max_size=12),
    st.lists(attribute_strategy, max_size=8).map(tuple),
    st.none(),
    st.booleans(),
)


@given(messages)
def test_encode_parse_roundtrip(msg: StunMessage) -> None:
    assert parse_message(encode_message(msg)) == msg


@given(messages, st.binary(min_size=1, max_size=32))
def test_integrity_roundtrip(msg: StunMessage, key: bytes) -> None:
    data = encode_message(msg, key=key)
    assert verify_integrity(data, key)
    assert not verify_integrity(data, key + b"x")
    parsed = parse_message(data)
    assert parsed.integrity is not None
    assert parsed.attributes == msg.attributes


def parse_or_reject(data: bytes) -> None:
    """The fuzz invariant: any bytes parse or raise StunParseError, nothing else."""
    try:
        msg = parse_message(data)
    except StunParseError:
        return
    encode_message(msg)  # whatever parses can be re-encoded
    try:
        verify_integrity(data, b"key")
    except StunParseError:
        raise AssertionError("verify_integrity rejected what parse_message accepted") from None


@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    parse_or_reject(data)


@given(
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
    st.integers(0, 0x3FFF),
)
def test_fuzz_well_framed_random_attributes(tlvs: list[tuple[int, bytes]], msg_type: int) -> None:
    # Valid header and TLV framing, random types and values: reaches every value decoder.
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4) for t, v in tlvs
    )
    parse_or_reject(struct.pack("!HHI", msg_type, len(body), 0x2112A442) + TXID + body)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
)


@settings(max_examples=300)
@given(
    st.one_of(st.sampled_from([*VECTORS, SAMPLE_LONG_TERM_REQUEST]),
              messages.map(encode_message)),
    st.lists(mutations, min_size=1, max_size=4),
    st.booleans(),
)
def test_fuzz_mutated_valid_messages(
    data: bytes, edits: list[tuple[str, int, int]], fix_length: bool
) -> None:
    buf = bytearray(data)
    for op, position, arg in edits:
        at = position % (len(buf) + 1)
        if op == "flip" and at < len(buf):
            buf[at] ^= 1 << arg
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = bytes([arg])
        elif op == "set" and at < len(buf):
            buf[at] = arg
    if fix_length and len(buf) >= 20:
        struct.pack_into("!H", buf, 2, (len(buf) - 20) & 0xFFFF)  # get past the length check
    parse_or_reject(bytes(buf))
