"""The `relay:` section of meshd's configuration and the `meshd server` relay flags."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeweave.config import ConfigError, load_config
from meshd.cli import main
from meshd.config import MeshdConfig, RelayConfig, StunConfig


def test_defaults_leave_the_relay_off() -> None:
    relay = MeshdConfig().relay
    assert relay == RelayConfig()
    assert not relay.enabled and relay.auth_secret_file is None
    assert (relay.min_port, relay.max_port, relay.quota_per_node) == (49152, 65535, 10)


def test_load_and_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(
        "relay:\n"
        "  enabled: true\n"
        "  realm: example.org\n"
        "  authSecretFile: /etc/edgeweave/turn-secret\n"
        "  relayIp: 198.51.100.1\n"
        "  externalIp: 203.0.113.1\n"
        "  minPort: 50000\n"
        "  maxPort: 50999\n"
        "  tcp: false\n"
        "  quotaPerNode: 3\n"
        "  bytesPerSPerNode: 1000000\n"
        "  deniedPeers: [10.0.0.0/8, 'fd00::/8']\n"
        "  metricsAddress: 127.0.0.1:20005\n"
        "  fastPath: false\n")
    relay = load_config(MeshdConfig, path).relay
    assert relay.enabled and relay.realm == "example.org"
    assert relay.auth_secret_file == Path("/etc/edgeweave/turn-secret")
    assert relay.denied_peers == ("10.0.0.0/8", "fd00::/8")
    assert (relay.tcp, relay.bytes_per_s_per_node, relay.fast_path) == (False, 1_000_000, False)
    assert RelayConfig().fast_path
    assert main(["--config", str(path), "config"]) == 0
    out = capsys.readouterr().out
    assert "relay:\n  enabled: true\n  realm: example.org\n" in out
    assert "  externalIp: 203.0.113.1\n" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("relay:\n  minPort: 60000\n  maxPort: 50000\n", "relay: minPort/maxPort"),
        ("relay:\n  maxPort: 70000\n", "relay: minPort/maxPort"),
        ("relay:\n  relayIp: somewhere\n", "relay: relayIp: 'somewhere' is not an IP"),
        ("relay:\n  deniedPeers: [10.0.0.0/33]\n", "relay: deniedPeers"),
        ("relay:\n  metricsAddress: nope\n", "relay: metricsAddress"),
        ("relay:\n  realm: ''\n", "relay: realm must not be empty"),
        ("relay:\n  enable: true\n", "unknown field 'enable'"),
        ("relay:\n  quotaPerNode: many\n", "relay.quotaPerNode: expected an integer"),
        ("relay:\n  bytesPerSPerNode: -1\n", "relay: bytesPerSPerNode must not be negative"),
        ("relay:\n  defaultLifetimeS: 7200\n", "relay: need 0 < defaultLifetimeS"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(MeshdConfig, path)


def test_server_config_resolution() -> None:
    stun = StunConfig(addresses=("198.51.100.1",))
    core = RelayConfig(enabled=True, quota_per_node=4).server_config((b"s",), stun)
    assert (core.relay_ip, core.external_ip, core.quota_per_node) == ("198.51.100.1", None, 4)
    assert core.software == stun.software
    with pytest.raises(ValueError, match="wildcard"):
        RelayConfig().server_config((b"s",), StunConfig())
    core = RelayConfig(external_ip="203.0.113.9").server_config((b"s",), StunConfig())
    assert (core.relay_ip, core.external_ip) == ("0.0.0.0", "203.0.113.9")
    with pytest.raises(ValueError, match="quotaPerNode"):
        RelayConfig(quota_per_node=0)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--relay"], "relay: authSecretFile is required"),
        (["--relay", "--relay-secret-file", "/nonexistent/secret"],
         "relay: authSecretFile /nonexistent/secret: No such file or directory"),
        (["--relay", "--relay-secret-file", "{empty}"], "no secret in the file"),
        (["--relay", "--relay-secret-file", "{secret}", "--stun-address", "0.0.0.0"],
         "relay: relayIp 0.0.0.0 is a wildcard"),
        (["--relay", "--relay-secret-file", "{secret}", "--relay-ip", "x"],
         "relay: relayIp: 'x' is not an IP address"),
    ],
)
def test_server_relay_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          args: list[str], error: str) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "secret").write_text("s3cret\n")
    argv = ["server", *[a.format(empty=tmp_path / "empty", secret=tmp_path / "secret")
                        for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshd: error: ") and err.count("\n") == 1, err
    assert error in err


@pytest.mark.parametrize("ports", ["1-", "5000-4000", "0-10", "a-b", "70000-70001"])
def test_bad_relay_ports_flag(ports: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["server", "--relay-ports", ports])
    assert exc.value.code == 2
    assert "--relay-ports" in capsys.readouterr().err


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_server_with_relay_flags_serves_metrics_and_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    metrics_port = free_tcp_port()
    config = tmp_path / "meshd.yaml"
    config.write_text(f"relay:\n  metricsAddress: 127.0.0.1:{metrics_port}\n")
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshd", "server", "--config", str(config),
             "--stun-address", "127.0.0.1", "--stun-port", "0", "--stun-alt-port", "0",
             "--relay", "--relay-secret-file", str(tmp_path / "secret"),
             "--relay-ports", "50000-50099"],
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 15
        while "turn.metrics" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        text = log.read_text()
        assert "turn.relay ip=127.0.0.1 advertised=127.0.0.1 ports=50000-50099" in text
        assert text.count("stun.listen") == 2 and "turn.listen" in text
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        assert "meshd_relay_allocations 0" in metrics
        assert "meshd_stun_requests_total 0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "turn.stop allocations=0 bytes_in=0 bytes_out=0 auth_failures=0" in text
    assert "Traceback" not in text
