"""Helpers of the NAT tests: start STUN servers (ours and coturn) in a lab, run netcheck."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netlab import Lab

__all__ = ["netcheck", "start_coturn", "start_stun"]


def start_stun(lab: Lab, node: str = "stun") -> subprocess.Popen[Any]:
    """Run `meshd server` on `node`'s two addresses and wait until it answers."""
    argv = [sys.executable, "-m", "meshd", "server", "--log-level", "warning"]
    for i in range(2):
        argv += ["--stun-address", lab.addr(node, i)]
    proc = lab.popen(node, argv)
    deadline = time.monotonic() + 10
    while True:
        probe = lab.run(node, ["ss", "-Hnul", "sport", "= :3479"], check=False)
        if probe.stdout.count("3479") >= 2:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"meshd server on {node} did not start (exit {proc.poll()})")
        time.sleep(0.05)


def netcheck(lab: Lab, node: str, server: str, *extra: str) -> dict[str, Any]:
    """`meshd netcheck --json` from `node`; fails the test with meshd's stderr on error."""
    proc = lab.run(node, [sys.executable, "-m", "meshd", "netcheck", "--server", server,
                          "--json", *extra], check=False, timeout=60)
    assert proc.returncode == 0, f"netcheck on {node} failed: {proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def start_coturn(lab: Lab, node: str, workdir: Path, port: int = 3478, *,
                 auth_secret: str | None = None, realm: str = "edgeweave",
                 relay_ports: tuple[int, int] = (31000, 31999),
                 extra: Sequence[str] = ()) -> subprocess.Popen[Any]:
    """Debian's coturn on `node`.

    Without `auth_secret`: STUN only, no auth, on `node`'s two addresses in RFC 5780 mode.
    With it: a TURN relay on `node`'s first address (UDP and TCP `port`) with REST credentials
    (`use-auth-secret` + `static-auth-secret`, the scheme `meshd server` mints for agents),
    relayed ports from `relay_ports`, verbose log (it names each allocation's relay address).
    `extra`: more turnserver options (e.g. `--stale-nonce=10`).

    `-n` skips /etc/turnserver.conf, whose Debian default says `no-rfc5780`.
    """
    log = workdir / "turn.log"
    common = ["-n", "--no-cli", "--no-tls", "--no-dtls", "--listening-port", str(port),
              "--pidfile", str(workdir / "turnserver.pid"), "--log-file", str(log),
              "--simple-log", "--no-stdout-log", "--userdb", str(workdir / "turndb")]
    if auth_secret is None:
        argv = ["turnserver", *common, "--stun-only", "--no-auth",
                "--alt-listening-port", str(port + 1),
                "-L", lab.addr(node, 0), "-L", lab.addr(node, 1)]
        probe_port, sockets = port + 1, 2
    else:
        argv = ["turnserver", *common, "--verbose", "--use-auth-secret",
                f"--static-auth-secret={auth_secret}", f"--realm={realm}",
                "-L", lab.addr(node), "--relay-ip", lab.addr(node),
                "--min-port", str(relay_ports[0]), "--max-port", str(relay_ports[1]), *extra]
        probe_port, sockets = port, 1
    proc = lab.popen(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        probe = lab.run(node, ["ss", "-Hnul", f"sport = :{probe_port}"], check=False)
        if probe.stdout.count(f":{probe_port}") >= sockets:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"coturn did not start on {node}: {text[-500:]}")
        time.sleep(0.05)
