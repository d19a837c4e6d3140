"""The tunnel's datagrams and handshake payload: pure parse/encode functions.

Every tunnel datagram starts with one type byte in 0xE0..0xEF. RFC 7983 (§7) demultiplexes one
UDP socket by the first byte: 0..3 STUN, 16..19 ZRTP, 20..63 DTLS, 64..79 TURN ChannelData
(0x40..0x7F with RFC 5766's channel range), 128..191 RTP/RTCP; 0xE0..0xEF is none of them, so the
tunnel shares the ICE socket with STUN and the relay. (RFC 9443 gives 192..255 to QUIC long
headers; meshd runs no QUIC on that socket.)

Byte layouts (sizes under each field; integers are big-endian):

Handshake initiation, Noise IK message 1 (`meshd.tunnel.noise`):

    +------+--------------+-----------------+--------------------+-------------------------+
    | 0xE1 | sender index | ephemeral key e | AEAD(static key s) | AEAD(handshake payload) |
    +------+--------------+-----------------+--------------------+-------------------------+
       1          4                32             32 + 16                 n + 16

Handshake response, Noise IK message 2:

    +------+--------------+----------------+-----------------+-------------------------+
    | 0xE2 | sender index | receiver index | ephemeral key e | AEAD(handshake payload) |
    +------+--------------+----------------+-----------------+-------------------------+
       1          4               4                32                  n + 16

Transport data: one whole IP packet, or nothing (a keepalive):

    +------+----------------+-----------+-------------------------------------+
    | 0xE3 | receiver index |  counter  | ChaCha20-Poly1305(packet) ... | tag |
    +------+----------------+-----------+-------------------------------------+
       1           4              8                     n + 16

Transport fragment: one AEAD message (an offload frame, `meshd.tunnel.offload`: virtio_net_hdr
+ IP packet or GSO super-packet of up to 64 KB) cut into `count` datagrams:

    +------+----------------+-----------+-------+-------+-----------------------------------+
    | 0xE4 | receiver index |  counter  | index | count | part `index` of AEAD(frame) + tag |
    +------+----------------+-----------+-------+-------+-----------------------------------+
       1           4              8          1       1              1 .. n

The ciphertext (frame + 16-byte tag) is cut into parts of equal size (the last may be shorter);
part `index` of `count` (1..64) travels in fragment `index`. The receiver joins the parts of one
(receiver index, counter) and opens them with one AEAD call; the counter is the nonce and goes
through the replay window once per message, as for 0xE3. A lost fragment loses the message.
Only peers that announced `CAP_FRAGMENTS` in their handshake payload are sent 0xE4.

Indexes are chosen by the receiver of later messages (the *sender index* of a handshake message
is what the peer puts in *receiver index* afterwards), so a datagram finds its keys with one
lookup and reveals nothing about the node. The counter is the AEAD nonce (Noise's 32 zero bits
+ 64-bit little-endian counter); the header itself is not AD: altering the type, index or counter
selects another key or nonce and fails authentication just the same.

Handshake payload (inside the Noise encryption, so only the peer sees it):

    +---------+--------+----------+-----------+---------+-------------+-----------+
    | version | family | cert len | timestamp | overlay | certificate | signature |
    |   = 1   | 4 or 6 |          |  ns, Unix | address |    (DER)    | (the rest)|
    +---------+--------+----------+-----------+---------+-------------+-----------+
         1         1         2          8       4 or 16    cert len      1..512

The timestamp's low byte carries capabilities: `CAP_MARKER | bits` (bit 0: `CAP_FRAGMENTS`, the
sender accepts 0xE4). Agents before this extension leave it 0 (their clock comes from a float of
256-ns granularity), so they announce nothing; its clock part keeps growing in steps of 256 ns.
The announcement is inside the Noise encryption and authenticated with the handshake (a
man in the middle can neither add nor strip it); old agents parse it as part of the time.

The overlay address is the one the sender claims; the certificate is its node certificate from
the cluster CA; the signature, by the certificate's key, covers the sender's Noise static key and
the overlay address (`meshd.tunnel.identity.attestation_message`). The timestamp only grows:
a responder refuses an initiation not newer than the last one it accepted from that key.

Any bytes given to a `parse_*` function either parse or raise `TunnelParseError` (a remote
error: drop the datagram). Bad values given to an `encode_*` function raise `ValueError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from meshd.tunnel.noise import MESSAGE1_OVERHEAD, MESSAGE2_OVERHEAD, TAGLEN

OverlayAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
"""A node's address on the mesh (TUN `mesh0`)."""

FIRST_BYTE_RANGE = range(0xE0, 0xF0)
"""Tunnel datagrams start with one of these bytes (free in RFC 7983's demultiplexing)."""


class MessageType(IntEnum):
    """The first byte of a tunnel datagram."""

    INITIATION = 0xE1
    RESPONSE = 0xE2
    DATA = 0xE3
    FRAGMENT = 0xE4


TYPE_INITIATION = MessageType.INITIATION.value
TYPE_RESPONSE = MessageType.RESPONSE.value
TYPE_DATA = MessageType.DATA.value
TYPE_FRAGMENT = MessageType.FRAGMENT.value

INITIATION_HEADER = struct.Struct("!BI")
RESPONSE_HEADER = struct.Struct("!BII")
DATA_HEADER = struct.Struct("!BIQ")
"""Type, receiver index, counter: 13 bytes. The session's hot loop uses this directly."""
DATA_OVERHEAD = DATA_HEADER.size + TAGLEN
"""Bytes a transport datagram adds to the packet it carries (29)."""

FRAGMENT_HEADER = struct.Struct("!BIQBB")
"""Type, receiver index, counter, fragment index, fragment count: 15 bytes."""
MAX_FRAGMENTS = 64
"""Fragments of one message at most (one UDP GSO send carries at most 64 segments)."""
MAX_MESSAGE = 0xFFFF + 10 + TAGLEN
"""Largest ciphertext of a fragmented message: a 64 KB packet, its offload header, the tag."""
FRAGMENT_PART = 1406
"""Ciphertext bytes per fragment a sender puts in all but the last fragment: a whole
1380-byte packet with its 10-byte offload header fits in one 1421-byte datagram, which leaves
room for outer IPv4 + UDP (28) and TURN ChannelData (4) within 1500."""


MIN_FRAGMENT_PART = -(-MAX_MESSAGE // MAX_FRAGMENTS)
"""Smallest part that still carries the largest message in MAX_FRAGMENTS fragments (1025)."""
FRAME_OVERHEAD = 10 + TAGLEN
"""A packet's offload header (virtio_net_hdr) and the AEAD tag: what a part adds to it."""
OFFLOAD_MIN_MTU = MIN_FRAGMENT_PART - FRAME_OVERHEAD
"""Below this TUN MTU (999) fragments sized to it cannot carry a 64 KB super-packet: the agent
then runs mesh0 without offloads (one packet per read, no fragments)."""


def fragment_part_for(mtu: int) -> int:
    """The part size for a TUN MTU of `mtu`: one whole mtu-sized packet with its offload header
    and tag fits one fragment, so a fragment datagram (part + 15) is as large as the largest
    lone 0xE3 datagram plus 2 bytes, and an operator who lowers `tunnel.mtu` for a narrow path
    (PPPoE, LTE) shrinks both. FRAGMENT_PART for the default 1380."""
    return max(mtu + FRAME_OVERHEAD, MIN_FRAGMENT_PART)


def whole_message_packet(send_bytes: int, part: int = FRAGMENT_PART) -> int:
    """The largest IP packet an offload frame may carry for its 0xE4 message (parts of `part`
    bytes, each with its 15-byte header) to fit one UDP GSO send of `send_bytes`, so that it
    arrives as one coalesced read the receiver takes whole (the agent caps the TUN device's
    `gso_max_size` at this: 63 244 bytes for 65 000-byte sends of 1406-byte parts)."""
    fragments = min(MAX_FRAGMENTS, send_bytes // (part + FRAGMENT_HEADER.size))
    return fragments * part - FRAME_OVERHEAD


CAP_MARKER = 0x80
"""Set in the low byte of the handshake timestamp by agents that announce capabilities."""
CAP_FRAGMENTS = 0x01
"""The sender accepts 0xE4 fragments (offload frames, up to 64 KB)."""
CAP_MASK = 0xFF

PAYLOAD_HEADER = struct.Struct("!BBHQ")
PAYLOAD_VERSION = 1
MAX_SIGNATURE = 512
MIN_PAYLOAD = PAYLOAD_HEADER.size + 4 + 1 + 1  # IPv4, one byte of certificate and signature
MIN_INITIATION = INITIATION_HEADER.size + MESSAGE1_OVERHEAD + MIN_PAYLOAD
MIN_RESPONSE = RESPONSE_HEADER.size + MESSAGE2_OVERHEAD + MIN_PAYLOAD
MAX_INDEX = 2**32 - 1


class TunnelParseError(Exception):
    """The peer sent bytes that are not a valid tunnel message (a remote error: drop it)."""


@dataclass(frozen=True)
class Initiation:
    """A handshake initiation datagram."""

    sender_index: int
    """The initiator's index for this handshake (the responder sends to it)."""
    noise_message: bytes
    """Noise IK message 1."""


@dataclass(frozen=True)
class Response:
    """A handshake response datagram."""

    sender_index: int
    """The responder's index for the new keys (the initiator sends to it)."""
    receiver_index: int
    """The initiation's sender index."""
    noise_message: bytes
    """Noise IK message 2."""


@dataclass(frozen=True)
class DataHeader:
    """The clear part of a transport data datagram."""

    receiver_index: int
    """Which of the receiver's keys decrypts it."""
    counter: int
    """Per-key message counter, the AEAD nonce."""


@dataclass(frozen=True)
class FragmentHeader:
    """The clear part of a transport fragment."""

    receiver_index: int
    """Which of the receiver's keys decrypts the message."""
    counter: int
    """Per-key message counter, the AEAD nonce (the message's identity)."""
    index: int
    """Which part of the ciphertext this is (0-based)."""
    count: int
    """How many parts the message has (1..MAX_FRAGMENTS)."""


@dataclass(frozen=True)
class HandshakePayload:
    """What each side says about itself inside its (encrypted) handshake message."""

    overlay: OverlayAddress
    """The overlay address the sender claims."""
    timestamp_ns: int
    """Sender's wall clock, strictly increasing per sender (replayed initiations are refused)."""
    certificate: bytes
    """The sender's node certificate, DER."""
    signature: bytes
    """Signature by the certificate's key over `identity.attestation_message(...)`."""

    def __post_init__(self) -> None:
        if not 0 <= self.timestamp_ns < 2**64:
            raise ValueError("timestamp_ns out of range")
        if not 1 <= len(self.certificate) <= 0xFFFF:
            raise ValueError("certificate must be 1..65535 bytes")
        if not 1 <= len(self.signature) <= MAX_SIGNATURE:
            raise ValueError(f"signature must be 1..{MAX_SIGNATURE} bytes")


def _check_index(index: int) -> None:
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index out of range: {index}")


def message_type(data: bytes) -> MessageType | None:
    """The tunnel message type of a datagram, or None if it is not one of ours."""
    if not data or data[0] not in FIRST_BYTE_RANGE:
        return None
    try:
        return MessageType(data[0])
    except ValueError:
        return None


def encode_initiation(message: Initiation) -> bytes:
    _check_index(message.sender_index)
    return INITIATION_HEADER.pack(TYPE_INITIATION, message.sender_index) + message.noise_message


def parse_initiation(data: bytes) -> Initiation:
    if len(data) < MIN_INITIATION or data[0] != TYPE_INITIATION:
        raise TunnelParseError(f"not a handshake initiation ({len(data)} bytes)")
    _, sender = INITIATION_HEADER.unpack_from(data)
    return Initiation(sender, bytes(data[INITIATION_HEADER.size :]))


def encode_response(message: Response) -> bytes:
    _check_index(message.sender_index)
    _check_index(message.receiver_index)
    header = RESPONSE_HEADER.pack(TYPE_RESPONSE, message.sender_index, message.receiver_index)
    return header + message.noise_message


def parse_response(data: bytes) -> Response:
    if len(data) < MIN_RESPONSE or data[0] != TYPE_RESPONSE:
        raise TunnelParseError(f"not a handshake response ({len(data)} bytes)")
    _, sender, receiver = RESPONSE_HEADER.unpack_from(data)
    return Response(sender, receiver, bytes(data[RESPONSE_HEADER.size :]))


def encode_data(receiver_index: int, counter: int, ciphertext: bytes) -> bytes:
    """A transport datagram around an already encrypted packet (the session inlines this)."""
    _check_index(receiver_index)
    if not 0 <= counter < 2**64:
        raise ValueError(f"counter out of range: {counter}")
    if len(ciphertext) < TAGLEN:
        raise ValueError("ciphertext shorter than its tag")
    return DATA_HEADER.pack(TYPE_DATA, receiver_index, counter) + ciphertext


def parse_data_header(data: bytes) -> DataHeader:
    if len(data) < DATA_OVERHEAD or data[0] != TYPE_DATA:
        raise TunnelParseError(f"not a transport datagram ({len(data)} bytes)")
    _, receiver, counter = DATA_HEADER.unpack_from(data)
    return DataHeader(receiver, counter)


def data_ciphertext(data: bytes) -> bytes:
    """The AEAD ciphertext (with its tag) of a transport datagram."""
    return data[DATA_HEADER.size :]


def encode_fragments(receiver_index: int, counter: int, ciphertext: bytes,
                     part: int = FRAGMENT_PART) -> list[bytes]:
    """The fragments of one sealed message (parts of `part` bytes, the last shorter)."""
    _check_index(receiver_index)
    if not 0 <= counter < 2**64:
        raise ValueError(f"counter out of range: {counter}")
    if not TAGLEN <= len(ciphertext) <= MAX_MESSAGE:
        raise ValueError(f"ciphertext of {len(ciphertext)} bytes cannot be fragmented")
    count = -(-len(ciphertext) // part) if part > 0 else MAX_FRAGMENTS + 1
    if count > MAX_FRAGMENTS:
        raise ValueError(f"{len(ciphertext)} bytes in parts of {part}: too many fragments")
    pack = FRAGMENT_HEADER.pack
    return [pack(TYPE_FRAGMENT, receiver_index, counter, k, count)
            + ciphertext[k * part:(k + 1) * part] for k in range(count)]


def parse_fragment_header(data: bytes) -> FragmentHeader:
    if len(data) <= FRAGMENT_HEADER.size or data[0] != TYPE_FRAGMENT:
        raise TunnelParseError(f"not a transport fragment ({len(data)} bytes)")
    _, receiver, counter, index, count = FRAGMENT_HEADER.unpack_from(data)
    if not index < count <= MAX_FRAGMENTS:
        raise TunnelParseError(f"fragment {index} of {count}")
    return FragmentHeader(receiver, counter, index, count)


def timestamp_capabilities(timestamp_ns: int) -> int:
    """The capability bits a handshake timestamp announces (0 from agents that predate them)."""
    low = timestamp_ns & CAP_MASK
    return low & ~CAP_MARKER if low & CAP_MARKER else 0


def stamp_capabilities(wall_ns: int, previous: int, capabilities: int) -> int:
    """The next handshake timestamp: newer than `previous` (in 256-ns steps) and carrying
    `capabilities` in its low byte (none: the low byte stays 0, like older agents)."""
    if not 0 <= capabilities < CAP_MARKER:
        raise ValueError(f"capabilities out of range: {capabilities}")
    clock = max(wall_ns & ~CAP_MASK, (previous & ~CAP_MASK) + CAP_MASK + 1)
    return clock | (CAP_MARKER | capabilities if capabilities else 0)


def encode_payload(payload: HandshakePayload) -> bytes:
    family = 4 if payload.overlay.version == 4 else 6
    header = PAYLOAD_HEADER.pack(
        PAYLOAD_VERSION, family, len(payload.certificate), payload.timestamp_ns
    )
    return header + payload.overlay.packed + payload.certificate + payload.signature


def parse_payload(data: bytes) -> HandshakePayload:
    if len(data) < PAYLOAD_HEADER.size:
        raise TunnelParseError("handshake payload too short")
    version, family, cert_len, timestamp = PAYLOAD_HEADER.unpack_from(data)
    if version != PAYLOAD_VERSION:
        raise TunnelParseError(f"unknown handshake payload version {version}")
    if family not in (4, 6):
        raise TunnelParseError(f"unknown address family {family}")
    start = PAYLOAD_HEADER.size
    addr_len = 4 if family == 4 else 16
    cert_start = start + addr_len
    sig_start = cert_start + cert_len
    sig_len = len(data) - sig_start
    if cert_len == 0 or not 1 <= sig_len <= MAX_SIGNATURE:
        raise TunnelParseError("handshake payload lengths do not add up")
    raw = bytes(data[start:cert_start])
    overlay: OverlayAddress = (
        ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
    )
    return HandshakePayload(
        overlay, timestamp, bytes(data[cert_start:sig_start]), bytes(data[sig_start:])
    )

