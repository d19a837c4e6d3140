"""Link impairments for benchmarks: delay and loss (userspace TAP forwarder), rate (tbf).

Prints the measured figures; docs/lab.md quotes them as the accuracy of the lab's links.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from netlab import Lab


def pair(link: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "link",
        "segments": {"lan": {"subnet": "10.7.0.0/24"}},
        "hosts": {"a": {"segment": "lan"}, "b": {"segment": "lan", "link": link}},
    }


def ping(lab: Lab, count: int, interval: float) -> tuple[float, float, float, float]:
    """(loss fraction, average RTT ms, mdev ms, minimum RTT ms) of `count` pings from a to b."""
    # Resolve ARP first, so that the figures are about ICMP: on a lossy link the ARP exchange
    # itself can fail several times in a row, and pings queued behind it are all lost.
    for _ in range(30):
        if lab.run("a", ["ping", "-c", "1", "-W", "1", lab.addr("b")], check=False).returncode == 0:
            break
    else:
        raise AssertionError("no ping answered in 30 tries: the link forwards nothing")
    out = lab.run("a", ["ping", "-q", "-c", str(count), "-i", str(interval), "-W", "2",
                        lab.addr("b")], check=False, timeout=120).stdout
    loss = float(re.search(r"([\d.]+)% packet loss", out).group(1)) / 100  # type: ignore[union-attr]
    stats = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    low, avg, mdev = ((float(stats.group(1)), float(stats.group(2)), float(stats.group(4)))
                      if stats else (0.0, 0.0, 0.0))
    return loss, avg, mdev, low


@pytest.mark.parametrize("delay_ms", [5, 25])
def test_delay_accuracy(make_lab: Callable[[Any], Lab], delay_ms: int) -> None:
    lab = make_lab(pair({"delayMs": delay_ms}))
    loss, avg, mdev, low = ping(lab, 40, 0.05)
    expected = 2 * delay_ms  # the link is crossed once each way
    print(f"delay {delay_ms} ms each way: RTT avg {avg:.2f} ms (expected {expected}), "
          f"min {low:.2f} ms, mdev {mdev:.2f} ms, error {avg - expected:+.2f} ms")
    assert loss == 0
    # The delay is a floor; what a busy machine adds on top is scheduling, not the link: the
    # fastest round trip shows the link's own accuracy.
    assert expected <= low <= expected + 1.5
    assert avg <= expected + 10.0


def test_loss_rate_matches(make_lab: Callable[[Any], Lab]) -> None:
    lab = make_lab(pair({"lossPercent": 20, "seed": 7}))
    loss, _, _, _ = ping(lab, 400, 0.005)
    expected = 1 - 0.8 * 0.8  # request and reply each cross the lossy link
    print(f"loss 20% per crossing: round-trip loss {loss:.3f} (expected {expected:.3f})")
    assert abs(loss - expected) < 0.08


def test_rate_limit(make_lab: Callable[[Any], Lab]) -> None:
    lab = make_lab(pair({"rateMbit": 50}))
    lab.popen("b", ["iperf3", "-s", "-1", "-B", lab.addr("b")])  # stopped at teardown
    deadline = time.monotonic() + 30
    while ":5201" not in lab.run("b", ["ss", "-Htln"]).stdout:
        assert time.monotonic() < deadline, "iperf3 -s did not listen"
        time.sleep(0.05)
    proc = lab.run("a", ["iperf3", "-c", lab.addr("b"), "-t", "2", "-J"], check=False)
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr
    out = proc.stdout
    mbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    print(f"tbf 50 Mbit/s: iperf3 measured {mbps:.1f} Mbit/s")
    assert 40 <= mbps <= 55
