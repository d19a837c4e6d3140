"""`python -m bench proxy --quick --json`: one JSON report, every system measured, no namespace
left behind. Root only (it builds a lab); CI must never skip it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

TOOLS = ("iperf3", "sockperf", "haproxy", "socat")


def test_quick_run_prints_one_json_report_and_cleans_up() -> None:
    problem = "needs root" if os.geteuid() != 0 else ""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        problem = f"missing {', '.join(absent)} (dev/setup installs them)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"bench proxy {problem}")
        pytest.skip(problem)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "proxy", "--quick", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["suite"] == "proxy" and "cores" in report["machine"] and report["quick"]
    results = report["results"]
    assert list(results) == ["direct", "edgeweave", "haproxy", "haproxy_splice", "socat",
                             "ratios"]
    for system in ("direct", "edgeweave", "haproxy", "haproxy_splice", "socat"):
        for metric in ("throughput_mbps", "rtt_p50_us", "rtt_p99_us"):
            assert results[system][metric] > 0, (system, metric)
        assert results[system]["rtt_p50_us"] <= results[system]["rtt_p99_us"]
        if system != "direct":
            assert results[system]["bulk_cpu_pct"] > 0, system
    ratios = results["ratios"]
    assert ratios["throughput_edgeweave_to_haproxy"] > 0
    assert "added_rtt_p50_edgeweave_us" in ratios and "added_rtt_p50_haproxy_us" in ratios
    assert set(ratios["targets"]) == {"throughput_ge_haproxy", "added_p50_le_2x_haproxy"}
    # The lab was owned by the bench process: none of its namespaces may remain.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout
    assert f"ewlab-{proc.pid}-" not in left
