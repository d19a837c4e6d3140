"""meshd.udp: address helpers and the asyncio socket adapter, over loopback."""

from __future__ import annotations

import asyncio

import pytest

from meshd.udp import BindError, canonical, format_address, open_udp


def test_format_and_canonical() -> None:
    assert format_address(("127.0.0.1", 3478)) == "127.0.0.1:3478"
    assert format_address(("::1", 3478)) == "[::1]:3478"
    assert canonical(("0:0::1", 5, 0, 0)) == ("::1", 5)
    assert canonical(("fe80::1%lo", 5, 0, 1)) == ("fe80::1", 5)


def test_send_and_receive_on_loopback() -> None:
    async def main() -> tuple[bytes, tuple[str, int], tuple[str, int]]:
        got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        a = await open_udp(("127.0.0.1", 0), lambda d, s: got.put_nowait((d, s)))
        b = await open_udp(("127.0.0.1", 0), lambda d, s: None)
        try:
            b.send(b"ping", a.address)
            data, source = await asyncio.wait_for(got.get(), 5)
            return data, source, b.address
        finally:
            a.close()
            b.close()
            b.send(b"after close is a no-op", ("127.0.0.1", 9))

    data, source, sender = asyncio.run(main())
    assert data == b"ping"
    assert source == sender
    assert sender[1] != 0


def test_bind_error_names_the_address() -> None:
    async def main() -> None:
        first = await open_udp(("127.0.0.1", 0), lambda d, s: None)
        try:
            await open_udp(first.address, lambda d, s: None)
        finally:
            first.close()

    with pytest.raises(BindError, match=r"cannot bind UDP 127\.0\.0\.1:\d+: .*in use") as info:
        asyncio.run(main())
    assert info.value.errno is not None
