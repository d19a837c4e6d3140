"""TurnClient against TurnServer over meshd.simnet: NATs, loss, and hours of virtual time, no
sockets and no sleeping. A failing test prints the datagram trace."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from meshd.simnet import APDF, APDM, EIM, SimNat, SimNetwork
from meshd.stun.server import ServerAddresses, StunServer
from meshd.turn.client import (
    Allocated,
    AllocationFailed,
    ChannelBound,
    ClientState,
    DataReceived,
    PermissionCreated,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import mint_credentials
from meshd.turn.ports import MemoryRelayPorts
from meshd.turn.server import TurnServer, TurnServerConfig
from meshd.udp import Address, Transmit

EPOCH = 1_700_000_000.0
SERVER_IP = "198.51.100.1"
LISTEN: Address = (SERVER_IP, 3478)
SECRET = b"mesh-secret"
CONFIG = TurnServerConfig(realm="edgeweave", secrets=(SECRET,), relay_ip=SERVER_IP,
                          min_port=50000, max_port=50999)


class World:
    """A TURN server, clients and peers on one simulated internet, driven event by event."""

    def __init__(self, *, seed: int = 1, loss: float = 0.0,
                 config: TurnServerConfig = CONFIG) -> None:
        self.net = SimNetwork(seed=seed, loss=loss, latency_s=0.02)
        self.net.advance(EPOCH)
        self.ports = MemoryRelayPorts(on_open=lambda a: self.net.attach(a, self._server))
        stun = StunServer(ServerAddresses(SERVER_IP, 3478, 3479))
        self.server = TurnServer(config, self.ports, stun=stun, rng=random.Random(seed),
                                 nonce_key=b"nonce-key")
        self.net.attach(LISTEN, self._server)
        self.clients: list[TurnClient] = []
        self.events: dict[int, list[TurnEvent]] = {}
        self._seed = seed

    def _server(self, data: bytes, source: Address, local: Address) -> list[Transmit]:
        outputs = self.server.handle_datagram(data, source, local, self.net.now)
        return [o for o in outputs if isinstance(o, Transmit)]

    def client(self, local: Address, node: str = "node-a", *, secret: bytes = SECRET,
               config: TurnClientConfig | None = None) -> TurnClient:
        credentials = mint_credentials(secret, node, self.net.now, 24 * 3600)
        client = TurnClient(LISTEN, credentials, local=local, config=config,
                            rng=random.Random(self._seed + len(self.clients)))
        self.clients.append(client)
        self.events[id(client)] = []

        def handler(data: bytes, source: Address, _: Address) -> list[Transmit]:
            client.handle_datagram(data, source, self.net.now)
            return client.datagrams_to_send(self.net.now)

        self.net.attach(local, handler)
        return client

    def peer(self, address: Address,
             reply: Callable[[bytes, Address], bytes | None]) -> list[tuple[bytes, Address]]:
        """A plain UDP host; `reply` may answer each datagram."""
        got: list[tuple[bytes, Address]] = []

        def handler(data: bytes, source: Address, _: Address) -> list[Transmit]:
            got.append((data, source))
            answer = reply(data, source)
            return [] if answer is None else [Transmit(address, source, answer)]

        self.net.attach(address, handler)
        return got

    def run(self, seconds: float) -> None:
        end = self.net.now + seconds
        while True:
            for client in self.clients:
                for t in client.datagrams_to_send(self.net.now):
                    self.net.send(t)
                self.events[id(client)].extend(iter(client.next_event, None))
            timers = [c.get_timer() for c in self.clients]
            timers += [self.server.get_timer(), self.net.next_time()]
            due = [t for t in timers if t is not None and t <= end]
            if not due:
                break
            self.net.advance(min(due))
            for client in self.clients:
                client.handle_timer(self.net.now)
            self.server.handle_timer(self.net.now)
        self.net.advance(end)
        self.server.handle_timer(end)

    def take(self, client: TurnClient) -> list[TurnEvent]:
        events, self.events[id(client)] = self.events[id(client)], []
        return events

    def allocate(self, client: TurnClient) -> Address:
        client.allocate(self.net.now)
        self.run(5)
        (event,) = [e for e in self.take(client) if isinstance(e, Allocated)]
        return event.relayed

    @contextmanager
    def traced(self) -> Iterator[None]:
        try:
            yield
        except AssertionError:
            print("\n".join(self.net.trace[-80:]))
            raise


def received(events: list[TurnEvent]) -> list[tuple[bytes, Address, int | None]]:
    return [(e.data, e.peer, e.channel) for e in events if isinstance(e, DataReceived)]


def test_two_clients_behind_symmetric_nats_talk_through_their_relays() -> None:
    world = World()
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", mapping=APDM, filtering=APDF))
    world.net.add_nat(SimNat("203.0.113.2", "10.0.2.0/24", mapping=APDM, filtering=APDF))
    a = world.client(("10.0.1.2", 4000), "node-a")
    b = world.client(("10.0.2.2", 4000), "node-b")
    with world.traced():
        relay_a, relay_b = world.allocate(a), world.allocate(b)
        assert a.mapped_address is not None and a.mapped_address[0] == "203.0.113.1"
        # Candidates exchanged through the control plane: each permits the other's relay.
        a.create_permission(relay_b[0], world.net.now)
        b.create_permission(relay_a[0], world.net.now)
        world.run(1)
        a.send(b"ping", relay_b, world.net.now)
        world.run(1)
        assert received(world.take(b)) == [(b"ping", relay_a, None)]
        b.send(b"pong", relay_a, world.net.now)
        world.run(1)
        assert received(world.take(a)) == [(b"pong", relay_b, None)]
        a.bind_channel(relay_b, world.net.now)
        b.bind_channel(relay_a, world.net.now)
        world.run(1)
        assert ChannelBound(relay_b, 0x4000) in world.take(a)
        for i in range(5):
            a.send(b"a%d" % i, relay_b, world.net.now)
            b.send(b"b%d" % i, relay_a, world.net.now)
        world.run(1)
        assert received(world.take(b)) == [(b"a%d" % i, relay_a, 0x4000) for i in range(5)]
        assert received(world.take(a)) == [(b"b%d" % i, relay_b, 0x4000) for i in range(5)]
        m = world.server.metrics
        assert m.datagrams_out == 12 and m.datagrams_in == 12


def test_allocation_permissions_and_channels_live_for_hours() -> None:
    world = World(config=replace(CONFIG, nonce_lifetime_s=900))
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", mapping=EIM, filtering=APDF))
    client = world.client(("10.0.1.2", 4000))
    peer: Address = ("192.0.2.80", 9000)
    world.peer(peer, lambda data, source: b"echo " + data)
    with world.traced():
        world.allocate(client)
        client.bind_channel(peer, world.net.now)
        world.run(3 * 3600)
        client.send(b"still there?", peer, world.net.now)
        world.run(1)
        assert received(world.take(client))[-1] == (b"echo still there?", peer, 0x4000)
        m = world.server.metrics
        assert m.allocations_expired == 0 and world.server.allocations == 1
        assert m.stale_nonces > 0  # refreshes ran into nonce expiry and recovered
        assert client.state is ClientState.ALLOCATED


def test_silent_client_allocation_expires_and_frees_the_port() -> None:
    world = World()
    client = world.client(("203.0.113.50", 4000))
    relayed = world.allocate(client)
    assert world.ports.opened == {relayed}
    world.clients.remove(client)  # the agent dies: no refresh, no delete
    world.run(590)  # allocated about 5 s ago
    assert world.server.allocations == 1
    world.run(20)
    assert world.server.allocations == 0 and world.ports.opened == set()
    assert world.server.metrics.allocations_expired == 1


def test_permission_lapses_when_the_client_stops_refreshing_it() -> None:
    world = World()
    client = world.client(("203.0.113.50", 4000))
    peer: Address = ("192.0.2.80", 9000)
    world.allocate(client)
    client.create_permission(peer[0], world.net.now)
    world.run(1)
    assert PermissionCreated(peer[0]) in world.take(client)
    client.remove_permission(peer[0])
    relayed = client.relayed_address
    assert relayed is not None
    world.run(290)  # asked for about 1 s ago
    world.net.send(Transmit(peer, relayed, b"in time"))
    world.run(20)
    world.net.send(Transmit(peer, relayed, b"too late"))
    world.run(1)
    m = world.server.metrics
    assert (m.datagrams_in, m.dropped_no_permission) == (1, 1)
    # The client no longer wants the peer either (RFC 8656 §11.4): it drops the Data too.
    assert received(world.take(client)) == [] and client.dropped == 1


def test_no_open_relay() -> None:
    world = World()
    intruder = world.client(("203.0.113.66", 4000), secret=b"guessed")
    intruder.allocate(world.net.now)
    world.run(5)
    assert world.take(intruder) == [AllocationFailed(401, "Unauthorized")]
    assert world.server.allocations == 0 and world.server.metrics.auth_failures >= 1
    # A legitimate allocation never relays for strangers: a peer without permission is dropped.
    client = world.client(("203.0.113.50", 4000))
    relayed = world.allocate(client)
    got = world.peer(("192.0.2.99", 1), lambda d, s: None)
    world.net.send(Transmit(("192.0.2.99", 1), relayed, b"let me in"))
    world.run(1)
    assert received(world.take(client)) == [] and got == []


def test_quota_per_node() -> None:
    world = World(config=replace(CONFIG, quota_per_node=2))
    clients = [world.client(("203.0.113.50", 4000 + i), "node-q") for i in range(3)]
    for client in clients:
        client.allocate(world.net.now)
    world.run(5)
    outcomes = [type(world.take(c)[-1]).__name__ for c in clients]
    assert sorted(outcomes) == ["Allocated", "Allocated", "AllocationFailed"]
    failed = next(c for c in clients if c.state is ClientState.FAILED)
    assert failed is not None
    assert world.server.metrics.errors.get(486) == 1


def test_lossy_network() -> None:
    world = World(seed=7, loss=0.25)
    config = TurnClientConfig()
    client = world.client(("203.0.113.50", 4000), config=config)
    peer: Address = ("192.0.2.80", 9000)
    world.peer(peer, lambda data, source: b"echo " + data)
    with world.traced():
        world.allocate(client)
        client.bind_channel(peer, world.net.now)
        world.run(5)
        for i in range(40):
            client.send(b"%d" % i, peer, world.net.now)
            world.run(0.1)
        world.run(1)
        echoes = received(world.take(client))
        assert 3 < len(echoes) < 30  # about (3/4)^4 make the four hops of the round trip
        world.run(3600)
        assert client.state is ClientState.ALLOCATED  # refreshes survive the loss


def test_peer_and_client_garbage_never_breaks_the_server() -> None:
    world = World(config=replace(CONFIG, nonce_lifetime_s=3600))
    client = world.client(("203.0.113.50", 4000))
    relayed = world.allocate(client)
    peer: Address = ("192.0.2.80", 9000)
    client.create_permission(peer[0], world.net.now)
    world.run(1)
    rng = random.Random(5)
    for i in range(500):
        junk = rng.randbytes(rng.randrange(0, 200))
        if i % 3 == 0:
            junk = b"\x40\x00" + junk
        elif i % 3 == 1:
            junk = b"\x00\x16\x00\x00\x21\x12\xa4\x42" + junk
        world.net.send(Transmit(peer, relayed, junk))
        world.net.send(Transmit(("192.0.2.81", 1), LISTEN, junk))
    world.run(2)
    assert len(received(world.take(client))) == 500  # permitted peer: relayed verbatim
    client.send(b"after", peer, world.net.now)
    got = world.peer(peer, lambda d, s: None)
    world.run(1)
    assert got == [(b"after", relayed)]
