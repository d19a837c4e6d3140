"""meshd.cli: the `meshd` command, as an operator runs it (subprocess) and in-process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeweave import __version__
from meshd.cli import main

MeshdCli = Callable[..., subprocess.CompletedProcess[str]]
JSON_KEYS = {
    "server", "local", "public", "nat", "mapping", "filtering", "hairpin", "port_preserved",
    "nat_type", "can_hole_punch_with", "relay_with", "notes",
}


def unused_port() -> int:
    """A UDP port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("meshd: error: ")
    return lines[0]


# --- subprocess: what an operator sees -----------------------------------------------------------


def test_netcheck_json_against_meshd_server(
    meshd_server: tuple[str, int], meshd_cli: MeshdCli
) -> None:
    done = meshd_cli("netcheck", "--server", f"127.0.0.1:{meshd_server[1]}", "--json")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    report = json.loads(done.stdout)
    assert set(report) == JSON_KEYS
    assert report["server"] == f"127.0.0.1:{meshd_server[1]}"
    assert report["local"] == report["public"]
    assert report["local"].startswith("127.0.0.1:")
    assert (report["nat"], report["mapping"], report["filtering"], report["nat_type"]) == (
        False, "endpoint-independent", "endpoint-independent", "public"
    )
    assert report["hairpin"] is True
    assert report["port_preserved"] is True
    assert report["can_hole_punch_with"] == [
        "public", "full-cone", "restricted", "port-restricted", "symmetric"
    ]
    assert report["relay_with"] == []


def test_netcheck_text_against_meshd_server(
    meshd_server: tuple[str, int], meshd_cli: MeshdCli
) -> None:
    done = meshd_cli("netcheck", "--server", f"127.0.0.1:{meshd_server[1]}", "--bind",
                     "127.0.0.1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"server          127.0.0.1:{meshd_server[1]}"
    assert "NAT             no" in lines
    assert "NAT type        public" in lines
    assert "can hole-punch with: public, full-cone, restricted, port-restricted, symmetric" in (
        lines
    )
    assert "needs relay with: (none)" in lines


def test_unreachable_server_is_one_line(meshd_cli: MeshdCli) -> None:
    port = unused_port()
    started = time.monotonic()
    done = meshd_cli("netcheck", "--server", f"127.0.0.1:{port}", "--json", "--timeout", "0.5")
    assert time.monotonic() - started < 10
    assert one_error_line(done) == (
        f"meshd: error: STUN server 127.0.0.1:{port} did not answer (2 requests over 0.5 s)"
    )


def test_bad_server_is_one_line(meshd_cli: MeshdCli) -> None:
    # (Unresolvable names are tested in test_netcheck_runner with a fake resolver: tests send
    # no DNS queries.)
    line = one_error_line(meshd_cli("netcheck", "--server", "127.0.0.1:99999"))
    assert line == (
        "meshd: error: bad STUN server address '127.0.0.1:99999': "
        "bad port '99999' in '127.0.0.1:99999'"
    )


def test_server_bind_failure_is_one_line(meshd_cli: MeshdCli) -> None:
    # 192.0.2.1 (TEST-NET-1) is not an address of this host: EADDRNOTAVAIL.
    line = one_error_line(meshd_cli("server", "--stun-address", "192.0.2.1", "--stun-port", "0"))
    assert line.startswith("meshd: error: cannot bind UDP 192.0.2.1:0: ")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_exits_0_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshd", "server", "--stun-address", "127.0.0.1",
             "--stun-port", "0", "--stun-alt-port", "0"],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 15
        while log.read_text().count("stun.listen") < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "stun.stop requests=0 responses=0 errors=0 dropped=0" in text
    assert "Traceback" not in text


def test_version_everywhere(meshd_cli: MeshdCli) -> None:
    for args in (["--version"], ["netcheck", "--version"], ["server", "--version"]):
        done = meshd_cli(*args)
        assert done.returncode == 0
        assert done.stdout.strip() == f"meshd (edgeweave) {__version__}"


# --- in-process: option handling -----------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("netcheck", "server", "config", "--config", "--log-level"):
        assert command in out


def test_netcheck_needs_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netcheck"]) == 2
    assert capsys.readouterr().err == (
        "meshd: error: no STUN server: give --server HOST[:PORT] or set netcheck.server\n"
    )


def test_netcheck_server_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = unused_port()
    config = tmp_path / "meshd.yaml"
    config.write_text(
        f"netcheck:\n  server: 127.0.0.1:{port}\n  giveUpS: 0.2\n  initialRtoS: 0.05\n"
    )
    assert main(["netcheck", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"meshd: error: STUN server 127.0.0.1:{port} did not answer (3 requests over 0.2 s)\n"
    )


def test_netcheck_bad_bind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netcheck", "--server", "127.0.0.1", "--bind", "nope"]) == 2
    assert capsys.readouterr().err == "meshd: error: --bind: 'nope' is not an IP address\n"


@pytest.mark.parametrize("timeout", ["0", "-1", "soon"])
def test_netcheck_bad_timeout(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["netcheck", "--server", "127.0.0.1", "--timeout", timeout])
    assert exit_info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_server_rejects_three_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["server"] + [a for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3")
                         for a in ("--stun-address", ip)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "meshd: error: stun: addresses: expected 1 or 2 IPs, got 3\n"
    )


def test_config_prints_effective_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "meshd.yaml"
    config.write_text("stun:\n  addresses: [127.0.0.1, 127.0.0.2]\n  altPort: 4000\n")
    assert main(["--config", str(config), "config"]) == 0
    out = capsys.readouterr().out
    assert "addresses:\n  - 127.0.0.1\n  - 127.0.0.2\n" in out
    assert "altPort: 4000" in out
    assert "giveUpS: 2.5" in out


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "meshd.yaml"
    config.write_text("stun:\n  port: x\n")
    assert main(["config", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"meshd: error: {config}: stun.port: expected an integer, got 'x'\n"
    )
