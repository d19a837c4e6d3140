"""Per NAT kind and hairpin setting, `meshd netcheck` observes what the router was built to do.

One small lab per case: a STUN server (`meshd server`, two addresses) on the internet segment,
one NAT router, one node behind it; plus a node on the internet itself (no NAT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from natcheck import netcheck, start_stun
from netlab import Lab
from netlab.nat import EXPECTED
from netlab.topology import NAT_KINDS


def one_nat(kind: str, hairpin: bool) -> dict[str, Any]:
    return {
        "name": "nat",
        "segments": {"internet": {"subnet": "203.0.113.0/24"},
                     "lan": {"subnet": "192.168.7.0/24"}},
        "routers": {"nat": {"wan": "internet", "lan": ["lan"], "nat": kind,
                            "hairpin": hairpin}},
        "hosts": {"stun": {"segment": "internet",
                           "addresses": ["203.0.113.10", "203.0.113.11"]},
                  "public": {"segment": "internet"},
                  "node": {"segment": "lan"}},
    }


@pytest.mark.parametrize("hairpin", [False, True], ids=["nohairpin", "hairpin"])
@pytest.mark.parametrize("kind", [k for k in NAT_KINDS if k != "none"])
def test_netcheck_sees_configured_behaviour(make_lab: Callable[[Any], Lab], kind: Any,
                                            hairpin: bool) -> None:
    lab = make_lab(one_nat(kind, hairpin))
    start_stun(lab)
    report = netcheck(lab, "node", lab.addr("stun"))
    mapping, filtering, nat_type = EXPECTED[kind]
    print(f"{kind} hairpin={hairpin}: {report}")
    assert report["nat"] is True
    assert report["public"].split(":")[0] == lab.addr("nat")
    assert report["local"].split(":")[0] == lab.addr("node")
    assert (report["mapping"], report["filtering"], report["nat_type"]) == (
        mapping, filtering, nat_type)
    assert report["hairpin"] is hairpin
    assert report["port_preserved"] is (kind != "symmetric")
    assert ("symmetric" in report["relay_with"]) is (kind in ("port-restricted", "symmetric"))


def test_public_host_sees_no_nat(make_lab: Callable[[Any], Lab]) -> None:
    lab = make_lab(one_nat("port-restricted", False))
    start_stun(lab)
    report = netcheck(lab, "public", lab.addr("stun"))
    assert report["nat"] is False
    assert report["public"] == report["local"]
    assert (report["mapping"], report["filtering"], report["nat_type"]) == EXPECTED["none"]
    assert report["relay_with"] == []


def test_double_nat_behaves_as_the_stricter_layer(make_lab: Callable[[Any], Lab]) -> None:
    spec = one_nat("full-cone", False)
    spec["segments"]["inner"] = {"subnet": "10.20.0.0/24"}
    spec["routers"]["cgnat"] = {"wan": "lan", "lan": ["inner"], "nat": "port-restricted"}
    spec["hosts"]["deep"] = {"segment": "inner"}
    lab = make_lab(spec)
    start_stun(lab)
    report = netcheck(lab, "deep", lab.addr("stun"))
    assert report["public"].split(":")[0] == lab.addr("nat")
    assert report["nat_type"] == "port-restricted"


def test_mapping_expires_after_udp_timeout(make_lab: Callable[[Any], Lab]) -> None:
    """The per-NAT UDP timeout is the conntrack timeout inside that router."""
    spec = one_nat("port-restricted", False)
    spec["routers"]["nat"]["udpTimeout"] = 7
    lab = make_lab(spec)
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        value = lab.run("nat", ["cat", f"/proc/sys/net/netfilter/{key}"]).stdout.strip()
        assert value == "7"
    start_stun(lab)
    netcheck(lab, "node", lab.addr("stun"))
    entries = lab.run("nat", ["conntrack", "-L", "-p", "udp"], check=False).stdout
    timeouts = [int(line.split()[2]) for line in entries.splitlines() if line.startswith("udp")]
    assert timeouts and max(timeouts) <= 7
