"""Endpoints on other nodes: `MeshDialer` (caller side) and `MeshConnectServer` (owner side).

The caller's proxy picks a backend; if the pod runs on another node that the mesh can reach,
`MeshDialer` connects to that node's agent (its overlay address and connect port, from a
`PeerDirectory`), sends the connect request of `meshd.tunnel.connect`, and hands the proxy the
stream once the owner answers CONNECTED. The owner's `MeshConnectServer` reads the request,
checks it against its own catalog (an endpoint of that Service on this node), dials the pod and
relays with the proxy's splice relay. A failed remote dial comes back as an OSError, so the
caller's passive health ejects the backend exactly as for a local one.

Endpoints on nodes the mesh does not know are dialed directly when `direct_routable` is set
(nodes on one LAN with routed pod subnets: no tunnel needed), and fail fast otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from edgeweave.log import event
from meshd.catalog import Catalog, Endpoint, Service
from meshd.proxy.dial import DirectDialer
from meshd.proxy.metrics import ProxyMetrics, ServiceCounters
from meshd.proxy.sockopt import reset
from meshd.tunnel.connect import (
    HEAD,
    REPLY,
    ConnectProtocolError,
    ConnectRequest,
    Status,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
    request_size,
)
from meshd.udp import Address

log = logging.getLogger("meshd.proxy")

_ERRNO_OF = {
    Status.REFUSED: errno.ECONNREFUSED,
    Status.UNREACHABLE: errno.EHOSTUNREACH,
    Status.TIMEOUT: errno.ETIMEDOUT,
    Status.NOT_ALLOWED: errno.EACCES,
    Status.BAD_REQUEST: errno.EPROTO,
}


class PeerDirectory(Protocol):
    """Where other nodes' agents accept mesh connects."""

    def connect_address(self, node: str) -> Address | None:
        """The address of `node`'s mesh connect server, or None if the mesh cannot reach it."""
        ...


class MeshDialer:
    """The proxy's dialer when the mesh carries traffic to other nodes."""

    def __init__(self, node: str, peers: PeerDirectory | None = None, *,
                 direct_routable: bool = True) -> None:
        self.node = node
        self.peers = peers
        self.direct_routable = direct_routable
        self._direct = DirectDialer()

    async def dial(self, endpoint: Endpoint, port: int, service: Service,
                   now: float) -> socket.socket:
        if endpoint.node in (None, "", self.node):
            return await self._direct.dial(endpoint, port, service, now)
        assert endpoint.node is not None
        where = self.peers.connect_address(endpoint.node) if self.peers is not None else None
        if where is None:
            if self.direct_routable:
                return await self._direct.dial(endpoint, port, service, now)
            raise OSError(errno.EHOSTUNREACH, f"no mesh path to node {endpoint.node}")
        return await self._via(where, endpoint, port, service)

    def remote(self, endpoint: Endpoint) -> bool:
        node = endpoint.node
        if node in (None, "", self.node) or node is None or self.peers is None:
            return False
        return self.peers.connect_address(node) is not None

    async def _via(self, where: Address, endpoint: Endpoint, port: int,
                   service: Service) -> socket.socket:
        loop = asyncio.get_running_loop()
        request = encode_request(ConnectRequest(endpoint.ip, port, service.key))
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, where)
            await loop.sock_sendall(sock, request)
            reply = b""
            while len(reply) < REPLY.size:  # read exactly the reply: pod bytes may follow
                chunk = await loop.sock_recv(sock, REPLY.size - len(reply))
                if not chunk:
                    raise OSError(errno.ECONNRESET,
                                  f"node {endpoint.node} closed the mesh connect")
                reply += chunk
            try:
                status = parse_reply(reply)
            except ConnectProtocolError as exc:
                raise OSError(errno.EPROTO, f"node {endpoint.node}: {exc}") from None
            if status is not Status.CONNECTED:
                raise OSError(_ERRNO_OF[status],
                              f"node {endpoint.node}: {status.name.lower().replace('_', ' ')}")
        except BaseException:
            sock.close()
            raise
        return sock


class MeshConnectServer:
    """Accepts mesh connects from other nodes' proxies and dials this node's pods."""

    def __init__(self, catalog: Callable[[], Catalog], adopt: Callable[
            [socket.socket, socket.socket, ServiceCounters], None], metrics: ProxyMetrics, *,
                 connect_timeout_s: float = 1.0, header_timeout_s: float = 5.0) -> None:
        self._catalog = catalog
        self._adopt = adopt
        self._metrics = metrics
        self.connect_timeout_s = connect_timeout_s
        self.header_timeout_s = header_timeout_s
        self._direct = DirectDialer()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Address | None = None
        """Where it listens, once started."""
        self.refused = 0
        """Requests refused (not allowed, bad request, or the pod dial failed)."""

    async def start(self, address: Address) -> None:
        """Listen on `address` (OSError when it cannot be bound)."""
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.address = sock.getsockname()[:2]
        self._loop.add_reader(sock.fileno(), self._on_accept)
        event(log, logging.INFO, "mesh.connect_listen", address=f"{address[0]}:"
              f"{self.address[1]}")

    async def stop(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def allowed(self, request: ConnectRequest) -> bool:
        """Whether `request` names an endpoint of its Service on this node, on a port it
        serves."""
        catalog = self._catalog()
        service = catalog.services.get(request.service)
        if service is None:
            return False
        return any(e.ip == request.ip and e.node in (None, catalog.node)
                   and any(number == request.port for _, number, _ in e.ports)
                   for e in service.endpoints)

    def _on_accept(self) -> None:
        listener, loop = self._listener, self._loop
        if listener is None or loop is None:
            return
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._metrics.accept_errors += 1
                event(log, logging.WARNING, "mesh.accept_failed", error=exc.strerror or exc)
                return
            sock.setblocking(False)
            task = loop.create_task(self._serve(sock, f"{peer[0]}:{peer[1]}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.header_timeout_s):
                head = await _recv_exactly(loop, client, HEAD.size)
                rest = await _recv_exactly(loop, client, request_size(head) - HEAD.size)
            request = parse_request(head + rest)
        except (ConnectProtocolError, OSError, TimeoutError, ValueError) as exc:
            self.refused += 1
            event(log, logging.WARNING, "mesh.bad_request", peer=peer, error=str(exc) or
                  type(exc).__name__)
            with contextlib.suppress(OSError):
                client.send(encode_reply(Status.BAD_REQUEST))
            reset(client)
            return
        if not self.allowed(request):
            self.refused += 1
            event(log, logging.WARNING, "mesh.not_allowed", peer=peer, service=request.service,
                  target=f"{request.ip}:{request.port}")
            await _reply_and_close(loop, client, Status.NOT_ALLOWED)
            return
        service = self._catalog().services[request.service]
        endpoint = next(e for e in service.endpoints if e.ip == request.ip)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                backend = await self._direct.dial(endpoint, request.port, service, loop.time())
        except (OSError, TimeoutError) as exc:
            self.refused += 1
            status = (Status.TIMEOUT if isinstance(exc, TimeoutError) else
                      Status.REFUSED if exc.errno == errno.ECONNREFUSED else Status.UNREACHABLE)
            event(log, logging.DEBUG, "mesh.dial_failed", peer=peer, service=request.service,
                  target=f"{request.ip}:{request.port}", status=status.name)
            await _reply_and_close(loop, client, status)
            return
        try:
            await loop.sock_sendall(client, encode_reply(Status.CONNECTED))
        except OSError:
            backend.close()
            reset(client)
            return
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._adopt(client, backend, self._metrics.service(request.service))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectProtocolError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def _reply_and_close(loop: asyncio.AbstractEventLoop, client: socket.socket,
                           status: Status) -> None:
    with contextlib.suppress(OSError):
        await loop.sock_sendall(client, encode_reply(status))
    client.close()
