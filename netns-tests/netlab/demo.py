"""The README's demo: every NAT kind in a lab, `meshd netcheck` behind each, one table.

Builds `topologies/nat-kinds.yaml` (one NAT router of each RFC 4787 kind, a node behind each,
a public node, and `meshd server` as an RFC 5780 STUN server with two addresses), runs
`meshd netcheck --json` on every node and prints what it observed next to what the router is.
Exits 0 only if every observation matches the router's configured behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def main() -> int:
    """Build the lab, run netcheck behind every NAT, print the table."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
