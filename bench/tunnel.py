"""`python -m bench tunnel`: the mesh tunnel next to the plain path and Debian's wireguard-go.

One lab (netlab.meshlab): `cloud` on a public segment with cloudcore and `meshd server` (control,
STUN, relay), and five sites, each a router with one node behind it running `meshd agent` with
the tunnel on:

    p, q  nat: none             pa, pb   plain routed sites (public addresses)
    a, b  nat: port-restricted  na, nb   behind NATs: the mesh goes direct
    c, d  nat: port-restricted  nc, nd   the same, agents with `tunnel.fastPath: false`
    s     nat: symmetric        ns       symmetric x port-restricted: the mesh relays
                                         (port guessing off on ns: it stays relayed)

Systems, each a client node sending to a server node:

- `plain`:            pa → pb, their lab addresses (the routed path, no tunnel): the reference;
- `wireguard_go`:     pa → pb through wireguard-go (userspace, like our agent), same hosts;
- `edgeweave_routed`: pa → pb through the mesh (direct: same hosts as the two above);
- `edgeweave`:        na → nb through the mesh, direct across two NATs;
- `edgeweave_python`: nc → nd, the same with every packet through Python (no native fast path:
                      what `edgeweave` measured before meshd/tunnel/_fastpath.c);
- `edgeweave_relay`:  ns → nb through the mesh, relayed by `meshd server`.

Per system and round: iperf3 TCP throughput, sockperf TCP ping-pong round trips (p50/p99), and
the time to move 4 MB over a fresh TCP connection (median of several). Systems alternate in a
rotated order every round, because this shared 2-core machine drifts: compare ratios.

By default every link is a veth (10-20 Gbit/s here). `--link-mbit N` and `--link-delay-ms D`
shape every site router's WAN attachment like an edge uplink (netlab's `link:`): `tc tbf` at N
Mbit/s on both ends (the site's upload and download), and D ms each way through netlab's
userspace delay forwarder. Each system's path crosses exactly two such links (its client's and
its server's site; the relay's `cloud` sits on the unshaped internet segment), so all five
compare like with like, and a delayed path's round trip gains 4D. With a delay, each system's
result carries `forwarder_cpu_pct`: the busiest forwarder's CPU during iperf3, in percent of
one core, highest of the rounds (near 100 it, not the system, would be the bottleneck).
`edgeweave_relay` carries `relay_server_cpu_pct` (the `meshd server` process during iperf3, in
percent of one core, median of the rounds) and `relay_server_cpu_s_per_gb` (that CPU per
relayed gigabyte).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Results, have, log, missing
from bench.proxy import PERCENTILE, cpu_seconds, need_root_and
from bench.wireguard import WireguardPair

SITES = {
    "p": {"nat": "none", "nodes": ["pa"]},
    "q": {"nat": "none", "nodes": ["pb"]},
    "a": {"nat": "port-restricted", "nodes": ["na"]},
    "b": {"nat": "port-restricted", "nodes": ["nb"]},
    "c": {"nat": "port-restricted", "nodes": ["nc"]},
    "d": {"nat": "port-restricted", "nodes": ["nd"]},
    "s": {"nat": "symmetric", "nodes": ["ns"]},
}
PYTHON_ONLY = ("nc", "nd")
"""Agents run with `tunnel.fastPath: false` (the `edgeweave_python` system)."""
IPERF_PORT, SOCKPERF_PORT, BULK_PORT = 5201, 11111, 5300
MOVE_BYTES = 4 * 1024 * 1024
MESSAGE_BYTES = 64


@dataclass(frozen=True)
class Params:
    """How long a run is."""

    rounds: int
    bulk_s: int
    rtt_s: int
    moves: int  # 4 MB transfers per system and round


QUICK = Params(rounds=2, bulk_s=2, rtt_s=1, moves=3)
FULL = Params(rounds=5, bulk_s=5, rtt_s=3, moves=7)


@dataclass(frozen=True)
class Link:
    """How every site router's WAN attachment is shaped; zeros leave it an unshaped veth."""

    rate_mbit: float = 0.0  # tbf on both ends: upload and download, each way
    delay_ms: float = 0.0  # each way, per link; a path crosses two links

    @property
    def shaped(self) -> bool:
        return self.rate_mbit > 0 or self.delay_ms > 0

    def spec(self) -> dict[str, float]:
        """The netlab `link:` of a site router."""
        return {"rateMbit": self.rate_mbit, "delayMs": self.delay_ms}

    def result(self) -> dict[str, float]:
        """The `link` entry of the report."""
        return {"rate_mbit": self.rate_mbit, "delay_ms": self.delay_ms,
                "rtt_added_ms": 4 * self.delay_ms}


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be within 0 (exclusive)..100000")
    return value


def _delay(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1_000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be within 0..1000")
    return value


def add_options(group: argparse._ArgumentGroup) -> list[str]:
    """The suite's own flags (see bench.harness.Suite)."""
    group.add_argument("--link-mbit", type=_positive, metavar="N",
                       help="shape every site's WAN link to N Mbit/s each way (tc tbf), like "
                            "an edge uplink; default: unshaped veth")
    group.add_argument("--link-delay-ms", type=_delay, metavar="D",
                       help="add D ms each way on every site's WAN link (netlab's userspace "
                            "forwarder); a path crosses two links, so its RTT gains 4D")
    return ["link_mbit", "link_delay_ms"]


@dataclass(frozen=True)
class Path_:
    """One system: traffic from `client` to `address` (where `server` listens)."""

    client: str
    server: str
    address: str
    expect: str | None = None  # the mesh path it must be on ("direct"/"relay")
    relay_pid: int | None = None  # the `meshd server` relaying it: its CPU is sampled


@dataclass
class Samples:
    throughput_mbps: list[float] = field(default_factory=list)
    rtt_p50_us: list[float] = field(default_factory=list)
    rtt_p99_us: list[float] = field(default_factory=list)
    move_ms: list[float] = field(default_factory=list)
    forwarder_cpu_pct: list[float] = field(default_factory=list)
    relay_cpu_pct: list[float] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        out = {"throughput_mbps": round(statistics.median(self.throughput_mbps), 1),
               "rtt_p50_us": round(statistics.median(self.rtt_p50_us), 1),
               "rtt_p99_us": round(statistics.median(self.rtt_p99_us), 1),
               "move_4mb_ms": round(statistics.median(self.move_ms), 1),
               "rounds": len(self.throughput_mbps)}
        if self.forwarder_cpu_pct:
            out["forwarder_cpu_pct"] = round(max(self.forwarder_cpu_pct), 1)
        if self.relay_cpu_pct:
            cpu = statistics.median(self.relay_cpu_pct)
            out["relay_server_cpu_pct"] = round(cpu, 1)
            # CPU-seconds of `meshd server` per relayed gigabyte (10**9 bytes)
            out["relay_server_cpu_s_per_gb"] = round(
                cpu / 100 / (out["throughput_mbps"] / 8 / 1000), 2)
        return out


BULK_SERVER = r"""
import socket, sys
block = bytes(1 << 20)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    left = int(sys.argv[2])
    while left > 0:
        c.sendall(block[:min(left, len(block))])
        left -= min(left, len(block))
    c.close()
"""
MOVE = r"""
import json, socket, sys, time
out = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    got = 0
    while chunk := s.recv(1 << 20):
        got += len(chunk)
    s.close()
    out.append((time.perf_counter() - t0) * 1000)
    assert got == int(sys.argv[4]), got
print(json.dumps(out))
"""


def forwarders() -> list[int]:
    """Pids of this process's `netlab.delaylink` children: the delayed links' forwarders."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"netlab.delaylink" in cmdline:
            pids.append(int(entry))
    return pids


def busiest(pids: list[int], before: dict[int, float], wall_s: float) -> float:
    """The highest CPU use among `pids` since `before`, in percent of one core."""
    return max((100 * (cpu_seconds(pid) - before[pid]) / wall_s for pid in pids), default=0.0)


def iperf(lab: Any, path: Path_, seconds: int) -> float:
    out = ""
    for _ in range(5):
        proc = lab.run(path.client, ["iperf3", "-c", path.address, "-p", str(IPERF_PORT),
                                     "-t", str(seconds), "-J"], check=False,
                       timeout=seconds + 30)
        out = proc.stdout
        try:
            return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
        except (KeyError, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"iperf3 {path.client} -> {path.address} failed: {out[-500:]}")


def sockperf(lab: Any, path: Path_, seconds: int) -> tuple[float, float]:
    proc = lab.run(path.client, ["sockperf", "ping-pong", "--tcp", "-i", path.address,
                                 "-p", str(SOCKPERF_PORT), "-t", str(seconds),
                                 "-m", str(MESSAGE_BYTES), "--full-rtt", "--dontwarmup"],
                   check=False, timeout=seconds + 30)
    text = proc.stdout + proc.stderr
    pct = dict(PERCENTILE.findall(text))
    if proc.returncode != 0 or "50.000" not in pct:
        raise RuntimeError(f"sockperf {path.client} -> {path.address} failed: {text[-800:]}")
    return float(pct["50.000"]), float(pct["99.000"])


def move(lab: Any, path: Path_, count: int) -> list[float]:
    proc = lab.run(path.client, [sys.executable, "-c", MOVE, path.address, str(BULK_PORT),
                                 str(count), str(MOVE_BYTES)], timeout=120)
    times: list[float] = json.loads(proc.stdout)
    return times


def overlay_of(plane: Any, node: str) -> str:
    """The node's overlay address, from its agent's status."""
    tunnel = plane.tunnel(node)
    if not tunnel.get("overlay"):
        raise RuntimeError(f"{node}: the agent has no overlay address: {tunnel}")
    return str(ipaddress.ip_interface(tunnel["overlay"]).ip)


def start_servers(plane: Any, node: str, tmp: Path) -> list[subprocess.Popen[Any]]:
    lab = plane.lab
    procs = [
        lab.popen(node, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL),
        lab.popen(node, ["sockperf", "server", "--tcp", "-p", str(SOCKPERF_PORT)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        lab.popen(node, [sys.executable, "-c", BULK_SERVER, str(BULK_PORT), str(MOVE_BYTES)],
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True),
    ]
    assert procs[2].stdout is not None and procs[2].stdout.readline().strip() == "ready"
    time.sleep(0.5)  # iperf3 and sockperf bind
    return procs


def measure(plane: Any, paths: dict[str, Path_], params: Params,
            watch: list[int]) -> dict[str, Samples]:
    """`watch`: the delay forwarders, whose CPU use is sampled during each iperf3 run."""
    samples = {name: Samples() for name in paths}
    names = list(paths)
    for r in range(params.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            path = paths[name]
            if path.expect is not None:
                now = (plane.peer(path.client, path.server) or {}).get("path")
                if now != path.expect:
                    raise RuntimeError(f"{name}: {path.client} -> {path.server} is on {now}, "
                                       f"not {path.expect}")
            pids = [*watch, path.relay_pid] if path.relay_pid else watch
            before, t0 = {pid: cpu_seconds(pid) for pid in pids}, time.monotonic()
            mbps = iperf(plane.lab, path, params.bulk_s)
            s = samples[name]
            wall = time.monotonic() - t0
            if watch:
                s.forwarder_cpu_pct.append(busiest(watch, before, wall))
            if path.relay_pid:
                s.relay_cpu_pct.append(busiest([path.relay_pid], before, wall))
            p50, p99 = sockperf(plane.lab, path, params.rtt_s)
            moves = move(plane.lab, path, params.moves)
            s.throughput_mbps.append(mbps)
            s.rtt_p50_us.append(p50)
            s.rtt_p99_us.append(p99)
            s.move_ms.extend(moves)
            cpu = f", forwarder CPU {s.forwarder_cpu_pct[-1]:.0f} %" if watch else ""
            log(f"round {r + 1}/{params.rounds} {name}: {mbps:.0f} Mbit/s, rtt p50 {p50:.0f} µs "
                f"p99 {p99:.0f} µs, 4 MB in {statistics.median(moves):.1f} ms{cpu}")
    return samples


def ratios(results: Results) -> dict[str, Any]:
    """The issue's targets: (b) ≥ 1.5x (d) throughput with p50 ≤ (d)'s; (c) ≥ 0.5x (b);
    4 MB through (b) ≤ 1.5x the time of (a). Also every system's 4 MB time over plain's."""
    out: dict[str, Any] = {}
    b, c = results.get("edgeweave", {}), results.get("edgeweave_relay", {})
    a, d = results.get("plain", {}), results.get("wireguard_go", {})
    if "throughput_mbps" in b and "throughput_mbps" in d:
        out["throughput_edgeweave_to_wireguard_go"] = round(
            b["throughput_mbps"] / d["throughput_mbps"], 2)
        out["rtt_p50_edgeweave_to_wireguard_go"] = round(b["rtt_p50_us"] / d["rtt_p50_us"], 2)
    if "throughput_mbps" in b and "throughput_mbps" in c:
        out["throughput_relay_to_direct"] = round(c["throughput_mbps"] / b["throughput_mbps"], 2)
    if "move_4mb_ms" in b and "move_4mb_ms" in a:
        out["move_4mb_edgeweave_to_plain"] = round(b["move_4mb_ms"] / a["move_4mb_ms"], 2)
    python = results.get("edgeweave_python", {})
    if "throughput_mbps" in b and "throughput_mbps" in python:
        out["throughput_edgeweave_to_python"] = round(
            b["throughput_mbps"] / python["throughput_mbps"], 2)
        out["rtt_p50_edgeweave_to_python"] = round(b["rtt_p50_us"] / python["rtt_p50_us"], 2)
    routed = results.get("edgeweave_routed", {})
    if "throughput_mbps" in routed and "throughput_mbps" in d:
        out["throughput_edgeweave_routed_to_wireguard_go"] = round(
            routed["throughput_mbps"] / d["throughput_mbps"], 2)
    for name in ("wireguard_go", "edgeweave_routed", "edgeweave_python", "edgeweave_relay"):
        got = results.get(name, {})
        if "move_4mb_ms" in got and "move_4mb_ms" in a:
            out[f"move_4mb_{name}_to_plain"] = round(got["move_4mb_ms"] / a["move_4mb_ms"], 2)
    if {"throughput_edgeweave_to_wireguard_go", "throughput_relay_to_direct",
            "move_4mb_edgeweave_to_plain"} <= out.keys():
        out["targets"] = {
            "direct_ge_1_5x_wireguard_go": out["throughput_edgeweave_to_wireguard_go"] >= 1.5,
            "direct_p50_le_wireguard_go": out["rtt_p50_edgeweave_to_wireguard_go"] <= 1.0,
            "relay_ge_half_direct": out["throughput_relay_to_direct"] >= 0.5,
            "move_4mb_le_1_5x_plain": out["move_4mb_edgeweave_to_plain"] <= 1.5,
        }
    return out


def run(quick: bool, link_mbit: float | None = None,
        link_delay_ms: float | None = None) -> Results:
    """Build the lab (site WAN links shaped if asked), bring up the mesh and wireguard-go,
    measure alternately, tear down."""
    need_root_and({"iperf3": "iperf3", "sockperf": "sockperf"}, "tunnel")
    from netlab.meshlab import MeshLab  # the lab library needs the dev extras

    class BenchLab(MeshLab):
        def start(self, *, agents: bool = True) -> None:
            for node in PYTHON_ONLY:
                self.agent_overrides[node] = {"fastPath": False}
            # The relayed system must stay relayed: port guessing would take it direct once
            # the lab's server has two STUN addresses (NAT classes known).
            self.agent_overrides["ns"] = {"portGuessing": {"enabled": False}}
            super().start(agents=agents)

    params = QUICK if quick else FULL
    link = Link(link_mbit or 0.0, link_delay_ms or 0.0)
    sites = {site: {**spec, "link": link.spec()} if link.shaped else spec
             for site, spec in SITES.items()}
    results: Results = {}
    if link.shaped:
        log(f"site WAN links shaped: {link.rate_mbit or 'unlimited'} Mbit/s, "
            f"{link.delay_ms} ms each way")
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp_name:
        tmp = Path(tmp_name)
        with BenchLab.up_sites(tmp, sites, pods=1, clients=1, name="btun") as plane:
            lab = plane.lab
            wg: WireguardPair | None = None
            started: list[subprocess.Popen[Any]] = []
            try:
                for server in ("pb", "nb", "nd"):
                    started += start_servers(plane, server, tmp)
                paths = {"plain": Path_("pa", "pb", lab.addr("pb"))}
                if have("wireguard-go") and have("wg"):
                    wg = WireguardPair.up(lab, "pa", "pb", tmp)
                    paths["wireguard_go"] = Path_("pa", "pb", wg.address("pb"))
                else:
                    results["wireguard_go"] = missing("wireguard-go", "wireguard-go "
                                                      "wireguard-tools")
                pb, nb = overlay_of(plane, "pb"), overlay_of(plane, "nb")
                paths["edgeweave_routed"] = Path_("pa", "pb", pb, "direct")
                paths["edgeweave"] = Path_("na", "nb", nb, "direct")
                paths["edgeweave_python"] = Path_("nc", "nd", overlay_of(plane, "nd"), "direct")
                relay = plane.meshd_server
                paths["edgeweave_relay"] = Path_("ns", "nb", nb, "relay",
                                                 relay.pid if relay is not None else None)
                for client, server in (("pa", "pb"), ("na", "nb"), ("nc", "nd"),
                                       ("ns", "nb")):
                    # The first packets open the path; wait until it settles where expected.
                    lab.run(client, ["ping", "-c", "2", "-W", "2", overlay_of(plane, server)],
                            check=False)
                for name, path in paths.items():
                    if path.expect is not None:
                        took = plane.wait_path(path.client, path.server, path.expect,
                                               timeout=30)
                        log(f"{name}: {path.client} -> {path.server} {path.expect} "
                            f"after {took:.1f} s")
                watch = forwarders() if link.delay_ms > 0 else []
                if link.delay_ms > 0 and len(watch) != len(SITES):
                    raise RuntimeError(f"expected {len(SITES)} delay forwarders (one per site "
                                       f"WAN link), found {len(watch)}")
                samples = measure(plane, paths, params, watch)
                results.update({name: s.result() for name, s in samples.items()})
            finally:
                if wg is not None:
                    wg.close()
                for proc in started:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
    if link.shaped:
        results["link"] = link.result()
    results["ratios"] = ratios(results)
    return results
