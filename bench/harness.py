"""What every benchmark suite shares: the machine line, peers, percentiles, the JSON report.

The contract is ../shared/bench.md: `python -m bench SUITE [--quick] [--json]`; with `--json`
exactly one JSON object on stdout (`suite`, `machine`, `results` with one key per system
measured), logs on stderr. Peers are real programs started by the suite; a missing one is
reported in `results` as `{"missing": "..."}`, never skipped silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

Results = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark suite: `run(quick, **options)` measures edgeweave and its peers in one
    run; `options`, if any, adds the suite's own flags to a group and returns their `dest`
    names (each defaulting to None), which `run` takes as keyword arguments."""

    name: str
    description: str
    run: Callable[..., Results]
    options: Callable[[argparse._ArgumentGroup], list[str]] | None = None


def machine_line() -> str:
    """`2 cores, Linux 6.18, Python 3.11.7, <cpu model>`: what the results were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kernel = platform.release().split("-")[0]
    return (f"{os.cpu_count()} cores, Linux {kernel}, Python {platform.python_version()}"
            + (f", {cpu}" if cpu else ""))


def missing(peer: str, package: str) -> dict[str, Any]:
    """The result entry of a peer that is not installed."""
    return {"missing": f"{peer} not found (Debian package {package}; dev/setup installs it)"}


def have(program: str) -> bool:
    """Whether `program` is on PATH."""
    return shutil.which(program) is not None


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_us(samples_s: Sequence[float], prefix: str) -> dict[str, float]:
    """p50/p99 (and mean) of durations in seconds, as `{prefix}_p50_us`-style metrics."""
    us = [s * 1e6 for s in samples_s]
    return {
        f"{prefix}_p50_us": round(percentile(us, 50), 1),
        f"{prefix}_p99_us": round(percentile(us, 99), 1),
        f"{prefix}_mean_us": round(statistics.fmean(us), 1) if us else 0.0,
    }


def log(message: str) -> None:
    """Progress on stderr (stdout is for the report)."""
    print(message, file=sys.stderr, flush=True)


def render_table(results: Results) -> str:
    """A human table: systems as rows, metrics as columns."""
    metrics: list[str] = []
    for values in results.values():
        for key in values:
            if key not in metrics:
                metrics.append(key)
    rows = [["system", *metrics]]
    for system, values in results.items():
        rows.append([system, *(str(values.get(m, "")) for m in metrics)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
