"""Fixtures for meshd tests that run real processes on loopback: `meshd server` and coturn.

Every process is started by a fixture and stopped by pid in its `finally`, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.stun.codec import MessageClass, Method, StunMessage, encode_message
from meshd.tunnel import fastpath

MeshdCli = Callable[..., "subprocess.CompletedProcess[str]"]


def meshd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshd", *args]


@pytest.fixture
def meshd_cli() -> MeshdCli:
    """Run `python -m meshd ARGS...` to completion; text stdout/stderr."""

    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(meshd_command(*args), capture_output=True, text=True,
                              timeout=timeout, check=False)

    return run


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes],
             timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def meshd_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """`meshd server` on 127.0.0.1 + 127.0.0.2 with free ports; yields the primary address."""
    log = tmp_path / "meshd-server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            meshd_command("server", "--stun-address", "127.0.0.1", "--stun-address",
                          "127.0.0.2", "--stun-port", "0", "--stun-alt-port", "0"),
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        wait_for(lambda: log.read_text().count("stun.listen") == 4, "meshd server", proc)
        match = re.search(r"stun\.listen address=127\.0\.0\.1:(\d+) role=primary",
                          log.read_text())
        assert match, log.read_text()
        yield ("127.0.0.1", int(match.group(1)))
    finally:
        stop(proc)


def free_ports_on_both(count: int) -> list[int]:
    """`count` UDP ports free on both 127.0.0.1 and 127.0.0.2 (checked, then released)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one:
            one.bind(("127.0.0.1", 0))
            port = one.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two:
                try:
                    two.bind(("127.0.0.2", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


def stun_answers(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        request = StunMessage(MessageClass.REQUEST, Method.BINDING, os.urandom(12))
        sock.sendto(encode_message(request), address)
        try:
            sock.recvfrom(2048)
        except OSError:
            return False
        return True


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """coturn (Debian's `turnserver`) in RFC 5780 mode on 127.0.0.1 + 127.0.0.2; yields the
    primary address. Skips when coturn is not installed."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.skip("coturn (turnserver) is not installed")
    port, alt_port = free_ports_on_both(2)
    log = tmp_path / "turnserver.log"
    command = [
        turnserver,
        "-n",  # ignore /etc/turnserver.conf (Debian's sets no-rfc5780)
        "--listening-ip", "127.0.0.1", "--listening-ip", "127.0.0.2",  # two IPs: RFC 5780 on
        "--listening-port", str(port), "--alt-listening-port", str(alt_port),
        "--stun-only", "--fingerprint",
        "--no-tcp", "--no-tls", "--no-dtls", "--no-cli",
        "--pidfile", str(tmp_path / "turnserver.pid"),
        "--userdb", str(tmp_path / "turndb"),
        "--log-file", str(log), "--simple-log", "--no-stdout-log",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)
    try:
        primary = ("127.0.0.1", port)
        wait_for(lambda: stun_answers(primary) and stun_answers(("127.0.0.2", alt_port)),
                 "coturn", proc)
        yield primary
    finally:
        stop(proc)


@pytest.fixture(params=["native", "pure"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sessions' send counters and replay windows from the extension, then the pure-Python
    ones meshd uses without it (no compiler at install time, or MESHD_PURE_PYTHON=1); modules
    opt in with `pytestmark = pytest.mark.usefixtures("data_path")`."""
    if request.param == "native":
        if not fastpath.AVAILABLE:
            pytest.skip("meshd.tunnel._fastpath is not built")
    else:
        monkeypatch.setattr(fastpath, "_native", None)
    return str(request.param)
