"""The README's demo: the mission in one lab. A cloud site and edge sites behind NATs; a Service
on one edge node called by name from every other edge node, through `meshd agent`'s tunnels.

- `cloud`, on a public "internet" segment: cloudcore with its embedded Kubernetes API, and
  `meshd server` with its control channel (signaling, overlay addresses), RFC 5780 STUN on two
  addresses and the TURN relay (netlab.meshlab, the lab of netns-tests/test_tunnel_nat.py).
- Edge sites, each a LAN behind its own router (firewall on, as real routers are): `home`
  port-restricted with two nodes, `shop` full cone, `farm` restricted, `lte` symmetric, and
  `dc` plainly routed (public addresses). Every node runs `meshd agent` with the tunnel on.
- `meshd netcheck` on every edge node against that `meshd server`: what NAT each site really
  sits behind, next to what its router was built to do.
- `kubectl apply` (on `cloud`): Deployment `hello` pinned to `home1` by a nodeSelector, and
  Service `hello`; then from a pod on every other edge node, calls to `http://hello.default/`.
  Per caller: who answered, the tunnel path to `home1` (direct/relay), time to first byte, time
  to direct, RTT and the peer endpoint, next to the path ../shared/design.md §6 expects. With
  port guessing (on by default; the agents know their NAT classes thanks to the second STUN
  address) symmetric × port-restricted decides relay first, then goes direct (guessed).

Exits 0 only if every netcheck matched its router, every call answered from `home1`, and every
pair ended on the expected path; 1 otherwise (naming what failed), 130 on Ctrl-C. The lab is
torn down in every case.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import LabError, signals_raise
from netlab.meshlab import INTERNET, MeshLab
from netlab.nat import EXPECTED
from netlab.serviceplane import fetch_many, wait_for
from netlab.topology import NatKind

SITES: dict[str, dict[str, Any]] = {
    "home": {"nat": "port-restricted", "nodes": ["home1", "home2"]},
    "shop": {"nat": "full-cone", "nodes": ["shop1"]},
    "farm": {"nat": "restricted", "nodes": ["farm1"]},
    "lte": {"nat": "symmetric", "nodes": ["lte1"]},
    "dc": {"nat": "none", "nodes": ["dc1"]},
}
SERVER_NODE = "home1"
SERVICE = "hello"
CALLS = 10
GUESSED = "direct (guessed)"
SETTLED = {"direct": "direct", "relay": "relayed", GUESSED: "direct"}
"""Path machine state once a pair is done: direct proven, or checks given up and relayed."""
SHORT = {"endpoint-independent": "EI", "address-dependent": "AD",
         "address-and-port-dependent": "APD"}
NAT_NAME = {"none": "public", "full-cone": "full cone", "restricted": "restricted",
            "port-restricted": "port-restricted", "symmetric": "symmetric"}

APP = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {SERVICE}, namespace: default}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: {SERVICE}}}}}
  template:
    metadata: {{labels: {{app: {SERVICE}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {SERVER_NODE}}}
      containers: [{{name: {SERVICE}, image: podserver, ports: [{{containerPort: 8080}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {SERVICE}, namespace: default}}
spec:
  selector: {{app: {SERVICE}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


def expected_path(a: NatKind, b: NatKind, same_site: bool) -> str:
    """The path ../shared/design.md §6 expects between nodes behind routers of kinds a and b.

    Direct everywhere (symmetric against an EIM side goes direct on a peer-reflexive candidate)
    except symmetric × symmetric (relay) and symmetric × port-restricted, which decides relay
    and then goes direct by port guessing ("direct (guessed)"); one LAN is always direct."""
    if same_site:
        return "direct"
    if frozenset({a, b}) == frozenset({"symmetric", "port-restricted"}):
        return GUESSED
    return "relay" if frozenset({a, b}) == frozenset({"symmetric"}) else "direct"


def shown_path(peer: dict[str, Any]) -> str:
    """A tunnel row's path as the report shows it: `direct (guessed)` for a guessed one."""
    path = str(peer.get("path", "none"))
    return GUESSED if path == "direct" and peer.get("guessed") else path


def settled(call: Call, peer: dict[str, Any]) -> bool:
    """The caller's path machine is done, on the path expected (a guessed pair only once the
    guess made it direct)."""
    return (peer.get("state") == SETTLED[call.expected]
            and (call.expected != GUESSED or bool(peer.get("guessed"))))


class MissionLab(MeshLab):
    """The tunnel lab with a second address on `cloud`, so that `meshd server`'s STUN answers
    RFC 5780 change requests and `meshd netcheck` can tell filtering behaviours apart."""

    alternate_ip = ""

    def start(self, *, agents: bool = True) -> None:
        used = {iface.ip for node in self.lab.nodes.values() for _, iface in node.addresses}
        network = ipaddress.IPv4Network(INTERNET)
        alternate = next(ip for ip in reversed(list(network.hosts())) if ip not in used)
        self.lab.run("cloud", ["ip", "addr", "add", f"{alternate}/{network.prefixlen}",
                               "dev", "eth0"])
        self.alternate_ip = str(alternate)
        self.server_overrides.setdefault("stun", {})["addresses"] = [
            self.cloud_ip, self.alternate_ip]
        super().start(agents=agents)


@dataclass
class Call:
    """What one caller node saw of the Service and of its tunnel to the Service's node."""

    node: str
    expected: str
    why: str
    ttfb: float | None = None
    answers: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    peer: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def calls(self) -> int:
        return sum(self.answers.values()) + len(self.failures)


def netcheck(plane: MissionLab, node: str) -> dict[str, Any]:
    """`meshd netcheck --json` from `node` against `meshd server`'s STUN service."""
    try:
        proc = plane.lab.run(node, [sys.executable, "-m", "meshd", "netcheck", "--server",
                                    plane.cloud_ip, "--json"], check=False, timeout=60)
    except LabError as exc:  # e.g. it outlived the timeout
        return {"error": str(exc)}
    lines = proc.stderr.strip().splitlines()
    try:
        report = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return report


def netcheck_ok(kind: NatKind, report: dict[str, Any]) -> bool:
    seen = (report.get("mapping"), report.get("filtering"), report.get("nat_type"))
    return seen == EXPECTED[kind]


def first_call(plane: MissionLab, pod: str) -> tuple[float, str]:
    """One call by name from `pod`: (seconds to the first byte of the answer, the answer)."""
    proc = plane.lab.run(pod, ["curl", "-sS", "--max-time", "5", "-w", "\n%{time_starttransfer}",
                               f"http://{SERVICE}.default/"], check=False)
    if proc.returncode != 0:
        raise AssertionError(f"curl http://{SERVICE}.default/ from {pod}: "
                             f"{proc.stderr.strip() or proc.returncode}")
    body, _, ttfb = proc.stdout.rpartition("\n")
    return float(ttfb), body.strip()


def agent_status(plane: MissionLab, node: str) -> dict[str, Any]:
    """The agent's /status, read with curl inside `node` (cheaper to poll than `meshd status`)."""
    proc = plane.lab.run(node, ["curl", "-sS", "--max-time", "2",
                                "http://127.0.0.1:40002/status"], check=False)
    try:
        doc = json.loads(proc.stdout) if proc.returncode == 0 else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def peer_row(plane: MissionLab, node: str) -> dict[str, Any]:
    """`node`'s tunnel peer row for the Service's node ({} if none yet)."""
    for row in (agent_status(plane, node).get("tunnel") or {}).get("peers", []):
        if row.get("node") == SERVER_NODE:
            return dict(row)
    return {}


def serving(plane: MissionLab, node: str, ips: list[str]) -> bool:
    """The agent on `node` load-balances the Service over exactly `ips`."""
    for svc in agent_status(plane, node).get("services", []):
        if svc.get("service") == f"default/{SERVICE}":
            return sorted(e["ip"] for e in svc["endpoints"] if e.get("ready")) == ips
    return False


def call_from(plane: MissionLab, call: Call, ips: list[str]) -> None:
    """Calls `hello` by name from a pod on `call.node`, then waits until the tunnel to the
    Service's node settles: direct proven, or checks given up and relayed."""
    node = call.node
    pod = plane.lab.pods(node)[-1]  # kept for clients, never given to the kubelet
    try:
        wait_for(lambda: serving(plane, node, ips), f"agent on {node} serving {ips}",
                 timeout=30, step=0.1)
        wait_for(lambda: peer_row(plane, node).get("path", "none") != "none",
                 f"{node} has a path to {SERVER_NODE}", timeout=30, step=0.05)
        call.ttfb, body = first_call(plane, pod)
        answers, call.failures = fetch_many(plane, pod, f"{SERVICE}.default", CALLS - 1)
        first = body.split()[0].removeprefix("pod=") if body else "?"
        answers[first] = answers.get(first, 0) + 1
        call.answers = answers
    except (AssertionError, LabError) as exc:
        call.error = str(exc)
        call.peer = peer_row(plane, node)
        return
    with contextlib.suppress(AssertionError):  # reported from call.peer if it never settles
        # A guessed pair decides relay after ≤ 6 s, then guesses (a phase lasts ≤ 5 s).
        wait_for(lambda: settled(call, peer_row(plane, node)), "settled", timeout=30, step=0.1)
    call.peer = peer_row(plane, node)


def call_ok(call: Call, pods_on: dict[str, str]) -> bool:
    return (not call.error and not call.failures and call.calls == CALLS
            and all(pods_on.get(pod) == SERVER_NODE for pod in call.answers)
            and shown_path(call.peer) == call.expected and settled(call, call.peer))


def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = [head, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def sites_table(kinds: dict[str, NatKind], sites: dict[str, str],
                reports: dict[str, dict[str, Any]]) -> str:
    rows = []
    for node, report in reports.items():
        kind = kinds[node]
        behaviour = (f"{SHORT.get(report.get('mapping', ''), '?')} / "
                     f"{SHORT.get(report.get('filtering', ''), '?')}")
        rows.append((sites[node], NAT_NAME[kind], node, str(report.get("public", "-")),
                     str(report.get("nat_type", report.get("error", "?"))), behaviour,
                     "ok" if netcheck_ok(kind, report) else "MISMATCH"))
    return table(("site", "router", "node", "netcheck: public address", "NAT type",
                  "mapping / filtering", "ok"), rows)


def calls_table(calls: list[Call], pods_on: dict[str, str]) -> str:
    rows = []
    for c in calls:
        p = c.peer
        ttd, ttr, rtt = p.get("timeToDirectS"), p.get("timeToRelayS"), p.get("rttMs")
        if p.get("path") == "direct" and p.get("guessed") and ttd is not None and ttr is not None:
            done = f"relay {ttr:.1f} s → direct {ttd:.1f} s"
        elif p.get("path") == "direct" and ttd is not None:
            done = f"{ttd * 1000:.0f} ms"
        elif p.get("path") == "relay" and ttr is not None:
            done = f"- (relay {ttr:.1f} s)"
        else:
            done = "-"
        where = sorted({pods_on.get(pod, "?") for pod in c.answers})
        answered = (f"{sum(c.answers.values())}/{CALLS}: "
                    + ", ".join(f"{pod.rsplit('-', 1)[-1]} ×{n}"
                                for pod, n in sorted(c.answers.items()))
                    + f" @{','.join(where) or '-'}")
        rows.append((
            c.node, c.why, answered, shown_path(p), c.expected,
            "-" if c.ttfb is None else f"{c.ttfb * 1000:.0f} ms", done,
            "-" if rtt is None else f"{rtt:.1f} ms", str(p.get("endpoint") or "-"),
            "ok" if call_ok(c, pods_on) else "FAIL"))
    return table(("caller", f"NAT (caller × {SERVER_NODE})", "answered by pod @node", "path",
                  "expected", "1st byte", "to direct", "RTT", "endpoint", "ok"), rows)


def mission(tmp: Path, started: float) -> list[str]:
    """Run the demo in a lab under `tmp`; what went wrong (empty: all good)."""
    problems: list[str] = []
    sites = {n: site for site, spec in SITES.items() for n in spec["nodes"]}
    kinds: dict[str, NatKind] = {n: SITES[site]["nat"] for n, site in sites.items()}
    with MissionLab.up_sites(tmp, SITES, pods=3, clients=1, name="mission") as lab:
        assert isinstance(lab, MissionLab)  # up_sites builds `cls`
        plane = lab
        print(f"lab up in {time.monotonic() - started:.1f} s\n"
              f"cloud site: cloudcore (embedded API) at {plane.api_url}\n"
              f"            meshd server at {plane.cloud_ip}: control :20004, STUN :3478 "
              f"(RFC 5780 alternate {plane.alternate_ip}), TURN relay\n"
              "edge sites: " + ", ".join(
                  f"{site} ({NAT_NAME[spec['nat']]}: {' '.join(spec['nodes'])})"
                  for site, spec in SITES.items())
              + "\n            `meshd agent` with the tunnel on every edge node", flush=True)
        with ThreadPoolExecutor(len(sites)) as pool:  # each check waits out its timeouts
            futures = {n: pool.submit(netcheck, plane, n) for n in sites}
            print("\n" + plane.apply(APP).strip(), flush=True)
            plane.wait_ready_pods(f"app={SERVICE}", 2, timeout=60)
            running = {k.split("/", 1)[1]: v for k, v in plane.running_pods().items()
                       if k.startswith(f"default/{SERVICE}-")}
            pods_on = {pod: str(v["node"]) for pod, v in running.items()}
            reports = {n: f.result() for n, f in futures.items()}
        print(f"\n`meshd netcheck` on every edge node against meshd server "
              f"({time.monotonic() - started:.1f} s):\n"
              f"{sites_table(kinds, sites, reports)}\n"
              "mapping/filtering: EI = endpoint-independent, AD = address-dependent, "
              "APD = address-and-port-dependent (RFC 4787)", flush=True)
        problems += [f"netcheck on {n} saw {r.get('nat_type', r.get('error'))}, router is "
                     f"{kinds[n]}" for n, r in reports.items() if not netcheck_ok(kinds[n], r)]

        cluster_ip = plane.cluster_ip(SERVICE)
        print(f"\nService default/{SERVICE} (ClusterIP {cluster_ip}) → pods "
              f"{', '.join(f'{p} ({n})' for p, n in sorted(pods_on.items()))}\n"
              f"{CALLS} calls to http://{SERVICE}.default/ from a pod on each other edge node:",
              flush=True)
        calls = []
        server_kind = kinds[SERVER_NODE]
        for node in sites:
            if node == SERVER_NODE:
                continue
            same = sites[node] == sites[SERVER_NODE]
            why = (f"same LAN ({NAT_NAME[server_kind]})" if same
                   else f"{NAT_NAME[kinds[node]]} × {NAT_NAME[server_kind]}")
            call = Call(node, expected_path(kinds[node], server_kind, same), why)
            call_from(plane, call, sorted(str(v["ip"]) for v in running.values()))
            calls.append(call)
        print(calls_table(calls, pods_on))
        print("expected: the NAT matrix for the routers' kinds (direct, but relay for symmetric "
              "× symmetric; symmetric × port-restricted relays, then goes direct by port "
              "guessing).\n1st byte: the first call (name lookup included), by curl. to "
              "direct: checks started → direct pair proven (relay: → relay decided; guessed: "
              "→ relay decided → guessed pair proven).\npath, RTT, endpoint: the caller's "
              f"tunnel to {SERVER_NODE} (the relayed address when relayed). Calls done at "
              f"{time.monotonic() - started:.1f} s.")
        for c in calls:
            if call_ok(c, pods_on):
                continue
            if c.error:
                problems.append(f"{c.node}: {c.error}")
            elif c.failures or c.calls != CALLS:
                problems.append(f"{c.node}: {len(c.failures)} of {CALLS} calls failed "
                                f"({'; '.join(c.failures[:2])})")
            elif shown_path(c.peer) != c.expected or not settled(c, c.peer):
                problems.append(f"{c.node} -> {SERVER_NODE}: path {shown_path(c.peer)} (state "
                                f"{c.peer.get('state')}), expected {c.expected} ({c.why})")
            else:
                problems.append(f"{c.node}: answers came from pods not on {SERVER_NODE}: "
                                f"{c.answers}")
        print(f"\n`meshd status` on {SERVER_NODE}:\n"
              + plane.lab.run(SERVER_NODE, [sys.executable, "-m", "meshd", "status"]).stdout)
        if problems:
            for node in plane.nodes:  # the agents' last words, for the operator
                print(f"--- agent {node} (log tail)\n{plane.agent_log(node)[-800:]}",
                      file=sys.stderr)
    return problems


def main() -> int:
    """Build the lab, run the mission, print the report; the exit code says if it held."""
    signals_raise()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="edgeweave-demo-") as tmp:
            problems = mission(Path(tmp), started)
    except KeyboardInterrupt:
        print("interrupted; the lab is torn down", file=sys.stderr)
        return 130
    except (AssertionError, LabError, subprocess.SubprocessError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    if problems:
        print(f"demo FAILED ({took:.1f} s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"every call by name answered from {SERVER_NODE}, every pair on the path the NAT "
          f"matrix expects, every netcheck as configured ({took:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
