"""`dns:` in meshd's configuration file (camelCase keys, read by `edgeweave.config`).

    dns:
      address: 169.254.96.16
      port: 53
      domain: cluster.local
      ttlS: 5
      upstreams: [10.0.0.2, "10.0.0.3:5353"]   # default: nameservers of resolvConf
      upstreamTimeoutS: 1.0
      forwardAttempts: 3
      cacheSize: 10000

Reference: docs/reference/meshd-dns.md.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from edgeweave.config import HostPort, camel
from meshd.dns.wire import name_from_text

DNS_PORT = 53
AGENT_DNS_ADDRESS = "169.254.96.16"  # EdgeMesh's link-local DNS address


@dataclass(frozen=True)
class DnsConfig:
    """`dns:` — the agent's cluster DNS server."""

    address: str = AGENT_DNS_ADDRESS
    """IP to listen on (UDP and TCP)."""
    port: int = DNS_PORT
    """Port to listen on; 0 picks a free one (tests)."""
    domain: str = "cluster.local"
    """The cluster domain: `svc.ns.svc.<domain>` names are answered from the catalog."""
    ttl_s: int = 5
    """TTL of every answer from the catalog (as CoreDNS' kubernetes plugin: 5 s)."""
    negative_ttl_s: int = 5
    """SOA minimum and TTL: how long resolvers may cache NXDOMAIN/NODATA for cluster names."""
    upstreams: tuple[str, ...] = ()
    """Resolvers for every other name (`ip` or `ip:port`, `[v6]:port`), tried in order starting
    with the last one that answered; empty: the nameservers of `resolvConf` at startup, minus
    our own address."""
    resolv_conf: Path = Path("/etc/resolv.conf")
    """Where default upstreams come from."""
    upstream_timeout_s: float = 1.0
    """Seconds to wait for one upstream before trying the next."""
    forward_attempts: int = 3
    """Upstream tries per query (cycling through `upstreams`) before answering SERVFAIL."""
    max_pending: int = 1024
    """Forwarded questions in flight at most; beyond, new ones get SERVFAIL at once."""
    cache_size: int = 10000
    """Forwarded answers cached at most (least recently used evicted). 0 disables the cache."""
    cache_max_ttl_s: int = 3600
    """Cap on how long a forwarded answer is cached."""
    cache_max_negative_ttl_s: int = 300
    """Cap for NXDOMAIN/NODATA from upstream (RFC 2308 §5 suggests at most 3 hours)."""
    answer_cache_size: int = 10000
    """Encoded answers for cluster names kept (emptied at every catalog change)."""
    edns_udp_size: int = 1232
    """Largest UDP answer we send to an EDNS client, and the size we advertise (DNS flag day
    2020); clients without EDNS get 512 bytes."""
    udp_receive_buffer_bytes: int = 4 * 1024 * 1024
    """SO_RCVBUF asked for the UDP socket (the kernel caps it at net.core.rmem_max): queries
    arriving in a burst wait there instead of being dropped."""
    tcp_idle_timeout_s: float = 10.0
    """A TCP connection with no complete query for this long is closed (RFC 7766 §6.2.3)."""
    tcp_max_connections: int = 256
    """Concurrent TCP client connections; more are closed at once."""
    malformed_log_interval_s: float = 10.0
    """At most one log line per this many seconds for malformed packets (all are counted)."""

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"address: {self.address!r} is not an IP address") from None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        try:
            labels = name_from_text(self.domain)
        except ValueError as exc:
            raise ValueError(f"domain: {exc}") from None
        if not labels:
            raise ValueError("domain: must not be the root")
        for upstream in self.upstreams:
            parse_upstream(upstream)
        for name in ("ttl_s", "negative_ttl_s", "cache_max_ttl_s", "cache_max_negative_ttl_s"):
            value = getattr(self, name)
            if not 0 <= value <= 2**31 - 1:
                raise ValueError(f"{camel(name)}: expected 0..2147483647, got {value}")
        for name in ("upstream_timeout_s", "tcp_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{camel(name)}: must be positive")
        for name in ("forward_attempts", "max_pending", "tcp_max_connections",
                     "udp_receive_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{camel(name)}: must be at least 1")
        for name in ("cache_size", "answer_cache_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{camel(name)}: must not be negative")
        if not 512 <= self.edns_udp_size <= 65535:
            raise ValueError(f"ednsUdpSize: expected 512..65535, got {self.edns_udp_size}")

    def upstream_addresses(self) -> tuple[tuple[str, int], ...]:
        """`upstreams` as (IP, port) pairs."""
        return tuple(parse_upstream(u) for u in self.upstreams)


def parse_upstream(text: str) -> tuple[str, int]:
    """`1.2.3.4`, `1.2.3.4:5353`, `2001:db8::1`, `[2001:db8::1]:5353` → (IP, port)."""
    try:
        ip = ipaddress.ip_address(text)  # a bare IPv6 address has colons but no port
        return str(ip), DNS_PORT
    except ValueError:
        pass
    try:
        hostport = HostPort.parse(text, DNS_PORT)
        return str(ipaddress.ip_address(hostport.host)), hostport.port
    except ValueError as exc:
        raise ValueError(f"upstreams: {text!r} is not an IP address with an optional port "
                         f"({exc})") from None

