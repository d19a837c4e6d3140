"""meshd.proxy's pure parts: the session table, the sockaddr codec, routing, the catalog file,
the configuration, and the command line's error handling."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeweave.config import ConfigError, dump_yaml, from_mapping
from meshd.proxy.catalog_file import CatalogFileError, dump_catalog, load_catalog, parse_catalog
from meshd.proxy.config import ProxyConfig, ProxyFile
from meshd.proxy.routing import find_port
from meshd.proxy.sessions import SessionTable
from meshd.proxy.sockopt import (
    IP_ORIGDSTADDR,
    SOL_IP,
    AddressError,
    encode_sockaddr_in,
    origdst_from_ancillary,
    parse_sockaddr_in,
)

# -- sessions ----------------------------------------------------------------------------------


def test_sessions_expire_after_idle_time_and_touch_extends() -> None:
    table: SessionTable[str, int] = SessionTable(idle_s=30, max_entries=10)
    table.add("a", 1, now=0)
    table.add("b", 2, now=10)
    table.touch("a", now=20)
    assert table.next_deadline() == 40  # b: last seen at 10
    assert table.expire(39.9) == []
    assert table.expire(40) == [("b", 2)]
    assert table.expire(49.9) == [] and table.expire(50) == [("a", 1)]
    assert len(table) == 0 and table.next_deadline() is None


def test_sessions_are_bounded_least_recently_used_first() -> None:
    table: SessionTable[int, str] = SessionTable(idle_s=30, max_entries=3)
    for i in range(3):
        table.add(i, f"s{i}", now=i)
    table.touch(0, now=5)
    assert table.add(3, "s3", now=6) == [(1, "s1")]
    assert sorted(k for k, _ in table.items()) == [0, 2, 3]
    assert table.pop(2) == "s2" and table.pop(2) is None
    with pytest.raises(ValueError):
        SessionTable(idle_s=0, max_entries=1)


# -- sockaddr_in -------------------------------------------------------------------------------


def test_sockaddr_in_vectors() -> None:
    # AF_INET (2, host order), port 53 (network order), 10.96.0.10, 8 zero bytes.
    raw = (socket.AF_INET).to_bytes(2, sys.byteorder) + b"\x00\x35" + b"\x0a\x60\x00\x0a" \
        + bytes(8)
    assert parse_sockaddr_in(raw) == ("10.96.0.10", 53)
    assert encode_sockaddr_in(("10.96.0.10", 53)) == raw
    assert origdst_from_ancillary([(SOL_IP, IP_ORIGDSTADDR, raw)]) == ("10.96.0.10", 53)
    assert origdst_from_ancillary([(41, 74, raw)]) is None
    with pytest.raises(AddressError):
        parse_sockaddr_in(b"\x02\x00")
    with pytest.raises(AddressError):
        parse_sockaddr_in((10).to_bytes(2, sys.byteorder) + bytes(14))


# -- routing and the catalog file ----------------------------------------------------------

CATALOG = {"node": "n1", "revision": 7, "services": [
    {"namespace": "default", "name": "web", "clusterIPs": ["10.96.0.10"],
     "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
     "endpoints": [{"ip": "172.17.0.2", "node": "n1", "target": "default/web-0",
                    "ports": [{"name": "http", "port": 8080}]}],
     "sessionAffinityTimeoutS": 10800, "lbPolicy": "consistent-hash"},
    {"namespace": "default", "name": "theirs", "clusterIPs": ["10.96.0.11"], "proxied": False,
     "ports": [{"port": 80}]},
]}


def test_find_port_by_ip_port_and_protocol() -> None:
    catalog = parse_catalog(CATALOG)
    found = find_port(catalog, "10.96.0.10", 53, "UDP")
    assert found is not None and found[1].name == "dns"
    assert find_port(catalog, "10.96.0.10", 53, "TCP") is None
    assert find_port(catalog, "10.96.0.11", 80, "TCP") is None  # another proxy's
    assert find_port(catalog, "10.96.0.99", 80, "TCP") is None


def test_catalog_file_round_trip(tmp_path: Path) -> None:
    catalog = parse_catalog(CATALOG)
    web = catalog.services["default/web"]
    assert web.lb_policy == "consistent-hash" and web.session_affinity_timeout_s == 10800
    assert web.ports[0].target_port == 80 and catalog.revision == "7"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dump_catalog(catalog)))
    assert load_catalog(path) == catalog


@pytest.mark.parametrize(("data", "message"), [
    ([], "expected an object"),
    ({"services": [{"name": "x"}]}, "services[0].namespace: required"),
    ({"services": [{"namespace": "a", "name": "b", "ports": [{"port": "80"}]}]},
     "ports[0].port: unexpected '80'"),
    ({"services": [{"namespace": "a", "name": "b", "ports": [{"port": 1, "protocol": "X"}]}]},
     "ports[0].protocol"),
    ({"services": [{"namespace": "a", "name": "b", "lbPolicy": "fastest"}]}, "lbPolicy"),
    ({"services": [{"namespace": "a", "name": "b", "endpoints": [{"ip": "1.2.3.4",
                                                                  "ready": "yes"}]}]},
     "endpoints[0].ready"),
])
def test_catalog_file_errors_name_the_field(data: object, message: str) -> None:
    with pytest.raises(CatalogFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_catalog(data, "c.json")


# -- configuration and the command ----------------------------------------------------------


def test_config_reads_camel_case_yaml_and_checks_values() -> None:
    config = from_mapping(ProxyFile, {"proxy": {
        "port": 15001, "connectTimeoutS": 0.5, "maxConnectionsPerService": 10,
        "relay": "copy", "udp": {"sessionIdleS": 5}, "lb": {"ejectionMaxS": 60},
        "rules": {"tproxyMark": 0x40000, "tproxyMask": 0x40000, "routeTable": 100}}},
        source="p.yaml").proxy
    assert (config.port, config.relay, config.udp.session_idle_s) == (15001, "copy", 5.0)
    assert config.lb.ejection_max_s == 60 and config.rules.mark == "0x40000/0x40000"
    assert "connectTimeoutS: 1.0" in dump_yaml(ProxyConfig())
    for bad, message in [({"relay": "zero"}, "relay"), ({"port": 70000}, "port"),
                         ({"udp": {"sessionIdleS": 0}}, "sessionIdleS"),
                         ({"lb": {"maxCandidates": 0}}, "maxCandidates"),
                         ({"bindAddress": "::"}, "bindAddress")]:
        with pytest.raises(ConfigError, match=message):
            from_mapping(ProxyFile, {"proxy": bad}, source="p.yaml")


def run_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd.proxy", *args], capture_output=True,
                          text=True, timeout=30, check=False)


def test_command_errors_are_one_line(tmp_path: Path) -> None:
    missing = run_proxy("--catalog", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("meshd-proxy: error: ")
    assert "cannot read" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"services": [{"name": 1}]}')
    result = run_proxy("--catalog", str(bad))
    assert result.returncode == 2 and "services[0].name" in result.stderr
    config = tmp_path / "p.yaml"
    config.write_text("proxy:\n  relay: fast\n")
    result = run_proxy("--catalog", str(bad), "--config", str(config))
    assert result.returncode == 2 and "proxy.relay" in result.stderr
