"""Interop: `meshd netcheck` against Debian's coturn gives the answers it gives against ours."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from natcheck import netcheck, start_coturn, start_stun
from netlab import Lab

TOPOLOGIES = Path(__file__).parent / "topologies"
COMPARED = ("nat", "mapping", "filtering", "hairpin", "port_preserved", "nat_type")
COTURN_PORT = 3480  # ours holds 3478/3479 on the same host; coturn takes 3480/3481


def test_coturn_and_meshd_agree_behind_every_nat(make_lab: Callable[[Any], Lab],
                                                  tmp_path: Path) -> None:
    lab = make_lab(TOPOLOGIES / "nat-kinds.yaml")
    start_stun(lab)
    start_coturn(lab, "stun", tmp_path, port=COTURN_PORT)
    stun = lab.addr("stun")
    for node in [n for n in lab.topology.hosts if n != "stun"]:
        ours = netcheck(lab, node, f"{stun}:3478")
        theirs = netcheck(lab, node, f"{stun}:{COTURN_PORT}")
        print(f"{node}: meshd server -> {ours['nat_type']}, coturn -> {theirs['nat_type']}")
        assert theirs["notes"] == [] or "OTHER-ADDRESS" not in " ".join(theirs["notes"])
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
