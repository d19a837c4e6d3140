"""`meshd server --control`: configuration, operator errors, and the real process on loopback
with certificates minted by `cloudcore certs` — including a crash and restart while agents are
connected."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudcore.cli import main as cloudcore_main
from edgeweave.pki import PKI_SUBDIR, CertificateAuthority
from meshd.control.client import ControlClient, ControlClientConfig, ControlEvent, Welcomed
from meshd.control.registry import REGISTRY_FILE
from meshd.control.service import ControlConnector, agent_tls_context


@dataclass(frozen=True)
class Lab:
    out: Path
    data: Path

    def server_args(self, port: int = 0) -> list[str]:
        return ["server", "--stun-address", "127.0.0.1", "--stun-port", "0",
                "--stun-alt-port", "0", "--control", "--control-address", f"127.0.0.1:{port}",
                "--control-data-dir", str(self.data), "--control-ca", str(self.out / "ca.crt"),
                "--control-cert", str(self.out / "meshd-server.crt"),
                "--control-key", str(self.out / "meshd-server.key")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("control-cli")
    cloud = root / "cloudcore"
    CertificateAuthority.load_or_create(cloud / PKI_SUBDIR)
    out = root / "certs"
    assert cloudcore_main(["--data-dir", str(cloud), "certs", "meshd-server", "--out", str(out),
                           "--address", "127.0.0.1", "--address", "localhost"]) == 0
    for node in ("edge-1", "edge-2"):
        assert cloudcore_main(["--data-dir", str(cloud), "certs", "node", node,
                               "--out", str(out)]) == 0
    return Lab(out, root / "meshd-data")


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:
        return subprocess.Popen([sys.executable, "-m", "meshd", *args],
                                stdout=subprocess.DEVNULL, stderr=stderr)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def control_port(proc: subprocess.Popen[bytes], log: Path, seen: int = 0) -> int:
    """The port of the `seen`-th `control.listen` line (0-based) once it is logged."""
    deadline = time.monotonic() + 20
    while True:
        found = re.findall(r"control\.listen address=127\.0\.0\.1:(\d+)", log.read_text())
        if len(found) > seen:
            return int(found[seen])
        if proc.poll() is not None:
            raise RuntimeError(f"meshd server exited {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no control.listen: {log.read_text()}")
        time.sleep(0.05)


@pytest.fixture
def server(lab: Lab, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    log = tmp_path / "server.log"
    proc = start(lab.server_args(), log)
    try:
        yield proc, control_port(proc, log), log
    finally:
        stop(proc)


def test_control_is_off_by_default_and_printed_by_config() -> None:
    result = subprocess.run([sys.executable, "-m", "meshd", "config"], capture_output=True,
                            text=True, check=True)
    assert "control:\n  enabled: false\n  address: 0.0.0.0:20004\n" in result.stdout
    assert "overlayCidr: 100.64.0.0/16" in result.stdout


@pytest.mark.parametrize(("yaml", "args", "error"), [
    ("", ["--control"], "control: caFile, certFile, keyFile required"),
    ("control: {overlayCidr: 10.0.0.0/33}\n", [], "control.overlayCidr: expected an IPv4"),
    ("control: {address: nowhere}\n", [], "control: address: expected host:port"),
    ("control: {keepaliveS: 20}\n", [], "idleTimeoutS must be longer than keepaliveS"),
    ("control: {turnServers: ['h:1/sctp']}\n", [], "turnServers[0]"),
])
def test_configuration_errors_are_one_line(tmp_path: Path, yaml: str, args: list[str],
                                           error: str) -> None:
    config = tmp_path / "meshd.yaml"
    config.write_text(yaml)
    result = subprocess.run([sys.executable, "-m", "meshd", "server", "--config", str(config),
                             "--stun-port", "0", "--stun-alt-port", "0", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert error in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_certificate_files_are_named(lab: Lab, tmp_path: Path) -> None:
    args = lab.server_args()
    args[args.index("--control-cert") + 1] = str(tmp_path / "nope.crt")
    result = subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert f"control: {tmp_path / 'nope.crt'}: missing" in result.stderr


def test_one_data_dir_one_server(lab: Lab, server: tuple[subprocess.Popen[bytes], int, Path],
                                 tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "meshd", *lab.server_args()],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "is in use by another meshd server" in result.stderr


class Agent:
    def __init__(self, lab: Lab, node: str, port: int, seed: int) -> None:
        self.events: asyncio.Queue[ControlEvent] = asyncio.Queue()
        config = ControlClientConfig(bytes([seed]) * 32, first_retry_s=0.1, max_retry_s=1.0)
        self.connector = ControlConnector(
            ControlClient(config, random.Random(seed)), "127.0.0.1", port,
            agent_tls_context(kubeconfig=lab.out / f"{node}.kubeconfig"),
            on_event=self.events.put_nowait)
        self.connector.start()

    async def welcomed(self, timeout: float) -> Welcomed:
        async def wait() -> Welcomed:
            while not isinstance(event := await self.events.get(), Welcomed):
                pass
            return event
        return await asyncio.wait_for(wait(), timeout)


def test_server_crash_and_restart_agents_keep_their_addresses(
        lab: Lab, server: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    proc, port, log = server

    async def main() -> None:
        one, two = Agent(lab, "edge-1", port, 1), Agent(lab, "edge-2", port, 2)
        try:
            before = {(await one.welcomed(10)).overlay, (await two.welcomed(10)).overlay}
            assert (lab.data / REGISTRY_FILE).exists()
            os.kill(proc.pid, signal.SIGKILL)  # a crash: no goodbye, connections reset
            await asyncio.to_thread(proc.wait, 10)
            restarted = start(lab.server_args(port), log)
            try:
                begun = time.monotonic()
                await asyncio.to_thread(control_port, restarted, log, 1)
                listening = time.monotonic()
                after = {(await one.welcomed(10)).overlay, (await two.welcomed(10)).overlay}
                # Agents are back within their capped backoff (1 s here) of the listener.
                assert time.monotonic() - listening < 2.0
                assert time.monotonic() - begun < 10
                assert after == before
            finally:
                stop(restarted)
        finally:
            await one.connector.close()
            await two.connector.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    text = log.read_text()
    assert text.count("control.hello") == 4 and "control.stop" in text
