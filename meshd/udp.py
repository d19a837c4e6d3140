"""The UDP seam every meshd protocol core sits behind (style habits 3 and 8).

Cores never touch sockets: they take `(bytes, source address, local address)` and return
`Transmit`s. `open_udp` is the one asyncio adapter that turns a bound socket into callbacks into
a core and `send` calls out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import sys
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


# --- batched datagram I/O (Linux UDP GRO/GSO) ----------------------------------------------------
#
# A relay or tunnel that moves tens of thousands of datagrams per second cannot afford one
# event-loop callback and one system call per datagram. Linux coalesces a burst of equal-size
# datagrams from one source into one read (UDP_GRO, 5.0+; the segment size arrives as a cmsg)
# and cuts one buffer into equal-size datagrams on send (UDP_SEGMENT, 4.18+). `BatchSocket` is
# the non-blocking socket both are used through; the cores see (buffer, segment, source) reads
# and ask for (buffer, segment) sends, so they never learn the kernel's interface.

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size, a cmsg of sendmsg (or a sockopt)
UDP_GRO = 104  # linux/udp.h: coalesced reads, the segment size as a cmsg of recvmsg
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # below one IP packet's 65535 with any header; segments past it: EINVAL
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_GSO_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})  # this kernel: never
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EMSGSIZE}) | _GSO_UNSUPPORTED
# EIO: the route's device lacks checksum offload; EINVAL/EMSGSIZE: a segment above the path MTU.

Read = tuple[bytes, int, Address]
"""One read of a `BatchSocket`: (data, segment, source). `segment` is 0 for a single datagram;
otherwise `data` holds datagrams of `segment` bytes from `source` back to back, the last one
possibly shorter."""


def split_read(data: bytes, segment: int) -> list[bytes]:
    """The datagrams of one `Read`."""
    if segment <= 0 or segment >= len(data):
        return [data]
    return [data[i : i + segment] for i in range(0, len(data), segment)]


@dataclass(slots=True)
class BatchCounters:
    """What a `BatchSocket` did, for metrics."""

    reads: int = 0
    """recvmsg calls that returned data."""
    datagrams_read: int = 0
    """Datagrams those reads carried (more than `reads` when GRO coalesced)."""
    gso_sends: int = 0
    """sendmsg calls that carried several datagrams."""
    datagrams_sent: int = 0
    """Datagrams handed to the kernel (single and segmented)."""
    gso_refused: int = 0
    """Segmented sends the kernel refused (then sent one by one)."""
    send_errors: int = 0
    """Datagrams the kernel refused (buffer full, unreachable, ...)."""


class BatchSocket:
    """A non-blocking UDP socket with coalesced reads and segmented sends (no asyncio here:
    the owner registers `fileno()` with its loop and calls `read_batch` when readable)."""

    def __init__(self, sock: socket.socket, address: Address, *, gro: bool) -> None:
        self.sock = sock
        self._address = address
        self.gro = gro
        """The kernel coalesces reads on this socket."""
        self.gso = True
        """Segmented sends are tried (off once the kernel says it cannot do them)."""
        self.counters = BatchCounters()

    @classmethod
    def bind(cls, local: Address, *, buffer_bytes: int = 4 << 20) -> BatchSocket:
        """Bind `local` (port 0: any free port); raises `BindError` naming the address."""
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(local)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise BindError(f"cannot bind UDP {format_address(local)}: {reason}",
                            exc.errno) from None
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # capped by net.core.[rw]mem_max; best effort
                sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        gro = True
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:  # not Linux 5.0+: one datagram per read
            gro = False
        return cls(sock, canonical(sock.getsockname()), gro=gro)

    @property
    def address(self) -> Address:
        return self._address

    def fileno(self) -> int:
        """The descriptor to watch for readability."""
        return self.sock.fileno()

    def read_batch(self, limit: int) -> list[Read]:
        """Drain up to `limit` reads (fewer when the socket runs dry). ICMP errors reported on
        the socket are skipped."""
        reads: list[Read] = []
        recvmsg = self.sock.recvmsg
        counters = self.counters
        datagrams = 0
        for _ in range(limit):
            try:
                data, ancillary, _, source = recvmsg(65536, _GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. ECONNREFUSED from an earlier send: nothing was read
            segment = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(value[:4], sys.byteorder)
            if segment >= len(data):
                segment = 0
            # AF_INET sources are already canonical text; IPv6 ones carry flow info and scope.
            reads.append((data, segment, source if len(source) == 2 else canonical(source)))
            datagrams += -(-len(data) // segment) if segment else 1
        counters.reads += len(reads)
        counters.datagrams_read += datagrams
        return reads

    def send(self, data: bytes | bytearray, destination: Address) -> None:
        """One datagram; failures are counted, never raised (UDP is best effort)."""
        try:
            self.sock.sendto(data, destination)
            self.counters.datagrams_sent += 1
        except OSError:
            self.counters.send_errors += 1

    def send_segments(self, data: bytes | bytearray, segment: int, destination: Address) -> None:
        """`data` as datagrams of `segment` bytes (the last may be shorter) to `destination`:
        one sendmsg with UDP_SEGMENT per `GSO_MAX_SEGMENTS` datagrams or `GSO_MAX_BYTES`
        bytes; one send per datagram when the kernel refuses that."""
        count = -(-len(data) // segment) if segment > 0 else 1
        if count <= 1:
            self.send(data, destination)
            return
        most = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // segment) * segment
        if most < 2 * segment:  # datagrams too big to carry two in one sendmsg
            for i in range(0, len(data), segment):
                self.send(data[i : i + segment], destination)
            return
        if len(data) > most:  # more than one sendmsg may carry
            for i in range(0, len(data), most):
                self.send_segments(data[i : i + most], segment, destination)
            return
        if self.gso:
            try:
                self.sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT,
                                            segment.to_bytes(2, sys.byteorder))],
                                  0, destination)
            except OSError as exc:
                if exc.errno not in _GSO_REFUSED:
                    self.counters.send_errors += count
                    return
                self.counters.gso_refused += 1
                if exc.errno in _GSO_UNSUPPORTED:
                    self.gso = False
                    event(log, logging.INFO, "udp.gso_off", local=format_address(self._address),
                          error=exc.strerror or exc)
            else:
                self.counters.gso_sends += 1
                self.counters.datagrams_sent += count
                return
        for i in range(0, len(data), segment):
            self.send(data[i : i + segment], destination)

    def close(self) -> None:
        self.sock.close()
