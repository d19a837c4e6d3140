"""meshd.config: defaults, YAML loading and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeweave.config import ConfigError, dump_yaml, load_config
from meshd.config import MeshdConfig, NetcheckConfig, StunConfig
from meshd.stun.transaction import RetransmitPolicy


def test_defaults() -> None:
    config = load_config(MeshdConfig, None)
    assert config.stun == StunConfig(("0.0.0.0",), 3478, 3479)
    assert config.netcheck.server is None
    assert config.netcheck.policy() == RetransmitPolicy(0.25, 4, 2.5)


def test_load_and_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(
        "stun:\n  addresses: [198.51.100.1, 198.51.100.2]\n  port: 3478\n  altPort: 3479\n"
        "netcheck:\n  server: stun.example.net\n  bind: 10.0.0.2\n  initialRtoS: 0.1\n"
        "  transmissions: 3\n  giveUpS: 1\n"
    )
    config = load_config(MeshdConfig, path)
    assert config.stun.addresses == ("198.51.100.1", "198.51.100.2")
    assert config.netcheck == NetcheckConfig("stun.example.net", "10.0.0.2", 0.1, 3, 1.0)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(config))
    assert load_config(MeshdConfig, again) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stun:\n  addresses: []\n", "stun: addresses: expected 1 or 2 IPs, got 0"),
        ("stun:\n  addresses: [1.2.3.4, '::1']\n", "same family"),
        ("stun:\n  addresses: [0.0.0.0, 1.2.3.4]\n", "non-wildcard"),
        ("stun:\n  addresses: [example.com]\n", "'example.com' is not an IP address"),
        ("stun:\n  port: 70000\n", "port: expected 0..65535"),
        ("stun:\n  port: 5000\n  altPort: 5000\n", "port and altPort are both 5000"),
        ("netcheck:\n  server: 'h:99999'\n", "netcheck: server: bad port"),
        ("netcheck:\n  bind: x\n", "bind: 'x' is not an IP address"),
        ("netcheck:\n  transmissions: 0\n", "transmissions must be at least 1"),
        ("netcheck:\n  giveUpS: 0\n", "must be positive"),
        ("netcheck:\n  timeout: 1\n", "unknown field 'timeout'"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(MeshdConfig, path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_ports_zero_allowed_for_ephemeral() -> None:
    assert StunConfig(("127.0.0.1",), 0, 0).port == 0
