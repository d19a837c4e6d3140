"""The asyncio adapter for `StunServer`: one UDP socket per server address, no decisions here.

    service = await StunService.start("127.0.0.1", alt_ip="127.0.0.2", port=0, alt_port=0)
    print(service.addresses)   # the real ports when 0 was asked for
    ...
    service.close()
"""

from __future__ import annotations

import errno
import logging

from edgeweave.log import event
from meshd.stun.server import DEFAULT_SOFTWARE, ServerAddresses, StunServer
from meshd.udp import Address, BindError, DatagramSocket, format_address, open_udp

log = logging.getLogger("meshd.stun")

_EPHEMERAL_ATTEMPTS = 8  # port 0 on two IPs: the port picked on one may be taken on the other
_ROLES = ("primary", "alt-port", "alt-ip", "alt-ip-alt-port")


class StunService:
    """A running STUN server: the core plus its bound sockets."""

    def __init__(self) -> None:
        self.server: StunServer | None = None
        """The core; None until every socket is bound (datagrams before that are ignored)."""
        self._sockets: dict[Address, DatagramSocket] = {}

    @property
    def addresses(self) -> ServerAddresses:
        """The addresses actually served (real port numbers)."""
        assert self.server is not None, "StunService.start() has not finished"
        return self.server.addresses

    @classmethod
    async def start(
        cls,
        primary_ip: str,
        *,
        alt_ip: str | None = None,
        port: int = 3478,
        alt_port: int = 3479,
        software: str = DEFAULT_SOFTWARE,
    ) -> StunService:
        """Bind all sockets and start answering. Port 0 picks free ports (the same two numbers
        on both IPs, as RFC 5780 needs). Raises `BindError` naming the address at fault."""
        ephemeral = port == 0 or alt_port == 0
        for attempt in range(_EPHEMERAL_ATTEMPTS):
            service = cls()
            try:
                await service._bind(primary_ip, alt_ip, port, alt_port, software)
            except BindError as exc:
                service.close()
                in_use = exc.errno == errno.EADDRINUSE
                if ephemeral and in_use and attempt + 1 < _EPHEMERAL_ATTEMPTS:
                    continue
                raise
            except BaseException:
                service.close()
                raise
            for role, address in zip(_ROLES, service.addresses.sockets, strict=False):
                event(log, logging.INFO, "stun.listen", address=format_address(address), role=role)
            return service
        raise AssertionError("unreachable")

    async def _bind(
        self, primary_ip: str, alt_ip: str | None, port: int, alt_port: int, software: str
    ) -> None:
        main = await self._open((primary_ip, port))
        alt = await self._open((primary_ip, alt_port))
        port, alt_port = main.address[1], alt.address[1]
        if alt_ip is not None:
            await self._open((alt_ip, port))
            await self._open((alt_ip, alt_port))
        addresses = ServerAddresses(main.address[0], port, alt_port, alt_ip)
        self.server = StunServer(addresses, software=software)

    async def _open(self, local: Address) -> DatagramSocket:
        sock = await open_udp(local, lambda data, source: self._received(bound, data, source))
        bound = sock.address
        self._sockets[bound] = sock
        return sock

    def _received(self, local: Address, data: bytes, source: Address) -> None:
        if self.server is None:
            return
        for t in self.server.handle_datagram(data, source, local):
            self._sockets[t.source].send(t.data, t.destination)

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
