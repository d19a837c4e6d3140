"""meshd.turn.framing: ChannelData (RFC 8656 §12.4) and TCP stream framing (§12.5), fed in every
chunking, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.stun.codec import (
    Data,
    MessageClass,
    Method,
    StunMessage,
    StunParseError,
    XorPeerAddress,
    encode_message,
    parse_message,
)
from meshd.turn.framing import (
    ChannelData,
    StreamDecoder,
    encode_channel_data,
    frame_size,
    is_channel_data,
    is_stun,
    pad_for_stream,
    parse_channel_data,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


def test_channel_data_layout() -> None:
    # 4-byte header: channel number, length of the application data (not of the padding).
    assert encode_channel_data(0x4001, b"abcde") == hexbytes("40 01 00 05 61 62 63 64 65")
    assert encode_channel_data(0x4001, b"abcde", pad=True) == hexbytes(
        "40 01 00 05 61 62 63 64 65 00 00 00")
    assert encode_channel_data(0x4FFF, b"", pad=True) == hexbytes("4f ff 00 00")
    assert encode_channel_data(0x4000, b"abcd", pad=True) == hexbytes("40 00 00 04 61 62 63 64")


def test_parse_ignores_padding_and_trailing_bytes() -> None:
    # RFC 8656 §12.5: over UDP a receiver ignores what follows Length.
    assert parse_channel_data(hexbytes("40 01 00 02 61 62 00 00")) == ChannelData(0x4001, b"ab")
    assert parse_channel_data(hexbytes("40 01 00 00 ff ff")) == ChannelData(0x4001, b"")


def test_rfc5766_channel_range_parses() -> None:
    # Old clients (coturn's uclient) bind 0x5000..0x7FFF; on TURN-only sockets we accept them.
    assert parse_channel_data(hexbytes("7f ff 00 01 61")) == ChannelData(0x7FFF, b"a")
    assert is_channel_data(b"\x7f") and is_channel_data(b"\x40") and not is_channel_data(b"\x80")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "too short"),
        (hexbytes("40 01 00"), "too short"),
        (hexbytes("3f ff 00 00"), "channel number"),
        (hexbytes("80 00 00 00"), "channel number"),
        (hexbytes("40 01 00 05 61 62"), "overruns"),
    ],
)
def test_parse_errors(data: bytes, error: str) -> None:
    with pytest.raises(StunParseError, match=error):
        parse_channel_data(data)


@pytest.mark.parametrize("make", [
    lambda: encode_channel_data(0x3FFF, b""),
    lambda: encode_channel_data(0x8000, b""),
    lambda: encode_channel_data(0x4000, bytes(0x10000)),
    lambda: ChannelData(0x1, b""),
])
def test_local_misuse(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_demux_and_frame_size() -> None:
    stun = encode_message(StunMessage(MessageClass.INDICATION, Method.SEND, bytes(12),
                                      (XorPeerAddress(("192.0.2.1", 5)), Data(b"xyz"))))
    assert is_stun(stun) and not is_channel_data(stun)
    assert frame_size(stun[:4]) == len(stun)
    assert frame_size(hexbytes("40 01 00 05")) == 12
    assert frame_size(hexbytes("40 01 00 08")) == 12
    with pytest.raises(StunParseError, match="neither"):
        frame_size(hexbytes("c0 00 00 00"))
    with pytest.raises(ValueError):
        frame_size(b"\x00")
    assert pad_for_stream(b"abcde") == b"abcde\x00\x00\x00"
    assert pad_for_stream(b"abcd") == b"abcd"


def sample_stream() -> tuple[bytes, list[bytes]]:
    frames = [
        encode_message(StunMessage(MessageClass.REQUEST, Method.ALLOCATE, b"A" * 12)),
        encode_channel_data(0x4001, b"hello", pad=True),
        encode_channel_data(0x4002, b"", pad=True),
        encode_message(StunMessage(MessageClass.INDICATION, Method.SEND, b"B" * 12,
                                   (XorPeerAddress(("2001:db8::1", 9)), Data(b"12345")))),
        encode_channel_data(0x4FFF, bytes(range(256)) * 3, pad=True),
    ]
    return b"".join(frames), frames


def decode_chunks(chunks: list[bytes]) -> list[bytes]:
    decoder = StreamDecoder()
    out: list[bytes] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert decoder.buffered == 0
    return out


def test_stream_whole_and_byte_by_byte() -> None:
    stream, frames = sample_stream()
    assert decode_chunks([stream]) == frames
    assert decode_chunks([stream[i : i + 1] for i in range(len(stream))]) == frames


def test_stream_split_at_every_offset() -> None:
    stream, frames = sample_stream()
    for cut in range(len(stream) + 1):
        assert decode_chunks([stream[:cut], stream[cut:]]) == frames, cut


def test_frames_parse_after_decoding() -> None:
    stream, _ = sample_stream()
    frames = decode_chunks([stream])
    assert parse_message(frames[0]).method == Method.ALLOCATE
    assert parse_channel_data(frames[1]) == ChannelData(0x4001, b"hello")
    assert parse_channel_data(frames[4]).data == bytes(range(256)) * 3


def test_lost_framing_stays_lost() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(hexbytes("c0 00 00 04 00 00 00 00"))
    with pytest.raises(StunParseError):
        decoder.next_frame()
    decoder.receive_data(encode_channel_data(0x4001, b"ok", pad=True))
    with pytest.raises(StunParseError, match="lost"):
        decoder.next_frame()


@settings(max_examples=200)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_stream_any_chunking(sizes: list[int]) -> None:
    stream, frames = sample_stream()
    chunks, at = [], 0
    for size in sizes:
        chunks.append(stream[at : at + size])
        at += size
    chunks.append(stream[at:])
    assert decode_chunks(chunks) == frames


@given(st.binary(max_size=80))
def test_fuzz_channel_data(data: bytes) -> None:
    try:
        message = parse_channel_data(data)
    except StunParseError:
        return
    assert encode_channel_data(message.channel, message.data) == data[:4 + len(message.data)]


@given(st.lists(st.binary(max_size=30), max_size=10))
def test_fuzz_stream(chunks: list[bytes]) -> None:
    decoder = StreamDecoder()
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            while decoder.next_frame() is not None:
                pass
    except StunParseError:
        pass
