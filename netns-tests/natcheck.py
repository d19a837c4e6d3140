"""Helpers of the NAT tests: start STUN servers (ours and coturn) in a lab, run netcheck."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netlab import Lab
from netlab.demo import start_stun

__all__ = ["netcheck", "start_coturn", "start_stun"]


def netcheck(lab: Lab, node: str, server: str, *extra: str) -> dict[str, Any]:
    """`meshd netcheck --json` from `node`; fails the test with meshd's stderr on error."""
    proc = lab.run(node, [sys.executable, "-m", "meshd", "netcheck", "--server", server,
                          "--json", *extra], check=False, timeout=60)
    assert proc.returncode == 0, f"netcheck on {node} failed: {proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def start_coturn(lab: Lab, node: str, workdir: Path, port: int = 3478) -> subprocess.Popen[Any]:
    """Debian's coturn on `node`'s two addresses in RFC 5780 mode (STUN only, no auth).

    `-n` skips /etc/turnserver.conf, whose Debian default says `no-rfc5780`.
    """
    argv = ["turnserver", "-n", "--stun-only", "--no-auth", "--no-cli", "--no-tls", "--no-dtls",
            "--listening-port", str(port), "--alt-listening-port", str(port + 1),
            "-L", lab.addr(node, 0), "-L", lab.addr(node, 1),
            "--pidfile", str(workdir / "turnserver.pid"), "--log-file", str(workdir / "turn.log"),
            "--simple-log", "--no-stdout-log", "--userdb", str(workdir / "turndb")]
    proc = lab.popen(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        probe = lab.run(node, ["ss", "-Hnul", f"sport = :{port + 1}"], check=False)
        if probe.stdout.count(str(port + 1)) >= 2:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (workdir / "turn.log").read_text() if (workdir / "turn.log").exists() else ""
            raise RuntimeError(f"coturn did not start on {node}: {log[-500:]}")
        time.sleep(0.05)
