"""meshd's configuration file (YAML, camelCase keys; see docs/reference/meshd.md).

    stun:
      addresses: [198.51.100.1, 198.51.100.2]   # second one = RFC 5780 alternate IP
      port: 3478
      altPort: 3479
    netcheck:
      server: stun.example.net:3478
      initialRtoS: 0.25
      transmissions: 4
      giveUpS: 2.5
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edgeweave.config import HostPort
from meshd.dns.config import DnsConfig
from meshd.proxy.config import ProxyConfig
from meshd.stun.server import DEFAULT_SOFTWARE
from meshd.stun.transaction import RetransmitPolicy

STUN_PORT = 3478  # RFC 5389 §9
STUN_ALT_PORT = 3479


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IP address") from None


@dataclass(frozen=True)
class StunConfig:
    """`stun:` — the STUN service run by `meshd server`."""

    addresses: tuple[str, ...] = ("0.0.0.0",)
    """One or two IPs to listen on; the second is the RFC 5780 alternate IP (both must then
    be concrete addresses of the same family)."""
    port: int = STUN_PORT
    """Primary port; 0 picks a free one (logged in `stun.listen`)."""
    alt_port: int = STUN_ALT_PORT
    """Alternate port (CHANGE-REQUEST change-port); 0 picks a free one."""
    software: str = DEFAULT_SOFTWARE
    """SOFTWARE attribute sent in every response."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.addresses) <= 2:
            raise ValueError(f"addresses: expected 1 or 2 IPs, got {len(self.addresses)}")
        ips = [_ip(a, "addresses") for a in self.addresses]
        if len(ips) == 2:
            if ips[0].version != ips[1].version:
                raise ValueError("addresses: the two IPs must be of the same family")
            if ips[0] == ips[1] or any(ip.is_unspecified for ip in ips):
                raise ValueError("addresses: the two IPs must be distinct, non-wildcard IPs")
        for name, port in (("port", self.port), ("altPort", self.alt_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}: expected 0..65535, got {port}")
        if self.port == self.alt_port != 0:
            raise ValueError(f"port and altPort are both {self.port}")


@dataclass(frozen=True)
class NetcheckConfig:
    """`netcheck:` — defaults for `meshd netcheck`."""

    server: str | None = None
    """STUN server as `host`, `host:port` or `[v6]:port` (default port 3478)."""
    bind: str | None = None
    """Local IP to probe from; default: the source IP of the route to the server."""
    initial_rto_s: float = 0.25
    """First retransmission timeout in seconds; doubles per copy (RFC 5389 §7.2.1)."""
    transmissions: int = 4
    """Copies of each request sent at most."""
    give_up_s: float = 2.5
    """Seconds after the first copy until a probe counts as unanswered."""

    def __post_init__(self) -> None:
        if self.server is not None:
            try:
                HostPort.parse(self.server, STUN_PORT)
            except ValueError as exc:
                raise ValueError(f"server: {exc}") from None
        if self.bind is not None:
            _ip(self.bind, "bind")
        self.policy()

    def policy(self) -> RetransmitPolicy:
        """The retransmission schedule these settings describe."""
        return RetransmitPolicy(self.initial_rto_s, self.transmissions, self.give_up_s)


@dataclass(frozen=True)
class AgentConfig:
    """`agent:` — who this node is and where its API is."""

    node_name: str = ""  # default: the host name
    kubeconfig: Path | None = None  # the API with TLS credentials (cloud nodes, labs)
    server: str = "http://127.0.0.1:10550"  # without kubeconfig: edgecore's MetaServer
    interface: str = "edgeweave0"  # link-local interface that carries the DNS address
    status_address: str = "127.0.0.1:40002"  # /status (meshd status) and /metrics; "" = off

    def node(self) -> str:
        """The node name to serve as."""
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class MeshdConfig:
    """The whole meshd configuration file."""

    agent: AgentConfig = field(default_factory=AgentConfig)
    """`meshd agent`: node identity and API."""
    dns: DnsConfig = field(default_factory=DnsConfig)
    """The agent's cluster DNS (docs/reference/meshd-dns.md)."""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    """The agent's proxy and iptables rules (docs/reference/meshd-proxy.md)."""

    stun: StunConfig = field(default_factory=StunConfig)
    """The STUN service (`meshd server`)."""
    netcheck: NetcheckConfig = field(default_factory=NetcheckConfig)
    """NAT discovery (`meshd netcheck`)."""
