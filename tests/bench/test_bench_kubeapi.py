"""`python -m bench kubeapi --quick --json` runs and prints the report ../shared/bench.md fixes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def test_quick_run_prints_one_json_report() -> None:
    if shutil.which("etcd") is None and not os.environ.get("CI"):
        pytest.skip("etcd not installed (dev/setup installs etcd-server)")
    proc = subprocess.run([sys.executable, "-m", "bench", "kubeapi", "--quick", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["suite"] == "kubeapi"
    assert "cores" in report["machine"]
    results = report["results"]
    for system in ("edgeweave", "etcd"):
        for metric in ("writes_per_s", "list_p50_ms", "watch_fanout_p50_us", "rss_mb"):
            assert results[system][metric] > 0, (system, metric)
    assert set(results["ratio_edgeweave_to_etcd"]) == {"writes", "list_p50", "watch_fanout_p50"}
