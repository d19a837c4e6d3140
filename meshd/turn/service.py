"""The asyncio adapter for `TurnServer` + `StunServer`: sockets in, core calls, sockets out.

    service = await TurnService.start(config, primary_ip="127.0.0.1", port=0, alt_port=0)
    service.addresses, service.tcp_address   # real ports when 0 was asked for
    ...
    service.close()

Sockets: the STUN/TURN listening sockets (primary IP × {port, alt port}, and the alternate IP's
two when given; RFC 5780 Binding works on all of them, TURN requests too), a TCP listener on
the primary address for TURN over TCP (RFC 8656 §3.1, stream framing §12.5), and one UDP socket
per relayed address, bound synchronously when the core asks (`RelayPorts`). One timer, re-armed
to `TurnServer.get_timer()`. No decisions here.

Every UDP socket is a `meshd.udp.BatchSocket` read with `add_reader`: one wake-up drains the
socket (up to `_READ_BATCH` reads, each possibly a UDP GRO burst of equal-size datagrams from
one source) into one `TurnServer.handle_reads` call, and the `TransmitBatch`es it returns go
out as one UDP GSO `sendmsg` each. That is the relay's fast path (docs/reference/meshd-relay.md).

With the native data path (`meshd.turn._relaypath`, built by dev/setup; `native=False` or a
per-node rate limit turns it off), a wake-up first drains the socket in C: reads on routes the
core learnt (`TurnServer.learned`) are relayed there, and the first read without one comes to
the core as above. The core's counters get the native ones added when they are read
(`samples`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from edgeweave.log import event
from meshd.stun.server import DEFAULT_SOFTWARE, ServerAddresses, StunServer
from meshd.turn.fastpath import TransmitBatch
from meshd.turn.server import (
    FiveTuple,
    LearnedRoute,
    Output,
    StreamClose,
    StreamWrite,
    Transport,
    TurnServer,
    TurnServerConfig,
)
from meshd.udp import (
    Address,
    BatchCounters,
    BatchSocket,
    BindError,
    Read,
    Transmit,
    canonical,
    format_address,
)

NATIVE: Any = None
"""meshd.turn._relaypath, or None: not built (no C compiler at install time) or
`MESHD_PURE_PYTHON=1` in the environment (the core relays everything)."""
if os.environ.get("MESHD_PURE_PYTHON") != "1":
    with contextlib.suppress(ImportError):
        NATIVE = importlib.import_module("meshd.turn._relaypath")

log = logging.getLogger("meshd.turn")

_EPHEMERAL_ATTEMPTS = 8  # port 0: the UDP port picked may be taken on the other IP or for TCP
_ROLES = ("primary", "alt-port", "alt-ip", "alt-ip-alt-port")
_READ_BATCH = 64  # reads per wake-up of a socket (each may be a GRO burst of 64 datagrams)
_TCP_WRITE_LIMIT = 1 << 20  # drop relayed data for a TCP client that stopped reading
# TurnMetrics fields that also count what the native data path relayed.
_NATIVE_METRICS = ("datagrams_out", "bytes_out", "datagrams_in", "bytes_in", "relayed_locally",
                   "coalesced_reads", "batches", "batched_datagrams")
# BatchCounters fields the native data path keeps for the sockets it reads and sends on.
_NATIVE_SOCKET = ("reads", "datagrams_read", "gso_sends", "datagrams_sent", "gso_refused",
                  "send_errors")
# Linux <linux/in.h>, <linux/in6.h> (Python 3.11's socket module lacks the names).
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_DO = 10, 23, 2


class _PickAgain(BindError):
    """A port number picked by the kernel for one socket is taken for another: retry."""


class _RelaySockets:
    """`RelayPorts` over real non-blocking UDP sockets."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_readable: Callable[[BatchSocket, bool], None]) -> None:
        self._loop = loop
        self._on_readable = on_readable
        self._sockets: dict[Address, BatchSocket] = {}
        self._reported: set[int] = set()  # errnos already logged (one warning each)
        self.closed = BatchCounters()
        """What the sockets closed so far did (`counters()` adds the open ones)."""

    def open(self, address: Address) -> bool:
        try:
            sock = BatchSocket.bind(address)
        except BindError as exc:
            if exc.errno != errno.EADDRINUSE and exc.errno not in self._reported:
                self._reported.add(exc.errno or 0)
                event(log, logging.WARNING, "turn.relay_bind", address=format_address(address),
                      error=exc)
            return False
        self._sockets[address] = sock
        self._loop.add_reader(sock.fileno(), self._on_readable, sock, False)
        return True

    def set_dont_fragment(self, address: Address) -> None:
        sock = self._sockets[address].sock
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_DO)
        except OSError as exc:  # not Linux
            event(log, logging.DEBUG, "turn.dont_fragment", address=format_address(address),
                  error=exc)

    def close(self, address: Address) -> None:
        sock = self._sockets.pop(address)
        self._loop.remove_reader(sock.fileno())
        _add_counters(self.closed, sock.counters)
        sock.close()

    def get(self, address: Address) -> BatchSocket | None:
        """The open socket on `address`."""
        return self._sockets.get(address)

    def counters(self) -> BatchCounters:
        """Totals over every relayed socket, open or closed."""
        total = BatchCounters()
        _add_counters(total, self.closed)
        for sock in self._sockets.values():
            _add_counters(total, sock.counters)
        return total

    def close_all(self) -> None:
        for address in list(self._sockets):
            self.close(address)


def _add_counters(total: BatchCounters, more: BatchCounters) -> None:
    for name in BatchCounters.__slots__:
        setattr(total, name, getattr(total, name) + getattr(more, name))


class _TcpClient(asyncio.Protocol):
    """One TURN-over-TCP client connection."""

    def __init__(self, service: TurnService, listening: Address) -> None:
        self._service = service
        self._listening = listening
        self.flow: FiveTuple | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = canonical(transport.get_extra_info("peername"))
        self.flow = FiveTuple(Transport.TCP, peer, self._listening)
        self._service._connections[self.flow] = self

    def data_received(self, data: bytes) -> None:
        assert self.flow is not None
        self._service._stream(self.flow, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flow is not None:
            self._service._lost(self.flow)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > _TCP_WRITE_LIMIT:
            self._service.tcp_dropped += 1
            return
        self.transport.write(data)


class TurnService:
    """A running STUN + TURN server: the two cores and their sockets."""

    def __init__(self, clock: Callable[[], float] = time.time, *, native: bool = True) -> None:
        self.server: TurnServer | None = None
        """The TURN core; None until every socket is bound."""
        self.stun: StunServer | None = None
        """The STUN core it composes."""
        self.tcp_address: Address | None = None
        """The TCP listener's address, if TURN over TCP is on."""
        self.tcp_dropped = 0
        """Frames dropped for TCP clients whose send buffer was full."""
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._udp: dict[Address, BatchSocket] = {}
        self._tcp_server: asyncio.Server | None = None
        self._connections: dict[FiveTuple, _TcpClient] = {}
        self._relays = _RelaySockets(self._loop, self._readable)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.native: Any = NATIVE.RelayPath() if native and NATIVE is not None else None
        """The native data path, if built and wanted (None once a rate limit rules it out)."""
        self._epoch = 0  # the core's routes_epoch the native routes were learnt in
        self._folded = dict.fromkeys(_NATIVE_METRICS, 0)  # native counts already in metrics

    @property
    def addresses(self) -> ServerAddresses:
        """The STUN/TURN listening addresses (real port numbers)."""
        assert self.stun is not None, "TurnService.start() has not finished"
        return self.stun.addresses

    @property
    def gro(self) -> bool:
        """The kernel coalesces reads on the listening sockets (UDP GRO, Linux 5.0+)."""
        return bool(self._udp) and all(sock.gro for sock in self._udp.values())

    def samples(self) -> Samples:
        """Prometheus samples of the core (the native data path's counts included) and of the
        sockets (`io_samples`)."""
        assert self.server is not None, "TurnService.start() has not finished"
        self._fold()
        return self.server.samples() + self.io_samples()

    def _fold(self) -> None:
        """Add what the native data path relayed since the last call to the core's metrics."""
        if self.native is None or self.server is None:
            return
        stats, metrics = self.native.stats(), self.server.metrics
        for name in _NATIVE_METRICS:
            setattr(metrics, name, getattr(metrics, name) + stats[name] - self._folded[name])
            self._folded[name] = stats[name]

    def io_samples(self) -> Samples:
        """Prometheus samples of the UDP sockets (listening and relayed, totals) and of the
        native data path."""
        total = self._relays.counters()
        for sock in self._udp.values():
            _add_counters(total, sock.counters)
        native: Samples = []
        if self.native is not None:
            stats = self.native.stats()
            for name in _NATIVE_SOCKET:
                setattr(total, name, getattr(total, name) + stats[name])
            native += [
                ("meshd_relay_native_reads_total", {}, stats["relayed_reads"]),
                ("meshd_relay_native_handed_total", {}, stats["handed"]),
                ("meshd_relay_native_expired_total", {}, stats["expired"]),
                ("meshd_relay_native_routes", {}, self.native.routes),
            ]
        return [
            *native,
            ("meshd_relay_socket_reads_total", {}, total.reads),
            ("meshd_relay_socket_datagrams_total", {"direction": "read"}, total.datagrams_read),
            ("meshd_relay_socket_datagrams_total", {"direction": "sent"}, total.datagrams_sent),
            ("meshd_relay_gso_sends_total", {}, total.gso_sends),
            ("meshd_relay_gso_refused_total", {}, total.gso_refused),
            ("meshd_relay_send_errors_total", {}, total.send_errors),
            ("meshd_relay_tcp_dropped_total", {}, self.tcp_dropped),
        ]

    @classmethod
    async def start(
        cls,
        config: TurnServerConfig,
        *,
        primary_ip: str,
        alt_ip: str | None = None,
        port: int = 3478,
        alt_port: int = 3479,
        tcp: bool = True,
        software: str = DEFAULT_SOFTWARE,
        clock: Callable[[], float] = time.time,
        native: bool = True,
    ) -> TurnService:
        """Bind every socket and start serving. Port 0 picks free ports (the same numbers on
        both IPs and for TCP). `native`: relay on the native data path when it is built and
        no per-node rate limit applies. Raises `BindError` naming the address at fault."""
        for attempt in range(_EPHEMERAL_ATTEMPTS):
            service = cls(clock, native=native)
            try:
                await service._bind(config, primary_ip, alt_ip, port, alt_port, tcp, software)
            except _PickAgain as exc:
                service.close()
                if attempt + 1 < _EPHEMERAL_ATTEMPTS:
                    continue
                raise BindError(str(exc), exc.errno) from None
            except BindError:
                service.close()
                raise
            except BaseException:
                service.close()
                raise
            for role, address in zip(_ROLES, service.addresses.sockets, strict=False):
                event(log, logging.INFO, "stun.listen", address=format_address(address), role=role)
            if service.tcp_address is not None:
                event(log, logging.INFO, "turn.listen",
                      address=format_address(service.tcp_address), transport="tcp")
            event(log, logging.INFO, "turn.relay", ip=config.relay_ip,
                  advertised=config.external_ip or config.relay_ip,
                  ports=f"{config.min_port}-{config.max_port}", realm=config.realm)
            return service
        raise AssertionError("unreachable")

    async def _bind(self, config: TurnServerConfig, primary_ip: str, alt_ip: str | None,
                    port: int, alt_port: int, tcp: bool, software: str) -> None:
        main = await self._open((primary_ip, port))
        alt = await self._open((primary_ip, alt_port))
        # A number the kernel picked on the first socket may be taken on the others: then
        # start over with new numbers (_PickAgain); a port the operator chose is final.
        picked = (port == 0, alt_port == 0)
        port, alt_port = main.address[1], alt.address[1]
        if alt_ip is not None:
            await self._open((alt_ip, port), picked=picked[0])
            await self._open((alt_ip, alt_port), picked=picked[1])
        if tcp:
            await self._listen_tcp(main.address, picked=picked[0])
        self._probe_relay_ip(config.relay_ip)
        addresses = ServerAddresses(main.address[0], port, alt_port, alt_ip)
        self.stun = StunServer(addresses, software=software)
        self.server = TurnServer(config, self._relays, stun=self.stun)
        if config.bytes_per_s_per_node > 0:
            self.native = None  # every datagram goes through the core's token buckets
        if self.native is not None:
            self.server.learned = []

    @staticmethod
    def _probe_relay_ip(ip: str) -> None:
        """Fail at start, not at every Allocate, when the relay IP is not ours."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((ip, 0))
            except OSError as exc:
                raise BindError(f"cannot bind UDP {format_address((ip, 0))} (relay IP): "
                                f"{exc.strerror or exc}", exc.errno) from None

    async def _open(self, local: Address, *, picked: bool = False) -> BatchSocket:
        try:
            sock = BatchSocket.bind(local)
        except BindError as exc:
            if picked and exc.errno == errno.EADDRINUSE:
                raise _PickAgain(str(exc), exc.errno) from None
            raise
        self._udp[sock.address] = sock
        self._loop.add_reader(sock.fileno(), self._readable, sock, True)
        return sock

    async def _listen_tcp(self, address: Address, *, picked: bool) -> None:
        try:
            self._tcp_server = await self._loop.create_server(
                lambda: _TcpClient(self, address), host=address[0], port=address[1],
                reuse_address=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            kind = _PickAgain if picked and exc.errno == errno.EADDRINUSE else BindError
            raise kind(f"cannot listen on TCP {format_address(address)}: {reason}",
                       exc.errno) from None
        self.tcp_address = address

    def set_revoked_nodes(self, nodes: Iterable[str]) -> None:
        """Stop serving these nodes now (`TurnServer.set_revoked_nodes`): their allocations
        go, their requests get 403."""
        if self.server is not None:
            self._emit(self.server.set_revoked_nodes(nodes, self._clock()))

    # --- core calls -------------------------------------------------------------------------------

    def _readable(self, sock: BatchSocket, listening: bool) -> None:
        """A wake-up of a listening (ChannelData, STUN) or relayed (peers) socket."""
        native = self.native
        if native is None or self.server is None:
            reads = sock.read_batch(_READ_BATCH)
        else:
            reads = native.drain(sock.fileno(), listening, self._clock(), _READ_BATCH)
            # AF_INET sources are already canonical text; IPv6 ones carry flow info and scope.
            reads = [(data, segment, source if len(source) == 2 else canonical(source))
                     for data, segment, source in reads]
        if reads:
            self._reads(reads, sock.address)

    def _reads(self, reads: list[Read], local: Address) -> None:
        if self.server is not None:
            self._emit(self.server.handle_reads(reads, local, self._clock()))

    def _sync_routes(self) -> None:
        """Hand the routes the core learnt to the native data path (forgetting the old ones
        first when an allocation came or went)."""
        server, native = self.server, self.native
        if native is None or server is None:
            return
        if server.routes_epoch != self._epoch:
            native.forget()
            self._epoch = server.routes_epoch
        learned = server.learned
        if not learned:
            return
        for route in learned:
            self._learn(native, route)
        learned.clear()

    def _learn(self, native: Any, route: LearnedRoute) -> None:
        into = self._udp.get(route.local) or self._relays.get(route.local)
        out = self._udp.get(route.out_local) or self._relays.get(route.out_local)
        if into is None or out is None:
            return  # a socket that is gone: the core sees those reads, if any
        native.learn(into.fileno(), route.source, route.channel, out.fileno(),
                     route.destination, route.out_channel, route.expires)

    def _stream(self, flow: FiveTuple, data: bytes) -> None:
        if self.server is not None:
            self._emit(self.server.stream_received(flow, data, self._clock()))

    def _lost(self, flow: FiveTuple) -> None:
        self._connections.pop(flow, None)
        if self.server is not None:
            self.server.connection_lost(flow, self._clock())
            self._sync_routes()
            self._rearm()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.server is not None:
            self.server.handle_timer(self._clock())
            self._sync_routes()
            self._rearm()

    def _emit(self, outputs: Iterable[Output]) -> None:
        for out in outputs:
            if isinstance(out, TransmitBatch):
                sock = self._udp.get(out.source) or self._relays.get(out.source)
                if sock is not None:
                    sock.send_segments(out.data, out.segment, out.destination)
            elif isinstance(out, Transmit):
                sock = self._udp.get(out.source) or self._relays.get(out.source)
                if sock is not None:
                    sock.send(out.data, out.destination)
            elif isinstance(out, StreamWrite):
                connection = self._connections.get(out.flow)
                if connection is not None:
                    connection.write(out.data)
            elif isinstance(out, StreamClose):
                connection = self._connections.get(out.flow)
                if connection is not None and connection.transport is not None:
                    event(log, logging.INFO, "turn.tcp_close",
                          client=format_address(out.flow.client), reason=out.reason)
                    connection.transport.close()
        self._sync_routes()
        self._rearm()

    def _rearm(self) -> None:
        assert self.server is not None
        deadline = self.server.get_timer()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def close(self) -> None:
        """Close every socket and connection (idempotent). Allocations end with the process."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        for connection in list(self._connections.values()):
            if connection.transport is not None:
                connection.transport.abort()
        self._connections.clear()
        if self._tcp_server is not None:
            self._tcp_server.close()
            self._tcp_server = None
        for sock in self._udp.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        self._relays.close_all()


Samples = list[tuple[str, dict[str, str], int]]
"""Prometheus samples: (name, labels, value)."""


async def start_metrics(host: str, port: int, samples: Callable[[], Samples], *,
                        routes: Iterable[web.RouteDef] = ()) -> web.AppRunner:
    """Serve `GET /metrics` (Prometheus text) and `/healthz` on `host:port` (0: any port; see
    `runner.addresses`), plus `routes` (`meshd server`'s `/nodes`). Raises `BindError`."""
    from meshd.status import prometheus_samples

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=prometheus_samples(samples()),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        where = format_address((host, port)) if ":" not in host else f"[{host}]:{port}"
        raise BindError(f"cannot listen on TCP {where} (metrics): {exc.strerror or exc}",
                        exc.errno) from None
    return runner
