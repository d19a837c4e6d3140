"""meshd.tunnel.candidates and meshd.tunnel.punch: formulas, encodings, the state table, the
two-peer in-memory harness (virtual clock, no NAT), and garbage from the network."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.simnet import APDF, EIM, SimNat, SimNetwork
from meshd.stun.codec import (
    IceAttributes,
    MessageClass,
    Method,
    StunMessage,
    Username,
    encode_message,
    parse_ice_attributes,
    parse_message,
    short_term_key,
)
from meshd.stun.server import ServerAddresses, StunServer
from meshd.tunnel.candidates import (
    Candidate,
    CandidateKind,
    Description,
    DescriptionError,
    ReflexiveQuery,
    Role,
    candidate_priority,
    encode_description,
    form_pairs,
    gather,
    host_candidate,
    pair_priority,
    parse_description,
    reflexive_candidate,
    relay_candidate,
    role_for,
)
from meshd.tunnel.punch import (
    TRANSITIONS,
    ChecksFailed,
    DescriptionChanged,
    Event,
    PairState,
    PathChanged,
    PathKind,
    PathMachine,
    PunchConfig,
    State,
)
from meshd.udp import Address, Transmit

A_HOST: Address = ("192.0.2.1", 41641)
B_HOST: Address = ("192.0.2.2", 41642)
STUN: Address = ("198.51.100.1", 3478)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


# --- candidates -------------------------------------------------------------------------------


def test_candidate_priorities_follow_rfc_8445() -> None:
    # 2^24·type preference + 2^8·local preference + (256 − component 1)
    assert candidate_priority(CandidateKind.HOST) == 126 * 2**24 + 65535 * 2**8 + 255
    assert candidate_priority(CandidateKind.HOST) == 2130706431
    assert candidate_priority(CandidateKind.PRFLX) == 1862270975
    assert candidate_priority(CandidateKind.SRFLX) == 1694498815
    assert candidate_priority(CandidateKind.RELAY) == 16777215
    assert candidate_priority(CandidateKind.HOST, 0) == 126 * 2**24 + 255
    with pytest.raises(ValueError):
        candidate_priority(CandidateKind.HOST, 65536)


def test_pair_priority_is_the_same_from_both_sides() -> None:
    g, d = 2130706431, 1694498815
    assert pair_priority(g, d) == 2**32 * d + 2 * g + 1
    assert pair_priority(d, g) == 2**32 * d + 2 * g
    # Both sides order the same pairs the same way (host candidates: nothing is replaced).
    a = gather([A_HOST, ("192.0.2.11", 5)])
    b = gather([B_HOST, ("192.0.2.12", 6)])
    mine = form_pairs(a, b, Role.CONTROLLING)
    theirs = form_pairs(b, a, Role.CONTROLLED)
    assert [(p.local.address, p.remote.address, p.priority) for p in mine] == \
        [(p.remote.address, p.local.address, p.priority) for p in theirs]


def test_gather_drops_redundant_reflexive_and_keeps_order() -> None:
    relayed = ("198.51.100.7", 50000)
    cands = gather([A_HOST, ("10.9.0.1", 5000)],
                   [(A_HOST, A_HOST, STUN), (("203.0.113.9", 7), ("10.9.0.1", 5000), STUN)],
                   [(relayed, ("198.51.100.7", 3478))])
    kinds = [(c.kind, c.address) for c in cands]
    assert kinds == [(CandidateKind.HOST, A_HOST), (CandidateKind.HOST, ("10.9.0.1", 5000)),
                     (CandidateKind.SRFLX, ("203.0.113.9", 7)), (CandidateKind.RELAY, relayed)]
    assert cands[0].priority > cands[1].priority  # first host preferred
    assert cands[2].base_address == ("10.9.0.1", 5000)
    assert cands[2].foundation != cands[1].foundation


def test_form_pairs_replaces_reflexive_by_base_and_keeps_relay_apart() -> None:
    local = gather([("10.0.1.2", 1)], [(("203.0.113.1", 2), ("10.0.1.2", 1), STUN)],
                   [(("198.51.100.7", 50000), STUN)])
    remote = (host_candidate(("10.0.2.2", 3)), reflexive_candidate(("203.0.113.2", 4),
              ("10.0.2.2", 3), STUN), relay_candidate(("198.51.100.7", 50001), STUN),
              host_candidate(("2001:db8::2", 5)))
    pairs = form_pairs(local, remote, Role.CONTROLLING)
    keys = [p.key for p in pairs]
    assert keys == [
        (("10.0.1.2", 1), ("10.0.2.2", 3)),
        (("10.0.1.2", 1), ("203.0.113.2", 4)),
        (("198.51.100.7", 50000), ("198.51.100.7", 50001)),
    ]
    assert [p.relayed for p in pairs] == [False, False, True]
    assert all(p.local.kind is not CandidateKind.SRFLX for p in pairs)


def test_role_for_is_deterministic() -> None:
    assert role_for("edge-1", "edge-2") is Role.CONTROLLING
    assert role_for("edge-2", "edge-1") is Role.CONTROLLED
    with pytest.raises(ValueError):
        role_for("edge-1", "edge-1")


def test_description_round_trip_through_json() -> None:
    cands = gather([A_HOST], [(("203.0.113.1", 40000), A_HOST, STUN)],
                   [(("198.51.100.7", 50000), STUN)])
    description = Description("Ab3x", "p" * 22, 7, cands)
    wire = json.loads(json.dumps(encode_description(description)))
    assert wire["cands"][0] == f"host 192.0.2.1 41641 2130706431 {cands[0].foundation}"
    back = parse_description(wire)
    assert back.generation == 7 and (back.ufrag, back.pwd) == ("Ab3x", "p" * 22)
    # Bases are local knowledge and do not travel.
    assert [(c.kind, c.address, c.priority, c.foundation) for c in back.candidates] == \
        [(c.kind, c.address, c.priority, c.foundation) for c in cands]


@pytest.mark.parametrize("bad", [
    None, [], {"v": 2}, {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": "1", "cands": []},
    {"v": 1, "ufrag": "ab", "pwd": "x" * 22, "gen": 1, "cands": []},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": True, "cands": []},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": -1, "cands": []},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["host 1.2.3.4 0 1 f"]},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["prflx 1.2.3.4 1 1 f"]},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["host 1.2.3.4 1 -1 f"]},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["host name 1 1 f"]},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["host 1.2.3.4 1 1 f:"]},
    {"v": 1, "ufrag": "abcd", "pwd": "x" * 22, "gen": 0, "cands": ["h 1.2.3.4 1 1 f"] * 40},
])
def test_bad_descriptions_are_remote_errors(bad: object) -> None:
    with pytest.raises(DescriptionError):
        parse_description(bad)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=6),
    max_leaves=20,
)
CANDIDATE_TEXT = st.builds(
    lambda kind, ip, port, prio, found: f"{kind} {ip} {port} {prio} {found}",
    st.sampled_from(["host", "srflx", "relay", "prflx", "x"]),
    st.sampled_from(["1.2.3.4", "::1", "300.1.1.1", "a"]),
    st.integers(-1, 70000), st.integers(-1, 2**33), st.text(max_size=34),
)


@settings(max_examples=300, deadline=None)
@given(JSON, st.lists(CANDIDATE_TEXT, max_size=4), st.text(max_size=70), st.integers())
def test_descriptions_parse_or_raise_description_error(
    junk: object, cands: list[str], text: str, gen: int
) -> None:
    for candidate in (junk, {"v": 1, "ufrag": text, "pwd": text, "gen": gen, "cands": cands},
                      {"v": 1, "ufrag": "abcd", "pwd": "y" * 22, "gen": 0, "cands": cands}):
        with contextlib.suppress(DescriptionError):
            parse_description(candidate)


def test_ice_attributes_from_the_rfc_5769_request() -> None:
    request = hexbytes("""
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf
    """)
    ice = parse_ice_attributes(parse_message(request))
    assert ice == IceAttributes(priority=0x6E0001FF, controlled=0x932FF9B151263B36)
    message = StunMessage(MessageClass.REQUEST, Method.BINDING, bytes(12),
                          IceAttributes(5, True, 7).to_attributes())
    assert parse_ice_attributes(parse_message(encode_message(message))) == \
        IceAttributes(5, True, 7)


# --- the state table --------------------------------------------------------------------------


def test_state_table_is_complete() -> None:
    reachable = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    for state in (State.DIRECT, State.RELAYED, State.FAILED):
        assert any(s is state and t is State.CHECKING for (s, _), t in TRANSITIONS.items())
    assert all(t is not State.IDLE for t in TRANSITIONS.values())


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        PunchConfig(keepalive_s=0)
    with pytest.raises(ValueError):
        PunchConfig(prepunch_ttl=0)
    with pytest.raises(ValueError):
        PunchConfig(consent_jitter=1.0)
    assert PunchConfig().keepalive_s == 25.0 and PunchConfig().dead_after_s == 7.0


# --- the two-peer in-memory harness -----------------------------------------------------------


class Pair:
    """Two machines on one in-memory network, descriptions passed on at once."""

    def __init__(self, *, seed: int = 1, loss: float = 0.0,
                 config: PunchConfig | None = None) -> None:
        self.net = SimNetwork(seed=seed, loss=loss)
        self.a = PathMachine("node-a", "node-b", config=config, rng=random.Random(seed))
        self.b = PathMachine("node-b", "node-a", config=config, rng=random.Random(seed + 100))
        self.events: dict[str, list[Event]] = {"a": [], "b": []}
        self.hold_for: PathMachine | None = None
        """Descriptions for this machine wait in `held` (a slow signaling path)."""
        self.held: list[DescriptionChanged] = []
        for machine, host in ((self.a, A_HOST), (self.b, B_HOST)):
            self.net.attach(host, self._handler(machine))

    def _handler(self, machine: PathMachine) -> Callable[[bytes, Address, Address],
                                                          list[Transmit]]:
        def handle(data: bytes, source: Address, local: Address) -> list[Transmit]:
            machine.receive(data, source, local, self.net.now)
            return machine.datagrams_to_send(self.net.now)
        return handle

    def machines(self) -> Iterator[tuple[str, PathMachine, PathMachine]]:
        yield "a", self.a, self.b
        yield "b", self.b, self.a

    def start(self) -> None:
        self.a.set_local_candidates([host_candidate(A_HOST)], self.net.now)
        self.b.set_local_candidates([host_candidate(B_HOST)], self.net.now)

    def run(self, until: float) -> None:
        for _ in range(200_000):
            for name, machine, peer in self.machines():
                for t in machine.datagrams_to_send(self.net.now):
                    self.net.send(t)
                while (item := machine.next_event()) is not None:
                    self.events[name].append(item)
                    if isinstance(item, DescriptionChanged):
                        if peer is self.hold_for:
                            self.held.append(item)
                        else:
                            peer.set_remote_candidates(item.description, self.net.now)
                timer = machine.get_timer()
                assert timer is None or timer > self.net.now, "a timer due now was not served"
            times = [m.get_timer() for _, m, _ in self.machines()] + [self.net.next_time()]
            due = [t for t in times if t is not None]
            nxt = min(due) if due else until
            if nxt > until:
                self.net.advance(until)
                return
            self.net.advance(nxt)
            for _, machine, _ in self.machines():
                timer = machine.get_timer()
                if timer is not None and timer <= self.net.now:
                    machine.handle_timer(self.net.now)
        raise RuntimeError("no progress")


def test_two_public_peers_go_direct() -> None:
    pair = Pair()
    pair.start()
    pair.run(1.0)
    assert pair.a.state is pair.b.state is State.DIRECT
    path = pair.a.current_path()
    assert (path.kind, path.local, path.remote) == (PathKind.DIRECT, A_HOST, B_HOST)
    assert pair.b.current_path().remote == A_HOST
    assert pair.a.metrics.successes == 1 and pair.a.metrics.attempts == 1
    ttd = pair.a.metrics.time_to_direct_s
    assert ttd is not None and ttd < 0.1
    changes = [e for e in pair.events["a"] if isinstance(e, PathChanged)]
    assert [c.new.kind for c in changes] == [PathKind.DIRECT]  # no relay: none -> direct
    assert pair.a.pairs()[0][1] is PairState.SUCCEEDED


def test_transmit_uses_the_current_path_and_keeps_consent_running() -> None:
    pair = Pair()
    assert pair.a.transmit(b"early", 0.0) is None  # no path yet
    assert pair.a.transmit_many([b"early"], 0.0) == []
    pair.start()
    pair.run(1.0)
    sent = pair.a.transmit(b"\xe3data", pair.net.now)
    assert sent == Transmit(A_HOST, B_HOST, b"\xe3data")
    assert pair.a.transmit_many([b"\xe3one", b"\xe3two"], pair.net.now) == [
        Transmit(A_HOST, B_HOST, b"\xe3one"), Transmit(A_HOST, B_HOST, b"\xe3two")]
    checks = pair.a.metrics.checks_sent
    pair.run(5.0)
    assert pair.a.metrics.checks_sent >= checks + 2  # consent checks while data flows
    idle = pair.a.metrics.checks_sent
    pair.run(60.0)  # no data for 55 s: consent stops after 30 s, keepalives go on
    assert pair.a.metrics.checks_sent - idle < 20
    assert pair.a.metrics.keepalives_sent >= 1
    assert pair.a.state is State.DIRECT


def test_dead_path_falls_back_and_restarts_with_a_new_generation() -> None:
    config = PunchConfig()
    pair = Pair(config=config)
    pair.start()
    pair.run(1.0)
    pair.net.loss = 1.0  # the path dies while data flows
    died = pair.net.now
    while pair.net.now < died + 8.0:
        pair.a.data_sent(pair.net.now)
        pair.run(pair.net.now + 0.5)
    assert pair.a.state is State.CHECKING
    assert pair.a.generation == 1
    assert pair.a.metrics.dead_paths == 1
    restart = next(e for e in pair.events["a"] if isinstance(e, DescriptionChanged)
                   and e.description.generation == 1)
    assert 6.0 <= restart.now - died <= 7.5
    pair.net.loss = 0.0
    pair.run(pair.net.now + 1.0)
    assert pair.a.state is pair.b.state is State.DIRECT


def test_time_to_direct_counts_from_both_descriptions_known() -> None:
    """The figure starts when *this* side holds both candidate sets (its round start), not
    when it gathered: a side whose peer description is late does not count the wait."""
    pair = Pair()
    pair.hold_for = pair.a  # b's description reaches a 3 s late
    pair.start()
    pair.run(3.0)
    assert (pair.a.state, pair.b.state) == (State.IDLE, State.CHECKING)
    pair.hold_for = None
    for held in pair.held:
        pair.a.set_remote_candidates(held.description, pair.net.now)
    pair.run(4.0)
    assert pair.a.state is pair.b.state is State.DIRECT
    ttd_a, ttd_b = pair.a.metrics.time_to_direct_s, pair.b.metrics.time_to_direct_s
    assert ttd_a is not None and ttd_a < 0.1
    # b held both sets from 0 s; its round waited for a (controlling) to nominate.
    assert ttd_b is not None and 3.0 <= ttd_b < 3.1
    assert pair.a.metrics.time_to_relay_s is None


def drive(m: PathMachine, now: float, until: Callable[[State], bool]) -> float:
    """Serve `m`'s timers (nothing answers) until `until(m.state)`; the time it happened."""
    for _ in range(10_000):
        if until(m.state):
            return now
        m.datagrams_to_send(now)
        timer = m.get_timer()
        assert timer is not None
        now = timer
        m.handle_timer(now)
    raise AssertionError("no progress")


@pytest.mark.parametrize(("config", "low", "high"), [
    (PunchConfig(), 5.0, 5.5),  # every check timed out (5 s) before the round timeout
    (PunchConfig(round_timeout_s=2.0), 2.0, 2.0),  # the round timeout decides
])
def test_time_to_relay_counts_round_start_to_the_relay_decision(
        config: PunchConfig, low: float, high: float) -> None:
    m = PathMachine("node-a", "node-b", config=config, rng=random.Random(5))
    relay = FakeRelay()
    m.set_local_candidates([host_candidate(A_HOST),
                            relay_candidate(relay.relayed_address, STUN)], 0.0, relay=relay)
    m.set_remote_candidates(Description("peer", "q" * 22, 0, (
        host_candidate(B_HOST), relay_candidate(("198.51.100.7", 50001), STUN))), 10.0)
    # The peer is unreachable directly: the round (started at 10 s) ends relayed.
    decided = drive(m, 10.0, lambda state: state is not State.CHECKING)
    assert m.state is State.RELAYED and m.metrics.time_to_direct_s is None
    ttr = m.metrics.time_to_relay_s
    assert ttr is not None and low <= ttr <= high and ttr == pytest.approx(decided - 10.0)
    # The controlling side's retry round (after ~2 s) ends relayed too: a fresh figure.
    retry = drive(m, decided, lambda state: state is State.CHECKING)
    assert 1.8 <= retry - decided <= 2.2
    again = drive(m, retry, lambda state: state is not State.CHECKING)
    assert m.metrics.time_to_relay_s == pytest.approx(again - retry)
    assert low <= again - retry <= high


def test_controlled_side_keeps_its_pair_when_the_restart_signal_comes_late() -> None:
    pair = Pair()
    pair.start()
    pair.run(1.0)
    assert pair.a.role is Role.CONTROLLING and pair.b.state is State.DIRECT
    pair.hold_for = pair.b  # a's restart description will reach b after a's checks
    pair.net.loss = 1.0
    died = pair.net.now
    while pair.a.generation == 0 and pair.net.now < died + 10.0:
        pair.a.data_sent(pair.net.now)
        pair.run(pair.net.now + 0.5)
    assert pair.a.generation == 1 and pair.held
    pair.net.loss = 0.0
    pair.run(pair.net.now + 1.0)  # a's new round: checks and nomination reach b first
    assert pair.a.state is State.DIRECT
    pair.hold_for = None
    for held in pair.held:
        pair.b.set_remote_candidates(held.description, pair.net.now)
    pair.run(pair.net.now + 8.0)
    assert pair.a.state is pair.b.state is State.DIRECT  # not relayed/failed on b's side
    assert pair.b.current_path().remote == A_HOST


def test_without_relay_a_dead_end_is_failed() -> None:
    pair = Pair()
    pair.net.loss = 1.0
    pair.start()
    pair.run(6.0)  # both rounds over (5.5 s); the controlling side retries after ~2 s
    assert pair.a.state is pair.b.state is State.FAILED
    assert any(isinstance(e, ChecksFailed) and not e.relayed for e in pair.events["a"])
    assert pair.a.current_path().kind is PathKind.NONE


# --- misuse, stale and early input --------------------------------------------------------------


def machine(name: str = "node-a", peer: str = "node-b") -> PathMachine:
    return PathMachine(name, peer, rng=random.Random(5))


def test_local_candidate_misuse_is_a_value_error() -> None:
    m = machine()
    relayed = relay_candidate(("198.51.100.7", 50000), STUN)
    with pytest.raises(ValueError):
        m.set_local_candidates([relayed], 0.0)  # no RelayLink
    prflx = Candidate(CandidateKind.PRFLX, A_HOST, 1, "abc")
    with pytest.raises(ValueError):
        m.set_local_candidates([prflx], 0.0)


def test_stale_and_new_session_descriptions() -> None:
    m = machine()
    m.set_local_candidates([host_candidate(A_HOST)], 0.0)
    first = Description("peer", "q" * 22, 3, (host_candidate(B_HOST),))
    m.set_remote_candidates(first, 0.0)
    assert m.state is State.CHECKING and m.metrics.attempts == 1
    m.set_remote_candidates(Description("peer", "q" * 22, 2, ()), 0.1)
    assert m.metrics.stale_descriptions == 1
    m.set_remote_candidates(Description("peer2", "r" * 22, 0, (host_candidate(B_HOST),)), 0.2)
    assert m.metrics.attempts == 2  # a new peer session restarts the checks


def check_request(to: PathMachine, ufrag: str, *, key: str | None = None,
                  ice: IceAttributes | None = None, txid: bytes = b"t" * 12) -> bytes:
    ice = ice or IceAttributes(priority=candidate_priority(CandidateKind.PRFLX), controlled=1)
    message = StunMessage(MessageClass.REQUEST, Method.BINDING, txid,
                          (Username(f"{to.ufrag}:{ufrag}"), *ice.to_attributes()),
                          fingerprint=True)
    return encode_message(message, key=short_term_key(key or to.pwd))


def test_checks_before_the_description_are_answered_then_replayed() -> None:
    m = machine()
    m.set_local_candidates([host_candidate(A_HOST)], 0.0)
    source = ("203.0.113.9", 40000)
    assert m.receive(check_request(m, "peer"), source, A_HOST, 0.0)
    answer = m.datagrams_to_send(0.0)
    assert [(t.source, t.destination) for t in answer] == [(A_HOST, source)]
    assert parse_message(answer[0].data).message_class is MessageClass.SUCCESS
    m.set_remote_candidates(Description("peer", "q" * 22, 0, (host_candidate(B_HOST),)), 0.1)
    sent = m.datagrams_to_send(0.1)
    assert sent[0].destination == source  # the triggered check to the peer-reflexive address
    assert m.metrics.prflx_learnt == 1


def test_role_conflict_and_bad_integrity_are_ignored() -> None:
    m = machine()  # node-a < node-b: controlling
    m.set_local_candidates([host_candidate(A_HOST)], 0.0)
    m.set_remote_candidates(Description("peer", "q" * 22, 0, (host_candidate(B_HOST),)), 0.0)
    m.datagrams_to_send(0.0)
    conflict = check_request(m, "peer", ice=IceAttributes(priority=1, controlling=9))
    assert m.receive(conflict, B_HOST, A_HOST, 0.01)
    assert m.metrics.role_conflicts == 1
    forged = check_request(m, "peer", key="w" * 22)
    assert m.receive(forged, B_HOST, A_HOST, 0.02)
    no_priority = check_request(m, "peer", ice=IceAttributes(controlled=1))
    assert m.receive(no_priority, B_HOST, A_HOST, 0.03)
    assert m.metrics.ignored == 2
    assert m.datagrams_to_send(0.03) == []
    other = check_request(m, "peer")
    assert not m.receive(other.replace(m.ufrag.encode(), b"zzzzzzzz"), B_HOST, A_HOST, 0.04)


STUN_SHAPED = st.builds(
    lambda cls, attrs, txid: encode_message(StunMessage(cls, Method.BINDING, txid, attrs,
                                                        fingerprint=True)),
    st.sampled_from(list(MessageClass)),
    st.lists(st.sampled_from([Username("zzzz:peer"), *IceAttributes(1, True, 2, 3)
                              .to_attributes()]), max_size=4).map(tuple),
    st.binary(min_size=12, max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=120) | STUN_SHAPED, max_size=6), st.booleans())
def test_garbage_never_raises_and_changes_nothing(datagrams: list[bytes], relay: bool) -> None:
    m = machine()
    m.set_local_candidates([host_candidate(A_HOST)], 0.0)
    m.set_remote_candidates(Description("peer", "q" * 22, 0, (host_candidate(B_HOST),)), 0.0)
    m.datagrams_to_send(0.0)
    before = (m.state, m.generation, m.current_path(), m.pairs())
    for i, data in enumerate(datagrams):
        m.receive(data, B_HOST, A_HOST, 0.001 * (i + 1))
        # Mangled copies of a genuine request: every chunking of a real check.
        genuine = check_request(m, "peer", txid=bytes([i]) * 12)
        cut = len(data) % len(genuine)
        m.receive(genuine[:cut] + data[:8], B_HOST, A_HOST, 0.01)
    assert (m.state, m.generation, m.current_path(), m.pairs()) == before
    assert all(parse_message(t.data).message_class is MessageClass.REQUEST
               for t in m.datagrams_to_send(0.02))  # no answers to unauthenticated input


# --- server-reflexive gathering -----------------------------------------------------------------


def test_reflexive_query_through_a_nat() -> None:
    net = SimNetwork(seed=3, loss=0.3)
    net.add_nat(SimNat("203.0.113.1", "10.0.1.0/24", mapping=EIM, filtering=APDF))
    server = StunServer(ServerAddresses(STUN[0], STUN[1], STUN[1] + 1))
    net.attach(STUN, server.handle_datagram)
    rng = random.Random(1)
    host: Address = ("10.0.1.2", 41641)
    query = ReflexiveQuery(host, STUN, 0.0, new_transaction_id=lambda: rng.randbytes(12))

    def client(data: bytes, source: Address, local: Address) -> list[Transmit]:
        query.receive(data, source, local, net.now)
        return []

    net.attach(host, client)
    while not query.done:
        for t in query.datagrams_to_send(net.now):
            net.send(t)
        timer = query.get_timer()
        assert timer is not None
        net.advance(min(timer, net.next_time() or timer))
        query.handle_timer(net.now)
    assert query.mapped == ("203.0.113.1", 40000)
    assert query.candidate() == (("203.0.113.1", 40000), host, STUN)


def test_reflexive_query_gives_up() -> None:
    query = ReflexiveQuery(A_HOST, STUN, 0.0, new_transaction_id=lambda: bytes(12))
    now = 0.0
    sent = 0
    while not query.done:
        sent += len(query.datagrams_to_send(now))
        timer = query.get_timer()
        assert timer is not None
        now = timer
        query.handle_timer(now)
    assert query.failed and query.mapped is None and sent == 5 and now == pytest.approx(1.6)


# --- the relay seam -----------------------------------------------------------------------------


class FakeRelay:
    """A `RelayLink` that marks what it wraps."""

    relayed_address: Address = ("198.51.100.7", 50000)

    def send_via_relay(self, data: bytes, peer: Address) -> Transmit:
        return Transmit(A_HOST, ("198.51.100.7", 3478), b"via " + repr(peer).encode() + data)


def test_relay_is_the_path_from_the_first_byte_until_it_goes() -> None:
    m = machine()
    relay = FakeRelay()
    ours = [host_candidate(A_HOST), relay_candidate(relay.relayed_address, STUN)]
    m.set_local_candidates(ours, 0.0, relay=relay)
    peer_relayed = ("198.51.100.7", 50001)
    m.set_remote_candidates(Description("peer", "q" * 22, 0, (
        host_candidate(B_HOST), relay_candidate(peer_relayed, STUN))), 0.0)
    path = m.current_path()
    assert (path.kind, path.local, path.remote) == (PathKind.RELAY, relay.relayed_address,
                                                    peer_relayed)
    sent = m.transmit(b"first", 0.0)
    assert sent is not None and sent.data == b"via " + repr(peer_relayed).encode() + b"first"
    batch = m.transmit_many([b"a", b"b"], 0.0)
    assert [t.data for t in batch] == [b"via " + repr(peer_relayed).encode() + x
                                       for x in (b"a", b"b")]
    # Checks leave from both the host socket and (for the relay pair) through the relay.
    now = 0.0
    seen: set[Address] = set()
    while m.state is State.CHECKING:
        seen |= {t.destination for t in m.datagrams_to_send(now)}
        timer = m.get_timer()
        assert timer is not None
        now = timer
        m.handle_timer(now)
    assert seen == {B_HOST, ("198.51.100.7", 3478)}
    assert 5.0 <= now <= 5.5
    assert [(m.state, m.current_path().kind)] == [(State.RELAYED, PathKind.RELAY)]
    m.set_local_candidates([host_candidate(A_HOST)], now)  # the allocation is gone
    assert [(m.state, m.current_path().kind)] == [(State.FAILED, PathKind.NONE)]


# --- the simnet extensions these tests rely on ----------------------------------------------------

INSIDE: Address = ("10.0.1.2", 41641)


def test_simnet_nat_flush_and_timeout() -> None:
    nat = SimNat("203.0.113.1", "10.0.1.0/24", mapping=EIM, filtering=APDF, timeout_s=30.0)
    first = nat.outbound(INSIDE, B_HOST, now=0.0)
    assert nat.inbound(B_HOST, first, now=29.0) == INSIDE  # refreshes the mapping
    assert nat.outbound(INSIDE, B_HOST, now=58.0) == first
    assert nat.inbound(B_HOST, first, now=88.5) is None  # 30 s of silence: forgotten
    second = nat.outbound(INSIDE, B_HOST, now=89.0)
    assert second != first
    nat.flush()
    assert nat.inbound(B_HOST, second, now=89.1) is None
    assert nat.outbound(INSIDE, B_HOST, now=89.2) not in (first, second)


def test_simnet_ttl_double_nat_and_private_addresses() -> None:
    net = SimNetwork()
    net.add_nat(SimNat("203.0.113.1", "100.64.0.0/24", mapping=EIM, filtering=APDF))
    net.add_nat(SimNat("100.64.0.2", "10.0.1.0/24", mapping=EIM, filtering=APDF))
    got: list[Address] = []

    def record(data: bytes, source: Address, local: Address) -> list[Transmit]:
        got.append(source)
        return [Transmit(local, source, b"back")] if data == b"hi" else []

    net.attach(B_HOST, record)
    net.attach(INSIDE, record)
    net.send(Transmit(INSIDE, B_HOST, b"x", ttl=2))  # passes one NAT, dies at the second
    net.send(Transmit(INSIDE, B_HOST, b"x", ttl=3))  # passes both, dies on the way
    net.send(Transmit(INSIDE, B_HOST, b"hi", ttl=4))
    net.send(Transmit(B_HOST, INSIDE, b"x"))  # private addresses are not routed
    net.advance(1.0)
    assert got == [("203.0.113.1", 40000), B_HOST]  # translated twice, answered through both
    outcomes = [(line.split()[1], line.split("  ")[-1]) for line in net.trace]
    assert outcomes == [
        ("100.64.0.2:40000", "expired: ttl"),  # the outer NAT never saw it: no mapping there
        ("203.0.113.1:40000", "expired: ttl"),  # both mappings open, the peer never sees it
        ("192.0.2.2:41642", "dropped: private address, not routed"),
        ("203.0.113.1:40000", "delivered"),
        ("192.0.2.2:41642", "delivered"),
    ]
