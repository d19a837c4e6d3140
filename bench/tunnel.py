"""`python -m bench tunnel`: the mesh tunnel next to the plain path and Debian's wireguard-go.

One lab (netlab.meshlab): `cloud` on a public segment with cloudcore and `meshd server` (control,
STUN, relay), and five sites, each a router with one node behind it running `meshd agent` with
the tunnel on:

    p, q  nat: none             pa, pb   plain routed sites (public addresses)
    a, b  nat: port-restricted  na, nb   behind NATs: the mesh goes direct
    s     nat: symmetric        ns       symmetric x port-restricted: the mesh relays

Systems, each a client node sending to a server node:

- `plain`:            pa → pb, their lab addresses (the routed path, no tunnel): the reference;
- `wireguard_go`:     pa → pb through wireguard-go (userspace, like our agent), same hosts;
- `edgeweave_routed`: pa → pb through the mesh (direct: same hosts as the two above);
- `edgeweave`:        na → nb through the mesh, direct across two NATs;
- `edgeweave_relay`:  ns → nb through the mesh, relayed by `meshd server`.

Per system and round: iperf3 TCP throughput, sockperf TCP ping-pong round trips (p50/p99), and
the time to move 4 MB over a fresh TCP connection (median of several). Systems alternate in a
rotated order every round, because this shared 2-core machine drifts: compare ratios.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Results, have, log, missing
from bench.proxy import PERCENTILE, need_root_and
from bench.wireguard import WireguardPair

SITES = {
    "p": {"nat": "none", "nodes": ["pa"]},
    "q": {"nat": "none", "nodes": ["pb"]},
    "a": {"nat": "port-restricted", "nodes": ["na"]},
    "b": {"nat": "port-restricted", "nodes": ["nb"]},
    "s": {"nat": "symmetric", "nodes": ["ns"]},
}
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
class Path_:
    """One system: traffic from `client` to `address` (where `server` listens)."""

    client: str
    server: str
    address: str
    expect: str | None = None  # the mesh path it must be on ("direct"/"relay")


@dataclass
class Samples:
    throughput_mbps: list[float] = field(default_factory=list)
    rtt_p50_us: list[float] = field(default_factory=list)
    rtt_p99_us: list[float] = field(default_factory=list)
    move_ms: list[float] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        return {"throughput_mbps": round(statistics.median(self.throughput_mbps), 1),
                "rtt_p50_us": round(statistics.median(self.rtt_p50_us), 1),
                "rtt_p99_us": round(statistics.median(self.rtt_p99_us), 1),
                "move_4mb_ms": round(statistics.median(self.move_ms), 1),
                "rounds": len(self.throughput_mbps)}


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


def measure(plane: Any, paths: dict[str, Path_], params: Params) -> dict[str, Samples]:
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
            mbps = iperf(plane.lab, path, params.bulk_s)
            p50, p99 = sockperf(plane.lab, path, params.rtt_s)
            moves = move(plane.lab, path, params.moves)
            s = samples[name]
            s.throughput_mbps.append(mbps)
            s.rtt_p50_us.append(p50)
            s.rtt_p99_us.append(p99)
            s.move_ms.extend(moves)
            log(f"round {r + 1}/{params.rounds} {name}: {mbps:.0f} Mbit/s, rtt p50 {p50:.0f} µs "
                f"p99 {p99:.0f} µs, 4 MB in {statistics.median(moves):.1f} ms")
    return samples


def ratios(results: Results) -> dict[str, Any]:
    """The issue's targets: (b) ≥ 1.5x (d) throughput with p50 ≤ (d)'s; (c) ≥ 0.5x (b);
    4 MB through (b) ≤ 1.5x the time of (a)."""
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
    routed = results.get("edgeweave_routed", {})
    if "throughput_mbps" in routed and "throughput_mbps" in d:
        out["throughput_edgeweave_routed_to_wireguard_go"] = round(
            routed["throughput_mbps"] / d["throughput_mbps"], 2)
    if len(out) >= 4:
        out["targets"] = {
            "direct_ge_1_5x_wireguard_go": out["throughput_edgeweave_to_wireguard_go"] >= 1.5,
            "direct_p50_le_wireguard_go": out["rtt_p50_edgeweave_to_wireguard_go"] <= 1.0,
            "relay_ge_half_direct": out["throughput_relay_to_direct"] >= 0.5,
            "move_4mb_le_1_5x_plain": out["move_4mb_edgeweave_to_plain"] <= 1.5,
        }
    return out


def run(quick: bool) -> Results:
    """Build the lab, bring up the mesh and wireguard-go, measure alternately, tear down."""
    need_root_and({"iperf3": "iperf3", "sockperf": "sockperf"}, "tunnel")
    from netlab.meshlab import MeshLab  # the lab library needs the dev extras

    params = QUICK if quick else FULL
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp_name:
        tmp = Path(tmp_name)
        with MeshLab.up_sites(tmp, SITES, pods=1, clients=1, name="btun") as plane:
            lab = plane.lab
            wg: WireguardPair | None = None
            started: list[subprocess.Popen[Any]] = []
            try:
                for server in ("pb", "nb"):
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
                paths["edgeweave_relay"] = Path_("ns", "nb", nb, "relay")
                for client, server in (("pa", "pb"), ("na", "nb"), ("ns", "nb")):
                    # The first packets open the path; wait until it settles where expected.
                    lab.run(client, ["ping", "-c", "2", "-W", "2", overlay_of(plane, server)],
                            check=False)
                for name, path in paths.items():
                    if path.expect is not None:
                        took = plane.wait_path(path.client, path.server, path.expect,
                                               timeout=30)
                        log(f"{name}: {path.client} -> {path.server} {path.expect} "
                            f"after {took:.1f} s")
                samples = measure(plane, paths, params)
                results.update({name: s.result() for name, s in samples.items()})
            finally:
                if wg is not None:
                    wg.close()
                for proc in started:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
    results["ratios"] = ratios(results)
    return results
