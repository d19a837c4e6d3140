"""meshd.netcheck.report: the text table and the JSON object."""

from __future__ import annotations

import json
from dataclasses import replace

from meshd.netcheck.classify import Behaviour, NatType, NetcheckReport
from meshd.netcheck.report import render_text, to_json

REPORT = NetcheckReport(
    server=("198.51.100.1", 3478),
    local=("10.0.0.2", 5000),
    public=("203.0.113.1", 40000),
    nat=True,
    mapping=Behaviour.ENDPOINT_INDEPENDENT,
    filtering=None,
    hairpin=None,
    port_preserved=False,
    nat_type=NatType.UNKNOWN,
    can_hole_punch_with=(),
    relay_with=(),
    notes=("a note",),
)


def test_json_keys_and_values() -> None:
    assert json.loads(to_json(REPORT)) == {
        "server": "198.51.100.1:3478",
        "local": "10.0.0.2:5000",
        "public": "203.0.113.1:40000",
        "nat": True,
        "mapping": "endpoint-independent",
        "filtering": None,
        "hairpin": None,
        "port_preserved": False,
        "nat_type": "unknown",
        "can_hole_punch_with": [],
        "relay_with": [],
        "notes": ["a note"],
    }
    assert "\n" not in to_json(REPORT)


def test_json_ipv6_addresses() -> None:
    v6 = replace(REPORT, server=("2001:db8::1", 3478))
    assert json.loads(to_json(v6))["server"] == "[2001:db8::1]:3478"


def test_text_table() -> None:
    full = replace(
        REPORT,
        filtering=Behaviour.ADDRESS_AND_PORT_DEPENDENT,
        hairpin=False,
        nat_type=NatType.PORT_RESTRICTED,
        can_hole_punch_with=(NatType.PUBLIC, NatType.FULL_CONE),
        relay_with=(NatType.SYMMETRIC,),
        notes=(),
    )
    assert render_text(full).splitlines() == [
        "server          198.51.100.1:3478",
        "local address   10.0.0.2:5000",
        "public address  203.0.113.1:40000",
        "NAT             yes",
        "mapping         endpoint-independent",
        "filtering       address-and-port-dependent",
        "hairpin         no",
        "port preserved  no",
        "NAT type        port-restricted",
        "can hole-punch with: public, full-cone",
        "needs relay with: symmetric",
    ]


def test_text_unknowns_and_notes() -> None:
    lines = render_text(REPORT).splitlines()
    assert "filtering       unknown" in lines
    assert "hairpin         unknown" in lines
    assert lines[-3:] == ["can hole-punch with: (none)", "needs relay with: (none)",
                          "note: a note"]
