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
    relay:                                      # TURN (RFC 8656) on the STUN port
      enabled: true
      authSecretFile: /etc/edgeweave/turn-secret
      minPort: 49152
      maxPort: 65535
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
from meshd.turn.server import TurnServerConfig

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
class RelayConfig:
    """`relay:` — the TURN relay (RFC 8656) of `meshd server`, on the STUN sockets (see
    docs/reference/meshd-relay.md)."""

    enabled: bool = False
    """Serve TURN beside STUN (Binding keeps working on the same ports)."""
    realm: str = "edgeweave"
    """REALM of the long-term credentials."""
    auth_secret_file: Path | None = None
    """File with the shared secret(s) of the REST credentials, one per line (the first is
    current, later ones still accepted); required when enabled. Same secret as coturn's
    `static-auth-secret`."""
    relay_ip: str | None = None
    """IP the relayed sockets bind to; default: the first `stun.addresses` entry."""
    external_ip: str | None = None
    """IP advertised in XOR-RELAYED-ADDRESS instead of `relayIp` (a 1:1 NAT in front, as on
    cloud VMs); needed when `relayIp` is a wildcard."""
    min_port: int = 49152
    """Lowest relayed port."""
    max_port: int = 65535
    """Highest relayed port."""
    tcp: bool = True
    """Accept TURN over TCP on the primary STUN address and port."""
    quota_per_node: int = 10
    """Allocations one node (the `<node>` of its username) may hold at once."""
    bytes_per_s_per_node: int = 0
    """Relayed payload bytes per second per node, both directions; 0 = unlimited."""
    default_lifetime_s: int = 600
    """Allocation lifetime granted when a client asks for less or nothing."""
    max_lifetime_s: int = 3600
    """Longest allocation lifetime granted."""
    nonce_lifetime_s: float = 600.0
    """Seconds a NONCE is valid before 438 (Stale Nonce)."""
    max_permissions: int = 64
    """Permissions, and separately channels, per allocation."""
    allow_loopback_peers: bool = False
    """Relay to loopback peers (labs and tests only: it exposes the server's own services)."""
    denied_peers: tuple[str, ...] = ()
    """Networks (CIDR) never relayed to, e.g. the server's LAN."""
    metrics_address: str = ""
    """`host:port` for Prometheus `/metrics` of STUN and relay counters; "" = off."""

    def __post_init__(self) -> None:
        for name, value in (("relayIp", self.relay_ip), ("externalIp", self.external_ip)):
            if value is not None:
                _ip(value, name)
        if not 1 <= self.min_port <= self.max_port <= 65535:
            raise ValueError(f"minPort/maxPort: need 1 <= minPort <= maxPort <= 65535, got "
                             f"{self.min_port}..{self.max_port}")
        for net in self.denied_peers:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"deniedPeers: {net!r} is not a network") from None
        if self.metrics_address:
            try:
                HostPort.parse(self.metrics_address)
            except ValueError as exc:
                raise ValueError(f"metricsAddress: {exc}") from None
        if not self.realm:
            raise ValueError("realm must not be empty")
        if self.quota_per_node < 1 or self.max_permissions < 1:
            raise ValueError("quotaPerNode and maxPermissions must be at least 1")
        if self.bytes_per_s_per_node < 0:
            raise ValueError("bytesPerSPerNode must not be negative")
        if not 0 < self.default_lifetime_s <= self.max_lifetime_s or self.nonce_lifetime_s <= 0:
            raise ValueError("need 0 < defaultLifetimeS <= maxLifetimeS and nonceLifetimeS > 0")

    def server_config(self, secrets: tuple[bytes, ...], stun: StunConfig) -> TurnServerConfig:
        """The core's settings; `ValueError` (naming the field) when they do not add up."""
        relay_ip = self.relay_ip or stun.addresses[0]
        if ipaddress.ip_address(relay_ip).is_unspecified and self.external_ip is None:
            raise ValueError(f"relayIp {relay_ip} is a wildcard: set relayIp to a concrete "
                             "address, or externalIp to the address clients reach")
        return TurnServerConfig(
            realm=self.realm, secrets=secrets, relay_ip=relay_ip, min_port=self.min_port,
            max_port=self.max_port, external_ip=self.external_ip,
            quota_per_node=self.quota_per_node, bytes_per_s_per_node=self.bytes_per_s_per_node,
            default_lifetime_s=self.default_lifetime_s, max_lifetime_s=self.max_lifetime_s,
            nonce_lifetime_s=self.nonce_lifetime_s, max_permissions=self.max_permissions,
            allow_loopback_peers=self.allow_loopback_peers, denied_peers=self.denied_peers,
            software=stun.software,
        )


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
    relay: RelayConfig = field(default_factory=RelayConfig)
    """The TURN relay (`meshd server`), on the STUN sockets."""
    netcheck: NetcheckConfig = field(default_factory=NetcheckConfig)
    """NAT discovery (`meshd netcheck`)."""
