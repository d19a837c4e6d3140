"""meshd.tunnel.mesh: whole nodes (control client, gathering, path machines, crypto sessions,
relay client) over meshd.simnet with NATs, the in-memory control plane and a TURN server core on
the simulated internet. No sockets, no sleeping; a failing test prints the datagram trace."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeweave.pki import CertificateAuthority, node_identity
from meshd.control.client import ControlClient, ControlClientConfig
from meshd.control.memory import MemoryControlPlane
from meshd.control.registry import MemoryRegistryStore
from meshd.control.server import ControlServer, ControlServerConfig
from meshd.control.wire import NatSummary
from meshd.simnet import APDF, APDM, EIF, EIM, SimNat, SimNetwork
from meshd.stun.server import ServerAddresses, StunServer
from meshd.tunnel.fastpath import FastStats
from meshd.tunnel.mesh import MeshConfig, MeshEvent, MeshNode, PeerPathChanged, ReflexiveChanged
from meshd.tunnel.noise import public_bytes
from meshd.tunnel.punch import PunchConfig
from meshd.tunnel.wire import DATA_OVERHEAD, INITIATION_HEADER, MIN_INITIATION, TYPE_INITIATION
from meshd.turn.ports import MemoryRelayPorts
from meshd.turn.server import TurnServer, TurnServerConfig
from meshd.udp import Address, Transmit, format_address

EPOCH = 1_700_000_000.0
CERT_TIME = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
SERVER_IP = "198.51.100.1"
STUN: Address = (SERVER_IP, 3478)
SECRET = b"turn-secret"
CA = CertificateAuthority.generate(now=CERT_TIME)
TURN_CONFIG = TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip=SERVER_IP,
                               min_port=50000, max_port=50999)

PORT_RESTRICTED: dict[str, Any] = {"mapping": EIM, "filtering": APDF, "preserve_ports": True}
SYMMETRIC: dict[str, Any] = {"mapping": APDM, "filtering": APDF}
FULL_CONE: dict[str, Any] = {"mapping": EIM, "filtering": EIF, "preserve_ports": True}


def ip_packet(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, marker: bytes) -> bytes:
    body = marker
    return struct.pack("!BBHIBBH4s4s", 0x45, 0, 20 + len(body), 0, 64, 17, 0,
                       src.packed, dst.packed) + body


class World:
    """A control server, a TURN/STUN server and mesh nodes behind NATs, one virtual clock."""

    def __init__(self, seed: int = 1, loss: float = 0.0) -> None:
        self.net = SimNetwork(seed=seed, latency_s=0.02, loss=loss)
        self.net.advance(EPOCH)
        ports = MemoryRelayPorts(on_open=lambda a: self.net.attach(a, self._server))
        self.turn = TurnServer(TURN_CONFIG, ports, stun=StunServer(ServerAddresses(
            SERVER_IP, 3478, 3479)), rng=random.Random(seed), nonce_key=b"nonce")
        self.net.attach(STUN, self._server)
        self.store = MemoryRegistryStore()
        self.plane = MemoryControlPlane(
            ControlServer(ControlServerConfig(turn_secret=SECRET), self.store), now=EPOCH)
        self._ports = ports
        self.punch = PunchConfig()
        """The path machine config of nodes added from now on."""
        self.nodes: dict[str, MeshNode] = {}
        self.tun: dict[str, list[bytes]] = {}
        self.events: dict[str, list[PeerPathChanged]] = {}
        self._seed = seed

    def restart_server(self, seed: int = 99) -> None:
        """`meshd server` restarts: control sessions drop, TURN allocations are gone."""
        self.plane.crash_server()
        self.turn = TurnServer(TURN_CONFIG, MemoryRelayPorts(
            on_open=lambda a: self.net.attach(a, self._server)), stun=StunServer(
                ServerAddresses(SERVER_IP, 3478, 3479)), rng=random.Random(seed),
            nonce_key=b"nonce2")
        self.plane.start_server(ControlServer(ControlServerConfig(turn_secret=SECRET),
                                              self.store))

    def _server(self, data: bytes, source: Address, local: Address) -> list[Transmit]:
        outputs = self.turn.handle_datagram(data, source, local, self.net.now)
        return [o for o in outputs if isinstance(o, Transmit)]

    def add(self, name: str, host: Address, *, start: bool = True) -> MeshNode:
        static = X25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest())
        client = ControlClient(ControlClientConfig(public_bytes(static)),
                               random.Random(len(self.nodes) + 7))
        self.plane.add(name, client)
        issued = CA.issue_client_cert(node_identity(name), now=CERT_TIME)
        config = MeshConfig(stun_server=STUN, punch=self.punch)
        node = MeshNode(client, host, certificate=issued.cert, certificate_key=issued.key,
                        ca_certificate=CA.cert, static_key=static, config=config,
                        rng=random.Random(self._seed * 100 + len(self.nodes)),
                        wall_offset=CERT_TIME.timestamp() - EPOCH)
        self.nodes[name] = node
        self.tun[name] = []
        self.events[name] = []

        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            self.tun[name] += node.receive_batch([(data, source)], self.net.now)
            self._collect(name)
            return node.datagrams_to_send(self.net.now)

        self.net.attach(host, handler)
        if start:
            self.plane.start(name)
        return node

    def _collect(self, name: str) -> None:
        node = self.nodes[name]
        while (ev := node.next_event()) is not None:
            if isinstance(ev, PeerPathChanged):
                self.events[name].append(ev)

    def _settle(self) -> None:
        while True:
            self.plane.pump()
            moved = False
            for name, node in self.nodes.items():
                for ev in self.plane.events(name):
                    node.control_event(ev, self.net.now)
                    moved = True
            self.plane.pump()
            for name, node in self.nodes.items():
                for t in node.datagrams_to_send(self.net.now):
                    self.net.send(t)
                self._collect(name)
            if not moved:
                return

    def run(self, seconds: float) -> None:
        end = self.net.now + seconds
        while True:
            self._settle()
            timers = [n.get_timer() for n in self.nodes.values()]
            timers += [self.net.next_time(), self.turn.get_timer()]
            timers += [self.plane.client(n).get_timer() for n in self.nodes]
            if self.plane.server is not None:
                timers.append(self.plane.server.get_timer())
            due = [t for t in timers if t is not None and t <= end]
            if not due:
                break
            at = max(min(due), self.net.now)
            self.net.advance(at)
            if at > self.plane.now:
                self.plane.advance(at - self.plane.now)
            self.turn.handle_timer(at)
            for node in self.nodes.values():
                timer = node.get_timer()
                if timer is not None and timer <= at:
                    node.handle_timer(at)
        self.net.advance(end)
        if end > self.plane.now:
            self.plane.advance(end - self.plane.now)
        self._settle()

    def send(self, src: str, dst: str, marker: bytes) -> bytes:
        a, b = self.nodes[src], self.nodes[dst]
        assert a.overlay is not None and b.overlay is not None
        packet = ip_packet(a.overlay.ip, b.overlay.ip, marker)
        for t in a.send_packets([packet], self.net.now):
            self.net.send(t)
        for t in a.datagrams_to_send(self.net.now):
            self.net.send(t)
        return packet

    def path(self, src: str, dst: str) -> str:
        return next(p.path for p in self.nodes[src].peer_status() if p.node == dst)

    @contextmanager
    def traced(self) -> Iterator[None]:
        try:
            yield
        except AssertionError:
            print("\n".join(self.net.trace[-120:]))
            raise


def two_nodes(nat_a: dict[str, Any], nat_b: dict[str, Any], seed: int = 1) -> World:
    world = World(seed)
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", **nat_a))
    world.net.add_nat(SimNat("203.0.113.2", "10.0.2.0/24", **nat_b))
    world.add("edge-a", ("10.0.1.2", 41641))
    world.add("edge-b", ("10.0.2.2", 52113))
    return world


@pytest.mark.parametrize("nat_a,nat_b", [(PORT_RESTRICTED, PORT_RESTRICTED),
                                         (PORT_RESTRICTED, FULL_CONE)],
                         ids=["port-restricted-x-port-restricted", "port-restricted-x-full-cone"])
def test_relay_first_then_direct(nat_a: dict[str, Any], nat_b: dict[str, Any]) -> None:
    world = two_nodes(nat_a, nat_b)
    with world.traced():
        world.run(0.5)
        first = world.send("edge-a", "edge-b", b"first")
        world.run(0.3)
        assert first in world.tun["edge-b"]
        world.run(2.0)
        kinds = [e.new for e in world.events["edge-a"]]
        assert kinds[:2] == ["relay", "direct"], kinds
        assert world.path("edge-a", "edge-b") == world.path("edge-b", "edge-a") == "direct"
        later = world.send("edge-b", "edge-a", b"later")
        world.run(0.2)
        assert later in world.tun["edge-a"]
        status = {p.node: p for p in world.nodes["edge-a"].peer_status()}["edge-b"]
        assert status.endpoint.startswith("203.0.113.2:")
        assert status.last_handshake is not None and status.bytes_in > 0
        assert status.time_to_direct_s is not None and status.time_to_direct_s < 1.0
        metrics = world.nodes["edge-a"].metrics
        assert sum(metrics.punch_successes.values()) >= 1
        assert metrics.relay_bytes_out > 0 and metrics.direct_bytes_out > 0


def test_symmetric_x_port_restricted_stays_relayed_and_carries_packets() -> None:
    world = two_nodes(SYMMETRIC, PORT_RESTRICTED)
    with world.traced():
        world.run(0.5)
        first = world.send("edge-a", "edge-b", b"first")
        world.run(0.3)
        assert first in world.tun["edge-b"]
        world.run(7.0)
        assert world.path("edge-a", "edge-b") == world.path("edge-b", "edge-a") == "relay"
        back = world.send("edge-b", "edge-a", b"back")
        world.run(0.2)
        assert back in world.tun["edge-a"]
        assert world.nodes["edge-a"].metrics.relay_bytes_in > 0


def test_three_nodes_and_peer_garbage() -> None:
    world = World(3)
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", **PORT_RESTRICTED))
    world.net.add_nat(SimNat("203.0.113.2", "10.0.2.0/24", **SYMMETRIC))
    world.add("edge-a", ("10.0.1.2", 41641))
    world.add("edge-b", ("10.0.2.2", 52113))
    world.add("edge-c", ("10.0.1.3", 33333))  # same LAN as edge-a
    with world.traced():
        world.run(8.0)
        assert world.path("edge-a", "edge-c") == "direct"
        assert world.path("edge-c", "edge-a") == "direct"
        assert world.path("edge-b", "edge-c") == "relay"
        for src, dst in [("edge-a", "edge-b"), ("edge-b", "edge-c"), ("edge-c", "edge-a")]:
            packet = world.send(src, dst, f"{src}>{dst}".encode())
            world.run(0.3)
            assert packet in world.tun[dst]
        node = world.nodes["edge-a"]
        rng = random.Random(5)
        before = len(world.tun["edge-a"])
        for _ in range(500):  # garbage of every first byte never raises
            junk = bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 80))
            assert node.receive_batch([(junk, ("203.0.113.9", 999))], world.net.now) == []
            node.datagrams_to_send(world.net.now)
        assert len(world.tun["edge-a"]) == before


def test_replayed_datagram_is_dropped_and_counted() -> None:
    world = two_nodes(PORT_RESTRICTED, PORT_RESTRICTED)
    captured: list[bytes] = []
    with world.traced():
        world.run(3.0)
        world.send("edge-a", "edge-b", b"handshake first")
        world.run(0.5)
        a, b = world.nodes["edge-a"], world.nodes["edge-b"]
        assert a.overlay is not None and b.overlay is not None
        packet = ip_packet(a.overlay.ip, b.overlay.ip, b"once")
        for t in a.send_packets([packet], world.net.now):
            captured.append(t.data)
            world.net.send(t)
        assert captured
        world.run(0.2)
        assert world.tun["edge-b"].count(packet) == 1
        source = ("203.0.113.1", 41641)
        assert b.receive_batch([(captured[0], source)], world.net.now) == []
        assert b.metrics.rejected.get("replayed") == 1
        (fresh,) = a.send_packets([packet], world.net.now)  # never sent: altered in flight
        altered = bytearray(fresh.data)
        altered[-1] ^= 1
        assert b.receive_batch([(bytes(altered), source)], world.net.now) == []
        assert b.metrics.rejected.get("auth-failed") == 1


def test_an_initiation_flood_is_cut_before_it_costs_cryptography() -> None:
    world = two_nodes(PORT_RESTRICTED, PORT_RESTRICTED)
    rng = random.Random(9)
    with world.traced():
        world.run(3.0)
        b = world.nodes["edge-b"]
        config = MeshConfig(stun_server=STUN)

        def initiation() -> bytes:  # well formed on the outside, garbage inside
            return (INITIATION_HEADER.pack(TYPE_INITIATION, rng.getrandbits(32))
                    + rng.randbytes(MIN_INITIATION - INITIATION_HEADER.size))

        # One source: its burst is taken, the rest dropped at once.
        for _ in range(50):
            assert b.receive_batch([(initiation(), ("198.51.100.66", 4444))],
                                   world.net.now) == []
        cut = 50 - int(config.initiation_source_burst)
        assert b.metrics.rejected["initiation-rate"] == cut
        # Many sources, one each: the overall burst is taken, the rest dropped.
        world.run(5.0)
        flood = [(initiation(), (f"198.51.{i // 250}.{i % 250}", 5000)) for i in range(300)]
        assert b.receive_batch(flood, world.net.now) == []
        assert b.metrics.rejected["initiation-rate"] == cut + 300 - int(config.initiation_burst)
        # The real peer still gets through once the buckets refill: a handshake and data.
        world.run(3.0)
        packet = world.send("edge-a", "edge-b", b"after the flood")
        world.run(1.0)
        assert packet in world.tun["edge-b"]


def test_server_restart_direct_keeps_flowing_relayed_recovers() -> None:
    world = World(4)
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", **PORT_RESTRICTED))
    world.net.add_nat(SimNat("203.0.113.2", "10.0.2.0/24", **SYMMETRIC))
    world.net.add_nat(SimNat("203.0.113.3", "10.0.3.0/24", **PORT_RESTRICTED))
    world.add("edge-a", ("10.0.1.2", 41641))
    world.add("edge-b", ("10.0.2.2", 52113))
    world.add("edge-c", ("10.0.3.2", 33333))
    with world.traced():
        world.run(8.0)
        assert world.path("edge-a", "edge-b") == "relay"
        assert world.path("edge-a", "edge-c") == "direct"
        old_relay = world.nodes["edge-b"].relayed_address
        world.restart_server()
        packet = world.send("edge-a", "edge-c", b"during restart")
        world.run(0.2)
        assert packet in world.tun["edge-c"]  # direct paths do not need the server
        world.run(10.0)
        assert world.nodes["edge-b"].relayed_address not in (None, old_relay)
        for src, dst in [("edge-a", "edge-b"), ("edge-b", "edge-a")]:
            packet = world.send(src, dst, f"after restart {src}".encode())
            world.run(0.3)
            assert packet in world.tun[dst]
        assert world.path("edge-a", "edge-c") == "direct"


# --- the mesh: reflexive address events and NAT class labels -------------------------------------


class EventWorld(World):
    """`World` that also keeps the mesh events it does not look at."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__(seed)
        self.all_events: dict[str, list[MeshEvent]] = {}

    def _collect(self, name: str) -> None:
        node = self.nodes[name]
        while (ev := node.next_event()) is not None:
            self.all_events.setdefault(name, []).append(ev)
            if isinstance(ev, PeerPathChanged):
                self.events[name].append(ev)


@pytest.mark.parametrize(("nat_a", "nat_b", "label_a", "label_b"), [
    (PORT_RESTRICTED, FULL_CONE, "port-restricted", "full-cone"),
    (SYMMETRIC, PORT_RESTRICTED, "symmetric", "port-restricted"),
])
def test_punch_metrics_are_labelled_with_both_nat_classes(
        nat_a: dict[str, Any], nat_b: dict[str, Any], label_a: str, label_b: str) -> None:
    world = two_nodes(nat_a, nat_b)
    world.plane.client("edge-a").report_nat(NatSummary(label_a), world.plane.now)
    world.plane.client("edge-b").report_nat(NatSummary(label_b), world.plane.now)
    world.run(3.0)
    a, b = world.nodes["edge-a"].metrics, world.nodes["edge-b"].metrics
    assert set(a.punch_attempts) == {(label_a, label_b)}
    assert set(b.punch_attempts) == {(label_b, label_a)}
    for m in (a, b):
        assert all(m.punch_successes.get(k, 0) <= n for k, n in m.punch_attempts.items())
    direct = world.path("edge-a", "edge-b") == "direct"
    assert bool(a.punch_successes) == direct
    (row,) = world.nodes["edge-a"].peer_status()
    assert row.nat == label_b and row.as_dict()["nat"] == label_b


def test_labels_are_unknown_until_classified_and_a_late_class_counts_from_the_next_round(
        ) -> None:
    world = two_nodes(PORT_RESTRICTED, PORT_RESTRICTED)
    world.run(3.0)
    a = world.nodes["edge-a"]
    assert set(a.metrics.punch_attempts) == {("unknown", "unknown")}
    assert a.metrics.punch_successes == {("unknown", "unknown"): 1}  # the round's labels
    assert a.peer_status()[0].nat == "unknown"
    world.plane.client("edge-b").report_nat(NatSummary("port-restricted"), world.plane.now)
    world.run(0.5)
    assert a.peer_status()[0].nat == "port-restricted"  # via the server's peerJoined


def test_the_reflexive_address_is_an_event_once_per_change() -> None:
    world = EventWorld()
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", **PORT_RESTRICTED))
    node = world.add("edge-a", ("10.0.1.2", 41641))
    world.run(2.0)
    changes = [e for e in world.all_events.get("edge-a", []) if isinstance(e, ReflexiveChanged)]
    assert changes == [ReflexiveChanged(("203.0.113.1", 41641))]
    assert node.reflexive_address == ("203.0.113.1", 41641)


def test_data_follows_the_path_at_every_moment() -> None:
    """`send_packets` addresses direct datagrams from the last path change it saw: at every
    step (direct; edge-b's NAT loses its state and maps a new port; relay; direct to the new
    port) they go where the path machine says."""
    world = World(3)
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", **PORT_RESTRICTED))
    nat = world.net.add_nat(SimNat("203.0.113.2", "10.0.2.0/24", mapping=EIM, filtering=APDF))
    a, b = world.add("edge-a", ("10.0.1.2", 41641)), world.add("edge-b", ("10.0.2.2", 52113))
    seen, endpoints = set(), set()
    with world.traced():
        world.run(0.3)
        for step in range(150):
            if step == 30:
                nat.flush()  # NAT state loss: the path machines find a new pair
            assert a.overlay is not None and b.overlay is not None
            packet = ip_packet(a.overlay.ip, b.overlay.ip, b"step %d" % step)
            status = {p.node: p for p in a.peer_status()}["edge-b"]
            for t in a.send_packets([packet], world.net.now):
                seen.add(status.path)
                if status.path == "direct":
                    endpoints.add(status.endpoint)
                    assert (t.source, format_address(t.destination)) == (a.local,
                                                                          status.endpoint)
                else:
                    assert t.destination == STUN  # through the relay
                world.net.send(t)
            world.run(0.1)
    assert seen == {"direct", "relay"} and len(endpoints) == 2, (seen, endpoints)


def test_fast_routes_follow_the_keys_and_the_direct_path() -> None:
    """`fast_routes` (what the native fast path may carry): the current keys as soon as there
    are any, an endpoint once the path is direct from the tunnel socket (the peer's address)
    or relayed through a channel of our allocation (the TURN server, and the channel), and the
    same counter and replay window objects the session itself uses."""
    relay_world = two_nodes(SYMMETRIC, PORT_RESTRICTED)
    relay_world.run(0.5)
    relay_world.send("edge-a", "edge-b", b"first")
    relay_world.run(7.0)
    assert relay_world.path("edge-a", "edge-b") == "relay"
    edge_a = relay_world.nodes["edge-a"]
    relayed = edge_a.fast_routes(relay_world.net.now)["edge-b"]
    link, turn = edge_a._link, edge_a._turn
    assert link is not None and turn is not None
    path = edge_a._peers["edge-b"].machine.current_path()
    assert path.remote is not None
    # What _TurnLink.send_via_relay would put in front of each datagram, and where it goes.
    assert relayed.endpoint == turn.server
    assert relayed.channel is not None
    assert relayed.channel.to_bytes(2, "big") == link.channel_of[path.remote]
    assert not replace(relayed, channel=None).same_keys(relayed)
    # Without a bound channel (Send indications) the relayed peer is received only.
    link.channel_of.clear()
    unbound = edge_a.fast_routes(relay_world.net.now)["edge-b"]
    assert unbound.endpoint is None and unbound.channel is None

    world = two_nodes(PORT_RESTRICTED, PORT_RESTRICTED)
    a = world.nodes["edge-a"]
    assert a.fast_routes(world.net.now) == {}  # no keys yet
    world.run(0.5)
    world.send("edge-a", "edge-b", b"first")
    world.run(2.0)
    assert world.path("edge-a", "edge-b") == "direct"
    route = a.fast_routes(world.net.now)["edge-b"]
    status = {p.node: p for p in a.peer_status()}["edge-b"]
    assert route.endpoint is not None and format_address(route.endpoint) == status.endpoint
    assert a.endpoint is not None
    session = a.endpoint.session("edge-b")
    assert session is not None
    kp = session._current
    assert kp is not None
    assert route.counter is kp.counter and route.replay is kp.replay
    assert route.local_index == kp.local_index and route.remote_index == kp.remote_index
    b = world.nodes["edge-b"]
    assert b.overlay is not None and route.overlay == b.overlay.ip.packed
    assert route.send_until == (kp.rekey_at if kp.initiator else kp.reject_at)
    assert route.receive_until >= route.send_until
    assert not replace(route, endpoint=None).same_keys(route)  # the path moved: reinstall
    assert replace(route, send_until=0.0, receive_until=0.0).same_keys(route)
    # The other side's route is the mirror image.
    back = b.fast_routes(world.net.now)["edge-a"]
    assert back.remote_index == route.local_index and back.send_key == route.receive_key


def settled(a_nat: dict[str, Any], path: str, seconds: float) -> tuple[Any, MeshNode]:
    """edge-a (behind `a_nat`) sent edge-b (port-restricted) a first packet `seconds` ago and
    the pair is on `path`: the world and edge-a."""
    world = two_nodes(a_nat, PORT_RESTRICTED)
    world.run(0.5)
    world.send("edge-a", "edge-b", b"first")
    world.run(seconds)
    assert world.path("edge-a", "edge-b") == path
    return world, world.nodes["edge-a"]


def test_fast_stats_count_like_the_python_path() -> None:
    """What the fast path carried reaches the session counters, the direct byte metric and
    the path machine (`data_sent`: consent checks and keepalive timers see the traffic)."""
    world, a = settled(PORT_RESTRICTED, "direct", 2.0)
    assert a.endpoint is not None
    session = a.endpoint.session("edge-b")
    assert session is not None
    before, direct_before = session.stats(), a.metrics.direct_bytes_out
    now = world.net.now
    a.fast_stats("edge-b", FastStats(tx_packets=3, tx_bytes=300, last_tx=now,
                                     rx_packets=2, rx_bytes=128, last_rx=now))
    after = session.stats()
    assert after.packets_sent == before.packets_sent + 3
    assert after.bytes_sent == before.bytes_sent + 300
    assert after.packets_received == before.packets_received + 2
    assert after.bytes_received == before.bytes_received + 128
    assert a.metrics.direct_bytes_out == direct_before + 300 + 3 * DATA_OVERHEAD
    a.fast_stats("nobody", FastStats(1, 1, now, 0, 0, None))  # a peer gone meanwhile: ignored
    # Only the fast path sends for a minute: the direct path stays up.
    for _ in range(60):
        world.run(1.0)
        a.fast_stats("edge-b", FastStats(1, 64, world.net.now, 1, 64, world.net.now))
    assert world.path("edge-a", "edge-b") == "direct"


def test_fast_stats_of_a_relayed_peer_count_relay_bytes() -> None:
    """Traffic the fast path relayed (in ChannelData through our allocation) is counted as the
    Python path counts it: relay bytes both ways, ChannelData header included; a minute of it
    keeps the relayed path."""
    world, a = settled(SYMMETRIC, "relay", 7.0)
    out_before, in_before = a.metrics.relay_bytes_out, a.metrics.relay_bytes_in
    direct_before = a.metrics.direct_bytes_out
    now = world.net.now
    a.fast_stats("edge-b", FastStats(tx_packets=3, tx_bytes=300, last_tx=now,
                                     rx_packets=2, rx_bytes=128, last_rx=now))
    assert a.metrics.relay_bytes_out == out_before + 300 + 3 * (DATA_OVERHEAD + 4)
    assert a.metrics.relay_bytes_in == in_before + 128 + 2 * (DATA_OVERHEAD + 4)
    assert a.metrics.direct_bytes_out == direct_before
    # An interval with traffic in only (nothing sent) is counted too.
    a.fast_stats("edge-b", FastStats(0, 0, None, 1, 100, now))
    assert a.metrics.relay_bytes_in == in_before + 228 + 3 * (DATA_OVERHEAD + 4)
    for _ in range(60):
        world.run(1.0)
        a.fast_stats("edge-b", FastStats(1, 64, world.net.now, 1, 64, world.net.now))
    assert world.path("edge-a", "edge-b") == "relay"


def test_a_moved_overlay_address_drops_the_keys_and_the_fast_route() -> None:
    """The registry moved a live peer to another overlay address (an operator's edit): its keys
    (which carry the old address for the inner source check) are dropped and the fast path
    gets no route until a new handshake proves the new one."""
    world = two_nodes(PORT_RESTRICTED, PORT_RESTRICTED)
    a = world.nodes["edge-a"]
    world.run(0.5)
    world.send("edge-a", "edge-b", b"first")
    world.run(2.0)
    assert "edge-b" in a.fast_routes(world.net.now)
    info = a._peers["edge-b"].info
    moved = replace(info, overlay=ipaddress.IPv4Address("100.64.77.77"))
    a._peers_changed({"edge-b": moved}, [], world.net.now)
    assert a.endpoint is not None
    session = a.endpoint.session("edge-b")
    assert session is not None and not session.can_send
    assert a.fast_routes(world.net.now) == {}
