"""Build a `Topology` out of network namespaces, drive it, tear it down.

```python
with Lab(Topology.load(path)) as lab:
    lab.run("node1", ["ping", "-c1", lab.addr("stun")])
    server = lab.popen("stun", [sys.executable, "-m", "meshd", "server", ...])
```

Teardown runs on success, on any exception (pytest timeouts included), on Ctrl-C, and on
SIGTERM when `signals_raise()` was called; a build that dies half-way is removed by the next
build (`ns.cleanup_stale`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

from netlab import nat, ns
from netlab.topology import LinkSpec, Topology

Addr = ipaddress.IPv4Address


@dataclasses.dataclass
class Node:
    """One namespace of the lab and what the build gave it."""

    name: str
    netns: str
    kind: str  # "switch", "router", "host" or "pod"
    addresses: list[tuple[str, ipaddress.IPv4Interface]] = dataclasses.field(
        default_factory=list)  # (interface, address/prefix)


class Lab:
    """A built topology. Use as a context manager, or call `build()` and `teardown()`."""

    def __init__(self, topology: Topology, *, owner: int | None = None) -> None:
        self.topology = topology
        self.owner = owner if owner is not None else os.getpid()
        self.nodes: dict[str, Node] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._next_host: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> None:
        """Create every namespace, link, address, route and NAT rule; undo all on failure."""
        ns.cleanup_stale(include_owner=None)
        for stale in [n for n in ns.list_netns() if n.startswith(self._prefix())]:
            ns.delete_ns(stale)  # our own pid re-used a name: an earlier lab of ours leaked
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Stop the processes this lab started, then delete its namespaces."""
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in reversed(self.nodes):
            ns.delete_ns(self.nodes[name].netns)
        for leftover in [n for n in ns.list_netns() if n.startswith(self._prefix())]:
            ns.delete_ns(leftover)  # namespaces made before a build failure was recorded
        self.nodes.clear()

    def _prefix(self) -> str:
        return ns.ns_name(self.owner, self.topology.name, "")

    # -- driving -------------------------------------------------------------------------

    def netns(self, node: str) -> str:
        """The namespace name of `node` (a host, router or pod such as `node1-p0`)."""
        try:
            return self.nodes[node].netns
        except KeyError:
            known = ", ".join(n for n, v in self.nodes.items() if v.kind != "switch")
            raise ns.LabError(f"no node {node!r} in lab {self.topology.name!r} "
                              f"(nodes: {known})") from None

    def argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside `node`'s namespace."""
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def run(self, node: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside `node` and wait for it; LabError on failure when `check`."""
        return ns.sh(self.argv(node, argv), what=f"node {node}", input=input,
                     timeout=timeout, check=check)

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside `node`; the lab stops it at teardown."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def python(self, node: str, *args: str) -> list[str]:
        """The argv to run this interpreter inside `node` (for `run`/`popen`)."""
        return self.argv(node, [sys.executable, *args])

    def addr(self, node: str, index: int = 0) -> str:
        """The `index`-th IPv4 address of `node` (in declaration order)."""
        addrs = self.nodes[node].addresses if node in self.nodes else []
        if not addrs:
            self.netns(node)  # raises a clear error for an unknown node
            raise ns.LabError(f"node {node!r} has no address")
        return str(addrs[index][1].ip)

    def pods(self, host: str) -> list[str]:
        """The pod node names behind `host`."""
        return [f"{host}-p{i}" for i in range(self.topology.hosts[host].pods)]

    # -- building ------------------------------------------------------------------------

    def _add_ns(self, name: str, kind: str) -> Node:
        netns = ns.ns_name(self.owner, self.topology.name, name)
        ns.sh(["ip", "netns", "add", netns], what=f"{kind} {name}")
        node = Node(name, netns, kind)
        self.nodes[name] = node
        self._ip(name, "link", "set", "lo", "up")
        return node

    def _ip(self, node: str, *args: str) -> None:
        ns.sh(["ip", "-n", self.nodes[node].netns, *args], what=f"node {node}")

    def _sysctl(self, node: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(node, ["sh", "-c", f"echo {value} > {path}"])

    def _alloc(self, segment: str, used: set[Addr]) -> Addr:
        subnet = self.topology.segments[segment].subnet
        nxt = self._next_host.get(segment, 2)  # .1 is kept for the segment's gateway
        while True:
            addr = subnet.network_address + nxt
            if addr >= subnet.broadcast_address:
                raise ns.LabError(f"segment {segment!r}: no free address left in {subnet}")
            nxt += 1
            if addr not in used:
                self._next_host[segment] = nxt
                return addr

    def _build(self) -> None:
        topo = self.topology
        for seg in topo.segments:
            self._add_ns(f"sw-{seg}", "switch")
            self._ip(f"sw-{seg}", "link", "add", "br0", "type", "bridge")
            self._ip(f"sw-{seg}", "link", "set", "br0", "up")
        for name in topo.routers:
            self._add_ns(name, "router")
        for name, host in topo.hosts.items():
            self._add_ns(name, "host")
            for pod in range(host.pods):
                self._add_ns(f"{name}-p{pod}", "pod")

        used = {a for h in topo.hosts.values() for a in h.addresses}
        used |= {r.wan_address for r in topo.routers.values() if r.wan_address is not None}
        used |= {topo.segments[s].subnet.network_address + 1
                 for r in topo.routers.values() for s in r.lan}
        # Routers first: their upstream interfaces, then their LANs (gateway .1).
        for name, router in topo.routers.items():
            wan_addr = router.wan_address or self._alloc(router.wan, used)
            self._attach(name, "wan", router.wan, wan_addr, router.link)
            for i, seg in enumerate(router.lan):
                gw = topo.segments[seg].subnet.network_address + 1
                self._attach(name, f"lan{i}", seg, gw, LinkSpec())
        for name, host in topo.hosts.items():
            addrs = list(host.addresses) or [self._alloc(host.segment, used)]
            self._attach(name, "eth0", host.segment, addrs[0], host.link, extra=addrs[1:])
        self._routes()
        for name, router in topo.routers.items():
            self._sysctl(name, "net.ipv4.ip_forward", "1")
            lan_ifs = [f"lan{i}" for i in range(len(router.lan))]
            script = nat.nat_ruleset(
                router.nat, wan_if="wan", lan_ifs=lan_ifs, wan_ip=Addr(self.addr(name)),
                lan_subnets=[topo.segments[s].subnet for s in router.lan],
                hairpin=router.hairpin, udp_timeout=router.udp_timeout,
                firewall=router.firewall)
            self.run(name, ["nft", "-f", "-"], input=script)
            for key, value in nat.conntrack_sysctls(router.udp_timeout).items():
                self._sysctl(name, key, value)
        for name, host in topo.hosts.items():
            if host.pods:
                self._pods(name)
        self._pod_routes()

    def _attach(self, node: str, ifname: str, segment: str, addr: Addr, link: LinkSpec,
                extra: Sequence[Addr] = ()) -> None:
        """Connect `node` to `segment`'s bridge as `ifname` with `addr` (and `extra`)."""
        switch = f"sw-{segment}"
        port = node  # node names are at most 12 characters: valid interface names
        if link.impaired:
            self._forwarder(node, ifname, switch, port, link)
        else:
            ns.sh(["ip", "link", "add", "name", ifname, "netns", self.nodes[node].netns,
                   "type", "veth", "peer", "name", port, "netns", self.nodes[switch].netns],
                  what=f"link {node}/{ifname} to segment {segment}")
        self._ip(switch, "link", "set", "dev", port, "master", "br0", "up")
        prefix = self.topology.segments[segment].subnet.prefixlen
        for a in (addr, *extra):
            iface = ipaddress.IPv4Interface(f"{a}/{prefix}")
            self._ip(node, "addr", "add", str(iface), "dev", ifname)
            self.nodes[node].addresses.append((ifname, iface))
        self._ip(node, "link", "set", "dev", ifname, "up")
        if link.rate_mbit:
            for where, dev in ((node, ifname), (switch, port)):
                self.run(where, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                                 f"{link.rate_mbit}mbit", "burst", "64kb", "latency", "50ms"])

    def _forwarder(self, node: str, ifname: str, switch: str, port: str, link: LinkSpec) -> None:
        argv = [sys.executable, "-m", "netlab.delaylink", self.nodes[node].netns, ifname,
                self.nodes[switch].netns, port, "--delay-ms", str(link.delay_ms),
                "--loss-percent", str(link.loss_percent), "--seed", str(link.seed)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self._procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise ns.LabError(f"link {node}/{ifname}: delay forwarder did not start "
                              f"(exit code {proc.poll()})")

    def _routes(self) -> None:
        topo = self.topology
        for name, host in topo.hosts.items():
            gw = topo.gateway_of(host.segment)
            if gw is not None:
                self._ip(name, "route", "add", "default", "via", self.addr_on(gw, host.segment))
        for name, router in topo.routers.items():
            up = topo.gateway_of(router.wan)
            if up is not None:
                self._ip(name, "route", "add", "default", "via", self.addr_on(up, router.wan))
        # Plain routers (`nat: none`) make their LANs reachable from their upstream segment.
        for name, router in topo.routers.items():
            if router.nat != "none":
                continue
            via = self.addr_on(name, router.wan)
            for subnet in self._routed_behind(name):
                for other in self._attached(router.wan):
                    if other != name:
                        self._ip(other, "route", "replace", str(subnet), "via", via)

    def _routed_behind(self, router: str) -> Iterator[ipaddress.IPv4Network]:
        topo = self.topology
        for seg in topo.routers[router].lan:
            yield topo.segments[seg].subnet
            for name, r in topo.routers.items():
                if r.wan == seg and r.nat == "none":
                    yield from self._routed_behind(name)

    def _attached(self, segment: str) -> list[str]:
        topo = self.topology
        out = [n for n, h in topo.hosts.items() if h.segment == segment]
        out += [n for n, r in topo.routers.items() if r.wan == segment or segment in r.lan]
        return out

    def addr_on(self, node: str, segment: str) -> str:
        """`node`'s address on `segment`."""
        subnet = self.topology.segments[segment].subnet
        for _, iface in self.nodes[node].addresses:
            if iface.ip in subnet:
                return str(iface.ip)
        raise ns.LabError(f"node {node!r} has no address on segment {segment!r}")

    def _pods(self, host: str) -> None:
        """A bridge on `host` with pods behind it, masqueraded out of the host (like Docker)."""
        spec = self.topology.hosts[host]
        subnet = spec.pod_subnet
        gw = ipaddress.IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
        self._ip(host, "link", "add", "ewbr0", "type", "bridge")
        self._ip(host, "addr", "add", str(gw), "dev", "ewbr0")
        self._ip(host, "link", "set", "ewbr0", "up")
        self.nodes[host].addresses.append(("ewbr0", gw))
        for i in range(spec.pods):
            pod = f"{host}-p{i}"
            ns.sh(["ip", "link", "add", "name", "eth0", "netns", self.nodes[pod].netns,
                   "type", "veth", "peer", "name", f"veth{i}", "netns", self.nodes[host].netns],
                  what=f"pod {pod}")
            self._ip(host, "link", "set", "dev", f"veth{i}", "master", "ewbr0", "up")
            iface = ipaddress.IPv4Interface(f"{subnet.network_address + 2 + i}/{subnet.prefixlen}")
            self._ip(pod, "addr", "add", str(iface), "dev", "eth0")
            self._ip(pod, "link", "set", "eth0", "up")
            self._ip(pod, "route", "add", "default", "via", str(gw.ip))
            self.nodes[pod].addresses.append(("eth0", iface))
        self._sysctl(host, "net.ipv4.ip_forward", "1")
        # Pod-to-pod traffic between hosts with podRoutes keeps its source address (as with
        # flannel host-gw); everything else leaves masqueraded, as from Docker's bridge.
        keep = [str(s) for s in self._routed_pod_subnets(host)]
        exempt = f"ip daddr != {{ {', '.join(keep)} }} " if keep else ""
        script = (f"table ip ewlab {{\n  chain post {{\n"
                  f"    type nat hook postrouting priority srcnat; policy accept;\n"
                  f'    ip saddr {subnet} {exempt}oifname != "ewbr0" masquerade\n  }}\n}}\n')
        self.run(host, ["nft", "-f", "-"], input=script)

    def _routed_pod_subnets(self, host: str) -> list[ipaddress.IPv4Network]:
        """Pod subnets of the other hosts on `host`'s segment, when that segment has podRoutes."""
        topo = self.topology
        segment = topo.hosts[host].segment
        if not topo.segments[segment].pod_routes:
            return []
        return [h.pod_subnet for n, h in topo.hosts.items()
                if n != host and h.segment == segment and h.pods]

    def _pod_routes(self) -> None:
        """Routes to the pod subnets of the other hosts on a podRoutes segment, via each host."""
        topo = self.topology
        for name, host in topo.hosts.items():
            if not topo.segments[host.segment].pod_routes:
                continue
            for other, spec in topo.hosts.items():
                if other != name and spec.segment == host.segment and spec.pods:
                    self._ip(name, "route", "replace", str(spec.pod_subnet), "via",
                             self.addr_on(other, host.segment))


def signals_raise() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `with Lab(...)` tears down (CLI use)."""
    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
