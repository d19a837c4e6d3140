"""`python -m bench dns`: meshd's cluster DNS next to dnsmasq, both driven by dnsperf.

One lab (netns): a `client` host and a `dns` host on one LAN segment. In the `dns` host,
`python -m meshd.dns` (the agent's DNS server, standalone, on uvloop as in the agent) answers
from a catalog of `SERVICES` Services on one address, and dnsmasq (`--no-resolv --no-hosts`, one
`--host-record` per Service name with the same address, TTL 5 s as ours) on another, both on
port 53. The client runs dnsperf 2.10 over UDP with the same query file for both: every
Service's A record (`svc-N.bench.svc.cluster.local`), in order, over and over. Both servers
answer every query from memory (no forwarding).

Per round, alternating which system goes first:
- `qps`: dnsperf at full speed (100 queries outstanding, its default) for `load_s`;
  `loaded_latency_avg_us` is dnsperf's average latency in that run (mostly queueing);
  `cpu_pct` is the server process's CPU time over that run, in percent of one core.
- latency: dnsperf at a fixed `RATE` queries/s for `latency_s` with `-v`, which prints every
  query's latency (µs resolution); `latency_p50_us`/`latency_p99_us` are percentiles of all
  those samples of all rounds pooled.
`qps` is the median over the rounds. dnsperf 2.10 has no latency histogram, hence `-v`.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import Lab, Topology

from bench.harness import Results, have, log, missing, percentile
from bench.proxy import cpu_seconds, need_root_and, start, stop, wait_for

SERVICES = 100
RATE = 1000  # queries/s of the latency runs: a busy node's resolver, far from saturation
SYSTEMS = ("edgeweave", "dnsmasq")
ADDRESSES = {"edgeweave": "10.2.0.53", "dnsmasq": "10.2.0.54"}
DOMAIN = "cluster.local"

TOPOLOGY: dict[str, Any] = {
    "name": "bdns",
    "segments": {"lan": {"subnet": "10.2.0.0/24"}},
    "hosts": {"client": {"segment": "lan"},
              "dns": {"segment": "lan", "addresses": list(ADDRESSES.values())}},
}
CLIENT, SERVER = "client", "dns"


@dataclass(frozen=True)
class Params:
    """How long a run is."""

    rounds: int
    """Rounds; each measures every system once at full speed and once at `RATE`."""
    load_s: int
    """Seconds of each full-speed dnsperf run."""
    latency_s: int
    """Seconds of each fixed-rate dnsperf run."""


QUICK = Params(rounds=2, load_s=3, latency_s=3)
FULL = Params(rounds=6, load_s=10, latency_s=6)


@dataclass
class Samples:
    """What the rounds measured for one system."""

    qps: list[float] = field(default_factory=list)
    """dnsperf's queries/s at full speed, one per round."""
    loaded_avg_s: list[float] = field(default_factory=list)
    """dnsperf's average latency at full speed, one per round."""
    latencies_s: list[float] = field(default_factory=list)
    """Every answered query's latency in the fixed-rate runs, all rounds."""
    lost: int = 0
    """Queries dnsperf got no answer for (all runs)."""
    sent: int = 0
    """Queries dnsperf sent (all runs)."""
    cpu_s: float = 0.0
    """The server's CPU seconds during the full-speed runs."""
    wall_s: float = 0.0
    """Wall seconds of those runs."""

    def result(self) -> dict[str, Any]:
        """The reported metrics."""
        lat_us = [s * 1e6 for s in self.latencies_s]
        return {
            "qps": round(statistics.median(self.qps), 1),
            "latency_p50_us": round(percentile(lat_us, 50), 1),
            "latency_p99_us": round(percentile(lat_us, 99), 1),
            "loaded_latency_avg_us": round(statistics.median(self.loaded_avg_s) * 1e6, 1),
            "lost_pct": round(100 * self.lost / self.sent, 3) if self.sent else 0.0,
            "cpu_pct": round(100 * self.cpu_s / self.wall_s, 1) if self.wall_s else 0.0,
            "rounds": len(self.qps),
            "latency_samples": len(lat_us),
        }


def names() -> list[str]:
    """The Service names both servers answer."""
    return [f"svc-{i}.bench.svc.{DOMAIN}" for i in range(SERVICES)]


def cluster_ip(i: int) -> str:
    """The ClusterIP of Service `i`."""
    return f"10.96.{i // 250}.{i % 250 + 1}"


def catalog() -> dict[str, Any]:
    """The catalog meshd.dns serves: `SERVICES` ClusterIP Services in namespace `bench`."""
    return {"node": "dns", "services": [
        {"namespace": "bench", "name": f"svc-{i}", "clusterIPs": [cluster_ip(i)],
         "ports": [{"name": "http", "port": 80}], "endpoints": []} for i in range(SERVICES)]}


def start_edgeweave(lab: Lab, tmp: Path) -> subprocess.Popen[bytes]:
    """`python -m meshd.dns` on its lab address, port 53."""
    path = tmp / "catalog.json"
    path.write_text(json.dumps(catalog()))
    log_file = tmp / "edgeweave.log"
    proc = start(lab, SERVER, [sys.executable, "-m", "meshd.dns", "--catalog", str(path),
                               "--address", ADDRESSES["edgeweave"], "--port", "53"], log_file)
    wait_for(lambda: "dns.ready" in log_file.read_text(), proc, "meshd.dns", log_file=log_file)
    return proc


def start_dnsmasq(lab: Lab, tmp: Path) -> subprocess.Popen[bytes]:
    """dnsmasq in the foreground on its lab address with the same names and TTL."""
    address = ADDRESSES["dnsmasq"]
    argv = ["dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--listen-address={address}", "--bind-interfaces", "--port=53",
            "--local-ttl=5", "--pid-file", "--user=root"]
    argv += [f"--host-record={name},{cluster_ip(i)}" for i, name in enumerate(names())]
    log_file = tmp / "dnsmasq.log"
    proc = start(lab, SERVER, argv, log_file)

    def bound() -> bool:
        out = lab.run(SERVER, ["ss", "-Hlun", f"src {address}:53"], check=False).stdout
        return bool(out.strip())

    wait_for(bound, proc, "dnsmasq", log_file=log_file)
    return proc


STAT = re.compile(r"^\s*(Queries sent|Queries completed|Queries lost|Queries per second|"
                  r"Average Latency \(s\)):\s+([\d.]+)", re.M)
VERBOSE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$", re.M)


def dnsperf(lab: Lab, server: str, queries: Path, seconds: int,
            extra: list[str]) -> tuple[dict[str, float], str]:
    """One dnsperf run from the client: its statistics and its whole output."""
    proc = lab.run(CLIENT, ["dnsperf", "-s", server, "-d", str(queries), "-l", str(seconds),
                            *extra], check=False, timeout=seconds + 60)
    stats = {k: float(v) for k, v in STAT.findall(proc.stdout)}
    if proc.returncode != 0 or "Queries per second" not in stats:
        raise RuntimeError(f"dnsperf against {server} failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr)[-800:]}")
    return stats, proc.stdout


def measure(lab: Lab, servers: dict[str, tuple[str, int]], queries: Path,
            params: Params) -> dict[str, Samples]:
    """Alternate the systems: per round, full speed for each, then fixed rate for each."""
    samples = {name: Samples() for name in servers}
    order = list(servers)
    for r in range(params.rounds):
        if r % 2:
            order.reverse()
        for name in order:
            address, pid = servers[name]
            before, t0 = cpu_seconds(pid), time.monotonic()
            stats, _ = dnsperf(lab, address, queries, params.load_s, [])
            got = samples[name]
            got.cpu_s += cpu_seconds(pid) - before
            got.wall_s += time.monotonic() - t0
            got.qps.append(stats["Queries per second"])
            got.loaded_avg_s.append(stats["Average Latency (s)"])
            got.sent += int(stats["Queries sent"])
            got.lost += int(stats.get("Queries lost", 0))
            log(f"round {r + 1}/{params.rounds} load {name}: {stats['Queries per second']:.0f} "
                f"queries/s, avg {stats['Average Latency (s)'] * 1e6:.0f} µs")
        for name in order:
            address, _ = servers[name]
            stats, out = dnsperf(lab, address, queries, params.latency_s,
                                 ["-Q", str(RATE), "-v"])
            got = samples[name]
            latencies = [float(s) for rcode, s in VERBOSE.findall(out) if rcode == "NOERROR"]
            if len(latencies) < 0.9 * RATE * params.latency_s:
                raise RuntimeError(f"{name}: only {len(latencies)} NOERROR answers at {RATE}/s")
            got.latencies_s.extend(latencies)
            got.sent += int(stats["Queries sent"])
            got.lost += int(stats.get("Queries lost", 0))
            log(f"round {r + 1}/{params.rounds} latency {name} at {RATE}/s: p50 "
                f"{percentile(latencies, 50) * 1e6:.0f} µs p99 "
                f"{percentile(latencies, 99) * 1e6:.0f} µs")
    return samples


def ratios(results: Results) -> dict[str, Any]:
    """edgeweave against dnsmasq, and the targets of issue 4."""
    edge, other = results.get("edgeweave", {}), results.get("dnsmasq", {})
    out: dict[str, Any] = {}
    if "qps" in edge and "qps" in other:
        out["qps_edgeweave_to_dnsmasq"] = round(edge["qps"] / other["qps"], 2)
        out["latency_p50_edgeweave_to_dnsmasq"] = round(
            edge["latency_p50_us"] / other["latency_p50_us"], 2)
        out["latency_p99_edgeweave_to_dnsmasq"] = round(
            edge["latency_p99_us"] / other["latency_p99_us"], 2)
        out["targets"] = {"qps_ge_half_dnsmasq": out["qps_edgeweave_to_dnsmasq"] >= 0.5,
                          "p99_lt_1ms": edge["latency_p99_us"] < 1000}
    return out


def run(quick: bool) -> Results:
    """Build the lab, start both servers, measure them alternately, tear everything down."""
    need_root_and({"dnsperf": "dnsperf", "ss": "iproute2"}, "dns")
    params = QUICK if quick else FULL
    results: Results = {}
    log(f"dns: {params.rounds} rounds of {params.load_s} s full speed + {params.latency_s} s "
        f"at {RATE} queries/s per system, {SERVICES} names")
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp_name:
        tmp = Path(tmp_name)
        queries = tmp / "queries.txt"
        queries.write_text("".join(f"{name} A\n" for name in names()))
        with Lab(Topology.from_dict(TOPOLOGY)) as lab:
            started: list[subprocess.Popen[Any]] = []
            try:
                edgeweave = start_edgeweave(lab, tmp)
                started.append(edgeweave)
                servers = {"edgeweave": (ADDRESSES["edgeweave"], edgeweave.pid)}
                if have("dnsmasq"):
                    dnsmasq = start_dnsmasq(lab, tmp)
                    started.append(dnsmasq)
                    servers["dnsmasq"] = (ADDRESSES["dnsmasq"], dnsmasq.pid)
                else:
                    results["dnsmasq"] = missing("dnsmasq", "dnsmasq-base")
                samples = measure(lab, servers, queries, params)
            finally:
                for proc in reversed(started):
                    stop(proc)
    for name, got in samples.items():
        results[name] = got.result()
    results = {name: results[name] for name in SYSTEMS if name in results}
    results["ratios"] = ratios(results)
    return results
