"""The transparent proxy: TCP from iptables REDIRECT, UDP from TPROXY, one port.

For every accepted TCP connection: read the original destination (`SO_ORIGINAL_DST`), find the
Service port serving that ClusterIP:port in the current catalog, check the connection limits,
ask the load balancer for candidates, dial them in order under the connect timeout (a failure
is counted, reported to the load balancer, and the next candidate is tried), then hand both
sockets to the relay. Anything that cannot be served is reset at once (SO_LINGER 0): no
Service, no endpoint, every dial failed, a limit reached.

The catalog is swapped whole with `set_catalog`; connections in flight keep their backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from edgeweave.log import event
from meshd.catalog import Catalog, Service, ServicePort
from meshd.lb import Backend, LoadBalancer
from meshd.proxy.config import ProxyConfig
from meshd.proxy.dial import Dialer, DirectDialer
from meshd.proxy.metrics import ProxyMetrics, ServiceCounters
from meshd.proxy.relay import Connection, Relay
from meshd.proxy.routing import find_port
from meshd.proxy.sockopt import Address, original_dst, reset
from meshd.proxy.udp import UdpProxy

log = logging.getLogger("meshd.proxy")

OriginalDst = Callable[[socket.socket], Address | None]
"""How the original destination of an accepted connection is found (`SO_ORIGINAL_DST`)."""

_ACCEPT_BURST = 64


class Proxy:
    """The proxy's listeners, connections, load balancer and counters on one event loop."""

    def __init__(self, config: ProxyConfig, catalog: Catalog, *,
                 dialer: Dialer | None = None, lb: LoadBalancer | None = None,
                 original_destination: OriginalDst = original_dst) -> None:
        self.config = config
        self.catalog = catalog
        """The catalog served now (replace it with `set_catalog`)."""
        self.lb = lb or LoadBalancer(config.lb)
        self.metrics = ProxyMetrics()
        self._dialer: Dialer = dialer or DirectDialer()
        self._original_dst = original_destination
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._relay: Relay | None = None
        self._udp: UdpProxy | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._dialing: set[asyncio.Task[None]] = set()
        self._active = 0
        self.address: Address = (config.bind_address, config.port)
        """The TCP (and UDP) listening address, with the real port once started."""

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and start serving (OSError when a port cannot be bound)."""
        loop = self._loop = asyncio.get_running_loop()
        config = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.bind_address, config.port))
            sock.listen(config.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        self._relay = Relay(loop, self.metrics, mode=config.relay, pipe_size=config.pipe_size,
                            buffer_size=config.buffer_size)
        if config.udp.enabled:
            udp = UdpProxy(loop, config, port, self.lb, self.metrics, lambda: self.catalog)
            try:
                udp.start()
            except BaseException:
                self._relay.close()
                sock.close()
                raise
            self._udp = udp
        loop.add_reader(sock.fileno(), self._on_accept)
        self._sweeper = loop.call_later(config.sweep_interval_s, self._sweep)
        event(log, logging.INFO, "proxy.listen", address=f"{host}:{port}",
              udp=config.udp.enabled, relay=config.relay, loop=type(loop).__module__)

    async def stop(self) -> None:
        """Stop listening, abort dials in progress and reset every relayed connection."""
        loop = self._loop
        if loop is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for task in list(self._dialing):
            task.cancel()
        if self._dialing:
            await asyncio.gather(*self._dialing, return_exceptions=True)
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._loop = None
        event(log, logging.INFO, "proxy.stop", connections=sum(
            c.connections_total for c in self.metrics.services.values()))

    def set_catalog(self, catalog: Catalog) -> None:
        """Serve `catalog` from now on (atomic: one reference swap)."""
        self.catalog = catalog
        self.lb.retain(catalog.services.values())
        if self._udp is not None:
            self._udp.sync(catalog)

    @property
    def connections(self) -> int:
        """TCP connections being dialed or relayed."""
        return self._active

    @property
    def udp_sessions(self) -> int:
        """UDP sessions open."""
        return self._udp.sessions if self._udp is not None else 0

    # -- TCP -----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BURST):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: keep serving the others
                self.metrics.accept_errors += 1
                event(log, logging.WARNING, "proxy.accept_failed", error=exc.strerror or exc)
                return
            try:
                self._admit(sock, peer[0])
            except Exception as exc:  # a bug must not take the listener down
                self.metrics.relay_errors += 1
                event(log, logging.ERROR, "proxy.admit_failed", error=repr(exc))
                reset(sock)

    def _admit(self, sock: socket.socket, client_ip: str) -> None:
        sock.setblocking(False)
        dst = self._original_dst(sock)
        if dst is None:
            self.metrics.not_redirected += 1
            reset(sock)
            return
        route = find_port(self.catalog, dst[0], dst[1], "TCP")
        if route is None:
            if dst == sock.getsockname()[:2]:  # conntrack without NAT: dialed us directly
                self.metrics.not_redirected += 1
                reset(sock)
                return
            self.metrics.no_service += 1
            event(log, logging.DEBUG, "proxy.no_service", client=client_ip,
                  dst=f"{dst[0]}:{dst[1]}")
            reset(sock)
            return
        service, port = route
        counters = self.metrics.service(service.key)
        if self._active >= self.config.max_connections:
            self.metrics.limited += 1
            reset(sock)
            return
        if counters.connections_active >= self.config.max_connections_per_service:
            counters.limited += 1
            reset(sock)
            return
        assert self._loop is not None
        candidates = self.lb.pick(service, port, client_ip, self._loop.time())
        if not candidates:
            counters.refused += 1
            reset(sock)
            return
        self._active += 1
        counters.connections_active += 1
        task = self._loop.create_task(
            self._connect(sock, client_ip, service, port, candidates, counters))
        self._dialing.add(task)
        task.add_done_callback(self._dialing.discard)

    async def _connect(self, client: socket.socket, client_ip: str, service: Service,
                       port: ServicePort, candidates: list[Backend],
                       counters: ServiceCounters) -> None:
        loop = asyncio.get_running_loop()
        try:
            for backend in candidates:
                # Over the tunnel a lost SYN (a path being re-established) is only resent
                # after TCP's 1 s initial RTO (RFC 6298 §2): allow for one retransmission.
                timeout = (self.config.tunnel_connect_timeout_s
                           if self._dialer.remote(backend.endpoint)
                           else self.config.connect_timeout_s)
                try:
                    async with asyncio.timeout(timeout):
                        upstream = await self._dialer.dial(backend.endpoint, backend.port,
                                                           service, loop.time())
                except Exception as exc:  # OSError, TimeoutError, or a dialer's bug
                    self._dial_failed(service, backend, exc, counters, loop.time())
                    continue
                self.lb.report_success(service, port, client_ip, backend, loop.time())
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                assert self._relay is not None
                counters.connections_total += 1
                self._relay.start(client, upstream, counters, loop.time(), self._closed)
                return
        except BaseException:  # cancelled by stop()
            self._release(counters)
            reset(client)
            raise
        counters.refused += 1
        self._release(counters)
        reset(client)

    def _dial_failed(self, service: Service, backend: Backend, exc: Exception,
                     counters: ServiceCounters, now: float) -> None:
        counters.dial_failures += 1
        reason = "timeout" if isinstance(exc, TimeoutError) else (
            getattr(exc, "strerror", None) or repr(exc))
        ejected = self.lb.report_failure(backend, now)
        if ejected:
            counters.ejections += 1
        event(log, logging.WARNING if ejected else logging.DEBUG,
              "proxy.eject" if ejected else "proxy.dial_failed", service=service.key,
              backend=f"{backend.ip}:{backend.port}", node=backend.key[0] or "-",
              error=reason)

    def _release(self, counters: ServiceCounters) -> None:
        self._active -= 1
        counters.connections_active -= 1

    def _closed(self, conn: Connection) -> None:
        self._release(conn.counters)

    def adopt(self, client: socket.socket, backend: socket.socket,
              counters: ServiceCounters) -> None:
        """Relay between two connected non-blocking sockets that did not come through the
        REDIRECT listener (the mesh connect server's), counted like the proxy's own."""
        assert self._loop is not None and self._relay is not None, "proxy not started"
        self._active += 1
        counters.connections_active += 1
        counters.connections_total += 1
        self._relay.start(client, backend, counters, self._loop.time(), self._closed)

    # -- housekeeping ----------------------------------------------------------------------

    def _sweep(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        try:
            if self._relay is not None:
                self._relay.sweep(now, self.config.idle_timeout_s)
            if self._udp is not None:
                self._udp.sweep(now)
            self.lb.expire(now)
        finally:
            self._sweeper = loop.call_later(self.config.sweep_interval_s, self._sweep)
