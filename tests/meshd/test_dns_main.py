"""`python -m meshd.dns --catalog FILE` on loopback: answers, SIGHUP reload, clean exit, errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dnslib  # type: ignore[import-untyped]


def catalog(ip: str) -> dict[str, Any]:
    return {"node": "n", "services": [{"namespace": "default", "name": "web",
                                       "clusterIPs": [ip], "ports": [{"port": 80}]}]}


def ask(port: int, name: str) -> list[str]:
    q = dnslib.DNSRecord.question(name, "A")
    reply = dnslib.DNSRecord.parse(q.send("127.0.0.1", port, timeout=3))
    return [str(rr.rdata) for rr in reply.rr]


def wait_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], count: int = 1) -> str:
    deadline = time.monotonic() + 15
    while len(found := re.findall(pattern, log.read_text())) < count:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return str(found[-1])


def test_serves_reloads_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog("10.96.0.10")))
    log = tmp_path / "dns.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "meshd.dns", "--catalog", str(path),
                                 "--address", "127.0.0.1", "--port", "0"], stderr=err)
    try:
        port = int(wait_line(log, r"dns\.ready address=127\.0\.0\.1 port=(\d+)", proc))
        assert ask(port, "web.default.svc.cluster.local") == ["10.96.0.10"]
        path.write_text(json.dumps(catalog("10.96.0.20")))
        proc.send_signal(signal.SIGHUP)
        wait_line(log, r"dns\.reload services=1", proc)
        assert ask(port, "web.default.svc.cluster.local") == ["10.96.0.20"]
        path.write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        wait_line(log, r"dns\.reload_failed", proc)
        assert ask(port, "web.default.svc.cluster.local") == ["10.96.0.20"]  # kept
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_operator_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"services": [{"name": "x"}]}))
    for args in (["--catalog", str(tmp_path / "absent.json")], ["--catalog", str(bad)],
                 ["--catalog", str(bad), "--address", "not-an-ip"]):
        proc = subprocess.run([sys.executable, "-m", "meshd.dns", *args], capture_output=True,
                              text=True, timeout=30, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("meshd-dns: error: ") and proc.stderr.count("\n") == 1
