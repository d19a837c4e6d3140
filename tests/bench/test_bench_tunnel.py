"""`python -m bench tunnel --quick --json --link-mbit N --link-delay-ms D` runs every system on
the shaped site WAN links, prints one JSON report, and cleans up; the flags are checked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench.__main__ import main
from bench.tunnel import ratios

QuickReport = Callable[..., dict[str, Any]]  # the fixture in tests/bench/conftest.py

TOOLS = ("iperf3", "sockperf", "wireguard-go", "wg")
SYSTEMS = ("plain", "wireguard_go", "edgeweave_routed", "edgeweave", "edgeweave_relay")
TARGETS = {"direct_ge_1_5x_wireguard_go", "direct_p50_le_wireguard_go", "relay_ge_half_direct",
           "move_4mb_le_1_5x_plain"}


def test_quick_run_on_shaped_edge_links(quick_report: QuickReport) -> None:
    """The one quick run CI pays for (~100 s) is on shaped links: it covers the unshaped run's
    code too (the lab, all five systems, the report) and checks the shaping took effect."""
    rate, delay = 100, 2
    report = quick_report("tunnel", TOOLS, 420,
                          ["--link-mbit", str(rate), "--link-delay-ms", str(delay)])
    results = report["results"]
    assert results["link"] == {"rate_mbit": rate, "delay_ms": delay, "rtt_added_ms": 4 * delay}
    # 4 MB at the link rate, without headers or slow start: a floor every system must respect.
    floor_ms = 4 * 1024 * 1024 * 8 / (rate * 1e6) * 1000
    for system in SYSTEMS:  # all five on the same shaped links
        got = results[system]
        assert 0 < got["throughput_mbps"] <= rate * 1.05, (system, got)
        assert got["rtt_p50_us"] >= 4 * delay * 1000, (system, got)  # two links, both ways
        assert got["move_4mb_ms"] >= floor_ms, (system, got)
        assert 0 < got["forwarder_cpu_pct"] < 100, (system, got)
    assert set(results["ratios"]["targets"]) == TARGETS
    assert results["ratios"]["move_4mb_wireguard_go_to_plain"] > 0


@pytest.mark.parametrize(("argv", "error"), [
    (["proxy", "--link-mbit", "100"], "--link-mbit: an option of `bench tunnel` only"),
    (["tunnel", "--link-mbit", "0"], "argument --link-mbit: '0': must be within"),
    (["tunnel", "--link-delay-ms", "-1"], "argument --link-delay-ms: '-1': must be within"),
    (["tunnel", "--link-delay-ms", "soon"], "argument --link-delay-ms: invalid"),
])
def test_link_flags_are_checked_before_any_lab_is_built(
        argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err


def test_ratios_put_every_tunnel_next_to_plain() -> None:
    row = {"throughput_mbps": 90.0, "rtt_p50_us": 9000.0}
    results = {"plain": {**row, "move_4mb_ms": 400.0},
               "wireguard_go": {**row, "move_4mb_ms": 440.0},
               "edgeweave_routed": {**row, "move_4mb_ms": 420.0},
               "edgeweave": {**row, "move_4mb_ms": 430.0},
               "edgeweave_relay": {**row, "throughput_mbps": 45.0, "move_4mb_ms": 800.0}}
    got = ratios(results)
    assert got["move_4mb_edgeweave_to_plain"] == 1.07
    assert got["move_4mb_wireguard_go_to_plain"] == 1.1
    assert got["move_4mb_edgeweave_routed_to_plain"] == 1.05
    assert got["move_4mb_edgeweave_relay_to_plain"] == 2.0
    assert got["targets"] == {"direct_ge_1_5x_wireguard_go": False,
                              "direct_p50_le_wireguard_go": True,
                              "relay_ge_half_direct": True, "move_4mb_le_1_5x_plain": True}
