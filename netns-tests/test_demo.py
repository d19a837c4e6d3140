"""The README's command stays true: `python -m netlab.demo` (what `./dev/demo` runs) builds the
mission lab, calls the Service by name from every other edge node, prints the per-pair report
and exits 0; it leaves no namespace behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from netlab import ns

# caller -> (its NAT against home1's port-restricted router, path design.md §6 expects)
PAIRS = {
    "home2": ("same LAN (port-restricted)", "direct"),
    "shop1": ("full cone × port-restricted", "direct"),
    "farm1": ("restricted × port-restricted", "direct"),
    "lte1": ("symmetric × port-restricted", "direct (guessed)"),  # relay first, then guessed
    "dc1": ("public × port-restricted", "direct"),
}
NETCHECK = {"home1": "port-restricted", "home2": "port-restricted", "shop1": "full-cone",
            "farm1": "restricted", "lte1": "symmetric", "dc1": "public"}


@pytest.mark.timeout(480)
def test_demo_runs_the_mission() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "netlab.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the demo tears its lab down on SIGTERM
            proc.communicate(timeout=60)
    print(out)
    assert proc.returncode == 0, f"demo exited {proc.returncode}: {err[-4000:]}"
    lines = out.splitlines()
    for node, nat_type in NETCHECK.items():  # site, router, node, public address, NAT type ...
        pattern = rf"\s{node}\s+[\d.]+:\d+\s+{nat_type}\s+\S+ / \S+\s+ok$"
        assert any(re.search(pattern, line) for line in lines), (node, nat_type)
    for caller, (nat, path) in PAIRS.items():
        row = next((line for line in lines if line.startswith(f"{caller} ")), "")
        assert nat in row, (caller, row)
        shown = re.escape(path)
        assert re.search(rf"10/10: .* @home1\s+{shown}\s+{shown}\s", row), (caller, row)
        assert re.search(r"\d+ ms", row) and row.rstrip().endswith(" ok"), (caller, row)
        if "guessed" in path:  # both times: relay decided, then direct by guessing
            assert re.search(r"relay \d+\.\d s → direct \d+\.\d s", row), (caller, row)
    assert lines[-1].startswith("every call by name answered from home1"), lines[-1]
    assert not [n for n in ns.list_netns() if n.startswith(ns.ns_name(proc.pid, "mission", ""))]
