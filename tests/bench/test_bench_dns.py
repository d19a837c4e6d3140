"""`python -m bench dns --quick --json`: one JSON report, both servers measured, no namespace
left behind. Root only (it builds a lab); CI must never skip it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

QuickReport = Callable[..., dict[str, Any]]  # the fixture in tests/bench/conftest.py

TOOLS = ("dnsperf", "dnsmasq")


def test_quick_run_prints_one_json_report_and_cleans_up(quick_report: QuickReport) -> None:
    report = quick_report("dns", TOOLS, 240)
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
