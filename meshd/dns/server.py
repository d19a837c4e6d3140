"""The asyncio adapter for `DnsCore`: UDP and TCP listeners on one address, upstream sockets,
one timer. No decisions here: every byte goes to the core, every action out of it is sent.

    core: DnsCore[DnsClient] = DnsCore(config, upstreams=default_upstreams(config))
    server = await DnsServer.start(core, "169.254.96.16", 53)
    core.set_catalog(catalog)          # whenever the catalog changes
    ...
    server.close()
    await server.wait_closed()

UDP: the listening socket is read directly (`loop.add_reader`), up to `_READ_BATCH` datagrams per
wake-up, and answers are sent with `sendto` at once. asyncio's datagram transport reads one
datagram per event-loop iteration, which made the loop, not the answering, the cost of a query
(about 9k queries/s before, see docs/reference/meshd-dns.md for the numbers after). Upstream
sockets, which carry little traffic, use the shared `meshd.udp` adapter.

TCP (RFC 7766): each message has a 2-byte length prefix; a connection may carry many queries,
answered as they complete (forwarded ones possibly out of order); it is closed after
`tcpIdleTimeoutS` without a complete query, on a malformed query, or when
`tcpMaxConnections` are already open. Upstream TCP (after a truncated UDP answer) opens one
connection per question.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from edgeweave.log import event
from meshd.dns.core import ClientReply, DnsCore, Outcome, UpstreamQuery
from meshd.udp import Address, BindError, UdpSocket, canonical, format_address, open_udp

log = logging.getLogger("meshd.dns")

_EPHEMERAL_ATTEMPTS = 8  # port 0: the port UDP got may be taken for TCP
_READ_BATCH = 64  # datagrams read per wake-up at most (then other work gets its turn)
_MAX_DATAGRAM = 65535


class TcpClient:
    """One client TCP connection (the core's token for replies to it)."""

    def __init__(self, writer: asyncio.StreamWriter, peer: Address) -> None:
        self.writer = writer
        self.peer = peer
        """The client's address."""

    def send(self, message: bytes) -> None:
        """Write one framed message (dropped if the connection is gone)."""
        if not self.writer.is_closing():
            self.writer.write(len(message).to_bytes(2, "big") + message)

    def __repr__(self) -> str:
        return f"tcp:{format_address(self.peer)}"


DnsClient = Address | TcpClient
"""How the server identifies a client to the core: its UDP address, or its TCP connection."""


class _UdpListener:
    """The listening UDP socket, read in batches."""

    def __init__(self, sock: socket.socket, on_datagram: Callable[[bytes, Address], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.address: Address = canonical(sock.getsockname())
        self._on_datagram = on_datagram
        self._loop = loop
        self._closed = False
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls, local: Address, receive_buffer: int,
             on_datagram: Callable[[bytes, Address], None]) -> _UdpListener:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # the kernel caps it at net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.bind(local)
        except OSError as exc:
            sock.close()
            raise BindError(f"cannot bind UDP {format_address(local)}: {exc.strerror or exc}",
                            exc.errno) from None
        return cls(sock, on_datagram, loop)

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        on_datagram = self._on_datagram
        for _ in range(_READ_BATCH):
            try:
                data, source = recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                event(log, logging.DEBUG, "dns.udp.error", error=str(exc))
                return
            on_datagram(data, source if len(source) == 2 else source[:2])
            if self._closed:
                return

    def send(self, data: bytes, destination: Address) -> None:
        """Send one datagram now; dropped if the socket buffer is full (UDP is lossy)."""
        if self._closed:
            return
        try:
            self.sock.sendto(data, destination)
        except OSError as exc:
            event(log, logging.DEBUG, "dns.udp.send", client=format_address(destination),
                  error=str(exc))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


@dataclass(frozen=True)
class _Listen:
    udp: _UdpListener
    tcp: asyncio.Server


class DnsServer:
    """A running DNS server: the core behind a UDP socket and a TCP listener."""

    def __init__(self, core: DnsCore[DnsClient]) -> None:
        self.core = core
        """The core it feeds."""
        self._loop = asyncio.get_running_loop()
        self._listen: _Listen | None = None
        self._upstream: dict[int, UdpSocket] = {}
        self._connections: set[TcpClient] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    @property
    def address(self) -> Address:
        """The address served (with the real port when 0 was asked for)."""
        assert self._listen is not None, "DnsServer.start() has not finished"
        return self._listen.udp.address

    @classmethod
    async def start(cls, core: DnsCore[DnsClient], host: str, port: int) -> DnsServer:
        """Listen on `host`:`port` over UDP and TCP (port 0: a free port, the same for both).
        Raises `BindError` naming the address when it cannot be bound."""
        server = cls(core)
        for attempt in range(_EPHEMERAL_ATTEMPTS):
            try:
                await server._bind(host, port)
            except BindError as exc:
                if port == 0 and exc.errno == errno.EADDRINUSE and \
                        attempt + 1 < _EPHEMERAL_ATTEMPTS:
                    continue
                server.close()
                raise
            except BaseException:
                server.close()
                raise
            event(log, logging.INFO, "dns.listen", address=format_address(server.address),
                  domain=core.config.domain,
                  upstreams=",".join(format_address(u) for u in core.upstreams) or "none")
            return server
        raise AssertionError("unreachable")

    async def _bind(self, host: str, port: int) -> None:
        udp = _UdpListener.open((host, port), self.core.config.udp_receive_buffer_bytes,
                                self._on_datagram)
        try:
            tcp = await asyncio.start_server(self._on_connection, udp.address[0],
                                             udp.address[1], reuse_address=True)
        except OSError as exc:
            udp.close()
            raise BindError(f"cannot bind TCP {format_address(udp.address)}: "
                            f"{exc.strerror or exc}", exc.errno) from None
        self._listen = _Listen(udp, tcp)
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                self._upstream[family] = await open_udp((wildcard, 0),
                                                        self._on_upstream_datagram)
            except BindError as exc:  # e.g. IPv6 disabled: only that family's upstreams fail
                event(log, logging.DEBUG, "dns.upstream.socket", error=str(exc))

    def close(self) -> None:
        """Stop listening, close client connections and upstream sockets (idempotent)."""
        self._closed = True
        if self._listen is not None:
            self._listen.udp.close()
            self._listen.tcp.close()
        for sock in self._upstream.values():
            sock.close()
        self._upstream.clear()
        for connection in list(self._connections):
            connection.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def wait_closed(self) -> None:
        """Wait until the listener and the tasks are gone (after `close`)."""
        if self._listen is not None:
            await self._listen.tcp.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- clients ----------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, source: Address) -> None:
        if self._listen is None:
            return
        reply = self.core.handle_query(data, self._loop.time(), source, tcp=False)
        if isinstance(reply, bytes):
            self._listen.udp.send(reply, source)
        elif reply is Outcome.PENDING:
            self._flush()

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        config = self.core.config
        if self._closed or len(self._connections) >= config.tcp_max_connections:
            event(log, logging.DEBUG, "dns.tcp.refused", client=format_address(peer),
                  open=len(self._connections))
            writer.close()
            return
        client = TcpClient(writer, peer)
        self._connections.add(client)
        reason = "eof"
        try:
            while True:
                try:
                    async with asyncio.timeout(config.tcp_idle_timeout_s):
                        prefix = await reader.readexactly(2)
                        message = await reader.readexactly(int.from_bytes(prefix, "big"))
                except TimeoutError:
                    reason = "idle"
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                reply = self.core.handle_query(message, self._loop.time(), client, tcp=True)
                if isinstance(reply, bytes):
                    client.send(reply)
                    await writer.drain()
                elif reply is Outcome.PENDING:
                    self._flush()
                else:
                    reason = "malformed"
                    break
        except ConnectionError:
            reason = "reset"
        finally:
            self._connections.discard(client)
            writer.close()
            event(log, logging.DEBUG, "dns.tcp.closed", client=format_address(peer),
                  reason=reason)

    # --- upstreams and the core's actions ---------------------------------------------------

    def _flush(self) -> None:
        for action in self.core.pop_actions():
            if isinstance(action, ClientReply):
                client = action.client
                if isinstance(client, TcpClient):
                    client.send(action.data)
                elif self._listen is not None:
                    self._listen.udp.send(action.data, client)
            elif action.tcp:
                task = self._loop.create_task(self._upstream_tcp(action))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                family = socket.AF_INET6 if ":" in action.upstream[0] else socket.AF_INET
                sock = self._upstream.get(family)
                if sock is not None:  # else: no socket of that family; the timer moves on
                    sock.send(action.data, action.upstream)
        self._rearm()

    def _on_upstream_datagram(self, data: bytes, source: Address) -> None:
        self.core.receive_upstream(data, source, self._loop.time())
        self._flush()

    async def _upstream_tcp(self, action: UpstreamQuery) -> None:
        response = None
        try:
            async with asyncio.timeout(self.core.config.upstream_timeout_s):
                reader, writer = await asyncio.open_connection(*action.upstream)
                try:
                    writer.write(len(action.data).to_bytes(2, "big") + action.data)
                    prefix = await reader.readexactly(2)
                    response = await reader.readexactly(int.from_bytes(prefix, "big"))
                finally:
                    writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            event(log, logging.DEBUG, "dns.upstream.tcp", upstream=format_address(
                action.upstream), error=type(exc).__name__)
        if self._closed:
            return
        if response is None:
            self.core.upstream_failed(action.ref, action.upstream, self._loop.time())
        else:
            self.core.receive_upstream(response, action.upstream, self._loop.time(), tcp=True)
        self._flush()

    def _rearm(self) -> None:
        deadline = self.core.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not self._closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self._loop.time())
        self._flush()


def _peer(writer: asyncio.StreamWriter) -> Address:
    peer = writer.get_extra_info("peername")
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return (str(peer[0]), int(peer[1]))
    return ("?", 0)
