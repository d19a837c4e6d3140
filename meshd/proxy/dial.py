"""The seam between the proxy and the way a backend is reached: `Dialer`.

The proxy calls `dial` for each candidate the load balancer returned, under its connect
timeout, and relays between the client and the connected socket it gets back. `DirectDialer`
connects straight to the endpoint (local pods, and endpoints that are plainly routable). The
tunnel issue plugs in a dialer that sends endpoints on other nodes through the owning node's
agent; it gets the whole `Endpoint` (its `node`) because pod IPs overlap between edge nodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Protocol

from meshd.catalog import Endpoint, Service


class Dialer(Protocol):
    """Opens a stream to one backend."""

    async def dial(self, endpoint: Endpoint, port: int, service: Service,
                   now: float) -> socket.socket:
        """A connected, non-blocking stream socket to `endpoint`'s `port`.

        Raise OSError (TimeoutError included) when the backend cannot be reached: the proxy
        counts it, reports it to the load balancer and tries the next candidate. On
        cancellation (the proxy's connect timeout), close whatever was opened.
        """
        ...

    def remote(self, endpoint: Endpoint) -> bool:
        """Whether `dial` reaches `endpoint` through another node's agent over the tunnel (the
        proxy then waits `tunnelConnectTimeoutS`, not `connectTimeoutS`)."""
        ...


class DirectDialer:
    """Connects to the endpoint's IP directly (TCP_NODELAY, non-blocking)."""

    async def dial(self, endpoint: Endpoint, port: int, service: Service,
                   now: float) -> socket.socket:
        family = socket.AF_INET6 if ipaddress.ip_address(endpoint.ip).version == 6 \
            else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, (endpoint.ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def remote(self, endpoint: Endpoint) -> bool:
        return False
