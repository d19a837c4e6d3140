"""Every console script answers --help, --version and --config the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeweave import __version__

COMMANDS = ["meshd", "cloudcore", "edgecore"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_and_version(cmd: str) -> None:
    help_ = run(cmd, "--help")
    assert help_.returncode == 0
    assert "--config" in help_.stdout
    version = run(cmd, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"{cmd} (edgeweave) {__version__}"


@pytest.mark.parametrize("cmd", ["cloudcore", "edgecore"])
def test_print_config_and_bad_config(cmd: str, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("dataDir: /srv/x\n")
    out = run(cmd, "--config", str(good), "--print-config")
    assert out.returncode == 0
    assert "dataDir: /srv/x" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataDir: [1\n")
    out = run(cmd, "--config", str(bad), "--print-config")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert f"{cmd}: error: {bad}: invalid YAML" in out.stderr


@pytest.mark.parametrize("cmd", ["edgecore"])
def test_running_says_what_is_missing(cmd: str) -> None:
    out = run(cmd)
    assert out.returncode == 2
    assert "no component" in out.stderr
    assert "Traceback" not in out.stderr
