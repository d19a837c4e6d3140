"""The proxy on real kernels: `python -m meshd.proxy --rules` in a node namespace.

Lab: a node behind a plain router (so it has a default route, as real nodes do) with four pods
on its bridge: three backends (a tiny TCP/UDP server each) and one client. The proxy runs in the
node with the iptables rules it installs there; clients call the ClusterIP from the client pod
(nat PREROUTING / mangle TPROXY, through the bridge) and from the node itself (nat OUTPUT /
mangle MARK + reroute). Every process is started with `lab.popen` and stopped by pid.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netlab import Lab

from meshd.proxy.catalog_file import dump_catalog, parse_catalog

CIP = "10.96.0.10"
EMPTY_CIP = "10.96.0.11"
TOPOLOGY: dict[str, Any] = {
    "name": "proxy",
    "segments": {"wan": {"subnet": "203.0.113.0/24"}, "lan": {"subnet": "10.1.0.0/24"}},
    "routers": {"r": {"wan": "wan", "lan": ["lan"], "nat": "none"}},
    "hosts": {"node": {"segment": "lan", "pods": 4}},
}

BACKEND = r"""
import socket, sys, threading
name = sys.argv[1].encode()

def serve_tcp(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def whoami(c):
    c.sendall(name + b"\n"); c.close()

def half_close(c):  # read until the client's FIN, then answer a lot
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(b"%d:" % len(data) + data.upper() + b"R" * 1000000); c.close()

def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
    while True:
        d, a = u.recvfrom(65535); u.sendto(name + b":" + d, a)

threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=serve_tcp, args=(8081, half_close), daemon=True).start()
print("ready", flush=True)
serve_tcp(8080, whoami)
"""

CLIENT = r"""
import json, socket, sys, collections
mode, ip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen, errors = collections.Counter(), collections.Counter()
held = []  # UDP sockets stay open to the end: a closed one's port may go to the next, which
           # would then share its proxy session (and backend)
for i in range(n):
    try:
        if mode == "tcp":
            with socket.create_connection((ip, port), timeout=5) as s:
                seen[s.makefile("rb").readline().decode().strip()] += 1
        elif mode == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(s)
            s.settimeout(2); s.sendto(b"hi", (ip, port))
            data, src = s.recvfrom(100)
            seen[data.decode().split(":")[0] + "@" + "%s:%d" % src] += 1
        elif mode == "half-close":
            with socket.create_connection((ip, port), timeout=5) as s:
                s.sendall(b"question"); s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
                seen[got[:20].decode() + "|%d" % len(got)] += 1
        elif mode == "raw":  # send garbage, report what happened
            with socket.create_connection((ip, port), timeout=5) as s:
                s.sendall(bytes(range(256)) * 4)
                seen[repr(s.recv(100))] += 1
    except OSError as exc:
        errors[type(exc).__name__] += 1
print(json.dumps({"seen": seen, "errors": errors}))
"""


def catalog_data(lab: Lab) -> dict[str, Any]:
    backends = lab.pods("node")[:3]
    ports = [{"name": "http", "port": 8080}, {"name": "half", "port": 8081},
             {"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "iperf", "port": 5201},
             {"name": "sp", "port": 11111}]
    endpoints = []
    for i, pod in enumerate(backends):
        served = [p for p in ports if p["name"] in ("http", "half", "dns")]
        if i == 0:
            served = ports
        endpoints.append({"ip": lab.addr(pod), "node": "node", "target": f"default/{pod}",
                          "ports": served})
    return dump_catalog(parse_catalog({"node": "node", "services": [
        {"namespace": "default", "name": "web", "clusterIPs": [CIP], "endpoints": endpoints,
         "ports": [{"name": "http", "port": 80}, {"name": "half", "port": 81},
                   {"name": "dns", "port": 53, "protocol": "UDP"},
                   {"name": "iperf", "port": 5201}, {"name": "sp", "port": 11111}]},
        {"namespace": "default", "name": "empty", "clusterIPs": [EMPTY_CIP],
         "ports": [{"port": 80}], "endpoints": []},
    ]}))


@dataclass
class Mesh:
    """A built lab with backends and the proxy running in `node`."""

    lab: Lab
    proxy: subprocess.Popen[bytes]
    log: Path
    backends: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def client(self, where: str, mode: str, ip: str, port: int, n: int) -> dict[str, Any]:
        out = self.lab.run(where, [sys.executable, "-c", CLIENT, mode, ip, str(port), str(n)],
                           timeout=60).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def metrics(self) -> dict[str, float]:
        text = self.lab.run("node", [sys.executable, "-c", (
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())")
        ]).stdout
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        """Stop the proxy (SIGTERM: it removes its rules) and wait for it."""
        if self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)


def start_proxy(lab: Lab, tmp_path: Path, config: str = "") -> tuple[subprocess.Popen[bytes],
                                                                     Path]:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(catalog_data(lab)))
    conf = tmp_path / "proxy.yaml"
    conf.write_text("proxy:\n  connectTimeoutS: 0.3\n  lb: {ejectionBaseS: 30, ejectionMaxS: 60}\n"
                    + config)
    log = tmp_path / "proxy.log"
    with log.open("wb") as stderr:
        proc = lab.popen("node", [sys.executable, "-m", "meshd.proxy", "--catalog", str(catalog),
                                  "--config", str(conf), "--rules",
                                  "--metrics", "127.0.0.1:9100"], stderr=stderr)
    deadline = time.monotonic() + 15
    while "proxy.ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"proxy did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, log


@pytest.fixture
def mesh(make_lab: Callable[[Any], Lab], tmp_path: Path) -> Iterator[Mesh]:
    lab = make_lab(TOPOLOGY)
    backends = {}
    for pod in lab.pods("node")[:3]:
        proc = lab.popen(pod, [sys.executable, "-c", BACKEND, pod], stdout=subprocess.PIPE,
                         text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        backends[pod] = proc
    proxy, log = start_proxy(lab, tmp_path)
    mesh = Mesh(lab, proxy, log, backends)
    try:
        yield mesh
    finally:
        mesh.stop()
        for proc in backends.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)


def names(result: dict[str, Any]) -> dict[str, int]:
    return {k.split("@")[0]: v for k, v in result["seen"].items()}


def test_tcp_round_robin_from_pod_and_node(mesh: Mesh) -> None:
    for where in ("node-p3", "node"):
        result = mesh.client(where, "tcp", CIP, 80, 300)
        print(where, result)
        assert result["errors"] == {}
        assert set(result["seen"]) == {"node-p0", "node-p1", "node-p2"}
        assert all(90 <= n <= 110 for n in result["seen"].values())


def test_half_close_client_reads_the_whole_reply(mesh: Mesh) -> None:
    for where in ("node-p3", "node"):
        result = mesh.client(where, "half-close", CIP, 81, 3)
        assert result["errors"] == {}
        assert list(result["seen"]) == ["8:QUESTIONRRRRRRRRRR|1000010"]


def test_dead_and_blackholed_backends_are_ejected_without_failed_clients(mesh: Mesh) -> None:
    mesh.backends["node-p1"].terminate()  # refused: fails over at once
    mesh.backends["node-p1"].wait(5)
    mesh.lab.run("node-p2", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8080",
                             "-j", "DROP"])  # blackholed: fails over after connectTimeoutS
    result = mesh.client("node-p3", "tcp", CIP, 80, 60)
    print(result)
    assert result["errors"] == {}
    assert result["seen"] == {"node-p0": 60}
    metrics = mesh.metrics()
    assert metrics['edgeweave_proxy_ejections_total{service="default/web"}'] == 2
    assert metrics['edgeweave_proxy_dial_failures_total{service="default/web"}'] == 2
    assert "proxy.eject" in mesh.log.read_text()


@pytest.mark.parametrize("bridge_nf", ["1", "0"])
def test_udp_service_answers_through_tproxy(mesh: Mesh, bridge_nf: str) -> None:
    """From a pod behind the bridge and from the node itself; with br_netfilter on (Docker's
    and Kubernetes' setting: datagrams arrive on the ClusterIP:port socket) and off (they
    arrive through the TPROXY listener). Replies come from the ClusterIP:port."""
    mesh.lab.run("node", ["sh", "-c",
                          f"echo {bridge_nf} > /proc/sys/net/bridge/bridge-nf-call-iptables"])
    for where in ("node-p3", "node"):
        result = mesh.client(where, "udp", CIP, 53, 30)
        print(where, result)
        assert result["errors"] == {}
        assert all(key.endswith(f"@{CIP}:53") for key in result["seen"])
        assert names(result) == {"node-p0": 10, "node-p1": 10, "node-p2": 10}
    metrics = mesh.metrics()
    print({k: v for k, v in metrics.items() if "udp" in k})
    assert metrics["edgeweave_proxy_udp_via_tproxy_total"] >= 30  # the node's own datagrams
    if bridge_nf == "0":
        assert metrics["edgeweave_proxy_udp_via_tproxy_total"] == 60
    else:
        assert metrics["edgeweave_proxy_udp_via_bound_total"] == 30
    # One session per client socket; the kernel may hand two of the 60 one-shot client sockets
    # the same ephemeral port (a few % of runs), and those share a live session.
    assert 55 <= metrics['edgeweave_proxy_udp_sessions_total{service="default/web"}'] <= 60


def test_udp_sessions_expire(make_lab: Callable[[Any], Lab], tmp_path: Path) -> None:
    lab = make_lab(TOPOLOGY)
    proc = lab.popen("node-p0", [sys.executable, "-c", BACKEND, "node-p0"],
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proxy, _ = start_proxy(lab, tmp_path, "  sweepIntervalS: 0.1\n  udp: {sessionIdleS: 0.5}\n")
    try:
        mesh = Mesh(lab, proxy, tmp_path / "proxy.log")
        # Only node-p0 runs a server: the others answer with ICMP port unreachable, which
        # ejects them, and the unanswered datagram goes to the next backend: no client waits.
        result = mesh.client("node-p3", "udp", CIP, 53, 12)
        assert result["errors"] == {} and names(result) == {"node-p0": 12}, result
        time.sleep(1.2)
        metrics = mesh.metrics()
        assert metrics['edgeweave_proxy_udp_sessions_active{service="default/web"}'] == 0
        # Every session that answered expired: one per client socket (two of the 12 one-shot
        # sockets may get the same ephemeral port from the kernel and share one, seen in CI),
        # plus the two that ended when their backend was ejected.
        sessions = metrics['edgeweave_proxy_udp_sessions_total{service="default/web"}']
        assert metrics['edgeweave_proxy_ejections_total{service="default/web"}'] == 2
        assert 13 <= sessions <= 14
        assert metrics['edgeweave_proxy_udp_sessions_expired_total{service="default/web"}'] \
            == sessions - 2
    finally:
        proxy.terminate()
        proxy.wait(10)
        proc.terminate()
        proc.wait(5)


def save_state(lab: Lab) -> str:
    tables = lab.run("node", ["iptables-save"]).stdout
    # Chain policy counters (`:OUTPUT ACCEPT [12:720]`) move with any traffic: not state.
    tables = "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in tables.splitlines()
                       if not line.startswith("#"))
    # IPv4 only (all the agent installs): the kernel's IPv6 link-local routes appear whenever
    # duplicate address detection ends, which made two snapshots differ by timing alone.
    rules = lab.run("node", ["ip", "-4", "rule", "show"]).stdout
    routes = lab.run("node", ["ip", "-4", "route", "show", "table", "all"]).stdout
    return "\n".join([tables, rules, routes])


def test_stopping_removes_every_rule(make_lab: Callable[[Any], Lab], tmp_path: Path) -> None:
    lab = make_lab(TOPOLOGY)
    # Somebody else's rules (Docker- and kube-proxy-like) must survive us untouched.
    lab.run("node", ["iptables-restore", "--noflush"], input=(
        "*nat\n:DOCKER - [0:0]\n:KUBE-SERVICES - [0:0]\n"
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
        "-A OUTPUT -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.0.0.1/32 -j RETURN\nCOMMIT\n"))
    before = save_state(lab)
    proxy, _ = start_proxy(lab, tmp_path)
    during = save_state(lab)
    assert "EDGEWEAVE-SERVICES" in during and "lookup 40001" in during
    nat = lab.run("node", ["iptables", "-t", "nat", "-S", "PREROUTING"]).stdout.splitlines()
    assert "EDGEWEAVE-PREROUTING" in nat[1]  # rule 1, ahead of DOCKER (line 0 is the policy)
    proxy.terminate()
    assert proxy.wait(10) == 0
    assert save_state(lab) == before


def test_garbage_and_unknown_destinations_are_survived(mesh: Mesh) -> None:
    lab = mesh.lab
    # Straight to the proxy port (no original destination): reset.
    direct = mesh.client("node", "raw", "127.0.0.1", 40001, 3)
    assert direct["errors"] == {"ConnectionResetError": 3}, direct
    # A stale rule sends a ClusterIP the proxy does not know: reset.
    lab.run("node", ["iptables", "-t", "nat", "-I", "OUTPUT", "-d", "10.96.0.99/32", "-p", "tcp",
                     "--dport", "80", "-j", "REDIRECT", "--to-ports", "40001"])
    stale = mesh.client("node", "raw", "10.96.0.99", 80, 3)
    assert stale["errors"] == {"ConnectionResetError": 3}, stale
    # A Service without endpoints is rejected by the filter rule: refused at once.
    empty = mesh.client("node-p3", "tcp", EMPTY_CIP, 80, 3)
    assert empty["errors"] == {"ConnectionRefusedError": 3}, empty
    # Garbage through a real Service is just bytes to the backend.
    garbage = mesh.client("node-p3", "raw", CIP, 80, 3)
    assert garbage["errors"] == {}, garbage
    # Garbage datagrams straight at the UDP listener are dropped.
    lab.run("node", [sys.executable, "-c",
                     "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                     "[s.sendto(bytes(range(200)), ('127.0.0.1', 40001)) for _ in range(5)]"])
    # Everything else still works.
    assert mesh.proxy.poll() is None
    result = mesh.client("node-p3", "tcp", CIP, 80, 30)
    assert result["errors"] == {} and sum(result["seen"].values()) == 30
    metrics = mesh.metrics()
    assert metrics["edgeweave_proxy_not_redirected_total"] == 3
    assert metrics["edgeweave_proxy_no_service_total"] == 3 + 5


def _iperf(lab: Lab, target: str) -> float:
    for _ in range(5):
        out = lab.run("node-p3", ["iperf3", "-c", target, "-t", "2", "-J"], check=False).stdout
        try:
            return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
        except (KeyError, ValueError):
            time.sleep(0.5)  # the server is still busy with the previous test
    raise AssertionError(f"iperf3 to {target} failed: {out[-300:]}")


def _sockperf(lab: Lab, target: str) -> tuple[float, float]:
    proc = lab.run("node-p3", ["sockperf", "ping-pong", "--tcp", "-i", target, "-p", "11111",
                               "-t", "2", "-m", "64"])
    text = proc.stdout + proc.stderr
    pct = dict(re.findall(r"percentile (\d+\.\d+) =\s+([\d.]+)", text))
    return float(pct["50.000"]), float(pct["99.000"])


def test_throughput_and_latency_sanity(mesh: Mesh) -> None:
    """iperf3 (and sockperf when installed) straight to the pod and through the proxy."""
    lab = mesh.lab
    lab.popen("node-p0", ["iperf3", "-s"], stdout=subprocess.DEVNULL)
    have_sockperf = shutil.which("sockperf") is not None
    if have_sockperf:
        lab.popen("node-p0", ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    pod = lab.addr("node-p0")
    direct, proxied = _iperf(lab, pod), _iperf(lab, CIP)
    print(f"\niperf3 pod→pod direct {direct:.2f} Gbit/s, through the proxy {proxied:.2f} Gbit/s")
    if have_sockperf:
        (d50, d99), (p50, p99) = _sockperf(lab, pod), _sockperf(lab, CIP)
        print(f"sockperf TCP 64 B half-RTT: direct p50 {d50} p99 {d99} µs, "
              f"proxy p50 {p50} p99 {p99} µs")
    assert proxied > 1.0  # Gbit/s: a sanity floor, not a benchmark (python -m bench proxy)


def test_sighup_reloads_catalog_and_rules(mesh: Mesh, tmp_path: Path) -> None:
    data = catalog_data(mesh.lab)
    web = data["services"][0]
    web["endpoints"] = [e for e in web["endpoints"] if e["target"] != "default/node-p1"]
    data["services"].append(dict(web, name="web2", clusterIPs=["10.96.0.12"]))
    (tmp_path / "catalog.json").write_text(json.dumps(data))
    mesh.proxy.send_signal(1)  # SIGHUP
    deadline = time.monotonic() + 10
    while mesh.log.read_text().count("rules.sync") < 2:
        assert time.monotonic() < deadline, mesh.log.read_text()
        time.sleep(0.05)
    for ip in (CIP, "10.96.0.12"):
        result = mesh.client("node-p3", "tcp", ip, 80, 20)
        assert result["errors"] == {} and result["seen"] == {"node-p0": 10, "node-p2": 10}


def test_kill_and_restart_reconciles_without_duplicates(make_lab: Callable[[Any], Lab],
                                                         tmp_path: Path) -> None:
    lab = make_lab(TOPOLOGY)
    proxy, _ = start_proxy(lab, tmp_path)
    first = save_state(lab)
    proxy.kill()  # SIGKILL: no chance to clean up
    proxy.wait(10)
    assert save_state(lab) == first  # the rules are still there
    proxy, _ = start_proxy(lab, tmp_path)
    assert save_state(lab) == first  # and the new process found them right: nothing doubled
    nat = lab.run("node", ["iptables", "-t", "nat", "-S"]).stdout
    assert nat.count("-j EDGEWEAVE-PREROUTING") == 1 and nat.count("-j EDGEWEAVE-OUTPUT") == 1
    proxy.terminate()
    assert proxy.wait(10) == 0
    left = lab.run("node", ["iptables-save"]).stdout
    assert "EDGEWEAVE" not in left and "-A " not in left
    assert "40001" not in lab.run("node", ["ip", "rule", "show"]).stdout
