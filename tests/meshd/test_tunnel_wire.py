"""meshd.tunnel.wire: layouts byte by byte, round trips, and garbage in every shape."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.tunnel.noise import MESSAGE1_OVERHEAD, MESSAGE2_OVERHEAD
from meshd.tunnel.wire import (
    CAP_FRAGMENTS,
    DATA_OVERHEAD,
    FIRST_BYTE_RANGE,
    FRAGMENT_HEADER,
    FRAGMENT_PART,
    MAX_FRAGMENTS,
    MAX_MESSAGE,
    MIN_FRAGMENT_PART,
    MIN_INITIATION,
    MIN_RESPONSE,
    OFFLOAD_MIN_MTU,
    DataHeader,
    FragmentHeader,
    HandshakePayload,
    Initiation,
    MessageType,
    Response,
    TunnelParseError,
    data_ciphertext,
    encode_data,
    encode_fragments,
    encode_initiation,
    encode_payload,
    encode_response,
    fragment_part_for,
    message_type,
    parse_data_header,
    parse_fragment_header,
    parse_initiation,
    parse_payload,
    parse_response,
    stamp_capabilities,
    timestamp_capabilities,
    whole_message_packet,
)

V4 = ipaddress.IPv4Address("100.64.0.7")
V6 = ipaddress.IPv6Address("fd00:6d65:7368::7")
PAYLOAD = HandshakePayload(V4, 1_772_366_400_000_000_000, b"C" * 500, b"S" * 71)


def test_types_stay_clear_of_stun_dtls_turn_and_rtp() -> None:
    # RFC 7983 §7: STUN 0..3, ZRTP 16..19, DTLS 20..63, TURN ChannelData 64..79 (RFC 5766
    # channels reach 0x7F), RTP/RTCP 128..191.
    taken = {*range(0, 4), *range(16, 20), *range(20, 64), *range(0x40, 0x80), *range(128, 192)}
    assert all(t.value in FIRST_BYTE_RANGE for t in MessageType)
    assert not taken & set(FIRST_BYTE_RANGE)
    assert message_type(b"\xe3") is MessageType.DATA
    assert message_type(b"\x00\x01") is None  # a STUN binding request
    assert message_type(b"\x40\x00") is None  # TURN ChannelData
    assert message_type(b"\xef") is None  # ours, but unassigned
    assert message_type(b"") is None


def test_data_layout() -> None:
    datagram = encode_data(0x01020304, 0x0A0B0C0D0E0F1011, b"x" * 20)
    assert datagram[:13] == bytes.fromhex("e3" "01020304" "0a0b0c0d0e0f1011")
    assert DATA_OVERHEAD == 29
    assert parse_data_header(datagram) == DataHeader(0x01020304, 0x0A0B0C0D0E0F1011)
    assert data_ciphertext(datagram) == b"x" * 20
    with pytest.raises(ValueError):
        encode_data(2**32, 0, b"x" * 16)
    with pytest.raises(ValueError):
        encode_data(0, 2**64, b"x" * 16)
    with pytest.raises(ValueError):
        encode_data(0, 0, b"x" * 15)
    for short in range(DATA_OVERHEAD):
        with pytest.raises(TunnelParseError):
            parse_data_header(datagram[:short])


def test_handshake_layouts() -> None:
    noise1 = b"n" * (MESSAGE1_OVERHEAD + 100)
    datagram = encode_initiation(Initiation(0xDEADBEEF, noise1))
    assert datagram[:5] == bytes.fromhex("e1deadbeef")
    assert parse_initiation(datagram) == Initiation(0xDEADBEEF, noise1)
    noise2 = b"m" * (MESSAGE2_OVERHEAD + 100)
    datagram = encode_response(Response(1, 2, noise2))
    assert datagram[:9] == bytes.fromhex("e2" "00000001" "00000002")
    assert parse_response(datagram) == Response(1, 2, noise2)
    with pytest.raises(TunnelParseError):
        parse_response(encode_initiation(Initiation(1, noise1)))
    with pytest.raises(TunnelParseError):
        parse_initiation(encode_response(Response(1, 2, noise1)))
    with pytest.raises(ValueError):
        encode_response(Response(-1, 2, noise2))


def test_payload_layout_v4_and_v6() -> None:
    raw = encode_payload(PAYLOAD)
    assert raw[:4] == bytes([1, 4]) + struct.pack("!H", 500)
    assert raw[4:12] == struct.pack("!Q", PAYLOAD.timestamp_ns)
    assert raw[12:16] == V4.packed
    assert parse_payload(raw) == PAYLOAD
    v6 = HandshakePayload(V6, 0, b"c", b"s")
    raw6 = encode_payload(v6)
    assert raw6[1] == 6 and raw6[12:28] == V6.packed
    assert parse_payload(raw6) == v6


def test_payload_rejects_wrong_version_family_and_lengths() -> None:
    raw = bytearray(encode_payload(PAYLOAD))
    for offset, value in [(0, 2), (1, 5)]:
        bad = bytearray(raw)
        bad[offset] = value
        with pytest.raises(TunnelParseError):
            parse_payload(bytes(bad))
    with pytest.raises(TunnelParseError):  # certificate length pointing past the end
        parse_payload(bytes(raw[:2]) + struct.pack("!H", 0xFFFF) + bytes(raw[4:]))
    with pytest.raises(TunnelParseError):  # no signature left
        parse_payload(bytes(raw[: 16 + 500]))
    with pytest.raises(TunnelParseError):  # signature too long
        parse_payload(bytes(raw) + b"S" * 512)
    invalid = [(-1, b"c", b"s"), (0, b"", b"s"), (0, b"c", b""), (0, b"c" * 70000, b"s")]
    for ts, cert, sig in invalid:
        with pytest.raises(ValueError):
            HandshakePayload(V4, ts, cert, sig)


def test_every_truncation_of_a_payload_is_refused() -> None:
    raw = encode_payload(PAYLOAD)
    cut_points = range(len(raw) - len(PAYLOAD.signature))  # shorter signatures still parse
    for cut in cut_points:
        with pytest.raises(TunnelParseError):
            parse_payload(raw[:cut])


def test_handshakes_shorter_than_the_smallest_possible_are_refused() -> None:
    # The smallest payload: IPv4, one byte of certificate, one of signature.
    init = encode_initiation(Initiation(7, b"n" * (MESSAGE1_OVERHEAD + 12 + 4 + 2)))
    resp = encode_response(Response(7, 8, b"m" * (MESSAGE2_OVERHEAD + 12 + 4 + 2)))
    assert len(init) == MIN_INITIATION and len(resp) == MIN_RESPONSE
    assert parse_initiation(init).sender_index == 7
    assert parse_response(resp).receiver_index == 8
    for cut in range(len(init)):
        with pytest.raises(TunnelParseError):
            parse_initiation(init[:cut])
    for cut in range(len(resp)):
        with pytest.raises(TunnelParseError):
            parse_response(resp[:cut])


@settings(max_examples=500)
@given(st.binary(max_size=700))
def test_garbage_parses_or_raises_the_remote_error(data: bytes) -> None:
    for parse in (parse_initiation, parse_response, parse_data_header, parse_payload):
        with contextlib.suppress(TunnelParseError):
            parse(data)


@settings(max_examples=300)
@given(
    st.sampled_from([V4, V6]),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=1, max_size=2000),
    st.binary(min_size=1, max_size=512),
)
def test_payload_round_trip(
    overlay: ipaddress.IPv4Address | ipaddress.IPv6Address, ts: int, cert: bytes, sig: bytes
) -> None:
    payload = HandshakePayload(overlay, ts, cert, sig)
    assert parse_payload(encode_payload(payload)) == payload


# -- 0xE4 fragments and capability bits ----------------------------------------------------------


def test_fragment_layout_and_round_trip() -> None:
    sealed = bytes(range(256)) * 20  # 5120 bytes
    frags = encode_fragments(0x01020304, 0x0A0B0C0D0E0F1011, sealed, part=2000)
    assert [len(f) for f in frags] == [2015, 2015, 1135]
    assert frags[1][:15] == bytes.fromhex("e4" "01020304" "0a0b0c0d0e0f1011" "01" "03")
    assert FRAGMENT_HEADER.size == 15
    assert b"".join(f[15:] for f in frags) == sealed
    assert parse_fragment_header(frags[2]) == FragmentHeader(0x01020304, 0x0A0B0C0D0E0F1011,
                                                             2, 3)
    # A whole 1380-byte packet with its offload header is one 1421-byte datagram.
    [one] = encode_fragments(1, 2, bytes(1380 + 10 + 16))
    assert len(one) == 1421 and FRAGMENT_PART == 1406
    # 64 KB frames take 47 fragments: within one GSO send's 64 segments.
    assert len(encode_fragments(1, 2, bytes(0xFFFF + 10 + 16))) == 47
    with pytest.raises(ValueError):
        encode_fragments(1, 2, bytes(0xFFFF + 10 + 17))
    with pytest.raises(ValueError):
        encode_fragments(1, 2, bytes(10_000), part=100)  # 100 fragments
    with pytest.raises(ValueError):
        encode_fragments(2**32, 2, bytes(100))
    with pytest.raises(ValueError):
        encode_fragments(1, 2, bytes(100), part=0)


@pytest.mark.parametrize("data", [
    b"", b"\xe4", bytes.fromhex("e4" "00000001" "0000000000000002" "00" "01"),  # no part
    bytes.fromhex("e4" "00000001" "0000000000000002" "01" "01" "ff"),  # index 1 of 1
    bytes.fromhex("e4" "00000001" "0000000000000002" "00" "00" "ff"),  # count 0
    bytes.fromhex("e4" "00000001" "0000000000000002" "00" "41" "ff"),  # count 65
    bytes.fromhex("e3" "00000001" "0000000000000002" "00" "01" "ff"),  # not 0xE4
])
def test_bad_fragments_are_parse_errors(data: bytes) -> None:
    with pytest.raises(TunnelParseError):
        parse_fragment_header(data)


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_fragment_garbage_parses_or_raises_parse_error(data: bytes) -> None:
    for candidate in (data, b"\xe4" + data):
        try:
            header = parse_fragment_header(candidate)
        except TunnelParseError:
            continue
        assert header.index < header.count <= MAX_FRAGMENTS


def test_capabilities_ride_in_the_timestamp_low_byte() -> None:
    wall = 1_772_366_400_123_456_789
    first = stamp_capabilities(wall, 0, CAP_FRAGMENTS)
    assert first & 0xFF == 0x81 and first >> 8 == wall >> 8
    assert timestamp_capabilities(first) == CAP_FRAGMENTS
    # Strictly increasing even when the clock stands still or goes back.
    second = stamp_capabilities(wall, first, CAP_FRAGMENTS)
    assert second > first and timestamp_capabilities(second) == CAP_FRAGMENTS
    assert stamp_capabilities(wall - 10**9, second, 0) > second
    # Without capabilities the low byte stays 0, like older agents' float-derived clocks.
    plain = stamp_capabilities(wall, 0, 0)
    assert plain & 0xFF == 0 and timestamp_capabilities(plain) == 0
    old_agent = int(1_772_366_400.123456 * 1e9)  # what agents before this did
    assert old_agent & 0xFF == 0 and timestamp_capabilities(old_agent) == 0
    assert timestamp_capabilities(old_agent + 1) == 0  # their +1 for same-ns handshakes
    with pytest.raises(ValueError):
        stamp_capabilities(wall, 0, 0x80)


def test_a_frame_of_the_whole_message_size_fits_one_gso_send() -> None:
    size = whole_message_packet(65000)
    assert size == 63244
    sealed = bytes(10 + size + 16)  # offload header, packet, tag
    fragments = encode_fragments(7, 1, sealed)
    assert len(fragments) == 45 and sum(map(len, fragments)) <= 65000
    assert len(encode_fragments(7, 1, bytes(len(sealed) + 1))) == 46  # one byte more: 46
    assert whole_message_packet(65000, part=1025) == 62 * 1025 - 26  # 65000 // 1040 parts


@pytest.mark.parametrize("mtu", [OFFLOAD_MIN_MTU, 1200, 1280, 1380, 1420, 9000])
def test_fragments_follow_the_mtu(mtu: int) -> None:
    part = fragment_part_for(mtu)
    # A whole mtu-sized packet with its offload header and tag is one fragment; the fragment
    # datagram is the largest the tunnel sends: mtu + 41 (+ 28 IPv4/UDP, + 4 ChannelData).
    fragments = encode_fragments(1, 1, bytes(10 + mtu + 16), part=part)
    assert len(fragments) == 1 and len(fragments[0]) == mtu + 41
    assert part * MAX_FRAGMENTS >= MAX_MESSAGE  # the largest super-packet still fits
    assert DATA_OVERHEAD + 10 + mtu <= mtu + 41  # a lone 0xE3 frame is never larger


def test_the_default_mtu_keeps_the_default_part_and_small_mtus_get_the_floor() -> None:
    assert fragment_part_for(1380) == FRAGMENT_PART
    assert OFFLOAD_MIN_MTU == 999 and fragment_part_for(OFFLOAD_MIN_MTU) == MIN_FRAGMENT_PART
    assert fragment_part_for(576) == MIN_FRAGMENT_PART  # the agent runs such MTUs unoffloaded
