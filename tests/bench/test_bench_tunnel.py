"""`python -m bench tunnel --quick --json` runs, prints one JSON report, and cleans up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from netlab import ns

TOOLS = ("iperf3", "sockperf", "wireguard-go", "wg")


def test_quick_run_prints_one_json_report_and_cleans_up() -> None:
    problem = "needs root" if os.geteuid() != 0 else ""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        problem = f"missing {', '.join(absent)} (dev/setup installs them)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"bench tunnel {problem}")
        pytest.skip(problem)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "tunnel", "--quick", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["suite"] == "tunnel" and report["quick"]
    results = report["results"]
    for system in ("plain", "wireguard_go", "edgeweave_routed", "edgeweave", "edgeweave_relay"):
        got = results[system]
        assert got["throughput_mbps"] > 0 and got["rtt_p50_us"] > 0 and got["move_4mb_ms"] > 0
    assert set(results["ratios"]["targets"]) == {
        "direct_ge_1_5x_wireguard_go", "direct_p50_le_wireguard_go", "relay_ge_half_direct",
        "move_4mb_le_1_5x_plain"}
    assert not [n for n in ns.list_netns() if n.startswith(f"{ns.PREFIX}{proc.pid}-")]
