"""The README's demo, in two labs: NAT kinds, then a Service called by name across nodes.

1. Builds `topologies/nat-kinds.yaml` (one NAT router of each RFC 4787 kind, a node behind each,
   a public node, and `meshd server` as an RFC 5780 STUN server with two addresses), runs
   `meshd netcheck --json` on every node and prints what it observed next to what the router is.
2. Builds the service-plane lab (netlab.serviceplane): cloudcore with its embedded API on host
   `cloud`, two nodes on a LAN each running `meshd agent`, pods behind each node's bridge (the
   lab plays the kubelet). Deploys a demo Deployment + Service with kubectl, then calls the
   Service by name from a pod on each node and prints which pod on which node answered.
Exits 0 only if every observation matches the router's configured behaviour and every call
by name succeeded and reached backends on both nodes.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netlab import Lab, Topology, signals_raise
from netlab.nat import EXPECTED
from netlab.topology import NatKind

TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "nat-kinds.yaml"
SHORT = {"endpoint-independent": "EI", "address-dependent": "AD",
         "address-and-port-dependent": "APD", None: "-"}


@dataclass(frozen=True)
class Row:
    """One node's netcheck next to its router's configuration."""

    node: str
    kind: NatKind
    hairpin: bool
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        mapping, filtering, nat_type = EXPECTED[self.kind]
        r = self.report
        hairpin_ok = self.kind == "none" or r.get("hairpin") is self.hairpin
        return (r.get("mapping"), r.get("filtering"), r.get("nat_type")) == (
            mapping, filtering, nat_type) and hairpin_ok


def start_stun(lab: Lab, node: str = "stun") -> subprocess.Popen[Any]:
    """Run `meshd server` on `node`'s two addresses and wait until it answers."""
    argv = [sys.executable, "-m", "meshd", "server", "--log-level", "warning"]
    for i in range(2):
        argv += ["--stun-address", lab.addr(node, i)]
    proc = lab.popen(node, argv)
    deadline = time.monotonic() + 10
    while True:
        probe = lab.run(node, ["ss", "-Hnul", "sport", "= :3479"], check=False)
        if probe.stdout.count("3479") >= 2:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"meshd server on {node} did not start (exit {proc.poll()})")
        time.sleep(0.05)


def netcheck(lab: Lab, node: str, server: str) -> dict[str, Any]:
    """`meshd netcheck --json` from `node` against `server`."""
    proc = lab.run(node, [sys.executable, "-m", "meshd", "netcheck", "--server", server,
                          "--json"], check=False, timeout=60)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()}
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def behind(lab: Lab) -> list[tuple[str, NatKind, bool]]:
    """(node, NAT kind, hairpin) for every host, `none` for hosts on the internet segment."""
    topo = lab.topology
    out: list[tuple[str, NatKind, bool]] = []
    for name, host in topo.hosts.items():
        if name == "stun":
            continue
        gw = topo.gateway_of(host.segment)
        router = topo.routers[gw] if gw else None
        out.append((name, router.nat if router else "none", router.hairpin if router else False))
    return out


def table(rows: list[Row]) -> str:
    """The demo's table: configured behaviour, then what netcheck observed."""
    head = ("node", "router NAT", "hairpin", "public address", "mapping", "filtering",
            "hairpin", "NAT type", "can hole-punch with", "ok")
    lines = [head]
    for row in rows:
        r = row.report
        lines.append((
            row.node, row.kind, "on" if row.hairpin else "off", str(r.get("public", "-")),
            SHORT.get(r.get("mapping"), "?"), SHORT.get(r.get("filtering"), "?"),
            {True: "yes", False: "no", None: "-"}.get(r.get("hairpin"), "?"),
            str(r.get("nat_type", r.get("error", "?"))),
            ", ".join(r.get("can_hole_punch_with", [])) or "-",
            "ok" if row.ok else "MISMATCH",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


DEMO_APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: default}
spec:
  replicas: 4
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers: [{name: hello, image: podserver, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec:
  selector: {app: hello}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
CALLS = 40


def service_demo() -> bool:
    """Part 2: the Service `hello` called by name from a pod on each node."""
    from netlab.serviceplane import ServicePlane, fetch_many  # needs the dev extras

    started = time.monotonic()
    ok = True
    with tempfile.TemporaryDirectory(prefix="edgeweave-demo-") as tmp, ServicePlane.up(
            Path(tmp), {"node1": {}, "node2": {}}, pods=4, name="demo") as plane:
        print(f"\nservice plane up in {time.monotonic() - started:.1f} s: cloudcore "
              f"(embedded API) on {plane.cloud_ip}, meshd agent on node1 "
              f"({plane.lab.addr('node1')}) and node2 ({plane.lab.addr('node2')})", flush=True)
        print(plane.apply(DEMO_APP).strip())
        ips = plane.wait_ready_pods("app=hello", 4)
        for node in plane.nodes:
            plane.wait_endpoints(node, "default/hello", ips)
        where = {k.split("/")[1]: p for k, p in plane.running_pods().items()}
        for client in ("node1-p3", "node2-p3"):
            resolved = plane.lab.run(client, ["getent", "hosts", "hello"]).stdout.split()
            counts, failures = fetch_many(plane, client, "hello.default", CALLS)
            nodes = collections.Counter(where[name]["node"] for name in counts if name in where)
            print(f"\nfrom pod {client} ({plane.lab.addr(client)}): `hello` resolves to "
                  f"{resolved[0] if resolved else '?'}; {sum(counts.values())}/{CALLS} calls "
                  f"to http://hello.default/ answered, {len(failures)} failed")
            for name, n in sorted(counts.items()):
                pod = where.get(name, {})
                print(f"  {name:<22} {pod.get('ip', '?'):<12} on {pod.get('node', '?')}: "
                      f"{n} calls")
            ok = ok and not failures and len(nodes) == 2
        print("\n" + plane.lab.run("node1", [sys.executable, "-m", "meshd", "status"]).stdout)
    return ok


def main() -> int:
    """Build the labs, run netcheck behind every NAT, print the table, then the Service."""
    signals_raise()
    started = time.monotonic()
    try:
        with Lab(Topology.load(TOPOLOGY)) as lab:
            print(f"lab up in {time.monotonic() - started:.1f} s: "
                  f"{len(lab.topology.routers)} NAT routers, STUN at {lab.addr('stun')} "
                  f"and {lab.addr('stun', 1)}", flush=True)
            start_stun(lab)
            cases = behind(lab)
            with ThreadPoolExecutor(len(cases)) as pool:  # each check waits out its timeouts
                reports = list(pool.map(lambda c: netcheck(lab, c[0], lab.addr("stun")), cases))
            rows = [Row(*case, report) for case, report in zip(cases, reports, strict=True)]
    except KeyboardInterrupt:
        return 130
    print(table(rows))
    print("mapping/filtering: EI = endpoint-independent, AD = address-dependent, "
          "APD = address-and-port-dependent (RFC 4787)")
    bad = [r.node for r in rows if not r.ok]
    if bad:
        print(f"MISMATCH on: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} NAT behaviours observed as configured "
          f"({time.monotonic() - started:.1f} s)")
    try:
        if not service_demo():
            print("calls by name failed or did not reach both nodes", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 130
    print(f"calls by name succeeded and spread over both nodes "
          f"({time.monotonic() - started:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
