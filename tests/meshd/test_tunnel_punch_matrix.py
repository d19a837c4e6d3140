"""meshd.tunnel.punch end to end in meshd.simnet: two agents behind simulated NATs gather
candidates from a STUN server, exchange descriptions through a (simulated) server, and punch.

The design §6 NAT matrix, same LAN, hairpinning, double NAT, seeded loss, NAT mapping loss and
NAT timeouts; virtual time only. The relay is a tiny public forwarding endpoint (`SimRelay`)
standing in for TURN: the machine sees it only through `RelayLink`.

Run with `-s` to see the per-pair table (outcome, time to direct after the exchange).
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from meshd.netcheck.classify import Behaviour
from meshd.simnet import ADF, APDF, APDM, EIF, EIM, SimNat, SimNetwork
from meshd.stun.server import ServerAddresses, StunServer
from meshd.tunnel.candidates import (
    ReflexiveQuery,
    encode_description,
    gather,
    parse_description,
)
from meshd.tunnel.punch import (
    ChecksRestarted,
    DescriptionChanged,
    PathChanged,
    PathKind,
    PathMachine,
    PunchConfig,
    State,
    StateChanged,
)
from meshd.udp import Address, Transmit

STUN: Address = ("198.51.100.1", 3478)
RELAY_IP = "198.51.100.7"
RELAY: Address = (RELAY_IP, 3478)
MAGIC = b"RLY"
WRAP = struct.Struct("!H4sH")  # allocation port, peer IPv4, peer port
SIGNAL_LATENCY_S = 0.03
DATA_INTERVAL_S = 0.05


# --- the test relay ---------------------------------------------------------------------------


def wrap(port: int, peer: Address, data: bytes) -> bytes:
    return MAGIC + WRAP.pack(port, ipaddress.IPv4Address(peer[0]).packed, peer[1]) + data


def unwrap(data: bytes) -> tuple[int, Address, bytes] | None:
    if not data.startswith(MAGIC) or len(data) < 3 + WRAP.size:
        return None
    port, ip, peer_port = WRAP.unpack_from(data, 3)
    return port, (str(ipaddress.IPv4Address(ip)), peer_port), data[3 + WRAP.size:]


class SimRelay:
    """A public forwarding endpoint: client → relay → peer from the client's allocation, and
    anything arriving on an allocation → its client (wherever the client last spoke from)."""

    def __init__(self, net: SimNetwork) -> None:
        self.net = net
        self.clients: dict[int, Address] = {}
        self._ports: set[int] = set()
        self._next = 50000
        net.attach(RELAY, self.on_control)

    def allocate(self) -> Address:
        port = self._next
        self._next += 1
        self._ports.add(port)
        self.net.attach((RELAY_IP, port), lambda d, s, _l: self.on_allocation(port, d, s))
        return (RELAY_IP, port)

    def on_control(self, data: bytes, source: Address, local: Address) -> list[Transmit]:
        parsed = unwrap(data)
        if parsed is None or parsed[0] not in self._ports:
            return []
        port, peer, payload = parsed
        self.clients[port] = source
        if peer[1] == 0:
            return []  # a refresh
        return [Transmit((RELAY_IP, port), peer, payload)]

    def on_allocation(self, port: int, data: bytes, source: Address) -> list[Transmit]:
        client = self.clients.get(port)
        return [] if client is None else [Transmit(RELAY, client, wrap(port, source, data))]


@dataclass
class SimRelayLink:
    """`RelayLink` for `SimRelay`."""

    host: Address
    relayed: Address

    @property
    def relayed_address(self) -> Address:
        return self.relayed

    def send_via_relay(self, data: bytes, peer: Address) -> Transmit:
        return Transmit(self.host, RELAY, wrap(self.relayed[1], peer, data))

    def refresh(self) -> Transmit:
        return Transmit(self.host, RELAY, wrap(self.relayed[1], ("0.0.0.0", 0), b""))


# --- agents and the world ---------------------------------------------------------------------


@dataclass
class Node:
    world: World
    name: str
    peer: str
    host: Address
    config: PunchConfig
    advertise_host: bool = True
    use_relay: bool = True
    machine: PathMachine = field(init=False)
    link: SimRelayLink | None = field(init=False, default=None)
    query: ReflexiveQuery | None = field(init=False, default=None)
    received: list[int] = field(init=False, default_factory=list)
    sent: list[tuple[int, PathKind, float]] = field(init=False, default_factory=list)
    states: list[tuple[float, State]] = field(init=False, default_factory=list)
    paths: list[tuple[float, PathKind]] = field(init=False, default_factory=list)
    restarts: list[ChecksRestarted] = field(init=False, default_factory=list)
    got_description_at: float | None = field(init=False, default=None)
    sending: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.world.seed}-{self.name}")
        self.machine = PathMachine(self.name, self.peer, config=self.config, rng=self.rng)
        if self.use_relay:
            self.link = SimRelayLink(self.host, self.world.relay.allocate())
            self.world.net.send(self.link.refresh())
        self.world.net.attach(self.host, self.on_datagram)

    @property
    def now(self) -> float:
        return self.world.net.now

    def gather(self) -> None:
        if self.query is None or self.query.done:
            self.query = ReflexiveQuery(self.host, STUN, self.now,
                                        new_transaction_id=lambda: self.rng.randbytes(12))

    def query_settled(self) -> None:
        assert self.query is not None
        reflexive = self.query.candidate()
        candidates = gather(
            [self.host] if self.advertise_host else [],
            [reflexive] if reflexive is not None else [],
            [(self.link.relayed, RELAY)] if self.link is not None else [],
        )
        if not self.advertise_host:  # the srflx candidate still sends from the host socket
            assert all(c.base_address == self.host for c in candidates
                       if c.kind.value == "srflx")
        self.machine.set_local_candidates(candidates, self.now, relay=self.link)

    def on_datagram(self, data: bytes, source: Address, local: Address) -> list[Transmit]:
        if source == RELAY and self.link is not None:
            parsed = unwrap(data)
            if parsed is None:
                return []
            _, source, data = parsed
            local = self.link.relayed
        if data.startswith(b"DATA"):
            self.received.append(int(data[4:]))
            return []
        if self.query is not None and not self.query.done and \
                self.query.receive(data, source, local, self.now):
            self.query_settled()
        else:
            self.machine.receive(data, source, local, self.now)
        return self.outgoing()

    def outgoing(self) -> list[Transmit]:
        out = self.query.datagrams_to_send(self.now) if self.query is not None else []
        return out + self.machine.datagrams_to_send(self.now)

    def timer(self) -> float | None:
        times = [self.machine.get_timer()]
        if self.query is not None:
            times.append(self.query.get_timer())
        found = [t for t in times if t is not None]
        return min(found) if found else None

    def handle_timer(self) -> None:
        if self.query is not None and not self.query.done:
            self.query.handle_timer(self.now)
            if self.query.failed:
                self.query_settled()
        self.machine.handle_timer(self.now)

    def send_data(self) -> None:
        seq = len(self.sent)
        t = self.machine.transmit(b"DATA%d" % seq, self.now)
        if t is not None:
            self.sent.append((seq, self.machine.current_path().kind, self.now))
            self.world.net.send(t)

    def lost(self, receiver: Node, since: float, until: float) -> list[int]:
        """Data this node sent between `since` and `until` that `receiver` never got."""
        got = set(receiver.received)
        return [seq for seq, _, t in self.sent if since <= t <= until and seq not in got]

    def state(self) -> State:
        return self.machine.state

    def first(self, state: State, after: float = 0.0) -> float | None:
        return next((t for t, s in self.states if s is state and t >= after), None)


class World:
    def __init__(self, *, seed: int = 1, loss: float = 0.0, latency_s: float = 0.02,
                 config: PunchConfig | None = None) -> None:
        self.seed = seed
        self.net = SimNetwork(seed=seed, loss=loss, latency_s=latency_s)
        self.config = config or PunchConfig()
        self.stun = StunServer(ServerAddresses(STUN[0], STUN[1], STUN[1] + 1))
        for address in self.stun.addresses.sockets:
            self.net.attach(address, self.stun.handle_datagram)
        self.relay = SimRelay(self.net)
        self.nodes: list[Node] = []
        self.nats: dict[int, SimNat] = {}
        """The NAT in front of node `index` (see `place`)."""
        self._schedule: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def add(self, name: str, peer: str, host: Address, **kw: bool) -> Node:
        node = Node(self, name, peer, host, self.config, **kw)
        self.nodes.append(node)
        return node

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._schedule, (when, self._seq, action))

    def start(self) -> None:
        for node in self.nodes:
            node.gather()
        self.at(self.net.now + DATA_INTERVAL_S, self._data_tick)

    def _data_tick(self) -> None:
        for node in self.nodes:
            if node.sending:
                node.send_data()
        self.at(self.net.now + DATA_INTERVAL_S, self._data_tick)

    def _events(self) -> None:
        for node in self.nodes:
            while (item := node.machine.next_event()) is not None:
                now = self.net.now
                if isinstance(item, DescriptionChanged):
                    wire = json.dumps(encode_description(item.description))
                    peer = next(n for n in self.nodes if n.name == node.peer)
                    self.at(now + SIGNAL_LATENCY_S, functools.partial(self._signal, peer, wire))
                elif isinstance(item, ChecksRestarted):
                    node.restarts.append(item)
                    node.gather()
                elif isinstance(item, StateChanged):
                    node.states.append((now, item.new))
                elif isinstance(item, PathChanged):
                    node.paths.append((now, item.new.kind))

    def _signal(self, node: Node, wire: str) -> None:
        if node.got_description_at is None:
            node.got_description_at = self.net.now
        node.machine.set_remote_candidates(parse_description(json.loads(wire)), self.net.now)

    def run(self, until: float) -> None:
        for _ in range(2_000_000):
            for node in self.nodes:
                for t in node.outgoing():
                    self.net.send(t)
            self._events()
            times = [n.timer() for n in self.nodes]
            times += [self.net.next_time(), self._schedule[0][0] if self._schedule else None]
            found = [t for t in times if t is not None]
            nxt = min(found) if found else until
            if nxt > until:
                self.net.advance(until)
                return
            self.net.advance(nxt)
            while self._schedule and self._schedule[0][0] <= self.net.now:
                heapq.heappop(self._schedule)[2]()
            for node in self.nodes:
                timer = node.timer()
                if timer is not None and timer <= self.net.now:
                    node.handle_timer()
        raise RuntimeError("simulation does not advance")

    @property
    def exchanged_at(self) -> float | None:
        times = [n.got_description_at for n in self.nodes]
        return None if None in times else max(t for t in times if t is not None)


# --- NAT kinds ----------------------------------------------------------------------------------

KINDS: dict[str, tuple[Behaviour, Behaviour] | None] = {
    "public": None,
    "full cone": (EIM, EIF),
    "restricted": (EIM, ADF),
    "port-restricted": (EIM, APDF),
    "symmetric": (APDM, APDF),
}
NAT_KINDS = {name: kind for name, kind in KINDS.items() if kind is not None}
# design §6: rows A, columns B; D* = direct through a peer-reflexive candidate
MATRIX = {
    "public": "D D D D D",
    "full cone": "D D D D D*",
    "restricted": "D D D D D*",
    "port-restricted": "D D D D R",
    "symmetric": "D D* D* R R",
}
EXPECTED = {(a, b): outcome for a, row in MATRIX.items()
            for b, outcome in zip(KINDS, row.split(), strict=True)}


def place(world: World, index: int, kind: str, *, timeout_s: float | None = None,
          preserve_ports: bool = False) -> Address:
    """A host for node `index` behind a NAT of `kind` (or public); returns its address."""
    behaviour = KINDS[kind]
    if behaviour is None:
        return (f"192.0.2.{index}", 41640 + index)
    world.nats[index] = world.net.add_nat(SimNat(
        f"203.0.113.{index}", f"10.0.{index}.0/24", mapping=behaviour[0],
        filtering=behaviour[1], timeout_s=timeout_s, preserve_ports=preserve_ports))
    return (f"10.0.{index}.2", 41640 + index)


@dataclass
class Outcome:
    world: World
    a: Node
    b: Node

    @property
    def exchanged(self) -> float:
        at = self.world.exchanged_at
        assert at is not None, "descriptions never crossed"
        return at

    def direct_after(self, since: float | None = None) -> float | None:
        since = self.exchanged if since is None else since
        times = [n.first(State.DIRECT, since) for n in (self.a, self.b)]
        return None if None in times else max(t for t in times if t is not None) - since

    def relayed_after(self) -> float | None:
        times = [n.first(State.RELAYED, self.exchanged) for n in (self.a, self.b)]
        return None if None in times else max(t for t in times if t is not None) - self.exchanged

    def trace(self) -> str:
        return "\n".join(self.world.net.trace[-400:])


def pair_world(kind_a: str, kind_b: str, *, seed: int = 1, loss: float = 0.0,
               config: PunchConfig | None = None, run_s: float = 12.0) -> Outcome:
    world = World(seed=seed, loss=loss, config=config)
    a = world.add("node-a", "node-b", place(world, 1, kind_a))
    b = world.add("node-b", "node-a", place(world, 2, kind_b))
    world.start()
    world.run(run_s)
    return Outcome(world, a, b)


def check_outcome(out: Outcome, expected: str, label: str, *,
                  direct_budget_s: float = 1.0) -> str:
    a, b = out.a, out.b
    if expected.startswith("D"):
        took = out.direct_after()
        assert took is not None, f"{label}: never direct\n{out.trace()}"
        assert a.state() is b.state() is State.DIRECT, label
        assert took <= direct_budget_s, f"{label}: direct after {took:.3f} s\n{out.trace()}"
        line = f"{label:<40} {expected:<3} direct {took * 1000:6.0f} ms after the exchange"
    else:
        took = out.relayed_after()
        assert took is not None, f"{label}: relay never decided\n{out.trace()}"
        assert took <= 6.0, f"{label}: relay decided after {took:.3f} s"
        for node in (a, b):  # what `meshd status` shows as timeToRelayS
            ttr = node.machine.metrics.time_to_relay_s
            assert ttr is not None and ttr <= 6.0, (label, ttr)
        assert a.first(State.DIRECT) is None and b.first(State.DIRECT) is None, label
        assert a.machine.current_path().kind is PathKind.RELAY, label
        assert b.machine.current_path().kind is PathKind.RELAY, label
        line = f"{label:<40} {expected:<3} relay decided {took:6.3f} s after the exchange"
    print(line)
    return line


# --- the matrix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind_a", "kind_b"), list(EXPECTED))
def test_nat_matrix(kind_a: str, kind_b: str) -> None:
    out = pair_world(kind_a, kind_b)
    expected = EXPECTED[kind_a, kind_b]
    check_outcome(out, expected, f"{kind_a} x {kind_b}")
    for node in (out.a, out.b):
        path = node.machine.current_path()
        if expected == "D*":  # the symmetric side's address was learnt from its checks
            assert node.machine.metrics.prflx_learnt >= 1
        if expected.startswith("D"):
            assert path.rtt is not None and path.rtt < 0.2
    # The relay carried data from the start and nothing was lost when the path switched.
    for sender, receiver in ((out.a, out.b), (out.b, out.a)):
        assert sender.sent and sender.sent[0][1] is PathKind.RELAY
        assert sender.lost(receiver, 0.0, out.world.net.now - 0.5) == []


def test_relay_carries_the_first_byte() -> None:
    out = pair_world("port-restricted", "port-restricted")
    first_data = out.a.sent[0]
    assert first_data[1] is PathKind.RELAY
    direct = out.a.first(State.DIRECT)
    assert direct is not None
    assert out.a.paths[0][1] is PathKind.RELAY and out.a.paths[0][0] <= direct
    assert {kind for _, kind, _ in out.a.sent} == {PathKind.RELAY, PathKind.DIRECT}


def test_same_lan_uses_host_candidates() -> None:
    world = World()
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", mapping=EIM, filtering=APDF))
    a = world.add("node-a", "node-b", ("10.0.1.2", 41641))
    b = world.add("node-b", "node-a", ("10.0.1.3", 41642))
    world.start()
    world.run(5.0)
    out = Outcome(world, a, b)
    check_outcome(out, "D", "same LAN (host candidates)")
    assert a.machine.current_path().remote == b.host
    assert b.machine.current_path().remote == a.host


@pytest.mark.parametrize(("hairpin", "expected"), [(True, "D"), (False, "R")])
def test_one_nat_without_host_candidates(hairpin: bool, expected: str) -> None:
    """Two nodes behind one NAT that advertise no host candidates: only hairpinning (through
    the server-reflexive candidates) keeps them direct."""
    world = World()
    world.net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", mapping=EIM, filtering=APDF,
                             hairpin=hairpin))
    a = world.add("node-a", "node-b", ("10.0.1.2", 41641), advertise_host=False)
    b = world.add("node-b", "node-a", ("10.0.1.3", 41642), advertise_host=False)
    world.start()
    world.run(12.0)
    check_outcome(Outcome(world, a, b), expected, f"one NAT, hairpin={hairpin}")


DOUBLE = [
    # node A behind `inner` behind `outer`, node B's kind, expected: the stricter layer wins
    ("full cone", "port-restricted", "port-restricted", "D"),
    ("full cone", "port-restricted", "symmetric", "R"),
    ("symmetric", "full cone", "full cone", "D*"),
    ("symmetric", "full cone", "port-restricted", "R"),
    ("port-restricted", "port-restricted", "port-restricted", "D"),
]


@pytest.mark.parametrize(("inner", "outer", "kind_b", "expected"), DOUBLE)
def test_double_nat(inner: str, outer: str, kind_b: str, expected: str) -> None:
    world = World()
    (outer_m, outer_f), (inner_m, inner_f) = NAT_KINDS[outer], NAT_KINDS[inner]
    world.net.add_nat(SimNat("203.0.113.1", "100.64.0.0/24", mapping=outer_m,
                             filtering=outer_f))  # the carrier's NAT
    world.net.add_nat(SimNat("100.64.0.2", "10.0.1.0/24", mapping=inner_m, filtering=inner_f))
    a = world.add("node-a", "node-b", ("10.0.1.2", 41641))
    b = world.add("node-b", "node-a", place(world, 2, kind_b))
    world.start()
    world.run(12.0)
    check_outcome(Outcome(world, a, b), expected, f"{inner} in {outer} x {kind_b}")


# --- loss, mapping loss, timeouts ---------------------------------------------------------------

LOSSY = [("port-restricted", "port-restricted"), ("restricted", "symmetric"),
         ("symmetric", "full cone"), ("port-restricted", "symmetric"), ("public", "symmetric")]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("kind_a", "kind_b"), LOSSY)
def test_converges_with_ten_percent_loss(kind_a: str, kind_b: str, seed: int) -> None:
    out = pair_world(kind_a, kind_b, seed=seed, loss=0.1, run_s=14.0)
    # 40 seeds: p90 0.5-0.6 s, worst 1.3 s (a lost nomination costs a retransmission)
    check_outcome(out, EXPECTED[kind_a, kind_b], f"{kind_a} x {kind_b}, 10% loss, seed {seed}",
                  direct_budget_s=1.5)


@pytest.mark.parametrize(("kind_a", "kind_b"), [("port-restricted", "port-restricted"),
                                                ("symmetric", "full cone"),
                                                ("full cone", "restricted")])
def test_mapping_loss_dead_then_direct_again(kind_a: str, kind_b: str) -> None:
    world = World()
    a = world.add("node-a", "node-b", place(world, 1, kind_a))
    b = world.add("node-b", "node-a", place(world, 2, kind_b))
    world.start()
    world.run(3.0)
    assert a.state() is b.state() is State.DIRECT
    nat_a = world.nats[1]
    before = b.machine.current_path()
    flushed = world.net.now
    nat_a.flush()  # conntrack -F on A's router: A's next packets leave from new ports
    world.run(flushed + 20.0)
    out = Outcome(world, a, b)
    dead = [n.first(State.CHECKING, flushed) for n in (a, b)]
    detected = min(t for t in dead if t is not None) - flushed
    assert detected <= 7.5, f"dead path detected after {detected:.2f} s"
    assert any(r.reason == "dead path" for r in a.restarts + b.restarts)
    back = out.direct_after(flushed)
    assert back is not None and back <= 10.0, out.trace()
    assert a.state() is b.state() is State.DIRECT
    print(f"{kind_a} x {kind_b}: mapping flushed, dead after {detected:.2f} s, "
          f"direct again after {back:.2f} s (B sends to {before.remote}, then "
          f"{b.machine.current_path().remote})")
    # Every datagram sent once direct again arrived.
    assert b.lost(a, flushed + back, world.net.now - 0.5) == []
    assert a.lost(b, flushed + back, world.net.now - 0.5) == []


def run_idle(keepalive_s: float) -> tuple[Node, Node]:
    """Direct, then idle for 150 s behind NATs that forget a mapping after 30 s of silence,
    then data again."""
    config = PunchConfig(keepalive_s=keepalive_s)
    world = World(config=config)
    a = world.add("node-a", "node-b", place(world, 1, "port-restricted", timeout_s=30.0))
    b = world.add("node-b", "node-a", place(world, 2, "port-restricted", timeout_s=30.0))
    world.start()
    world.run(2.0)
    assert a.state() is b.state() is State.DIRECT
    a.sending = b.sending = False
    world.run(152.0)
    a.sending = b.sending = True
    world.run(165.0)
    return a, b


def test_keepalives_hold_the_mapping_across_nat_timeouts() -> None:
    a, b = run_idle(keepalive_s=25.0)
    assert a.state() is b.state() is State.DIRECT
    assert a.restarts == [] and b.restarts == []
    assert a.machine.metrics.keepalives_sent >= 4 and b.machine.metrics.keepalives_sent >= 4
    assert a.machine.metrics.dead_paths == 0


def test_without_keepalives_the_mapping_expires_and_recovers() -> None:
    a, b = run_idle(keepalive_s=100.0)
    assert a.machine.metrics.dead_paths + b.machine.metrics.dead_paths >= 1
    assert a.state() is b.state() is State.DIRECT  # recovered after the restart


def test_relayed_pair_retries_with_backoff_and_upgrades() -> None:
    world = World()
    a = world.add("node-a", "node-b", place(world, 1, "port-restricted"))
    b = world.add("node-b", "node-a", place(world, 2, "symmetric"))
    world.start()
    world.run(40.0)
    retries = [r.now for r in a.restarts if r.reason == "retry"]
    assert b.restarts and all(r.reason == "peer restart" for r in b.restarts)
    gaps = [later - earlier for earlier, later in itertools.pairwise(retries)]
    assert len(retries) >= 3 and all(g2 > g1 for g1, g2 in itertools.pairwise(gaps))
    assert a.state() in (State.RELAYED, State.CHECKING)
    assert a.machine.current_path().kind is PathKind.RELAY
    # B's router is replaced by a port-restricted one: the next retry finds the direct path.
    nat_b = world.nats[2]
    nat_b.mapping = EIM
    nat_b.flush()
    changed = world.net.now
    world.run(changed + 70.0)
    assert a.state() is b.state() is State.DIRECT
    print(f"relayed: retries at {[round(t, 1) for t in retries]}; direct "
          f"{(a.first(State.DIRECT, changed) or 0) - changed:.1f} s after the NAT change")


def test_no_relay_and_no_direct_is_failed() -> None:
    world = World()
    a = world.add("node-a", "node-b", place(world, 1, "symmetric"), use_relay=False)
    b = world.add("node-b", "node-a", place(world, 2, "symmetric"), use_relay=False)
    world.start()
    world.run(8.0)
    assert a.first(State.FAILED) is not None and b.first(State.FAILED) is not None
    assert a.machine.current_path().kind is PathKind.NONE
    assert a.sent == []


def test_prepunch_opens_our_mapping_and_never_reaches_the_peer() -> None:
    config = PunchConfig(prepunch_ttl=2)
    out = pair_world("port-restricted", "port-restricted", config=config)
    check_outcome(out, "D", "port-restricted x port-restricted, pre-punch")
    assert out.a.machine.metrics.prepunches_sent >= 1
    expired = [line for line in out.world.net.trace if "expired: ttl" in line]
    assert expired
    # Each expired pre-punch was translated by its own NAT (a public source), i.e. it opened
    # the mapping, and none was delivered to the far side.
    assert all(" 203.0.113." in line.split("->")[0] for line in expired)
