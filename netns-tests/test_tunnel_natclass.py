"""Issue 5 item 5 in the lab: every agent learns its NAT class in the background (RFC 5780 against
`meshd server`'s STUN service), publishes it over the control channel, and the punch metrics
carry the (own class, peer's class) pair.

Sites: a = full cone (n1), b = port-restricted (n2), c = symmetric (n3). The cloud has a second
address (`netlab.demo.MissionLab`): with `stun.addresses` of one entry the server sends no
OTHER-ADDRESS and every agent would publish `unknown` (tests/meshd/test_tunnel_natprobe.py shows
that case on loopback).

The first round of checks of a pair usually starts before either side finished its netcheck
(~3 s), so it is labelled `unknown`; the test then restarts n3, whose NAT the server kept: the
new rounds of n1 and n2 with it carry both classes.

Then n2 restarts with `tunnel.natProbe.enabled: false`: it sends no probe, and its class is the
one the server stored, from its welcome (`natSource: stored`, `meshd status` says "(stored)").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab.demo import MissionLab
from netlab.nat import EXPECTED
from netlab.serviceplane import wait_for

from meshd.status import render_peers

SITES: dict[str, dict[str, Any]] = {
    "a": {"nat": "full-cone", "nodes": ["n1"]},
    "b": {"nat": "port-restricted", "nodes": ["n2"]},
    "c": {"nat": "symmetric", "nodes": ["n3"]},
}
KIND = {"n1": "full-cone", "n2": "port-restricted", "n3": "symmetric"}


def expected(node: str) -> dict[str, str]:
    mapping, filtering, nat_type = EXPECTED[KIND[node]]  # type: ignore[index]
    return {"natType": nat_type, "mapping": mapping, "filtering": filtering}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MissionLab]:
    with MissionLab.up_sites(tmp_path_factory.mktemp("natclass"), SITES, pods=1,
                             clients=1, name="natc") as plane:
        assert isinstance(plane, MissionLab) and plane.alternate_ip
        yield plane


def punch(metrics: dict[str, float], name: str, nat: str, peer_nat: str) -> float:
    return metrics.get(f'meshd_tunnel_punch_{name}_total{{nat="{nat}",peerNat="{peer_nat}"}}',
                       0.0)


def wait_classified(lab: MissionLab) -> None:
    for node in KIND:
        def classified(node: str = node) -> bool:
            return bool(lab.tunnel(node).get("nat") == expected(node))

        wait_for(classified, f"{node} classified as {expected(node)} "
                 f"(now {lab.tunnel(node).get('nat')})", timeout=30, step=0.5)


def test_each_agent_publishes_its_router_s_class(lab: MissionLab) -> None:
    wait_classified(lab)
    for node in KIND:  # every peer's row shows the others' classes (through the server)
        def rows(node: str = node) -> bool:
            seen = {p["node"]: p.get("nat") for p in lab.tunnel(node).get("peers", [])}
            return seen == {o: KIND[o] for o in KIND if o != node}

        wait_for(rows, f"{node}'s peer rows show their NATs", timeout=15, step=0.5)
    registry = json.loads((Path(lab.tmp) / "meshd-server-data" /
                           "control-registry.json").read_text())
    assert {n: e.get("nat") for n, e in registry["nodes"].items()} == {
        n: expected(n) for n in KIND}
    print({n: lab.tunnel(n)["nat"] for n in KIND})


def test_punch_metrics_carry_both_classes(lab: MissionLab) -> None:
    wait_classified(lab)
    lab.stop_agent("n3")
    lab.start_agent("n3")
    lab.wait_agent("n3", timeout=60)
    # full cone x symmetric: direct (the symmetric side's actual source is learnt as a
    # peer-reflexive candidate); port-restricted x symmetric: relay (design §6), then direct by
    # port guessing (test_tunnel_portguess.py), which needs exactly these classes.
    lab.wait_path("n1", "n3", "direct", timeout=30)
    lab.wait_path("n2", "n3", "direct", timeout=40)
    guessed = lab.peer("n2", "n3") or {}
    assert guessed.get("guessed") and guessed.get("timeToRelayS") is not None, guessed
    m1, m2 = lab.metrics("n1"), lab.metrics("n2")
    print({k: v for k, v in m1.items() if "punch" in k})
    print({k: v for k, v in m2.items() if "punch" in k})
    assert punch(m1, "attempts", "full-cone", "symmetric") >= 1
    assert punch(m1, "successes", "full-cone", "symmetric") >= 1
    assert punch(m2, "attempts", "port-restricted", "symmetric") >= 1
    assert punch(m2, "successes", "port-restricted", "symmetric") >= 1  # the guessed one
    for metrics in (m1, m2):  # every label is a class pair; no peer's text gets through as is
        for key in metrics:
            if key.startswith("meshd_tunnel_punch_"):
                assert 'peerNat="' in key and 'nat="' in key, key
    m3 = lab.metrics("n3")
    assert {k for k in m3 if k.startswith("meshd_tunnel_punch_attempts_total")} <= {
        f'meshd_tunnel_punch_attempts_total{{nat="{own}",peerNat="{peer}"}}'
        for own in ("unknown", "symmetric") for peer in ("full-cone", "port-restricted")}


def test_without_natprobe_the_stored_class_comes_with_the_welcome(lab: MissionLab) -> None:
    wait_classified(lab)
    lab.stop_agent("n2")
    log = lab.agent_logs["n2"]
    start = len(log.read_text())
    lab.agent_overrides["n2"] = {"natProbe": {"enabled": False}}
    try:
        lab.start_agent("n2")
        lab.wait_agent("n2", timeout=60)
        wait_for(lambda: lab.tunnel("n2").get("natSource") == "stored",
                 f"n2 has its stored class (now {lab.tunnel('n2').get('natSource')})",
                 timeout=30, step=0.5)
        time.sleep(6)  # longer than the probe's first delay plus a run, were it on
        tunnel = lab.tunnel("n2")
        assert tunnel["nat"] == expected("n2") and tunnel["natSource"] == "stored"
        assert tunnel["natProbe"] is False
        head = render_peers(tunnel)[0]
        print(head)
        assert "NAT port-restricted (stored; " in head
        text = log.read_text()[start:]
        assert "tunnel.nat_probe_off" in text
        assert not re.search(r" tunnel\.nat(_failed|_recheck)? ", text), text[-2000:]
        # Peers still see its class (the server's record), so guessing pairs keep working.
        for node in ("n1", "n3"):
            wait_for(lambda node=node: {p["node"]: p.get("nat") for p in  # type: ignore[misc]
                                        lab.tunnel(node).get("peers", [])}.get("n2")
                     == "port-restricted", f"{node} sees n2 as port-restricted",
                     timeout=15, step=0.5)
    finally:
        lab.agent_overrides.pop("n2", None)
