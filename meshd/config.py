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
    control:                                    # agents' TLS control channel
      enabled: true
      caFile: /etc/edgeweave/meshd/ca.crt
      certFile: /etc/edgeweave/meshd/meshd-server.crt
      keyFile: /etc/edgeweave/meshd/meshd-server.key
      revokedFile: /etc/edgeweave/meshd/revoked.txt   # node names / serial:HEX; SIGHUP re-reads
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from edgeweave.config import HostPort
from meshd.control.server import ControlServerConfig
from meshd.control.wire import TurnServerAddress
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
    fast_path: bool = True
    """Relay ChannelData and peer datagrams on routes the relay has checked in C
    (meshd/turn/_relaypath.c) when it is built; off: every datagram through Python. A
    `bytesPerSPerNode` limit turns it off too."""

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


# --- control channel (`meshd server`) ------------------------------------------------------------


def parse_listen_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` with port 0..65535 (0 = any free port)."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port with a port 0..65535, got {text!r}")
    return host, int(port)


def parse_turn_server(text: str) -> TurnServerAddress:
    """`host:port`, `host:port/udp` or `host:port/tcp` (IPv6 as `[v6]:port`)."""
    address, _, transport = text.strip().partition("/")
    transport = transport or "udp"
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport of {text!r} must be udp or tcp")
    where = HostPort.parse(address)
    return TurnServerAddress(where.host, where.port, "tcp" if transport == "tcp" else "udp")


@dataclass(frozen=True)
class ControlConfig:
    """`control:` — the control channel of `meshd server`: TLS with node certificates, node
    registry, overlay addresses, signaling, TURN credentials (docs/reference/meshd.md)."""

    enabled: bool = False
    """Serve the control channel."""
    address: str = "0.0.0.0:20004"
    """TCP listen address (`host:port`; port 0 = any free port, logged in `control.listen`)."""
    data_dir: Path = Path("/var/lib/edgeweave/meshd-server")
    """State: the node registry (`control-registry.json`: overlay addresses, static keys)."""
    overlay_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("100.64.0.0/16")
    """Where overlay addresses come from (CGNAT space by default)."""
    ca_file: Path | None = None
    """The cluster CA (cloudcore's `DATA_DIR/pki/ca.crt`): only its node certificates get in."""
    cert_file: Path | None = None
    """The serving certificate (`cloudcore certs meshd-server`)."""
    key_file: Path | None = None
    """Its private key."""
    turn_secret_file: Path | None = None
    """Shared secret(s) of the TURN REST credentials (first line used); default:
    `relay.authSecretFile`; neither = no TURN credentials for agents."""
    turn_ttl_s: int = 3600
    """Lifetime of the TURN credentials handed out; fresh ones follow after half of it."""
    turn_servers: tuple[str, ...] = ()
    """TURN servers told to agents: `host:port[/udp|/tcp]`; empty = the host agents dial for
    control, port 3478, UDP."""
    keepalive_s: float = 5.0
    """Agents ping this often."""
    idle_timeout_s: float = 15.0
    """A session silent this long is dropped (both sides)."""
    hello_timeout_s: float = 10.0
    """A connection without hello this long after TLS is dropped."""
    signals_per_s: float = 20.0
    """Signals per second one node may send (sustained)."""
    signal_burst: int = 40
    """Signals one node may send at once."""
    max_signal_bytes: int = 16384
    """Largest signal routed."""
    metrics_address: str = ""
    """`host:port` for Prometheus `/metrics` of the control counters; "" = off."""
    revoked_file: Path | None = None
    """Revocation list: one node name or `serial:HEX` per line (`meshd.control.revoked`);
    re-read on SIGHUP and when it changes. None = nothing revoked."""

    def __post_init__(self) -> None:
        try:
            parse_listen_address(self.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        for i, text in enumerate(self.turn_servers):
            try:
                parse_turn_server(text)
            except ValueError as exc:
                raise ValueError(f"turnServers[{i}]: {exc}") from None
        if self.metrics_address:
            try:
                HostPort.parse(self.metrics_address)
            except ValueError as exc:
                raise ValueError(f"metricsAddress: {exc}") from None
        self.server_config(None)

    def server_config(self, turn_secret: bytes | None, realm: str = "edgeweave"
                      ) -> ControlServerConfig:
        """The core's settings; `ValueError` when they do not add up."""
        return ControlServerConfig(
            overlay_network=self.overlay_cidr, keepalive_s=self.keepalive_s,
            idle_timeout_s=self.idle_timeout_s, hello_timeout_s=self.hello_timeout_s,
            turn_secret=turn_secret, turn_realm=realm, turn_ttl_s=self.turn_ttl_s,
            turn_servers=tuple(parse_turn_server(t) for t in self.turn_servers),
            signals_per_s=self.signals_per_s, signal_burst=self.signal_burst,
            max_signal_bytes=self.max_signal_bytes)


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
class PortGuessingConfig:
    """`tunnel.portGuessing:` — birthday-paradox port guessing, so that symmetric ×
    port-restricted pairs go direct (`meshd.tunnel.guess`; needs NAT classes, i.e. a server
    with two `stun.addresses`)."""

    enabled: bool = True
    """Guess (symmetric × port-restricted pairs only, after they decided relay)."""
    sockets: int = 256
    """Pool sockets the symmetric side opens (node-wide; each one file descriptor)."""
    probes: int = 2048
    """Probes the port-restricted side sends per phase at most (P(miss) ≈ e^-8 with 256)."""

    def __post_init__(self) -> None:
        if not 1 <= self.sockets <= 4096:
            raise ValueError(f"sockets: {self.sockets} out of range (1..4096)")
        if not 1 <= self.probes <= 16384:
            raise ValueError(f"probes: {self.probes} out of range (1..16384)")


@dataclass(frozen=True)
class NatProbeSettings:
    """`tunnel.natProbe:` — the agent's background NAT classification (RFC 5780 probes to the
    server's STUN port, `meshd.tunnel.natprobe`). Off, the agent sends no probes: its class is
    the one the server stored from an earlier run, or `unknown`, and port guessing then needs
    a stored class for us and the peer's own."""

    enabled: bool = True
    """Probe (a run is a few dozen small STUN datagrams)."""
    first_delay_s: float = 0.5
    """First run this long after the tunnel starts."""
    min_interval_s: float = 60.0
    """Re-probes (on a change of the reflexive address) start at most this often."""
    retry_s: float = 30.0
    """After a failed run; doubles per failure up to `maxRetryS`."""
    max_retry_s: float = 600.0
    """Longest delay between failed runs."""

    def __post_init__(self) -> None:
        if not 0 <= self.first_delay_s <= 3600:
            raise ValueError(f"firstDelayS: {self.first_delay_s} out of range (0..3600)")
        if not 1 <= self.min_interval_s <= 86400:
            raise ValueError(f"minIntervalS: {self.min_interval_s} out of range (1..86400)")
        if not 1 <= self.retry_s <= 86400:
            raise ValueError(f"retryS: {self.retry_s} out of range (1..86400)")
        if not self.retry_s <= self.max_retry_s <= 86400:
            raise ValueError(f"maxRetryS: {self.max_retry_s} out of range "
                             f"(retryS {self.retry_s:g}..86400)")


@dataclass(frozen=True)
class TunnelConfig:
    """`tunnel:` — the agent's packet tunnel to other nodes (docs/reference/meshd.md)."""

    enabled: bool = False
    """Run the tunnel (needs `server` and a node certificate)."""
    server: str = ""
    """`meshd server` as `host` or `host:controlPort` (default port 20004)."""
    stun_port: int = 3478
    """The server's STUN/TURN UDP port."""
    interface: str = "mesh0"
    """TUN device for the overlay."""
    mtu: int = 1380
    """TUN MTU (1380 leaves room for the tunnel and TURN headers in 1500)."""
    listen_port: int = 0
    """UDP port of the tunnel socket; 0 = a random port per start (design §6)."""
    keepalive_s: float = 25.0
    """Keepalive on an idle direct path (below conntrack's 30 s UDP timeout)."""
    connect_port: int = 40003
    """TCP port of the mesh connect server on the overlay address."""
    direct_routable: bool = True
    """Dial endpoints on nodes the mesh does not reach directly (same LAN, routed pod
    subnets); false: such endpoints fail fast."""
    relay: bool = True
    """Allocate a relay (TURN) candidate."""
    kubeconfig: Path | None = None
    """Node kubeconfig with the node certificate; default `agent.kubeconfig`."""
    prepunch_ttl: int | None = None
    """TTL of the pre-punch datagrams (None: off)."""
    port_guessing: PortGuessingConfig = field(default_factory=PortGuessingConfig)
    """Birthday-paradox port guessing (symmetric × port-restricted → direct)."""
    nat_probe: NatProbeSettings = field(default_factory=NatProbeSettings)
    """Background NAT classification (RFC 5780 probes); `enabled: false` sends none."""
    fast_path: bool = True
    """Carry lone data packets of direct paths in the native thread (meshd/tunnel/_fastpath.c);
    false: every packet goes through the Python data path."""
    busy_poll_us: int = 0
    """The native thread keeps polling for up to this many µs after an event that followed the
    one before it within as long (round trips, slow start), instead of sleeping; 0 = off.
    Trades CPU for round-trip time on hosts with slow wake-ups."""

    def __post_init__(self) -> None:
        if self.enabled and not self.server:
            raise ValueError("server: required when the tunnel is enabled")
        if self.server:
            try:
                HostPort.parse(self.server, 20004)
            except ValueError as exc:
                raise ValueError(f"server: {exc}") from None
        for name, port, low in (("stunPort", self.stun_port, 1),
                                ("listenPort", self.listen_port, 0),
                                ("connectPort", self.connect_port, 1)):
            if not low <= port <= 65535:
                raise ValueError(f"{name}: {port} is not a port ({low}..65535)")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu: {self.mtu} out of range (576..65535)")
        if not 1 <= self.keepalive_s <= 600:
            raise ValueError(f"keepaliveS: {self.keepalive_s} out of range (1..600)")
        if self.prepunch_ttl is not None and not 1 <= self.prepunch_ttl <= 255:
            raise ValueError(f"prepunchTtl: {self.prepunch_ttl} out of range (1..255)")
        if not self.interface or len(self.interface.encode()) > 15:
            raise ValueError(f"interface: {self.interface!r} is not an interface name")
        if not 0 <= self.busy_poll_us <= 10000:
            raise ValueError(f"busyPollUs: {self.busy_poll_us} out of range (0..10000)")

    def server_address(self) -> HostPort:
        """The control channel address."""
        return HostPort.parse(self.server, 20004)


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
    control: ControlConfig = field(default_factory=ControlConfig)
    """The control channel (`meshd server`): registry, signaling, TURN credentials."""
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    """The agent's packet tunnel (`mesh0`) to other nodes."""
