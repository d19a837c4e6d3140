"""The asyncio adapter for `NetcheckMachine`: two ephemeral UDP sockets and one timer.

Callbacks only feed the machine, send what it returns and re-arm its timer (the aioquic
pattern); every decision is in the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from edgeweave.config import HostPort
from meshd.config import STUN_PORT
from meshd.netcheck.classify import NetcheckReport, build_report
from meshd.netcheck.machine import NetcheckFailed, NetcheckMachine
from meshd.stun.transaction import RetransmitPolicy
from meshd.udp import Address, DatagramSocket, canonical, format_address, open_udp

Resolver = Callable[[str, int], Awaitable[list[Address]]]
"""Name lookup seam: (host, port) -> addresses; raises OSError (e.g. socket.gaierror)."""


async def system_resolver(host: str, port: int) -> list[Address]:
    """The OS resolver (getaddrinfo), IPv4 answers first as most clients do."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return [canonical(info[4]) for info in infos]


async def resolve_server(
    text: str, default_port: int = STUN_PORT, *, resolver: Resolver = system_resolver
) -> Address:
    """`host`, `host:port`, `ip:port` or `[v6]:port` -> an address; `NetcheckFailed` naming
    the input when it is malformed or the name does not resolve."""
    try:
        target = HostPort.parse(text, default_port)
    except ValueError as exc:
        raise NetcheckFailed(f"bad STUN server address {text!r}: {exc}") from None
    try:
        return (str(ipaddress.ip_address(target.host)), target.port)
    except ValueError:
        if ":" in target.host:
            raise NetcheckFailed(
                f"bad STUN server address {text!r}: write IPv6 as [address]:port"
            ) from None
    try:
        found = await resolver(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise NetcheckFailed(f"cannot resolve STUN server {target.host!r}: {reason}") from None
    if not found:
        raise NetcheckFailed(f"cannot resolve STUN server {target.host!r}: no addresses")
    return found[0]


def route_source_ip(server: Address) -> str:
    """The local IP the kernel would use towards `server` (a connected UDP socket sends
    nothing; it only looks up the route)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(server)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            where = format_address(server)
            raise NetcheckFailed(f"no route to STUN server {where}: {reason}") from None
        return canonical(probe.getsockname())[0]


class _Driver:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.machine: NetcheckMachine | None = None
        self.sockets: dict[Address, DatagramSocket] = {}
        self.finished: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None

    async def open(self, local: Address) -> Address:
        sock = await open_udp(local, lambda data, source: self.received(bound, data, source))
        bound = sock.address
        self.sockets[bound] = sock
        return bound

    def received(self, local: Address, data: bytes, source: Address) -> None:
        if self.machine is not None:
            self.machine.receive_datagram(data, source, self.loop.time(), local=local)
            self.pump()

    def on_timer(self) -> None:
        self._timer = None
        if self.machine is not None:
            self.machine.handle_timer(self.loop.time())
            self.pump()

    def pump(self) -> None:
        assert self.machine is not None
        for t in self.machine.datagrams_to_send(self.loop.time()):
            self.sockets[t.source].send(t.data, t.destination)
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.machine.get_timer()
        self._timer = None if deadline is None else self.loop.call_at(deadline, self.on_timer)
        if self.machine.done and not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sock in self.sockets.values():
            sock.close()


async def run_netcheck(
    server: Address, *, bind_ip: str | None = None, policy: RetransmitPolicy | None = None
) -> NetcheckReport:
    """Run RFC 5780 discovery against `server` from two fresh ephemeral ports on `bind_ip`
    (default: the source IP of the route to the server). Raises `NetcheckFailed` when test I
    gets no answer, `BindError` when `bind_ip` cannot be bound."""
    loop = asyncio.get_running_loop()
    ip = bind_ip if bind_ip is not None else route_source_ip(server)
    driver = _Driver(loop)
    try:
        mapping = await driver.open((ip, 0))
        filtering = await driver.open((ip, 0))
        driver.machine = NetcheckMachine(server, mapping, filtering, policy=policy)
        driver.machine.start(loop.time())
        driver.pump()
        await driver.finished
        return build_report(driver.machine.observations())
    finally:
        driver.close()
