"""Lab topologies: a few lines of YAML (or dataclasses) describing hosts, segments and routers.

```yaml
name: nat-kinds
segments:
  internet: {subnet: 203.0.113.0/24}
  lan1: {subnet: 192.168.1.0/24}
routers:
  nat1: {wan: internet, lan: [lan1], nat: port-restricted, hairpin: true, udpTimeout: 30}
hosts:
  stun: {segment: internet, addresses: [203.0.113.10, 203.0.113.11]}
  node1: {segment: lan1, pods: 2, link: {delayMs: 25}}
```

A segment is an L2 broadcast domain (a bridge in a namespace of its own). A router has one
upstream (`wan`) segment and one or more downstream (`lan`) segments; it is the gateway of its
LAN segments (address `.1`). Hosts default-route through the router of their segment. `nat`
picks the RFC 4787 behaviour (see `netlab.nat`). Pods are namespaces behind a bridge on their
host, as Docker's default bridge puts containers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from edgeweave.config import ConfigError, from_mapping, read_yaml

NatKind = Literal["none", "full-cone", "restricted", "port-restricted", "symmetric"]
NAT_KINDS: tuple[NatKind, ...] = ("none", "full-cone", "restricted", "port-restricted", "symmetric")

_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """Impairments of one attachment, applied in both directions (see `netlab.delaylink`)."""

    delay_ms: float = 0.0  # one-way delay added to every frame
    loss_percent: float = 0.0  # frames dropped at random, seeded
    rate_mbit: float = 0.0  # egress rate limit (tbf) on the host side; 0 = unlimited
    seed: int = 1  # seed of the loss decisions

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.delay_ms > 10_000:
            raise ValueError("link.delayMs: must be within 0..10000")
        if not 0 <= self.loss_percent < 100:
            raise ValueError("link.lossPercent: must be within 0..100 (exclusive)")
        if self.rate_mbit < 0:
            raise ValueError("link.rateMbit: must not be negative")

    @property
    def impaired(self) -> bool:
        """Whether frames must go through a userspace forwarder (delay or loss)."""
        return self.delay_ms > 0 or self.loss_percent > 0


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """An L2 segment with its IPv4 subnet."""

    subnet: ipaddress.IPv4Network
    pod_routes: bool = False  # hosts on it route to each other's pod subnets (host-gw style)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """A router between one upstream segment and its LAN segments, optionally a NAT."""

    wan: str  # upstream segment
    lan: list[str]  # downstream segments; the router is their gateway (.1)
    nat: NatKind = "port-restricted"
    hairpin: bool = False  # UDP hairpinning (RFC 4787 §6) for LAN hosts
    udp_timeout: int = 30  # conntrack UDP timeouts (unreplied and assured), seconds
    firewall: bool = True  # drop unsolicited WAN input as real routers do
    wan_address: ipaddress.IPv4Address | None = None  # default: next free on the wan segment
    link: LinkSpec = LinkSpec()  # impairment of the wan attachment

    def __post_init__(self) -> None:
        if not self.lan:
            raise ValueError("lan: a router needs at least one LAN segment")
        if not 1 <= self.udp_timeout <= 86_400:
            raise ValueError("udpTimeout: must be within 1..86400 seconds")


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """An end host on one segment; `pods` adds that many pod namespaces behind it."""

    segment: str
    addresses: list[ipaddress.IPv4Address] = dataclasses.field(default_factory=list)
    pods: int = 0
    pod_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("172.17.0.0/16")
    link: LinkSpec = LinkSpec()

    def __post_init__(self) -> None:
        if not 0 <= self.pods <= 50:
            raise ValueError("pods: must be within 0..50")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A whole lab. Build it with `netlab.Lab`."""

    name: str
    segments: dict[str, SegmentSpec]
    hosts: dict[str, HostSpec] = dataclasses.field(default_factory=dict)
    routers: dict[str, RouterSpec] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Topology:
        """Read and check a YAML topology; errors name the file and the field."""
        data = read_yaml(path)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "topology") -> Topology:
        """Build and check a topology from plain data."""
        topo = from_mapping(cls, data, source=source)
        topo.check(source)
        return topo

    def check(self, source: str = "topology") -> None:
        """Cross-field checks: names, references, addresses."""
        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if not _NAME.match(self.name):
            raise fail(f"name: {self.name!r} must be 1-12 lower-case letters/digits, letter first")
        names: dict[str, str] = {}
        for kind, group in (("segments", self.segments), ("hosts", self.hosts),
                            ("routers", self.routers)):
            for name in group:
                if not _NAME.match(name):
                    raise fail(f"{kind}.{name}: names must be 1-12 lower-case letters/digits, "
                               "letter first")
                if kind != "segments" and name in names:
                    raise fail(f"{kind}.{name}: name already used by {names[name]}")
                if kind != "segments":
                    names[name] = f"{kind}.{name}"
        if not self.segments:
            raise fail("segments: at least one segment is needed")
        seen_subnets: dict[ipaddress.IPv4Network, str] = {}
        for name, segment in self.segments.items():
            subnet = segment.subnet
            for other, owner in seen_subnets.items():
                if subnet.overlaps(other):
                    raise fail(f"segments.{name}.subnet: {subnet} overlaps {owner}")
            if subnet.prefixlen > 29:
                raise fail(f"segments.{name}.subnet: {subnet} is too small (/29 at most)")
            seen_subnets[subnet] = f"segments.{name}"
        lan_owner: dict[str, str] = {}
        for name, router in self.routers.items():
            if router.wan not in self.segments:
                raise fail(f"routers.{name}.wan: unknown segment {router.wan!r}")
            for seg in router.lan:
                if seg not in self.segments:
                    raise fail(f"routers.{name}.lan: unknown segment {seg!r}")
                if seg == router.wan:
                    raise fail(f"routers.{name}.lan: {seg!r} is also its wan segment")
                if seg in lan_owner:
                    raise fail(f"routers.{name}.lan: segment {seg!r} already has router "
                               f"{lan_owner[seg]!r}")
                lan_owner[seg] = name
        _check_no_loops(self, fail)
        used: dict[ipaddress.IPv4Address, str] = {}

        def claim(addr: ipaddress.IPv4Address, seg: str, who: str) -> None:
            subnet = self.segments[seg].subnet
            if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
                raise fail(f"{who}: {addr} is not a host address of segment {seg!r} ({subnet})")
            if addr in used:
                raise fail(f"{who}: {addr} is already used by {used[addr]}")
            used[addr] = who

        for name, router in self.routers.items():
            for seg in router.lan:
                claim(self.segments[seg].subnet.network_address + 1, seg, f"routers.{name}")
            if router.wan_address is not None:
                claim(router.wan_address, router.wan, f"routers.{name}.wanAddress")
        for name, host in self.hosts.items():
            if host.segment not in self.segments:
                raise fail(f"hosts.{name}.segment: unknown segment {host.segment!r}")
            for addr in host.addresses:
                claim(addr, host.segment, f"hosts.{name}.addresses")
            if host.pods:
                for seg_name, segment in self.segments.items():
                    if host.pod_subnet.overlaps(segment.subnet):
                        raise fail(f"hosts.{name}.podSubnet: {host.pod_subnet} overlaps "
                                   f"segment {seg_name!r}")
                if host.pod_subnet.num_addresses < host.pods + 4:
                    raise fail(f"hosts.{name}.podSubnet: {host.pod_subnet} is too small for "
                               f"{host.pods} pods")
        for seg_name, segment in self.segments.items():
            if not segment.pod_routes:
                continue
            routed: dict[ipaddress.IPv4Network, str] = {}
            for name, host in self.hosts.items():
                if host.segment != seg_name or not host.pods:
                    continue
                for other, owner in routed.items():
                    if host.pod_subnet.overlaps(other):
                        raise fail(f"hosts.{name}.podSubnet: {host.pod_subnet} overlaps {owner}'s"
                                   f" on segment {seg_name!r}, which has podRoutes")
                routed[host.pod_subnet] = name

    def gateway_of(self, segment: str) -> str | None:
        """The router whose LAN `segment` is, if any."""
        for name, router in self.routers.items():
            if segment in router.lan:
                return name
        return None


def _check_no_loops(topo: Topology, fail: Any) -> None:
    """Routers form a tree (each LAN has one router): walking upstream must end."""
    for start in topo.routers:
        seen = {start}
        node = start
        while True:
            up = topo.gateway_of(topo.routers[node].wan)
            if up is None:
                break
            if up in seen:
                raise fail(f"routers.{start}: routers form a loop through {up!r}")
            seen.add(up)
            node = up
