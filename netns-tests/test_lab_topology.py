"""Topology files: good ones load, bad ones give one line naming the file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from netlab import Topology
from netlab.nat import nat_ruleset

from edgeweave.config import ConfigError

pytestmark = pytest.mark.nonroot
TOPOLOGIES = Path(__file__).parent / "topologies"


def base() -> dict[str, Any]:
    return {
        "name": "t",
        "segments": {"internet": {"subnet": "203.0.113.0/24"}, "lan": {"subnet": "10.1.0.0/24"}},
        "routers": {"r": {"wan": "internet", "lan": ["lan"], "nat": "symmetric"}},
        "hosts": {"a": {"segment": "lan", "pods": 1}, "s": {"segment": "internet"}},
    }


def test_shipped_topologies_load() -> None:
    for path in TOPOLOGIES.glob("*.yaml"):
        topo = Topology.load(path)
        assert topo.segments, path


def test_defaults_and_gateways() -> None:
    topo = Topology.from_dict(base())
    assert topo.routers["r"].udp_timeout == 30
    assert topo.routers["r"].firewall is True
    assert topo.gateway_of("lan") == "r"
    assert topo.gateway_of("internet") is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["routers"]["r"].update(nat="fullcone"), "routers.r.nat: expected one of"),
        (lambda d: d["routers"]["r"].update(wan="nowhere"), "routers.r.wan: unknown segment"),
        (lambda d: d["hosts"]["a"].update(segment="x"), "hosts.a.segment: unknown segment"),
        (lambda d: d["hosts"]["a"].update(addresses=["10.2.0.5"]), "not a host address"),
        (lambda d: d["hosts"]["a"].update(addresses=["10.1.0.1"]), "already used by routers.r"),
        (lambda d: d["hosts"]["a"].update(bogus=1), "hosts.a: unknown field 'bogus'"),
        (lambda d: d["segments"]["lan"].update(subnet="10.1.0.0/33"), "segments.lan.subnet"),
        (lambda d: d["segments"].update(x={"subnet": "10.1.0.128/25"}), "overlaps"),
        (lambda d: d.update(name="Bad_Name"), "name: 'Bad_Name'"),
        (lambda d: d["routers"]["r"].update(udpTimeout=0), "udpTimeout"),
        (lambda d: d["routers"]["r"].update(lan=[]), "lan: a router needs"),
        (lambda d: d["hosts"]["a"].update(podSubnet="10.1.0.0/16"), "hosts.a.podSubnet"),
        (lambda d: d["hosts"]["a"].update(link={"lossPercent": 100}), "lossPercent"),
        (lambda d: d.pop("segments"), "segments: required field is missing"),
    ],
)
def test_bad_topology_names_the_field(mutate: Any, message: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(data, source="lab.yaml")
    assert str(err.value).startswith("lab.yaml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_router_loop_is_refused() -> None:
    data = base()
    data["segments"]["lan2"] = {"subnet": "10.2.0.0/24"}
    data["routers"] = {
        "r1": {"wan": "lan", "lan": ["lan2"]},
        "r2": {"wan": "lan2", "lan": ["lan"]},
    }
    with pytest.raises(ConfigError, match="loop"):
        Topology.from_dict(data)


@pytest.mark.parametrize(
    "content",
    ["name: [unclosed\n", "- just\n- a list\n", "name: x\nsegments: {a: {subnet: nope}}\n"],
)
def test_cli_check_bad_file_is_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "netlab", "check", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_check_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "netlab", "check", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "no.yaml: cannot read" in proc.stderr


def test_nat_rules_per_kind() -> None:
    import ipaddress

    def rules(kind: Any, hairpin: bool = False) -> str:
        return nat_ruleset(kind, wan_if="wan", lan_ifs=["lan0"],
                           wan_ip=ipaddress.IPv4Address("203.0.113.2"),
                           lan_subnets=[ipaddress.IPv4Network("10.1.0.0/24")],
                           hairpin=hairpin, udp_timeout=30, firewall=True)

    assert "fully-random" in rules("symmetric")
    assert "fully-random" not in rules("port-restricted")
    assert "@mapping" not in rules("port-restricted")
    assert "@contacted" in rules("restricted")
    assert "dnat ip to udp dport map @mapping" in rules("full-cone")
    assert "snat ip to 203.0.113.2" in rules("port-restricted", hairpin=True)
    assert "masquerade" not in rules("none")
    assert 'iifname "wan" drop' in rules("full-cone")
