"""meshd.dns.config: defaults, YAML keys, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeweave.config import ConfigError, dump_yaml, load_config
from meshd.dns.config import DnsConfig, parse_upstream


def test_defaults() -> None:
    config = load_config(DnsConfig, None)
    assert (config.address, config.port, config.domain) == ("169.254.96.16", 53, "cluster.local")
    assert (config.ttl_s, config.negative_ttl_s, config.edns_udp_size) == (5, 5, 1232)
    assert config.upstreams == () and config.resolv_conf == Path("/etc/resolv.conf")


def test_yaml_camel_case_and_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "dns.yaml"
    path.write_text("address: 127.0.0.53\nport: 5353\ndomain: edge.local\nttlS: 30\n"
                    "upstreams: [10.0.0.2, '10.0.0.3:5353', '[fd00::1]:53', 'fd00::2']\n"
                    "upstreamTimeoutS: 0.5\nforwardAttempts: 2\ncacheSize: 10\n"
                    "tcpIdleTimeoutS: 3\nresolvConf: /tmp/resolv.conf\n")
    config = load_config(DnsConfig, path)
    assert config.upstream_addresses() == (("10.0.0.2", 53), ("10.0.0.3", 5353),
                                           ("fd00::1", 53), ("fd00::2", 53))
    assert config.ttl_s == 30 and config.upstream_timeout_s == 0.5
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(config))
    assert load_config(DnsConfig, again) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("address: nowhere\n", "address: 'nowhere' is not an IP address"),
        ("port: 70000\n", "port: expected 0..65535"),
        ("domain: 'a..b'\n", "domain: bad label length"),
        ("domain: '.'\n", "domain: must not be the root"),
        ("upstreams: ['dns.google']\n", "upstreams: 'dns.google' is not an IP address"),
        ("upstreams: ['10.0.0.1:0']\n", "upstreams: '10.0.0.1:0'"),
        ("ttlS: -1\n", "ttlS: expected 0..2147483647"),
        ("upstreamTimeoutS: 0\n", "upstreamTimeoutS: must be positive"),
        ("forwardAttempts: 0\n", "forwardAttempts: must be at least 1"),
        ("cacheSize: -5\n", "cacheSize: must not be negative"),
        ("ednsUdpSize: 100\n", "ednsUdpSize: expected 512..65535"),
        ("ttl: 5\n", "unknown field 'ttl'"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "dns.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(DnsConfig, path)


def test_parse_upstream() -> None:
    assert parse_upstream("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_upstream("[2001:DB8::1]:5353") == ("2001:db8::1", 5353)
    with pytest.raises(ValueError):
        parse_upstream("[2001:db8::1")
