"""The agent's `tunnel:` section, `meshd status`'s peer table and `meshd ping`'s refusals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeweave.config import ConfigError, dump_yaml, load_config
from meshd.config import MeshdConfig, NatProbeSettings, TunnelConfig
from meshd.status import render_status
from meshd.tunnel.natprobe import NatProbeConfig


def test_tunnel_is_off_by_default_and_round_trips(tmp_path: Path) -> None:
    assert MeshdConfig().tunnel == TunnelConfig()
    assert not TunnelConfig().enabled and TunnelConfig().listen_port == 0
    path = tmp_path / "meshd.yaml"
    path.write_text("tunnel:\n  enabled: true\n  server: 198.51.100.7\n  connectPort: 40013\n"
                    "  directRoutable: false\n  keepaliveS: 10\n")
    config = load_config(MeshdConfig, path)
    assert config.tunnel.enabled and config.tunnel.connect_port == 40013
    assert not config.tunnel.direct_routable and config.tunnel.keepalive_s == 10
    assert (config.tunnel.server_address().host, config.tunnel.server_address().port) == (
        "198.51.100.7", 20004)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(config))
    assert load_config(MeshdConfig, again) == config


@pytest.mark.parametrize("text,message", [
    ("tunnel: {enabled: true}", "server: required"),
    ("tunnel: {server: 'host:99999'}", "server:"),
    ("tunnel: {stunPort: 0}", "stunPort"),
    ("tunnel: {mtu: 100}", "mtu"),
    ("tunnel: {keepaliveS: 0}", "keepaliveS"),
    ("tunnel: {interface: 'a-very-long-interface-name'}", "interface"),
    ("tunnel: {prepunchTtl: 300}", "prepunchTtl"),
    ("tunnel: {busyPollUs: -1}", "busyPollUs"),
    ("tunnel: {busyPollUs: 20000}", "busyPollUs"),
    ("tunnel: {bogus: 1}", "unknown field 'bogus'"),
])
def test_tunnel_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(MeshdConfig, path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_nat_probe_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert TunnelConfig().nat_probe == NatProbeSettings(True)
    # The agent builds meshd.tunnel.natprobe.NatProbeConfig from these: same defaults.
    probe = NatProbeConfig()
    defaults = NatProbeSettings()
    assert (defaults.first_delay_s, defaults.min_interval_s, defaults.retry_s,
            defaults.max_retry_s) == (probe.first_delay_s, probe.min_interval_s,
                                      probe.retry_s, probe.max_retry_s)
    path = tmp_path / "meshd.yaml"
    path.write_text("tunnel:\n  natProbe: {enabled: false, minIntervalS: 300, retryS: 60, "
                    "maxRetryS: 3600, firstDelayS: 2}\n")
    config = load_config(MeshdConfig, path)
    assert config.tunnel.nat_probe == NatProbeSettings(False, 2.0, 300.0, 60.0, 3600.0)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(config))
    assert load_config(MeshdConfig, again) == config


@pytest.mark.parametrize("text,message", [
    ("{enabled: 'no'}", "tunnel.natProbe.enabled: expected true"),
    ("{firstDelayS: -1}", "tunnel.natProbe: firstDelayS: -1"),
    ("{minIntervalS: 0}", "tunnel.natProbe: minIntervalS: 0"),
    ("{retryS: 0.5}", "tunnel.natProbe: retryS: 0.5"),
    ("{retryS: 120, maxRetryS: 60}", "tunnel.natProbe: maxRetryS: 60"),
    ("{intervalS: 5}", "unknown field 'intervalS'"),
])
def test_nat_probe_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "meshd.yaml"
    path.write_text(f"tunnel:\n  natProbe: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(MeshdConfig, path)
    assert message in str(info.value)


def test_status_renders_the_peer_table() -> None:
    doc = {"node": "n1", "nodegroup": "", "revision": "7", "rulesInPlace": True, "services": [],
           "tunnel": {"interface": "mesh0", "overlay": "100.64.0.5/16", "local": "10.0.0.2:41641",
                      "relayed": "198.51.100.7:50001", "control": "ready", "connectPort": 40003,
                      "peers": [
                          {"node": "n2", "overlay": "100.64.0.9", "online": True,
                           "state": "direct", "path": "direct", "endpoint": "203.0.113.5:4000",
                           "rttMs": 1.25, "bytesIn": 10, "bytesOut": 20,
                           "lastHandshake": time.time() - 3, "timeToDirectS": 0.2,
                           "session": "established"},
                          {"node": "n3", "overlay": "100.64.0.10", "online": False,
                           "state": "idle", "path": "none", "endpoint": "", "rttMs": None,
                           "bytesIn": 0, "bytesOut": 0, "lastHandshake": None,
                           "timeToDirectS": None, "session": "none"}]}}
    text = render_status(doc)
    assert "tunnel mesh0 100.64.0.5/16" in text and "relay 198.51.100.7:50001" in text
    row = next(line for line in text.splitlines() if line.startswith("n2 "))
    assert "direct" in row and "203.0.113.5:4000" in row and "1.2 ms" in row and "10/20" in row
    assert "s ago" in row
    row3 = next(line for line in text.splitlines() if line.startswith("n3 "))
    assert "none (offline)" in row3
