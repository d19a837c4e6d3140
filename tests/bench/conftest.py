"""The quick run of a benchmark suite, as every tests/bench test uses it.

`quick_report(suite, tools, timeout, args=())` runs `python -m bench SUITE --quick --json ARGS`
(ARGS: the suite's own flags), skips (or, in CI, fails) when not root or a tool is missing,
checks the exit code, that no namespace of the bench process is left behind, and the report's
frame, and returns the parsed report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest

QuickReport = Callable[..., dict[str, Any]]  # (suite, tools, timeout, args=())


@pytest.fixture
def quick_report() -> QuickReport:
    def run(suite: str, tools: Sequence[str], timeout: float,
            args: Sequence[str] = ()) -> dict[str, Any]:
        problem = "needs root" if os.geteuid() != 0 else ""
        absent = [t for t in tools if shutil.which(t) is None]
        if absent:
            problem = f"missing {', '.join(absent)} (dev/setup installs them)"
        if problem:
            if os.environ.get("CI"):
                pytest.fail(f"bench {suite} {problem}")  # CI must never skip a benchmark
            pytest.skip(problem)
        proc = subprocess.Popen([sys.executable, "-m", "bench", suite, "--quick", "--json",
                                 *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-2000:]
        # The lab was owned by the bench process: none of its namespaces may remain.
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              check=True).stdout
        assert f"ewlab-{proc.pid}-" not in left
        report: dict[str, Any] = json.loads(out)
        assert report["suite"] == suite and "cores" in report["machine"] and report["quick"]
        return report

    return run
