"""The proxy's configuration (YAML, camelCase keys; docs/reference/meshd-proxy.md).

    proxy:
      port: 40001
      connectTimeoutS: 1.0
      tunnelConnectTimeoutS: 3.0
      idleTimeoutS: 3600
      maxConnections: 16384
      maxConnectionsPerService: 4096
      relay: auto            # auto | splice | copy
      eventLoop: uvloop      # uvloop | asyncio
      udp: {sessionIdleS: 30, maxSessions: 16384}
      lb: {ejectionBaseS: 1, ejectionMaxS: 30}
      rules: {tproxyMark: 0x1000, routeTable: 40001}
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from meshd.lb import LbConfig
from meshd.rules.document import RulesConfig

PROXY_PORT = 40001


@dataclass(frozen=True)
class UdpConfig:
    """`proxy.udp:` — the TPROXY UDP listener and its sessions."""

    enabled: bool = True
    """Listen for UDP (needs CAP_NET_ADMIN for IP_TRANSPARENT)."""
    session_idle_s: float = 30.0
    """A (client, ClusterIP:port) session with no datagram either way this long is closed."""
    max_sessions: int = 16384
    """Bound of the session table; the least recently used session is closed beyond it."""
    max_datagram: int = 65535
    """Largest datagram relayed (bytes)."""

    def __post_init__(self) -> None:
        if self.session_idle_s <= 0:
            raise ValueError("udp.sessionIdleS: expected a positive number")
        if self.max_sessions < 1:
            raise ValueError("udp.maxSessions: expected at least 1")
        if not 512 <= self.max_datagram <= 65535:
            raise ValueError("udp.maxDatagram: expected 512..65535")


@dataclass(frozen=True)
class ProxyConfig:
    """`proxy:` — the transparent proxy on :40001."""

    port: int = PROXY_PORT
    """TCP port the REDIRECT rules send to, and the UDP TPROXY port (0: any free port, for
    tests without rules)."""
    bind_address: str = "0.0.0.0"
    """Address the listeners bind (REDIRECT delivers to the incoming interface's address, or
    127.0.0.1 from OUTPUT: keep the wildcard unless you know better)."""
    connect_timeout_s: float = 1.0
    """Seconds to wait for a backend to accept before trying the next candidate."""
    tunnel_connect_timeout_s: float = 3.0
    """The same for backends on other nodes reached through the tunnel (the owning agent
    dials the pod under its own `connectTimeoutS`; a lost SYN costs TCP's 1 s RTO)."""
    idle_timeout_s: float = 3600.0
    """A TCP connection that moved no byte either way this long is closed."""
    max_connections: int = 16384
    """Connections relayed at once (over: new clients are reset)."""
    max_connections_per_service: int = 4096
    """Connections relayed at once per Service."""
    backlog: int = 4096
    """listen() backlog of the TCP socket."""
    relay: Literal["auto", "splice", "copy"] = "auto"
    """How bytes move: `splice` (zero-copy through a pipe), `copy` (recv_into/send through a
    buffer), `auto` (copy small reads, splice bulk; copy for sockets that cannot splice)."""
    pipe_size: int = 1048576
    """Capacity of each splice pipe (bytes; F_SETPIPE_SZ, capped by fs.pipe-max-size)."""
    buffer_size: int = 65536
    """Bytes read per call when copying (in `auto`, a read filling it switches to splice)."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """Event loop of `python -m meshd.proxy` (asyncio when uvloop is not installed)."""
    sweep_interval_s: float = 1.0
    """Seconds between housekeeping runs (idle timeouts, UDP expiry, metrics)."""
    udp: UdpConfig = field(default_factory=UdpConfig)
    """UDP through TPROXY."""
    lb: LbConfig = field(default_factory=LbConfig)
    """Load balancing and passive health."""
    rules: RulesConfig = field(default_factory=RulesConfig)
    """iptables rules and policy routing."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        try:
            ipaddress.IPv4Address(self.bind_address)
        except ValueError:
            raise ValueError(f"bindAddress: {self.bind_address!r} is not an IPv4 address") \
                from None
        for name, value in (("connectTimeoutS", self.connect_timeout_s),
                            ("tunnelConnectTimeoutS", self.tunnel_connect_timeout_s),
                            ("idleTimeoutS", self.idle_timeout_s),
                            ("sweepIntervalS", self.sweep_interval_s)):
            if value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value}")
        for name, count in (("maxConnections", self.max_connections),
                            ("maxConnectionsPerService", self.max_connections_per_service),
                            ("backlog", self.backlog)):
            if count < 1:
                raise ValueError(f"{name}: expected at least 1, got {count}")
        if not 4096 <= self.pipe_size <= 1 << 30:
            raise ValueError(f"pipeSize: expected 4096..2^30, got {self.pipe_size}")
        if not 1024 <= self.buffer_size <= 1 << 26:
            raise ValueError(f"bufferSize: expected 1024..2^26, got {self.buffer_size}")


@dataclass(frozen=True)
class ProxyFile:
    """A file with a `proxy:` section (what `python -m meshd.proxy --config` reads)."""

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """The proxy."""
