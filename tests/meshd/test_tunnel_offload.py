"""meshd.tunnel.offload: the virtio_net_hdr codec, checksums against a word-by-word reference,
GSO segmentation (split, then joined again: the same byte stream), and garbage in every shape."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.tunnel.offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    PLAIN_HEADER,
    VNET_HDR_LEN,
    OffloadError,
    VnetHeader,
    check_frame,
    complete_checksum,
    encode_vnet_header,
    ones_sum,
    parse_vnet_header,
    to_packets,
)

SRC4, DST4 = ipaddress.IPv4Address("100.64.0.1"), ipaddress.IPv4Address("100.64.0.2")
SRC6, DST6 = ipaddress.IPv6Address("fd00::1"), ipaddress.IPv6Address("fd00::2")


def reference_sum(data: bytes) -> int:
    """RFC 1071 as written: 16-bit words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def verify(packet: bytes) -> None:
    """The IPv4 header checksum and the TCP/UDP checksum of `packet` are right; lengths too."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 15) * 4
        assert reference_sum(packet[:ihl]) == 0xFFFF, "IPv4 header checksum"
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
        proto, l4 = packet[9], packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    else:
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
        proto, l4 = packet[6], packet[40:]
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(l4), proto)
    if proto == 17:
        assert struct.unpack_from("!H", l4, 4)[0] == len(l4)
    assert reference_sum(pseudo + l4) == 0xFFFF, "L4 checksum"


def ip(version: int, proto: int, body: bytes, ident: int = 0x1234) -> bytes:
    if version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, 0x4000, 64, proto,
                             0, SRC4.packed, DST4.packed)
        csum = ~reference_sum(header) & 0xFFFF
        return header[:10] + struct.pack("!H", csum) + header[12:] + body
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64, SRC6.packed,
                       DST6.packed) + body


def pseudo_partial(packet: bytes) -> bytes:
    """What the kernel leaves in the L4 checksum field with CHECKSUM_PARTIAL: the folded
    pseudo-header sum (not complemented)."""
    version = packet[0] >> 4
    at = 20 if version == 4 else 40
    proto = packet[9] if version == 4 else packet[6]
    length = len(packet) - at
    pseudo = (packet[12:20] + struct.pack("!BBH", 0, proto, length) if version == 4
              else packet[8:40] + struct.pack("!IxxxB", length, proto))
    field = at + (16 if proto == 6 else 6)
    return packet[:field] + struct.pack("!H", reference_sum(pseudo)) + packet[field + 2:]


def tcp_super(version: int, payload: bytes, *, seq: int = 1000, flags: int = 0x18,
              options: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, doff << 4, flags, 512, 0, 0) + options
    return pseudo_partial(ip(version, 6, tcp + payload))


def frame(header: VnetHeader, packet: bytes) -> bytes:
    return encode_vnet_header(header) + packet


def test_header_codec_round_trip_and_layout() -> None:
    h = VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 52, 1328, 20, 16)
    raw = encode_vnet_header(h)
    assert raw == bytes.fromhex("01 01 3400 3005 1400 1000")  # little-endian fields
    assert len(raw) == VNET_HDR_LEN == 10
    assert parse_vnet_header(raw + b"rest") == h
    assert parse_vnet_header(PLAIN_HEADER) == VnetHeader()
    with pytest.raises(OffloadError):
        parse_vnet_header(b"\x01\x01")


@given(st.binary(max_size=3000))
@settings(max_examples=300)
def test_ones_sum_matches_rfc_1071(data: bytes) -> None:
    folded = ones_sum(data)
    expected = reference_sum(data)
    # Both are the ones' complement sum; 0 and 0xFFFF are the same number there.
    assert folded % 0xFFFF == expected % 0xFFFF
    assert folded == expected or (not any(data) and folded == 0)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("proto", [6, 17])
def test_partial_checksum_is_completed(version: int, proto: int) -> None:
    body = (struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, 0x10, 6, 0, 0) if proto == 6
            else struct.pack("!HHHH", 1, 2, 8 + 333, 0)) + random.Random(1).randbytes(333)
    packet = pseudo_partial(ip(version, proto, body))
    at = 20 if version == 4 else 40
    offset = 16 if proto == 6 else 6
    [done] = to_packets(frame(VnetHeader(F_NEEDS_CSUM, GSO_NONE, 0, 0, at, offset), packet))
    verify(done)
    assert done == complete_checksum(packet, at, offset)
    # A frame without NEEDS_CSUM is passed through untouched.
    assert to_packets(PLAIN_HEADER + done) == [done]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("length", [1, 1327, 1328, 1329, 5000, 65535 - 60 - 32])
def test_tcp_super_packet_is_segmented(version: int, length: int) -> None:
    mss = 1328
    options = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: 32-byte TCP header
    payload = random.Random(length).randbytes(length)
    packet = tcp_super(version, payload, flags=0x18 | 0x01 | 0x80, options=options)
    at = 20 if version == 4 else 40
    gso = (GSO_TCPV4 if version == 4 else GSO_TCPV6) | GSO_ECN
    segments = to_packets(frame(VnetHeader(F_NEEDS_CSUM, gso, at + 32, mss, at, 16), packet))
    assert len(segments) == -(-length // mss)
    joined = b""
    for i, seg in enumerate(segments):
        verify(seg)
        tcp = seg[at:]
        seq, flags = struct.unpack_from("!I", tcp, 4)[0], tcp[13]
        assert seq == 1000 + i * mss
        assert tcp[20:32] == options
        last = i == len(segments) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH: last
        assert bool(flags & 0x80) == (i == 0)  # CWR: first only
        assert flags & 0x10  # ACK on all
        if version == 4:
            assert struct.unpack_from("!H", seg, 4)[0] == 0x1234 + i  # IP ID per segment
        assert len(seg) - at - 32 == (mss if not last else length - mss * i)
        joined += tcp[32:]
    assert joined == payload  # merged again, the same stream


def test_sequence_numbers_wrap() -> None:
    packet = tcp_super(4, bytes(3000), seq=2**32 - 100)
    segments = to_packets(frame(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16), packet))
    assert [struct.unpack_from("!I", s, 24)[0] for s in segments] == [2**32 - 100, 1300, 2700]


@pytest.mark.parametrize("version", [4, 6])
def test_udp_super_packet_is_segmented(version: int) -> None:
    payload = random.Random(2).randbytes(4000)
    packet = pseudo_partial(ip(version, 17, struct.pack("!HHHH", 5, 6, 8 + 4000, 0) + payload))
    at = 20 if version == 4 else 40
    segments = to_packets(frame(VnetHeader(F_NEEDS_CSUM, GSO_UDP_L4, at + 8, 1200, at, 6),
                                packet))
    assert [len(s) - at - 8 for s in segments] == [1200, 1200, 1200, 400]
    for seg in segments:
        verify(seg)
    assert b"".join(s[at + 8:] for s in segments) == payload


@pytest.mark.parametrize(("header", "packet", "why"), [
    (VnetHeader(0x10), tcp_super(4, b"x"), "unknown offload flags"),
    (VnetHeader(F_NEEDS_CSUM, GSO_TCPV6, 0, 1000, 20, 16), tcp_super(4, b"x"), "IPv4"),
    (VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 20, 16), tcp_super(4, b"x"), "gso_size"),
    (VnetHeader(0, GSO_TCPV4, 0, 1000, 20, 16), tcp_super(4, b"x"), "flags"),
    (VnetHeader(F_NEEDS_CSUM, GSO_UDP, 0, 1000, 20, 6), tcp_super(4, b"x"), "gso_type 3"),
    (VnetHeader(F_NEEDS_CSUM, 0, 0, 0, 20, 5000), tcp_super(4, b"x"), "outside"),
    (VnetHeader(F_NEEDS_CSUM, 0, 0, 0, 2, 0), tcp_super(4, b"x"), "outside"),
    (VnetHeader(), b"\x00" * 40, "not an IP packet"),
    (VnetHeader(F_NEEDS_CSUM, GSO_UDP_L4, 0, 100, 20, 6), tcp_super(4, b"x" * 300),
     "not UDP"),
])
def test_bad_headers_are_offload_errors(header: VnetHeader, packet: bytes, why: str) -> None:
    with pytest.raises(OffloadError, match=why):
        to_packets(frame(header, packet))


def test_data_valid_flag_is_accepted() -> None:
    packet = tcp_super(4, b"abc")
    check_frame(frame(VnetHeader(F_DATA_VALID), packet))


FLAGS = st.sampled_from([0, F_NEEDS_CSUM, F_DATA_VALID, 0x10])
GSO = st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_UDP, 0x81, 0x7F])


@given(st.builds(VnetHeader, FLAGS, GSO, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                 st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
       st.one_of(st.binary(max_size=200),
                 st.builds(lambda v, n: tcp_super(v, bytes(n)), st.sampled_from([4, 6]),
                           st.integers(0, 3000))),
       st.integers(0, 60), st.binary(max_size=4))
@settings(max_examples=400, deadline=None)
def test_garbage_frames_split_or_raise_offload_error(header: VnetHeader, packet: bytes,
                                                     cut: int, tail: bytes) -> None:
    data = frame(header, packet)
    for candidate in (data, data[:len(data) - cut] + tail):
        try:
            out = to_packets(candidate)
        except OffloadError:
            continue
        assert all(isinstance(p, bytes) for p in out)
        assert len(out) <= 0xFFFF
