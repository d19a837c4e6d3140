"""`python -m bench dns --quick --json`: one JSON report, both servers measured, no namespace
left behind. Root only (it builds a lab); CI must never skip it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

TOOLS = ("dnsperf", "dnsmasq")


def test_quick_run_prints_one_json_report_and_cleans_up() -> None:
    problem = "needs root" if os.geteuid() != 0 else ""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        problem = f"missing {', '.join(absent)} (dev/setup installs them)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"bench dns {problem}")
        pytest.skip(problem)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "dns", "--quick", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["suite"] == "dns" and "cores" in report["machine"] and report["quick"]
    results = report["results"]
    assert list(results) == ["edgeweave", "dnsmasq", "ratios"]
    for system in ("edgeweave", "dnsmasq"):
        got = results[system]
        for metric in ("qps", "latency_p50_us", "latency_p99_us", "cpu_pct"):
            assert got[metric] > 0, (system, metric)
        assert got["latency_p50_us"] <= got["latency_p99_us"]
        assert got["lost_pct"] < 1, got  # both answer (nearly) everything they are asked
    ratios = results["ratios"]
    assert ratios["qps_edgeweave_to_dnsmasq"] > 0
    assert set(ratios["targets"]) == {"qps_ge_half_dnsmasq", "p99_lt_1ms"}
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout
    assert f"ewlab-{proc.pid}-" not in left
