"""`python -m bench proxy`: the meshd proxy next to haproxy and socat, on one lab path.

One lab (netns): a node with a client pod behind its bridge, as a workload runs, and a server
host on the node's LAN. The server runs `iperf3 -s` and `sockperf server --tcp`; the client pod
runs `iperf3 -c` (bulk throughput, one TCP stream) and `sockperf ping-pong --tcp` (64-byte
request/response round trips, one in flight) along these paths:

- `direct`: the server's address; the node only routes (and masquerades, as Docker does).
- `edgeweave`: the Service's ClusterIP; the rules of `python -m meshd.proxy --rules` on the node
  REDIRECT it to the proxy on :40001 there, which dials the server: where the agent runs.
- `haproxy`: the node's bridge address, a port haproxy (`mode tcp`) listens on in the node;
  `haproxy_splice` another port of the same haproxy, with `option splice-request` and
  `option splice-response` (kernel splicing, as edgeweave's relay does for bulk data).
- `socat`: the node's bridge address, a port `socat TCP-LISTEN:…,fork,reuseaddr` listens on.

So every proxy sits in the same namespace, one hop from the client, and dials the same server
from the same interface. The systems alternate: each round measures bulk for every system
(in a rotated order), then round trips for every system; the reported value of each metric is
its median over the rounds. `bulk_cpu_pct` is the proxy process's CPU time (user + system,
children included) over the wall time of its bulk runs, in percent of one core.

Ratios: `throughput_edgeweave_to_haproxy`; `added_rtt_p50_*_us` = the system's p50 minus
direct's, and `added_rtt_p50_edgeweave_to_haproxy` their ratio; the targets of issue 4 as
booleans under `targets`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import Lab, Topology

from bench.harness import Results, have, log, missing

CLUSTER_IP = "10.96.0.10"
IPERF_PORT = 5201
SOCKPERF_PORT = 11111
PEER_PORTS = {"haproxy": (15201, 21111), "haproxy_splice": (16201, 22111),
              "socat": (25201, 31111)}  # (iperf, sockperf) each peer listens on
MESSAGE_BYTES = 64
SYSTEMS = ("direct", "edgeweave", "haproxy", "haproxy_splice", "socat")

TOPOLOGY: dict[str, Any] = {
    "name": "bproxy",
    "segments": {"wan": {"subnet": "203.0.113.0/24"}, "lan": {"subnet": "10.1.0.0/24"}},
    "routers": {"r": {"wan": "wan", "lan": ["lan"], "nat": "none"}},
    "hosts": {"node": {"segment": "lan", "pods": 1}, "server": {"segment": "lan"}},
}
CLIENT, NODE, SERVER = "node-p0", "node", "server"


@dataclass(frozen=True)
class Params:
    """How long a run is."""

    rounds: int
    """Rounds; each measures every system once for bulk and once for round trips."""
    bulk_s: int
    """Seconds of each iperf3 run that count."""
    omit_s: int
    """Seconds of slow start before them that iperf3 leaves out (`-O`)."""
    rtt_s: int
    """Seconds of each sockperf run (its statistics leave out the first 400 ms)."""


QUICK = Params(rounds=3, bulk_s=1, omit_s=0, rtt_s=1)
FULL = Params(rounds=10, bulk_s=4, omit_s=1, rtt_s=3)


@dataclass
class Target:
    """Where the client connects to reach the server through one system."""

    host: str
    """The address the client dials (server, ClusterIP or the node's bridge address)."""
    iperf_port: int
    """Port that leads to the server's iperf3."""
    sockperf_port: int
    """Port that leads to the server's sockperf."""
    pid: int | None = None
    """The proxy process (its CPU is sampled), None for direct."""


@dataclass
class Samples:
    """Per-round measurements of one system."""

    throughput_mbps: list[float] = field(default_factory=list)
    """iperf3's received rate, one per round."""
    rtt_p50_us: list[float] = field(default_factory=list)
    """sockperf's median round trip, one per round."""
    rtt_p99_us: list[float] = field(default_factory=list)
    """sockperf's 99th percentile round trip, one per round."""
    cpu_s: float = 0.0
    """The proxy's CPU seconds during the bulk runs."""
    wall_s: float = 0.0
    """Wall seconds of those runs."""

    def result(self) -> dict[str, Any]:
        """The reported metrics: medians over the rounds."""
        out: dict[str, Any] = {
            "throughput_mbps": round(statistics.median(self.throughput_mbps), 1),
            "rtt_p50_us": round(statistics.median(self.rtt_p50_us), 1),
            "rtt_p99_us": round(statistics.median(self.rtt_p99_us), 1),
            "rounds": len(self.throughput_mbps),
        }
        if self.wall_s > 0:
            out["bulk_cpu_pct"] = round(100 * self.cpu_s / self.wall_s, 1)
        return out


# --- processes --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system time of `pid` and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_for(check: Callable[[], bool], proc: subprocess.Popen[Any], what: str,
             timeout: float = 20, log_file: Path | None = None) -> None:
    """Poll `check` until it holds; raise naming `what` if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_file.read_text()[-2000:] if log_file and log_file.exists() else ""
            state = (f"exited with {proc.returncode}" if proc.poll() is not None
                     else f"not ready after {timeout:.0f} s")
            raise RuntimeError(f"{what} {state}\n{tail}")
        time.sleep(0.05)


def listening(lab: Lab, node: str, port: int) -> Callable[[], bool]:
    """A check: something listens on TCP `port` in `node`."""
    def check() -> bool:
        out = lab.run(node, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())
    return check


def start(lab: Lab, node: str, argv: Sequence[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in `node` with stdout and stderr to `log_file` (the lab stops it)."""
    with log_file.open("ab") as out:
        proc: subprocess.Popen[bytes] = lab.popen(node, list(argv), stdout=out, stderr=out,
                                                  stdin=subprocess.DEVNULL)
    return proc


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a process this suite started and wait for it (SIGKILL after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the systems ------------------------------------------------------------------------------


def catalog(server: str) -> dict[str, Any]:
    """One Service whose ClusterIP forwards both benchmark ports to the server."""
    ports = [{"name": "iperf", "port": IPERF_PORT}, {"name": "sockperf", "port": SOCKPERF_PORT}]
    return {"node": NODE, "services": [{
        "namespace": "bench", "name": "echo", "clusterIPs": [CLUSTER_IP], "ports": ports,
        "endpoints": [{"ip": server, "node": None, "target": "bench/server", "ports": ports}],
    }]}


def start_edgeweave(lab: Lab, tmp: Path, server: str) -> subprocess.Popen[bytes]:
    """`python -m meshd.proxy --rules` in the node, as the agent runs it."""
    path = tmp / "catalog.json"
    path.write_text(json.dumps(catalog(server)))
    log_file = tmp / "edgeweave.log"
    proc = start(lab, NODE, [sys.executable, "-m", "meshd.proxy", "--catalog", str(path),
                             "--rules"], log_file)
    wait_for(lambda: "proxy.ready" in log_file.read_text(), proc, "meshd.proxy",
             log_file=log_file)
    return proc


HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
listen iperf
    bind {listen}:{ports[haproxy][0]}
    server s1 {server}:{iperf}
listen sockperf
    bind {listen}:{ports[haproxy][1]}
    server s1 {server}:{sockperf}
listen iperf_splice
    bind {listen}:{ports[haproxy_splice][0]}
    option splice-request
    option splice-response
    server s1 {server}:{iperf}
listen sockperf_splice
    bind {listen}:{ports[haproxy_splice][1]}
    option splice-request
    option splice-response
    server s1 {server}:{sockperf}
"""


def start_haproxy(lab: Lab, tmp: Path, listen: str, server: str) -> subprocess.Popen[bytes]:
    """One haproxy (foreground, Debian's build: one thread per CPU) in TCP mode serving both
    systems: `haproxy` with the defaults (recv/send through its buffers) and `haproxy_splice`
    with `option splice-request` + `option splice-response` (kernel splicing both ways)."""
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(listen=listen, server=server, iperf=IPERF_PORT,
                                      sockperf=SOCKPERF_PORT, ports=PEER_PORTS))
    log_file = tmp / "haproxy.log"
    proc = start(lab, NODE, ["haproxy", "-db", "-f", str(cfg)], log_file)
    for name in ("haproxy", "haproxy_splice"):
        for port in PEER_PORTS[name]:
            wait_for(listening(lab, NODE, port), proc, "haproxy", log_file=log_file)
    return proc


def start_socat(lab: Lab, tmp: Path, listen: str, server: str) -> list[subprocess.Popen[bytes]]:
    """One `socat TCP-LISTEN:…,fork,reuseaddr TCP:server:port` per forwarded port."""
    procs = []
    for port, target in zip(PEER_PORTS["socat"], (IPERF_PORT, SOCKPERF_PORT), strict=True):
        log_file = tmp / f"socat-{port}.log"
        proc = start(lab, NODE, ["socat", f"TCP-LISTEN:{port},bind={listen},fork,reuseaddr",
                                 f"TCP:{server}:{target}"], log_file)
        wait_for(listening(lab, NODE, port), proc, "socat", log_file=log_file)
        procs.append(proc)
    return procs


# --- measurements -----------------------------------------------------------------------------


def iperf(lab: Lab, target: Target, seconds: int, omit: int) -> float:
    """One iperf3 run from the client pod: received Mbit/s."""
    out = ""
    for _ in range(5):
        proc = lab.run(CLIENT, ["iperf3", "-c", target.host, "-p", str(target.iperf_port),
                                "-t", str(seconds), "-O", str(omit), "-J"], check=False,
                       timeout=seconds + omit + 30)
        out = proc.stdout
        try:
            return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
        except (KeyError, ValueError):
            time.sleep(0.5)  # the server may still be closing the previous test
    raise RuntimeError(f"iperf3 to {target.host}:{target.iperf_port} failed: {out[-500:]}")


PERCENTILE = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def sockperf(lab: Lab, target: Target, seconds: int) -> tuple[float, float]:
    """One sockperf TCP ping-pong run from the client pod: (p50, p99) round trip in µs."""
    proc = lab.run(CLIENT, ["sockperf", "ping-pong", "--tcp", "-i", target.host,
                            "-p", str(target.sockperf_port), "-t", str(seconds),
                            "-m", str(MESSAGE_BYTES), "--full-rtt", "--dontwarmup"], check=False,
                   timeout=seconds + 30)
    text = proc.stdout + proc.stderr
    pct = dict(PERCENTILE.findall(text))
    if proc.returncode != 0 or "50.000" not in pct:
        raise RuntimeError(f"sockperf to {target.host}:{target.sockperf_port} failed: "
                           f"{text[-800:]}")
    return float(pct["50.000"]), float(pct["99.000"])


def measure(lab: Lab, paths: dict[str, Target], params: Params) -> dict[str, Samples]:
    """Alternate the systems: per round, bulk for each (rotated order), then round trips."""
    samples = {name: Samples() for name in paths}
    names = list(paths)
    for r in range(params.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            target = paths[name]
            before = cpu_seconds(target.pid) if target.pid else 0.0
            t0 = time.monotonic()
            mbps = iperf(lab, target, params.bulk_s, params.omit_s)
            if target.pid:
                time.sleep(0.2)  # socat's child exits and is reaped: its time joins cutime
                samples[name].cpu_s += cpu_seconds(target.pid) - before
                samples[name].wall_s += time.monotonic() - t0 - 0.2
            samples[name].throughput_mbps.append(mbps)
            log(f"round {r + 1}/{params.rounds} bulk {name}: {mbps:.0f} Mbit/s")
        for name in order:
            p50, p99 = sockperf(lab, paths[name], params.rtt_s)
            samples[name].rtt_p50_us.append(p50)
            samples[name].rtt_p99_us.append(p99)
            log(f"round {r + 1}/{params.rounds} rtt {name}: p50 {p50:.1f} µs p99 {p99:.1f} µs")
    return samples


def ratios(results: Results) -> dict[str, Any]:
    """edgeweave against haproxy (and socat), and the targets of issue 4."""
    out: dict[str, Any] = {}
    direct = results.get("direct", {})
    edge = results.get("edgeweave", {})
    for peer in ("haproxy", "haproxy_splice", "socat"):
        other = results.get(peer, {})
        if "throughput_mbps" not in other or "throughput_mbps" not in edge:
            continue
        out[f"throughput_edgeweave_to_{peer}"] = round(
            edge["throughput_mbps"] / other["throughput_mbps"], 2)
    for name in ("edgeweave", "haproxy", "haproxy_splice", "socat"):
        if "rtt_p50_us" in results.get(name, {}) and "rtt_p50_us" in direct:
            out[f"added_rtt_p50_{name}_us"] = round(
                results[name]["rtt_p50_us"] - direct["rtt_p50_us"], 1)
    if "added_rtt_p50_haproxy_us" in out and "added_rtt_p50_edgeweave_us" in out:
        haproxy_added = max(out["added_rtt_p50_haproxy_us"], 0.1)
        out["added_rtt_p50_edgeweave_to_haproxy"] = round(
            out["added_rtt_p50_edgeweave_us"] / haproxy_added, 2)
        out["targets"] = {
            "throughput_ge_haproxy": out["throughput_edgeweave_to_haproxy"] >= 1.0,
            "added_p50_le_2x_haproxy": out["added_rtt_p50_edgeweave_to_haproxy"] <= 2.0,
        }
    return out


def need_root_and(tools: dict[str, str], suite: str) -> None:
    """Exit with one line when not root or a measuring tool (not a peer) is missing."""
    if os.geteuid() != 0:
        raise SystemExit(f"python -m bench {suite}: needs root (it builds lab namespaces)")
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise SystemExit(f"python -m bench {suite}: {tool} not found (Debian package "
                             f"{package}; dev/setup installs it)")


def run(quick: bool) -> Results:
    """Build the lab, start every system, measure them alternately, tear everything down."""
    need_root_and({"iperf3": "iperf3", "sockperf": "sockperf", "ss": "iproute2"}, "proxy")
    params = QUICK if quick else FULL
    results: Results = {}
    log(f"proxy: {params.rounds} rounds of {params.bulk_s} s iperf3 (+{params.omit_s} s omitted) "
        f"+ {params.rtt_s} s sockperf per system")
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        with Lab(Topology.from_dict(TOPOLOGY)) as lab:
            server = lab.addr(SERVER)
            gateway = lab.addr(NODE, 1)  # the node's bridge address, the pods' gateway
            started: list[subprocess.Popen[Any]] = []
            try:
                iperf_server = start(lab, SERVER, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                     tmp / "iperf3.log")
                started.append(iperf_server)
                sock_server = start(lab, SERVER, ["sockperf", "server", "--tcp", "-i", server,
                                                  "-p", str(SOCKPERF_PORT)], tmp / "sockperf.log")
                started.append(sock_server)
                wait_for(listening(lab, SERVER, IPERF_PORT), iperf_server, "iperf3 -s")
                wait_for(listening(lab, SERVER, SOCKPERF_PORT), sock_server, "sockperf server")
                paths = {"direct": Target(server, IPERF_PORT, SOCKPERF_PORT)}
                edgeweave = start_edgeweave(lab, tmp, server)
                started.append(edgeweave)
                paths["edgeweave"] = Target(CLUSTER_IP, IPERF_PORT, SOCKPERF_PORT, edgeweave.pid)
                if have("haproxy"):
                    proc = start_haproxy(lab, tmp, gateway, server)
                    started.append(proc)
                    for name in ("haproxy", "haproxy_splice"):
                        paths[name] = Target(gateway, *PEER_PORTS[name], proc.pid)
                else:
                    results["haproxy"] = missing("haproxy", "haproxy")
                    results["haproxy_splice"] = missing("haproxy", "haproxy")
                if have("socat"):
                    socats = start_socat(lab, tmp, gateway, server)
                    started.extend(socats)
                    paths["socat"] = Target(gateway, *PEER_PORTS["socat"], socats[0].pid)
                else:
                    results["socat"] = missing("socat", "socat")
                samples = measure(lab, paths, params)
            finally:
                for proc in reversed(started):
                    stop(proc)
    for name in SYSTEMS:
        if name in samples:
            results[name] = samples[name].result()
    results = {name: results[name] for name in SYSTEMS if name in results}
    results["ratios"] = ratios(results)
    return results
