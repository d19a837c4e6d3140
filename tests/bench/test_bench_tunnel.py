"""`python -m bench tunnel --quick --json` runs, prints one JSON report, and cleans up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

QuickReport = Callable[..., dict[str, Any]]  # the fixture in tests/bench/conftest.py

TOOLS = ("iperf3", "sockperf", "wireguard-go", "wg")


def test_quick_run_prints_one_json_report_and_cleans_up(quick_report: QuickReport) -> None:
    report = quick_report("tunnel", TOOLS, 420)
    results = report["results"]
    for system in ("plain", "wireguard_go", "edgeweave_routed", "edgeweave", "edgeweave_relay"):
        got = results[system]
        assert got["throughput_mbps"] > 0 and got["rtt_p50_us"] > 0 and got["move_4mb_ms"] > 0
    assert set(results["ratios"]["targets"]) == {
        "direct_ge_1_5x_wireguard_go", "direct_p50_le_wireguard_go", "relay_ge_half_direct",
        "move_4mb_le_1_5x_plain"}
