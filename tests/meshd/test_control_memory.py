"""Server and clients together over in-memory pipes on a virtual clock (meshd.control.memory):
registration, restarts, duplicates, partitions, refusals, signaling, in every chunking."""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections.abc import Callable

import pytest

from meshd.control.client import (
    ClientState,
    ControlClient,
    ControlClientConfig,
    ControlEvent,
    Disconnected,
    PeersChanged,
    ServerError,
    SignalReceived,
    Welcomed,
)
from meshd.control.memory import MemoryControlPlane
from meshd.control.registry import MemoryRegistryStore
from meshd.control.server import ControlServer, ControlServerConfig

NODES = ("edge-1", "edge-2", "edge-3")
CONFIG = ControlServerConfig(turn_secret=b"s")
Chunk = Callable[[bytes], list[bytes]]
CHUNKINGS: dict[str, Chunk | None] = {
    "whole": None,
    "bytes": lambda d: [d[i:i + 1] for i in range(len(d))],
    "halves": lambda d: [d[:len(d) // 2], d[len(d) // 2:]],
}


def key(node: str) -> bytes:
    return hashlib.sha256(node.encode()).digest()


def client(node: str, seed: int = 0) -> ControlClient:
    return ControlClient(ControlClientConfig(key(node)), random.Random(seed or key(node)[0]))


def plane_with(nodes: tuple[str, ...] = NODES, store: MemoryRegistryStore | None = None,
               chunk: Chunk | None = None, config: ControlServerConfig = CONFIG
               ) -> MemoryControlPlane:
    plane = MemoryControlPlane(ControlServer(config, store or MemoryRegistryStore()),
                               chunk=chunk)
    for i, node in enumerate(nodes):
        plane.add(node, client(node, i + 1))
        plane.start(node)
    return plane


def welcomes(events: list[ControlEvent]) -> list[Welcomed]:
    return [e for e in events if isinstance(e, Welcomed)]


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_nodes_register_see_each_other_and_signal(chunking: str) -> None:
    plane = plane_with(chunk=CHUNKINGS[chunking])
    overlays = {n: welcomes(plane.events(n))[0].overlay for n in NODES}
    assert len({o.ip for o in overlays.values()}) == 3
    for node in NODES:
        table = plane.client(node).peers
        assert set(table) == set(NODES) - {node}
        for other, info in table.items():
            assert info.online and info.overlay == overlays[other].ip
            assert info.static_key == key(other)
    plane.client("edge-1").send_signal("edge-3", {"ufrag": "a", "gen": 0}, plane.now)
    plane.pump()
    assert plane.events("edge-3") == [SignalReceived("edge-1", {"ufrag": "a", "gen": 0})]
    plane.advance(60.0)  # pings keep everything up
    assert plane.server is not None and plane.server.online() == list(NODES)
    assert all(plane.client(n).rtt_s == 0.0 for n in NODES)


def test_restart_clients_reregister_within_two_seconds_with_the_same_addresses() -> None:
    store = MemoryRegistryStore()
    plane = plane_with(store=store)
    before = {n: welcomes(plane.events(n))[0].overlay for n in NODES}
    plane.advance(30.0)
    plane.crash_server()
    assert all(isinstance(plane.events(n)[-1], Disconnected) for n in NODES)
    plane.advance(5.0)  # down for 5 s: clients back off, capped at 2 s
    assert all(plane.client(n).state is ClientState.BACKOFF for n in NODES)
    restarted = plane.now
    plane.start_server(ControlServer(CONFIG, store))
    plane.advance(2.0)
    assert plane.server is not None and plane.server.online() == list(NODES)
    for node in NODES:
        again = welcomes(plane.events(node))
        assert [w.overlay for w in again] == [before[node]] and again[0].sessions == 2
        assert all(p.online for p in plane.client(node).peers.values())
    assert plane.now - restarted <= 2.0


def test_clean_stop_tells_clients_and_they_come_back() -> None:
    store = MemoryRegistryStore()
    plane = plane_with(store=store)
    plane.events("edge-1")
    plane.stop_server()
    events = plane.events("edge-1")
    assert ServerError("shutdown", "server stopping", "") in events
    assert isinstance(events[-1], Disconnected)
    plane.start_server(ControlServer(CONFIG, store))
    plane.advance(2.0)
    assert plane.client("edge-1").ready


def test_backoff_during_a_long_outage_is_capped_and_not_a_hot_loop() -> None:
    plane = plane_with(("edge-1",))
    plane.crash_server()
    dials_before = plane.client("edge-1").failures
    plane.advance(60.0)
    failures = plane.client("edge-1").failures - dials_before
    assert 30 <= failures <= 70  # about one dial per 1-2 s once capped
    plane.start_server(ControlServer(CONFIG, MemoryRegistryStore()))
    plane.advance(2.0)
    assert plane.client("edge-1").ready


def test_partition_expires_the_session_on_both_sides_and_heals() -> None:
    plane = plane_with(("edge-1", "edge-2"))
    plane.events("edge-2")
    plane.partition("edge-1")
    plane.advance(16.0)
    assert plane.server is not None and plane.server.online() == ["edge-2"]
    assert plane.server.metrics.sessions_expired == 1
    assert any(isinstance(e, Disconnected) for e in plane.events("edge-1"))
    changed = [e for e in plane.events("edge-2") if isinstance(e, PeersChanged)]
    assert changed and not changed[-1].peers["edge-1"].online
    plane.partition("edge-1", False)
    plane.advance(3.0)
    assert plane.server.online() == ["edge-1", "edge-2"]
    assert plane.client("edge-2").peers["edge-1"].online


def test_a_certificate_without_a_node_never_gets_in() -> None:
    plane = MemoryControlPlane(ControlServer(CONFIG, MemoryRegistryStore()))
    plane.add("intruder", client("intruder"), no_node=True)
    plane.start("intruder")
    plane.advance(10.0)
    events = plane.events("intruder")
    assert not welcomes(events)
    assert {e.code for e in events if isinstance(e, ServerError)} == {"unauthorized"}
    assert plane.server is not None and plane.server.metrics.auth_failures >= 5


def test_an_agent_cannot_take_another_nodes_place() -> None:
    plane = plane_with(("edge-1",))
    overlay = welcomes(plane.events("edge-1"))[0].overlay
    # edge-2's certificate with edge-1's static key (a copied public key): refused.
    plane.add("copycat", ControlClient(ControlClientConfig(key("edge-1")), random.Random(5)),
              as_node="edge-2")
    plane.start("copycat")
    events = plane.events("copycat")
    assert not welcomes(events)
    assert ServerError("key-in-use", "this static key belongs to another online node", "") \
        in events
    assert plane.server is not None
    assert plane.server.peer_table()["edge-1"].overlay == overlay.ip
    assert plane.client("edge-1").ready


def test_two_agents_with_the_same_certificate_do_not_spin() -> None:
    plane = plane_with(("edge-1",))
    plane.add("twin", client("edge-1", 9), as_node="edge-1")
    plane.start("twin")
    plane.advance(20.0)
    assert plane.server is not None
    hellos = plane.server.metrics.hellos
    assert hellos <= 30  # they take turns, paced by the backoff, never a tight loop
    assert plane.server.online() == ["edge-1"]


def test_signals_to_offline_peers_are_refused_not_queued() -> None:
    plane = plane_with(("edge-1", "edge-2"))
    plane.partition("edge-2")
    plane.advance(16.0)
    plane.events("edge-1")
    plane.client("edge-1").send_signal("edge-2", {"x": 1}, plane.now)
    plane.pump()
    assert plane.events("edge-1") == [ServerError("peer-offline", "edge-2 is not connected",
                                                  "edge-2")]


def test_overlay_network_from_config() -> None:
    config = ControlServerConfig(overlay_network=ipaddress.IPv4Network("10.200.0.0/24"))
    plane = plane_with(("edge-1",), config=config)
    welcome = welcomes(plane.events("edge-1"))[0]
    assert welcome.overlay.network == ipaddress.IPv4Network("10.200.0.0/24")
    assert welcome.turn is None


def test_a_nat_report_reaches_every_peer_and_survives_a_reconnect() -> None:
    from meshd.control.wire import NatSummary
    plane = plane_with()
    for node in NODES:
        plane.events(node)
    nat = NatSummary("full-cone", "endpoint-independent", "endpoint-independent")
    plane.client("edge-1").report_nat(nat, plane.now)
    plane.pump()
    for other in ("edge-2", "edge-3"):
        changed = [e for e in plane.events(other) if isinstance(e, PeersChanged)]
        assert [e.changed for e in changed] == [("edge-1",)]
        assert changed[0].peers["edge-1"].nat == nat
    plane.crash_server()
    assert plane.server is None
    plane.start_server(ControlServer(CONFIG, MemoryRegistryStore()))  # a registry lost too
    plane.advance(5.0)
    assert plane.client("edge-2").peers["edge-1"].nat == nat  # the hello carried it again


def test_an_old_agent_and_a_new_one_share_a_server() -> None:
    from meshd.control.wire import NatSummary
    plane = MemoryControlPlane(ControlServer(CONFIG, MemoryRegistryStore()))
    plane.add("old", ControlClient(ControlClientConfig(key("old"), version=1), random.Random(1)))
    plane.add("new", client("new", 2))
    plane.start("old")
    plane.start("new")
    assert plane.client("old").version == 1 and plane.client("new").version == 2
    plane.client("old").report_nat(NatSummary("symmetric"), plane.now)  # waits for a hello
    plane.client("new").report_nat(NatSummary("public"), plane.now)
    plane.pump()
    assert plane.client("old").peers["new"].nat == NatSummary("public")
    assert plane.client("new").peers["old"].nat is None
    assert plane.client("old").state is ClientState.READY
