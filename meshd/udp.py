"""The UDP seam every meshd protocol core sits behind (style habits 3 and 8).

Cores never touch sockets: they take `(bytes, source address, local address)` and return
`Transmit`s. `open_udp` is the one asyncio adapter that turns a bound socket into callbacks into
a core and `send` calls out of it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgeweave.config import HostPort
from edgeweave.log import event

log = logging.getLogger("meshd.udp")

Address = tuple[str, int]
"""An (IP literal, port) pair, IP in its canonical text form ("::1", not "0::1")."""


@dataclass(frozen=True)
class Transmit:
    """One datagram a protocol core wants sent."""

    source: Address
    """The local socket address to send it from."""
    destination: Address
    """Where it goes."""
    data: bytes
    """The datagram."""
    ttl: int | None = None
    """IP TTL (hop limit) to send it with; None: the socket's default. Only the punch
    machine's pre-punch sets it (open our own NAT mapping, expire before the peer's NAT)."""


class BindError(Exception):
    """A local UDP address could not be bound (operator's problem: in use, not ours, ...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        """The OS error number, e.g. `errno.EADDRINUSE`."""


def format_address(address: Address) -> str:
    """`1.2.3.4:5` or `[2001:db8::1]:5`."""
    return str(HostPort(address[0], address[1]))


def canonical(address: Any) -> Address:
    """Normalise a socket-API address (IPv6 4-tuples too) to an `Address`."""
    host = str(address[0]).split("%", 1)[0]
    return (str(ipaddress.ip_address(host)), int(address[1]))


class DatagramSocket(Protocol):
    """What a core's adapter needs from a bound UDP socket."""

    @property
    def address(self) -> Address:
        """The bound local address (with the real port when 0 was asked for)."""
        ...

    def send(self, data: bytes, destination: Address) -> None:
        """Send one datagram; failures are logged, never raised (UDP is best effort)."""
        ...

    def close(self) -> None:
        """Stop receiving and release the port."""
        ...


OnDatagram = Callable[[bytes, Address], None]
"""Callback for one received datagram: (data, source)."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: OnDatagram) -> None:
        self._on_datagram = on_datagram
        self.local: Address = ("0.0.0.0", 0)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data, canonical(addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable) surface here; a timeout will handle them.
        event(log, logging.DEBUG, "udp.error", local=format_address(self.local), error=exc)


class UdpSocket:
    """An asyncio UDP socket bound to one local address."""

    def __init__(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        self._transport = transport
        self._address = address

    @property
    def address(self) -> Address:
        return self._address

    def send(self, data: bytes, destination: Address) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(data, destination)

    def close(self) -> None:
        self._transport.close()


async def open_udp(local: Address, on_datagram: OnDatagram) -> UdpSocket:
    """Bind `local` (port 0: any free port) and call `on_datagram` for every datagram."""
    loop = asyncio.get_running_loop()
    protocol = _Protocol(on_datagram)
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, local_addr=local)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BindError(f"cannot bind UDP {format_address(local)}: {reason}", exc.errno) from None
    address = canonical(transport.get_extra_info("sockname"))
    protocol.local = address
    return UdpSocket(transport, address)
