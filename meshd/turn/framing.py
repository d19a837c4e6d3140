"""ChannelData messages and the stream framing of TURN over TCP (RFC 8656 §12.4-12.5): pure
parse/encode.

ChannelData (RFC 8656 §12.4), a 4-byte header then the application data:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Channel Number        |            Length             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    /                       Application Data                        /
    /                                                               /
    |                                                               |
    |                               +-------------------------------+
    |                               |  padding to 4 bytes (TCP only)
    +-------------------------------+

Length counts the application data only. Over UDP the padding is optional and a receiver
ignores bytes after Length; over TCP the message is padded to a multiple of four so that the
next message starts on a 4-byte boundary (§12.5).

Demultiplexing by the first byte: 0x00-0x3F is STUN (whose header carries its own length:
20 + Length, always a multiple of 4), 0x40-0x7F is ChannelData; anything else is not TURN. RFC
8656 §12 binds channels 0x4000-0x4FFF only (it reserves the rest for RFC 7983 multiplexing with
DTLS/SRTP), but RFC 5766 §11 allowed 0x4000-0x7FFF and deployed clients (coturn's
`turnutils_uclient`) still pick numbers there; on sockets that carry nothing but TURN the wider
range is unambiguous, so the parsers accept it and senders of ours stay within 0x4FFF. On a
stream an unknown first byte means the framing is lost for good, so `StreamDecoder` raises and
the connection must be closed.

Any bytes given to the parsers either parse or raise `StunParseError` (the remote error shared
with `meshd.stun.codec`); bad arguments to the encoders raise `ValueError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshd.stun.codec import StunParseError

CHANNEL_MIN = 0x4000  # RFC 8656 §12: the channel numbers a ChannelBind may use
CHANNEL_MAX = 0x4FFF
LEGACY_CHANNEL_MAX = 0x7FFF  # RFC 5766 §11: the range older clients still use
CHANNEL_HEADER = struct.Struct("!HH")
STUN_HEADER_SIZE = 20
MAX_BUFFER = 4 + 0xFFFF + 3  # the longest frame either kind can have on a stream


@dataclass(frozen=True)
class ChannelData:
    """One ChannelData message."""

    channel: int
    """0x4000..0x4FFF (RFC 8656), 0x4000..0x7FFF from RFC 5766 clients."""
    data: bytes
    """The application data (at most 65535 bytes)."""

    def __post_init__(self) -> None:
        if not CHANNEL_MIN <= self.channel <= LEGACY_CHANNEL_MAX:
            raise ValueError(f"channel number out of range 0x4000..0x7FFF: {self.channel:#x}")
        if len(self.data) > 0xFFFF:
            raise ValueError(f"ChannelData too long ({len(self.data)} bytes)")


def is_channel_data(data: bytes) -> bool:
    """The first byte says ChannelData (0x40-0x7F: top bits 01), not STUN or other."""
    return len(data) > 0 and 0x40 <= data[0] <= 0x7F


def is_stun(data: bytes) -> bool:
    """The first byte says STUN (top two bits zero, RFC 5389 §6)."""
    return len(data) > 0 and data[0] < 0x40


def parse_channel_data(data: bytes) -> ChannelData:
    """Parse one ChannelData message (a UDP datagram or a frame from `StreamDecoder`); bytes
    after Length are padding and ignored (RFC 8656 §12.5)."""
    if len(data) < CHANNEL_HEADER.size:
        raise StunParseError(f"too short for a ChannelData header ({len(data)} bytes)")
    channel, length = CHANNEL_HEADER.unpack_from(data)
    if not CHANNEL_MIN <= channel <= LEGACY_CHANNEL_MAX:
        raise StunParseError(f"not a ChannelData channel number: {channel:#06x}")
    if CHANNEL_HEADER.size + length > len(data):
        raise StunParseError(f"ChannelData length {length} overruns the message ({len(data)})")
    return ChannelData(channel, data[CHANNEL_HEADER.size : CHANNEL_HEADER.size + length])


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    """The wire form; `pad=True` for stream transports (RFC 8656 §12.5: TCP must pad)."""
    if not CHANNEL_MIN <= channel <= LEGACY_CHANNEL_MAX:
        raise ValueError(f"channel number out of range 0x4000..0x7FFF: {channel:#x}")
    if len(data) > 0xFFFF:
        raise ValueError(f"ChannelData too long ({len(data)} bytes)")
    header = CHANNEL_HEADER.pack(channel, len(data))
    return header + data + bytes(-len(data) % 4) if pad else header + data


def pad_for_stream(frame: bytes) -> bytes:
    """`frame` (a STUN message or ChannelData) padded to a multiple of 4 for a stream."""
    extra = -len(frame) % 4
    return frame + bytes(extra) if extra else frame


def frame_size(header: bytes) -> int:
    """Total bytes (padding included) of the stream frame whose first 4 bytes are `header`;
    `StunParseError` when the first byte is neither STUN nor ChannelData."""
    if len(header) < 4:
        raise ValueError("need the first 4 bytes of the frame")
    first = header[0]
    length: int = CHANNEL_HEADER.unpack_from(header)[1]
    if first < 0x40:
        # STUN: 20-byte header + Length; Length is a multiple of 4 (checked by the parser).
        return STUN_HEADER_SIZE + length
    if first <= 0x7F:
        return CHANNEL_HEADER.size + length + (-length % 4)
    raise StunParseError(f"stream byte {first:#04x} starts neither STUN nor ChannelData")


class StreamDecoder:
    """Splits a TCP byte stream into STUN messages and ChannelData frames (h11 style).

        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            handle(frame)   # bytes of one STUN message or one (padded) ChannelData

    Chunk boundaries do not matter. After `next_frame` raises `StunParseError` the stream is
    unusable (close it).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the stream."""
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._broken:
            raise StunParseError("stream framing was lost earlier")
        if len(self._buffer) < 4:
            return None
        try:
            size = frame_size(bytes(self._buffer[:4]))
        except StunParseError:
            self._broken = True
            raise
        if len(self._buffer) < size:
            return None
        frame = bytes(self._buffer[:size])
        del self._buffer[:size]
        return frame
