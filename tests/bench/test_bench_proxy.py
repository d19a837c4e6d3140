"""`python -m bench proxy --quick --json`: one JSON report, every system measured, no namespace
left behind. Root only (it builds a lab); CI must never skip it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

QuickReport = Callable[..., dict[str, Any]]  # the fixture in tests/bench/conftest.py

TOOLS = ("iperf3", "sockperf", "haproxy", "socat")


def test_quick_run_prints_one_json_report_and_cleans_up(quick_report: QuickReport) -> None:
    report = quick_report("proxy", TOOLS, 240)
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
