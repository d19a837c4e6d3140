"""UDP through TPROXY: per (client, original destination) sessions to a picked backend.

Two ways in, one way out:

- The listener is a transparent UDP socket (`IP_TRANSPARENT`) on the proxy port with
  `IP_RECVORIGDSTADDR`: the mangle-table TPROXY rule hands it datagrams for ClusterIP:port
  unchanged and `recvmsg` says which ClusterIP:port each was sent to.
- Each UDP ClusterIP:port also has a transparent socket bound to exactly that address. It sends
  the backend's answers to the client from the address the client addressed, and it receives
  what TPROXY's socket assignment did not survive: on a host with `br_netfilter`
  (`bridge-nf-call-iptables=1`, as Docker and Kubernetes set it) a datagram from a pod behind a
  bridge runs the PREROUTING hooks at bridge level, and the socket TPROXY assigned there is
  dropped when the packet re-enters IP; the TPROXY mark still routes it locally, where the
  ordinary socket lookup finds the socket bound to its ClusterIP:port.

A session is a connected UDP socket to the backend the load balancer picked. Sessions expire
after `sessionIdleS` without a datagram either way and the table is bounded, so nothing leaks.
An ICMP error from a backend (port unreachable: connection refused on the connected socket)
ejects it and closes the session; if the backend never answered, the session's first datagram
is sent again on a new session to the next backend (so a dead backend costs the client
nothing), and later datagrams pick another backend anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable

from edgeweave.log import event
from meshd.catalog import Catalog, Service, ServicePort
from meshd.lb import Backend, LoadBalancer
from meshd.proxy.config import ProxyConfig
from meshd.proxy.metrics import ProxyMetrics, ServiceCounters
from meshd.proxy.routing import find_port
from meshd.proxy.sessions import SessionTable
from meshd.proxy.sockopt import (
    IP_RECVORIGDSTADDR,
    IP_TRANSPARENT,
    SOCKADDR_IN_SIZE,
    SOL_IP,
    Address,
    origdst_from_ancillary,
)

log = logging.getLogger("meshd.proxy")

_CMSG_SPACE = socket.CMSG_SPACE(SOCKADDR_IN_SIZE)
_BURST = 64
SessionKey = tuple[Address, Address]  # (client, original destination)


def _transparent_udp(address: Address, ancillary: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        if ancillary:
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_destinations(catalog: Catalog) -> set[Address]:
    """Every IPv4 ClusterIP:port of a proxied UDP Service port."""
    out = set()
    for service in catalog.services.values():
        if not service.proxied or service.external_name is not None:
            continue
        for port in service.ports:
            if port.protocol != "UDP":
                continue
            for ip in service.cluster_ips:
                if ":" not in ip:
                    out.add((ip, port.port))
    return out


class _Session:
    __slots__ = ("answered", "backend", "client", "closed", "counters", "dst", "first",
                 "first_tries", "key", "port", "reply", "service", "udp", "upstream",
                 "upstream_fd")

    def __init__(self, udp: UdpProxy, key: SessionKey, service: Service, port: ServicePort,
                 backend: Backend, upstream: socket.socket, reply: socket.socket,
                 counters: ServiceCounters) -> None:
        self.udp = udp
        self.key = key
        self.client, self.dst = key
        self.service = service
        self.port = port
        self.backend = backend
        self.upstream = upstream
        self.upstream_fd = upstream.fileno()
        self.reply = reply
        self.counters = counters
        self.answered = False
        self.closed = False
        self.first: bytes | None = None  # the first datagram, until the backend answers
        self.first_tries = 0  # further backends it may be sent to

    def on_readable(self) -> None:
        """Datagrams from the backend → the client, from the ClusterIP:port."""
        if self.closed:
            return
        udp = self.udp
        buf, view = udp.buffer, udp.view
        counters = self.counters
        for _ in range(_BURST):
            try:
                n = self.upstream.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                udp.backend_failed(self, exc)
                return
            try:
                self.reply.sendto(view[:n], self.client)
            except OSError:
                udp.metrics.udp_dropped += 1
                continue
            counters.udp_datagrams_out += 1
            counters.bytes_out += n
            if not self.answered:
                self.answered = True
                self.first = None
                udp.lb.report_success(self.service, self.port, self.client[0], self.backend,
                                      udp.loop.time())
        udp.table.touch(self.key, udp.loop.time())


class UdpProxy:
    """The TPROXY UDP listener, the per-ClusterIP:port sockets and the sessions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: ProxyConfig, port: int,
                 lb: LoadBalancer, metrics: ProxyMetrics,
                 catalog: Callable[[], Catalog]) -> None:
        self.loop = loop
        self.config = config
        self.port = port
        self.lb = lb
        self.metrics = metrics
        self._catalog = catalog
        self.table: SessionTable[SessionKey, _Session] = SessionTable(
            config.udp.session_idle_s, config.udp.max_sessions)
        self.buffer = bytearray(config.udp.max_datagram)
        self.view = memoryview(self.buffer)
        self._bound: dict[Address, socket.socket] = {}
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Bind the transparent listener and the ClusterIP:port sockets (OSError when not
        permitted or in use)."""
        self._sock = _transparent_udp((self.config.bind_address, self.port), ancillary=True)
        self.loop.add_reader(self._sock.fileno(), self._on_listener)
        self.sync(self._catalog())

    @property
    def sessions(self) -> int:
        """Sessions open."""
        return len(self.table)

    @property
    def bound(self) -> list[Address]:
        """The ClusterIP:port sockets open."""
        return sorted(self._bound)

    def sync(self, catalog: Catalog) -> None:
        """Open a socket per UDP ClusterIP:port of `catalog`; close those of vanished ones
        (with their sessions)."""
        wanted = udp_destinations(catalog)
        for dst in [d for d in self._bound if d not in wanted]:
            self._unbind(dst)
        for dst in sorted(wanted - set(self._bound)):
            try:
                self._bind(dst)
            except OSError as exc:
                event(log, logging.WARNING, "proxy.udp_bind_failed", dst=f"{dst[0]}:{dst[1]}",
                      error=exc.strerror or exc)

    def _bind(self, dst: Address) -> socket.socket:
        sock = _transparent_udp(dst, ancillary=False)
        self._bound[dst] = sock

        def readable() -> None:
            self._on_bound(sock, dst)

        self.loop.add_reader(sock.fileno(), readable)
        return sock

    def _unbind(self, dst: Address) -> None:
        sock = self._bound.pop(dst)
        self.loop.remove_reader(sock.fileno())
        sock.close()
        self._close_sessions([key for key in self._keys() if key[1] == dst])

    def _keys(self) -> list[SessionKey]:
        return [key for key, _ in self.table.items()]

    # -- client → backend -----------------------------------------------------------------

    def _on_listener(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buf, view = self.buffer, self.view
        for _ in range(_BURST):
            try:
                n, ancdata, flags, client = sock.recvmsg_into((buf,), _CMSG_SPACE)
            except BlockingIOError:
                return
            except OSError:
                self.metrics.udp_dropped += 1
                return
            dst = origdst_from_ancillary(ancdata)
            if dst is None or flags & socket.MSG_TRUNC:
                self.metrics.udp_dropped += 1
                continue
            self.metrics.udp_via_tproxy += 1
            self._forward(view[:n], (client[0], client[1]), dst)

    def _on_bound(self, sock: socket.socket, dst: Address) -> None:
        buf, view = self.buffer, self.view
        for _ in range(_BURST):
            if sock.fileno() < 0:  # closed by a catalog swap inside this loop
                return
            try:
                n, client = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self.metrics.udp_dropped += 1
                return
            self.metrics.udp_via_bound += 1
            self._forward(view[:n], (client[0], client[1]), dst)

    def _forward(self, data: memoryview, client: Address, dst: Address,
                 tries: int | None = None) -> None:
        """Send a client datagram to its session's backend; `tries`: how many more backends
        it may go to if that one fails (default: `lb.maxCandidates` - 1)."""
        if tries is None:
            tries = self.lb.config.max_candidates - 1
        key = (client, dst)
        now = self.loop.time()
        session = self.table.get(key)
        new = session is None
        if session is None:
            session = self._open(key, now)
            if session is None:
                return
        else:
            self.table.touch(key, now)
        try:
            session.upstream.send(data)
        except BlockingIOError:
            self.metrics.udp_dropped += 1
            return
        except OSError as exc:  # an ICMP error from an earlier datagram was pending
            self.backend_failed(session, exc)  # (resends an older unanswered first datagram)
            if tries > 0:
                self._forward(data, client, dst, tries - 1)
            else:
                self.metrics.udp_dropped += 1
            return
        if new and tries > 0:
            session.first = bytes(data)  # kept until the backend answers (see backend_failed)
            session.first_tries = tries
        session.counters.udp_datagrams_in += 1
        session.counters.bytes_in += len(data)

    def _open(self, key: SessionKey, now: float) -> _Session | None:
        client, dst = key
        route = find_port(self._catalog(), dst[0], dst[1], "UDP")
        if route is None:
            self.metrics.no_service += 1
            self.metrics.udp_dropped += 1
            return None
        service, port = route
        counters = self.metrics.service(service.key)
        try:
            reply = self._bound.get(dst) or self._bind(dst)
        except OSError as exc:
            event(log, logging.WARNING, "proxy.udp_bind_failed", dst=f"{dst[0]}:{dst[1]}",
                  error=exc.strerror or exc)
            self.metrics.udp_dropped += 1
            return None
        for backend in self.lb.pick(service, port, client[0], now):
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                upstream.setblocking(False)
                upstream.connect((backend.ip, backend.port))
            except OSError as exc:
                upstream.close()
                self._count_failure(counters, backend, exc, now)
                continue
            session = _Session(self, key, service, port, backend, upstream, reply, counters)
            for _, evicted in self.table.add(key, session, now):
                self._close(evicted, expired=True)
            self.loop.add_reader(session.upstream_fd, session.on_readable)
            counters.udp_sessions_active += 1
            counters.udp_sessions_total += 1
            return session
        counters.refused += 1
        self.metrics.udp_dropped += 1
        return None

    # -- failures and expiry --------------------------------------------------------------

    def _count_failure(self, counters: ServiceCounters, backend: Backend, exc: OSError,
                       now: float) -> None:
        counters.dial_failures += 1
        if self.lb.report_failure(backend, now):
            counters.ejections += 1
            event(log, logging.WARNING, "proxy.eject", protocol="udp",
                  backend=f"{backend.ip}:{backend.port}", node=backend.key[0] or "-",
                  error=exc.strerror or exc)

    def backend_failed(self, session: _Session, exc: OSError) -> None:
        """The backend answered with an ICMP error (or the socket broke): eject, close, and
        send a first datagram that was never answered to another backend."""
        self._count_failure(session.counters, session.backend, exc, self.loop.time())
        self.table.pop(session.key)
        self._close(session, expired=False)
        first, session.first = session.first, None
        if first is not None:
            self._forward(memoryview(first), session.client, session.dst,
                          session.first_tries - 1)

    def _close(self, session: _Session, expired: bool) -> None:
        if session.closed:
            return
        session.closed = True
        self.loop.remove_reader(session.upstream_fd)
        session.upstream.close()
        session.counters.udp_sessions_active -= 1
        if expired:
            session.counters.udp_sessions_expired += 1

    def _close_sessions(self, keys: Iterable[SessionKey]) -> None:
        for key in keys:
            session = self.table.pop(key)
            if session is not None:
                self._close(session, expired=False)

    def sweep(self, now: float) -> int:
        """Close the sessions idle for `sessionIdleS`; returns how many."""
        expired = self.table.expire(now)
        for _, session in expired:
            self._close(session, expired=True)
        return len(expired)

    def close(self) -> None:
        """Close the listener, the ClusterIP:port sockets and every session."""
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._close_sessions(self._keys())
        for dst in list(self._bound):
            self._unbind(dst)
