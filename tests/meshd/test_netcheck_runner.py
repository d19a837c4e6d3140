"""meshd.netcheck.runner: the machine over real loopback sockets against our own server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from meshd.netcheck.classify import Behaviour, NatType, NetcheckReport
from meshd.netcheck.machine import NetcheckFailed
from meshd.netcheck.runner import resolve_server, route_source_ip, run_netcheck
from meshd.stun.service import StunService
from meshd.stun.transaction import RetransmitPolicy

FAST = RetransmitPolicy(initial_rto_s=0.05, transmissions=3, give_up_s=0.3)


def check_against_our_server(alt_ip: str | None, bind_ip: str | None) -> NetcheckReport:
    async def main() -> NetcheckReport:
        service = await StunService.start("127.0.0.1", alt_ip=alt_ip, port=0, alt_port=0)
        try:
            server = ("127.0.0.1", service.addresses.port)
            return await run_netcheck(server, bind_ip=bind_ip, policy=FAST)
        finally:
            service.close()

    return asyncio.run(main())


@pytest.mark.parametrize("bind_ip", ["127.0.0.1", None])
def test_loopback_is_public(bind_ip: str | None) -> None:
    report = check_against_our_server("127.0.0.2", bind_ip)
    assert not report.nat
    assert report.local == report.public
    assert report.local[0] == "127.0.0.1"
    assert report.mapping is Behaviour.ENDPOINT_INDEPENDENT
    assert report.filtering is Behaviour.ENDPOINT_INDEPENDENT
    assert report.hairpin is True
    assert report.port_preserved
    assert report.nat_type is NatType.PUBLIC
    assert report.relay_with == ()


def test_server_without_alternate_ip() -> None:
    report = check_against_our_server(None, "127.0.0.1")
    assert not report.nat
    assert (report.mapping, report.filtering, report.nat_type) == (None, None, NatType.UNKNOWN)
    assert any("OTHER-ADDRESS" in note for note in report.notes)


def test_nobody_listening() -> None:
    async def main() -> None:
        # A service we close at once gives a port nobody listens on.
        service = await StunService.start("127.0.0.1", port=0, alt_port=0)
        port = service.addresses.port
        service.close()
        await run_netcheck(("127.0.0.1", port), policy=FAST)

    with pytest.raises(NetcheckFailed, match=r"did not answer \(3 requests over 0.3 s\)"):
        asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 3478)),
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::1]:5000", ("::1", 5000)),
        ("localhost:7", ("127.0.0.1", 7)),  # from /etc/hosts, no DNS query
    ],
)
def test_resolve_server(text: str, expected: tuple[str, int]) -> None:
    assert asyncio.run(resolve_server(text)) == expected


async def no_such_name(host: str, port: int) -> list[tuple[str, int]]:
    # A fake resolver: tests send no DNS queries off the host.
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def no_answers(host: str, port: int) -> list[tuple[str, int]]:
    return []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("127.0.0.1:99999", "bad STUN server address '127.0.0.1:99999': bad port"),
        ("a:b:c", "bad STUN server address 'a:b:c': write IPv6 as"),
        ("stun.example:3478",
         "cannot resolve STUN server 'stun.example': Name or service not known"),
    ],
)
def test_resolve_server_errors(text: str, error: str) -> None:
    with pytest.raises(NetcheckFailed, match=error):
        asyncio.run(resolve_server(text, resolver=no_such_name))


def test_resolver_without_answers() -> None:
    with pytest.raises(NetcheckFailed, match="no addresses"):
        asyncio.run(resolve_server("stun.example", resolver=no_answers))


def test_route_source_ip() -> None:
    assert route_source_ip(("127.0.0.2", 3478)) == "127.0.0.1"
