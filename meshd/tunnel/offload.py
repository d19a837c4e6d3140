"""TUN offload frames: a `virtio_net_hdr` in front of an IP packet or a TCP/UDP super-packet.
Pure functions, no I/O.

With `IFF_VNET_HDR` and `TUNSETOFFLOAD` (`meshd.tunnel.tun`) every read from the TUN device is a
*frame*: this 10-byte header, then one IP packet that may be a GSO super-packet of up to 64 KB
(the kernel left segmentation to us), and may carry a partial checksum (the kernel left the
checksum to us). A write takes a frame the same way, and the kernel segments or checksums what
the header says is left to do. Layout (`struct virtio_net_hdr`, virtio 1.x §5.1.6; little-endian
here, which is also what the legacy native-endian header is on x86 and arm64):

    +-------+----------+---------+----------+------------+-------------+--------- - -
    | flags | gso_type | hdr_len | gso_size | csum_start | csum_offset | IP packet
    +-------+----------+---------+----------+------------+-------------+--------- - -
        1        1         2          2           2             2

- `flags` NEEDS_CSUM: the L4 checksum field at `csum_start + csum_offset` holds only the
  pseudo-header sum; the ones' complement sum from `csum_start` to the end completes it.
- `gso_type` TCPV4 / TCPV6 / UDP_L4 (+ ECN bit): cut the payload after the headers into
  `gso_size`-byte segments, each with its own headers (TCP: sequence numbers, FIN/PSH only on
  the last, CWR only on the first; IPv4: ID + 1 per segment; lengths, checksums).

`to_packets(frame)` does in software what the kernel would: it turns a frame into complete IP
packets. The tunnel needs it when the other side cannot take frames (a peer agent without
fragment support, or a TUN device the kernel refused offloads for). `check_frame` is the cheap
sanity check of a frame a peer sent before it goes to the kernel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
"""10: the header without `num_buffers` (TUNSETVNETHDRSZ is set to this)."""

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO: IP fragmentation of a UDP datagram; never enabled, refused here
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # USO (Linux 6.2+ on TUN)
GSO_ECN = 0x80

PLAIN_HEADER = bytes(VNET_HDR_LEN)
"""The header of a frame that is one complete packet (no GSO, checksum done)."""

MAX_FRAME = VNET_HDR_LEN + 0xFFFF
"""An IPv4 total length / IPv6 payload length is 16 bits: no frame is longer."""

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP_SEQ = struct.Struct("!I")
_H = struct.Struct("!H")
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


class OffloadError(ValueError):
    """A frame whose offload header does not fit its packet (from a peer: a remote error)."""


@dataclass(frozen=True)
class VnetHeader:
    """A decoded `virtio_net_hdr`."""

    flags: int = 0
    """NEEDS_CSUM / DATA_VALID."""
    gso_type: int = GSO_NONE
    """GSO_* (ECN bit included)."""
    hdr_len: int = 0
    """Bytes of headers (IP + L4) before the payload to segment; a hint."""
    gso_size: int = 0
    """Payload bytes per segment."""
    csum_start: int = 0
    """Where the L4 checksum's coverage starts (the L4 header), from the IP header."""
    csum_offset: int = 0
    """Offset of the checksum field from `csum_start` (TCP 16, UDP 6)."""


def parse_vnet_header(frame: bytes) -> VnetHeader:
    if len(frame) < VNET_HDR_LEN:
        raise OffloadError(f"frame of {len(frame)} bytes has no offload header")
    return VnetHeader(*VNET_HDR.unpack_from(frame))


def encode_vnet_header(header: VnetHeader) -> bytes:
    return VNET_HDR.pack(header.flags, header.gso_type, header.hdr_len, header.gso_size,
                         header.csum_start, header.csum_offset)


def check_frame(frame: bytes) -> None:
    """Raise OffloadError unless the header is one this module (and the kernel) can act on: an
    IPv4/IPv6 packet, a known GSO type matching the IP version, a checksum field inside the
    packet. Cheap: a struct unpack and a few comparisons."""
    if len(frame) < VNET_HDR_LEN + 20:
        raise OffloadError(f"frame of {len(frame)} bytes is too short")
    flags, gso, _, gso_size, start, offset = VNET_HDR.unpack_from(frame)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise OffloadError(f"unknown offload flags {flags:#x}")
    version = frame[VNET_HDR_LEN] >> 4
    kind = gso & ~GSO_ECN
    if kind != GSO_NONE:
        if (kind, version) not in ((GSO_TCPV4, 4), (GSO_TCPV6, 6), (GSO_UDP_L4, 4),
                                   (GSO_UDP_L4, 6)):
            raise OffloadError(f"gso_type {gso} with IPv{version}")
        if not 0 < gso_size <= 0xFFFF or not flags & F_NEEDS_CSUM:
            raise OffloadError(f"gso_size {gso_size} / flags {flags:#x} unusable")
    elif version not in (4, 6):
        raise OffloadError(f"not an IP packet (version {version})")
    if flags & F_NEEDS_CSUM and (start < 20 or VNET_HDR_LEN + start + offset + 2 > len(frame)):
        raise OffloadError(f"checksum field {start}+{offset} outside a "
                           f"{len(frame) - VNET_HDR_LEN}-byte packet")


def ones_sum(data: bytes) -> int:
    """RFC 1071 ones' complement sum of 16-bit big-endian words, folded (0..0xFFFF; 0xFFFF
    for a non-zero sum that folds to zero). Since 2**16 ≡ 1 (mod 0xFFFF), the sum is the value
    of all the bytes as one big integer modulo 0xFFFF, which CPython computes in C."""
    if len(data) & 1:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total if total or not any(data) else 0xFFFF


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(*parts: bytes) -> int:
    """The Internet checksum over the concatenation of `parts` (each of even length but the
    last), never 0 (RFC 768: a computed zero is sent as 0xFFFF)."""
    value = ~_fold(sum(ones_sum(p) for p in parts)) & 0xFFFF
    return value or 0xFFFF


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """`packet` with the partial checksum at `csum_start + csum_offset` completed (the field
    holds the pseudo-header sum, so summing from `csum_start` over the field gives the
    whole)."""
    field = csum_start + csum_offset
    if csum_start < 0 or field + 2 > len(packet):
        raise OffloadError(f"checksum field {csum_start}+{csum_offset} outside the packet")
    value = _checksum(packet[csum_start:])
    return packet[:field] + _H.pack(value) + packet[field + 2:]


def _pseudo(packet: bytes, version: int, proto: int, length: int) -> bytes:
    if version == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, length)
    return packet[8:40] + struct.pack("!IxxxB", length, proto)


def _l3(packet: bytes) -> tuple[int, int]:
    """(IP version, IP header length) of a packet without IPv6 extension headers."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            raise OffloadError("IPv4 header length out of range")
        return 4, ihl
    if version == 6:
        if len(packet) < 40:
            raise OffloadError("IPv6 packet shorter than its header")
        return 6, 40
    raise OffloadError(f"not an IP packet (version {version})")


def _ip_header(template: bytes, version: int, total: int, ident_step: int) -> bytes:
    """The IP header for a segment of `total` bytes (IPv4: ID + step, checksum redone)."""
    if version == 6:
        return template[:4] + _H.pack(total - 40) + template[6:40]
    ihl = len(template)
    ident = (_H.unpack_from(template, 4)[0] + ident_step) & 0xFFFF
    header = template[:2] + _H.pack(total) + _H.pack(ident) + template[6:10] + b"\0\0" \
        + template[12:ihl]
    return header[:10] + _H.pack(_checksum(header)) + header[12:]


def to_packets(frame: bytes) -> list[bytes]:
    """The complete IP packets a frame stands for: GSO super-packets segmented, partial
    checksums completed, everything else as it is. Raises OffloadError for a header that does
    not fit its packet."""
    check_frame(frame)
    flags, gso, _, gso_size, start, offset = VNET_HDR.unpack_from(frame)
    packet = frame[VNET_HDR_LEN:]
    kind = gso & ~GSO_ECN
    if kind == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            return [complete_checksum(packet, start, offset)]
        return [packet]
    version, ihl = _l3(packet)
    proto = packet[9] if version == 4 else packet[6]
    if version == 4 and packet[6] & 0x3F | packet[7]:
        raise OffloadError("GSO of an IP fragment")
    if kind == GSO_UDP_L4:
        if proto != 17 or len(packet) < ihl + 8:
            raise OffloadError("UDP segmentation of a packet that is not UDP")
        return _split_udp(packet, version, ihl, gso_size)
    if proto != 6 or len(packet) < ihl + 20:
        raise OffloadError("TCP segmentation of a packet that is not TCP")
    return _split_tcp(packet, version, ihl, gso_size)


def _split_tcp(packet: bytes, version: int, ihl: int, mss: int) -> list[bytes]:
    doff = (packet[ihl + 12] >> 4) * 4
    end = ihl + doff
    if doff < 20 or end > len(packet):
        raise OffloadError("TCP header length out of range")
    ip_template, tcp_template = packet[:ihl], packet[ihl:end]
    seq = _TCP_SEQ.unpack_from(tcp_template, 4)[0]
    flags = tcp_template[13]
    payload = packet[end:]
    starts = range(0, max(len(payload), 1), mss)
    last = len(starts) - 1
    out = []
    for i, at in enumerate(starts):
        chunk = payload[at:at + mss]
        seg_flags = flags
        if i != last:
            seg_flags &= ~(_TCP_FIN | _TCP_PSH)
        if i:
            seg_flags &= ~_TCP_CWR
        tcp = (tcp_template[:4] + _TCP_SEQ.pack((seq + at) & 0xFFFFFFFF) + tcp_template[8:13]
               + bytes((seg_flags,)) + tcp_template[14:16] + b"\0\0" + tcp_template[18:])
        ip = _ip_header(ip_template, version, ihl + doff + len(chunk), i)
        csum = _checksum(_pseudo(ip, version, 6, doff + len(chunk)), tcp, chunk)
        out.append(ip + tcp[:16] + _H.pack(csum) + tcp[18:] + chunk)
    return out


def _split_udp(packet: bytes, version: int, ihl: int, size: int) -> list[bytes]:
    ip_template, udp = packet[:ihl], packet[ihl:ihl + 8]
    payload = packet[ihl + 8:]
    out = []
    for i, at in enumerate(range(0, max(len(payload), 1), size)):
        chunk = payload[at:at + size]
        header = udp[:4] + _H.pack(8 + len(chunk)) + b"\0\0"
        ip = _ip_header(ip_template, version, ihl + 8 + len(chunk), i)
        csum = _checksum(_pseudo(ip, version, 17, 8 + len(chunk)), header, chunk)
        out.append(ip + header[:6] + _H.pack(csum) + chunk)
    return out
