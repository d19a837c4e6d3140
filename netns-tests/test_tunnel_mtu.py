"""The tunnel on a narrow path: every site router's WAN link has an MTU of 1273 bytes (routers
clamp TCP's MSS to it, as PPPoE routers do), and the agents run `tunnel.mtu: 1200`, the largest
that fits (`mtu + 73`: outer IPv4 and UDP, a TURN ChannelData header, and the biggest tunnel
datagram, a 0xE4 fragment of `mtu + 26` bytes plus its 15-byte header). Bulk transfers through a
direct and a relayed pair arrive whole, and no IP fragment crosses a router: mesh0's 64 KB
super-packets travel as tunnel fragments sized to the MTU (`wire.fragment_part_for`). They used
to be a fixed 1421 bytes, which the kernel then split into IP fragments (or, where a middlebox
drops fragments, lost). m1 runs with `tunnel.fastPath: false` (every packet through Python), m2
and m3 with the native fast path: the two data paths interoperate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.meshlab import MeshLab
from test_tunnel_nat import expected_sha, fetch, manifests

SITES = {
    "a": {"nat": "port-restricted", "nodes": ["m1"]},
    "b": {"nat": "port-restricted", "nodes": ["m2"]},
    "s": {"nat": "symmetric", "nodes": ["m3"]},
}
MTU = 1200
LINK_MTU = MTU + 73
SIZE = 16 * 1024 * 1024
NARROW = """table inet narrow {
  chain fragments {
    type filter hook prerouting priority -450;
    ip frag-off & 0x3fff != 0 counter
  }
  chain clamp {
    type filter hook forward priority 0;
    tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu
  }
}
"""


class NarrowLab(MeshLab):
    """`MeshLab` whose site routers' WAN links carry at most LINK_MTU bytes per packet, with
    agents configured for it."""

    def start(self, *, agents: bool = True) -> None:
        for node in self.nodes:
            self.agent_overrides[node] = {"mtu": MTU}
        # m1 moves every packet in Python: the direct pair is an agent without the native
        # fast path talking to one with it (tunnel.fastPath).
        self.agent_overrides["m1"]["fastPath"] = False
        for router in self.narrow_routers():
            found = self.lab.run(router, ["ip", "-o", "-4", "addr", "show", "to",
                                          self.lab.addr(router)]).stdout
            wan = found.split()[1]  # "2: ifname    inet ADDR/24 ..."
            self.lab.run(router, ["ip", "link", "set", "dev", wan, "mtu", str(LINK_MTU)])
            self.lab.run(router, ["nft", "-f", "-"], input=NARROW)
        super().start(agents=agents)

    def narrow_routers(self) -> list[str]:
        return sorted(set(self.routers.values()))

    def ip_fragments(self) -> int:
        """IP fragments the routers received (either side, before reassembly)."""
        total = 0
        for router in self.narrow_routers():
            out = self.lab.run(router, ["nft", "list", "chain", "inet", "narrow",
                                        "fragments"]).stdout
            total += sum(int(n) for n in re.findall(r"counter packets (\d+)", out))
        return total


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[NarrowLab]:
    tmp: Path = tmp_path_factory.mktemp("mtu")
    failed = request.session.testsfailed
    with NarrowLab.up_sites(tmp, SITES, pods=2, clients=1, name="mtu") as lab:
        assert isinstance(lab, NarrowLab)
        lab.apply(manifests(["m2"]))
        lab.wait_ready_pods("app=web-m2", 1, timeout=90)
        try:
            yield lab
        finally:
            if request.session.testsfailed > failed:
                lab.print_agent_tails(2500)


def test_the_path_is_narrow_and_mesh0_fits_it(mesh: NarrowLab) -> None:
    # Don't-fragment pings to meshd server's host: LINK_MTU fits, one byte more does not
    # (m1's router answers "fragmentation needed").
    fits = mesh.lab.run("m1", ["ping", "-c", "1", "-W", "2", "-M", "do", "-s",
                               str(LINK_MTU - 28), mesh.cloud_ip], check=False)
    over = mesh.lab.run("m1", ["ping", "-c", "2", "-W", "2", "-M", "do", "-s",
                               str(LINK_MTU - 27), mesh.cloud_ip], check=False)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert over.returncode != 0, over.stdout
    for node in ("m1", "m2", "m3"):
        link = mesh.lab.run(node, ["ip", "-o", "link", "show", "mesh0"]).stdout
        assert f" mtu {MTU} " in link, link


@pytest.mark.parametrize("client,path", [("m1", "direct"), ("m3", "relay")])
def test_bulk_crosses_the_narrow_path(mesh: NarrowLab, client: str, path: str) -> None:
    mesh.wait_path(client, "m2", path, timeout=30)
    before = mesh.ip_fragments()
    proc = fetch(mesh, client, "web-m2", SIZE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got, sha, seconds = out.split()
    assert int(got) == SIZE and sha == expected_sha(SIZE)
    sender, receiver = mesh.metrics("m2"), mesh.metrics(client)
    assert sender["meshd_tunnel_gso_sends_total"] > 0  # super-packets left as fragment runs
    assert sender["meshd_tunnel_send_errors_total"] == 0
    assert mesh.ip_fragments() == before  # every tunnel datagram fit the path whole
    assert (mesh.peer(client, "m2") or {}).get("path") == path
    if path == "direct":  # m1 without the fast path, m2 with it
        assert mesh.tunnel(client).get("fastPath") is None
        assert sender['meshd_tunnel_fastpath_packets_total{direction="in"}'] > 0  # m1's ACKs
    print(f"\n{client} <- m2 ({path}) over {LINK_MTU}-byte links, mesh0 mtu {MTU}: 16 MB in "
          f"{seconds} s, sha256 ok; GRO reads {receiver['meshd_tunnel_gro_reads_total']:.0f}")
