"""meshd.stun.service: the core on real loopback sockets (127.0.0.1 and 127.0.0.2)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from meshd.stun.codec import (
    ChangeRequest,
    MessageClass,
    Method,
    OtherAddress,
    ResponseOrigin,
    StunMessage,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.stun.service import StunService
from meshd.udp import BindError

TXID = b"servicetest!"


def ask(server: tuple[str, int], *attributes: ChangeRequest) -> tuple[StunMessage, tuple[str, int],
                                                                      tuple[str, int]]:
    """One blocking request from a plain socket (the test is the independent client)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        request = StunMessage(MessageClass.REQUEST, Method.BINDING, TXID, attributes)
        sock.sendto(encode_message(request), server)
        data, source = sock.recvfrom(2048)
        return parse_message(data), source, sock.getsockname()


def test_four_sockets_and_change_request() -> None:
    async def main() -> None:
        service = await StunService.start("127.0.0.1", alt_ip="127.0.0.2", port=0, alt_port=0)
        try:
            addresses = service.addresses
            assert addresses.port != addresses.alt_port
            primary = ("127.0.0.1", addresses.port)
            msg, source, local = await asyncio.to_thread(ask, primary)
            assert source == primary
            assert msg.get(XorMappedAddress) == XorMappedAddress(local)
            assert msg.get(OtherAddress) == OtherAddress(("127.0.0.2", addresses.alt_port))
            msg, source, _ = await asyncio.to_thread(ask, primary, ChangeRequest(True, True))
            assert source == ("127.0.0.2", addresses.alt_port)
            assert msg.get(ResponseOrigin) == ResponseOrigin(source)
            msg, source, _ = await asyncio.to_thread(ask, ("127.0.0.2", addresses.alt_port),
                                                     ChangeRequest(False, True))
            assert source == ("127.0.0.2", addresses.port)
            assert service.server is not None
            assert service.server.responses == 3
        finally:
            service.close()
            service.close()

    asyncio.run(main())


def test_two_sockets_without_alternate_ip() -> None:
    async def main() -> None:
        service = await StunService.start("127.0.0.1", port=0, alt_port=0)
        try:
            assert len(service.addresses.sockets) == 2
            msg, _, _ = await asyncio.to_thread(ask, ("127.0.0.1", service.addresses.alt_port))
            assert msg.message_class is MessageClass.SUCCESS
            assert msg.get(OtherAddress) is None
        finally:
            service.close()

    asyncio.run(main())


def test_bind_failure_names_the_address() -> None:
    async def main() -> None:
        first = await StunService.start("127.0.0.1", port=0, alt_port=0)
        try:
            port = first.addresses.port
            await StunService.start("127.0.0.1", alt_ip="127.0.0.2", port=port, alt_port=0)
        finally:
            first.close()

    with pytest.raises(BindError, match=r"cannot bind UDP 127\.0\.0\.1:\d+"):
        asyncio.run(main())


def test_listen_events_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        service = await StunService.start("127.0.0.1", alt_ip="127.0.0.2", port=0, alt_port=0)
        service.close()

    caplog.set_level("INFO", logger="meshd.stun")
    asyncio.run(main())
    listens = [r for r in caplog.records if r.getMessage() == "stun.listen"]
    assert [r.fields["role"] for r in listens] == [  # type: ignore[attr-defined]
        "primary", "alt-port", "alt-ip", "alt-ip-alt-port"
    ]
