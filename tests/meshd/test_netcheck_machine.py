"""meshd.netcheck.machine, driven through meshd.simnet: every NAT combination, no sockets,
no sleeping, seeded loss."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.netcheck.classify import Behaviour, NatType, NetcheckReport, build_report
from meshd.netcheck.machine import (
    TRANSITIONS,
    NetcheckFailed,
    NetcheckMachine,
    Phase,
    Probe,
    Status,
)
from meshd.simnet import ADF, ADM, APDF, APDM, EIF, EIM, SimNat, SimNetwork, run_machine
from meshd.stun.codec import ErrorCode, MessageClass, StunMessage, encode_message, parse_message
from meshd.stun.server import ServerAddresses, StunServer
from meshd.stun.transaction import RetransmitPolicy
from meshd.udp import Address, Transmit

P, A = "198.51.100.1", "198.51.100.2"
SERVER: Address = (P, 3478)
NAT_IP = "203.0.113.1"
LAN_HOST = "10.0.0.2"
PUBLIC_HOST = "192.0.2.50"
POLICY = RetransmitPolicy()  # the defaults: 0.25 s RTO, 4 copies, 2.5 s

ServerHandler = Callable[[StunServer], Callable[[bytes, Address, Address], Iterable[Transmit]]]


def plain(server: StunServer) -> Callable[[bytes, Address, Address], Iterable[Transmit]]:
    return server.handle_datagram


def run(
    nat: SimNat | None,
    *,
    host: str = LAN_HOST,
    seed: int = 0,
    loss: float = 0.0,
    duplicate: float = 0.0,
    alt_ip: str | None = A,
    server_ips: tuple[str, str] = (P, A),
    serve: ServerHandler | None = plain,
    policy: RetransmitPolicy = POLICY,
) -> tuple[NetcheckMachine, SimNetwork]:
    net = SimNetwork(seed=seed, loss=loss, duplicate=duplicate)
    if nat is not None:
        net.add_nat(nat)
    primary = server_ips[0]
    if serve is not None:
        server = StunServer(ServerAddresses(primary, 3478, 3479, alt_ip and server_ips[1]))
        handler = serve(server)
        for address in server.addresses.sockets:
            net.attach(address, handler)
    rng = random.Random(seed)
    machine = NetcheckMachine(
        (primary, 3478), (host, 50000), (host, 50001), policy=policy,
        new_transaction_id=lambda: rng.randbytes(12),
    )

    def client(data: bytes, source: Address, local: Address) -> list[Transmit]:
        machine.receive_datagram(data, source, net.now, local=local)
        return []

    net.attach((host, 50000), client)
    net.attach((host, 50001), client)
    machine.start(net.now)
    run_machine(net, machine)
    return machine, net


def report_of(machine: NetcheckMachine, net: SimNetwork) -> NetcheckReport:
    try:
        return build_report(machine.observations())
    except NetcheckFailed:
        print("\n".join(net.trace))
        raise


def nat(mapping: Behaviour | None, filtering: Behaviour, *, hairpin: bool = False,
        preserve_ports: bool = False) -> SimNat:
    if mapping is None:  # a firewall in front of public addresses
        return SimNat(PUBLIC_HOST, "192.0.2.0/24", mapping=None, filtering=filtering)
    return SimNat(NAT_IP, "10.0.0.0/24", mapping=mapping, filtering=filtering, hairpin=hairpin,
                  preserve_ports=preserve_ports)


EXPECTED_TYPE = {
    (EIM, EIF): NatType.FULL_CONE,
    (EIM, ADF): NatType.RESTRICTED,
    (EIM, APDF): NatType.PORT_RESTRICTED,
    **{(m, f): NatType.SYMMETRIC for m in (ADM, APDM) for f in (EIF, ADF, APDF)},
}
COMBOS = [(m, f) for m in (EIM, ADM, APDM) for f in (EIF, ADF, APDF)]


@pytest.mark.parametrize(("mapping", "filtering"), COMBOS)
@pytest.mark.parametrize("hairpin", [False, True])
@pytest.mark.parametrize("preserve_ports", [False, True])
def test_every_nat_combination(
    mapping: Behaviour, filtering: Behaviour, hairpin: bool, preserve_ports: bool
) -> None:
    machine, net = run(nat(mapping, filtering, hairpin=hairpin, preserve_ports=preserve_ports))
    report = report_of(machine, net)
    trace = "\n".join(net.trace)
    assert report.nat, trace
    assert report.public[0] == NAT_IP
    assert (report.mapping, report.filtering) == (mapping, filtering), trace
    assert report.hairpin is hairpin, trace
    assert report.port_preserved is preserve_ports
    assert report.nat_type is EXPECTED_TYPE[mapping, filtering]
    assert report.notes == ()
    # Everything after test I runs concurrently: about one give-up period at most.
    assert net.now <= POLICY.give_up_s + 4 * net.latency_s


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("mapping", "filtering"), COMBOS)
def test_every_combination_with_loss_and_duplicates(
    seed: int, mapping: Behaviour, filtering: Behaviour
) -> None:
    machine, net = run(nat(mapping, filtering, hairpin=True), seed=seed, loss=0.05,
                       duplicate=0.05)
    report = report_of(machine, net)
    assert (report.mapping, report.filtering, report.hairpin) == (mapping, filtering, True), (
        "\n".join(net.trace)
    )


def test_heavy_loss_is_covered_by_retransmissions() -> None:
    machine, net = run(nat(EIM, ADF, hairpin=True), seed=7, loss=0.3)
    report = report_of(machine, net)
    assert (report.mapping, report.filtering, report.hairpin) == (EIM, ADF, True)
    assert any("lost" in line for line in net.trace)
    assert max(r.sent for r in machine.results.values()) > 1


def test_fast_when_everything_answers() -> None:
    machine, net = run(nat(EIM, EIF, hairpin=True))
    assert report_of(machine, net).nat_type is NatType.FULL_CONE
    assert net.now < 0.1  # no probe had to time out
    assert machine.results[Probe.MAPPING_ALT_ADDRESS].status is Status.CANCELLED
    assert machine.results[Probe.FILTERING_CHANGE_PORT].status is Status.CANCELLED


def test_no_nat_is_public() -> None:
    machine, net = run(None, host=PUBLIC_HOST)
    report = report_of(machine, net)
    assert not report.nat
    assert report.public == report.local == (PUBLIC_HOST, 50000)
    assert (report.mapping, report.filtering) == (EIM, EIF)
    assert report.hairpin is True  # sending to ourselves arrives
    assert report.port_preserved
    assert report.nat_type is NatType.PUBLIC


@pytest.mark.parametrize(
    ("filtering", "expected"), [(ADF, NatType.RESTRICTED), (APDF, NatType.PORT_RESTRICTED)]
)
def test_no_nat_behind_a_firewall(filtering: Behaviour, expected: NatType) -> None:
    machine, net = run(nat(None, filtering), host=PUBLIC_HOST)
    report = report_of(machine, net)
    assert not report.nat
    assert report.filtering is filtering
    assert report.nat_type is expected


def test_server_without_other_address() -> None:
    machine, net = run(nat(EIM, EIF), alt_ip=None)
    report = report_of(machine, net)
    assert report.nat
    assert (report.mapping, report.filtering) == (None, None)
    assert report.nat_type is NatType.UNKNOWN
    assert report.hairpin is False
    assert report.can_hole_punch_with == report.relay_with == ()
    assert any("no usable OTHER-ADDRESS" in note for note in report.notes)
    assert any("NAT type unknown" in note for note in report.notes)


def test_unreachable_server_is_a_typed_failure() -> None:
    machine, net = run(nat(EIM, EIF), serve=None)
    assert machine.phase is Phase.FAILED
    with pytest.raises(NetcheckFailed) as info:
        machine.observations()
    assert str(info.value) == (
        "STUN server 198.51.100.1:3478 did not answer (4 requests over 2.5 s)"
    )
    assert net.now == pytest.approx(2.5)


def test_shorter_policy_from_config() -> None:
    policy = RetransmitPolicy(initial_rto_s=0.05, transmissions=3, give_up_s=0.4)
    machine, net = run(nat(EIM, APDF), serve=None, policy=policy)
    with pytest.raises(NetcheckFailed, match=r"\(3 requests over 0.4 s\)"):
        machine.observations()
    assert net.now == pytest.approx(0.4)


def test_error_answer_to_test_one() -> None:
    def refuse(server: StunServer) -> Callable[[bytes, Address, Address], list[Transmit]]:
        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            req = parse_message(data)
            answer = StunMessage(MessageClass.ERROR, req.method, req.transaction_id,
                                 (ErrorCode(401, "Unauthorized"),))
            return [Transmit(local, source, encode_message(answer))]
        return handler

    machine, _ = run(nat(EIM, EIF), serve=refuse)
    with pytest.raises(NetcheckFailed, match=r"answered error 401 \(Unauthorized\)"):
        machine.observations()


def test_answer_from_wrong_address_is_not_accepted() -> None:
    def elsewhere(server: StunServer) -> Callable[[bytes, Address, Address], list[Transmit]]:
        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            return [replace(t, source=(P, 3479)) for t in server.handle_datagram(data, source,
                                                                                  local)]
        return handler

    machine, _ = run(None, host=PUBLIC_HOST, serve=elsewhere)
    with pytest.raises(NetcheckFailed) as info:
        machine.observations()
    assert str(info.value) == (
        "STUN server 198.51.100.1:3478 did not answer (4 requests over 2.5 s);"
        " answers came from 198.51.100.1:3479"
    )


def test_server_ignoring_change_request() -> None:
    # An RFC 3489-ish server that answers from where the request arrived: filtering cannot be
    # told (a naive client would call it endpoint-independent).
    def ignores(server: StunServer) -> Callable[[bytes, Address, Address], list[Transmit]]:
        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            return [replace(t, source=local) for t in server.handle_datagram(data, source,
                                                                              local)]
        return handler

    machine, net = run(nat(EIM, APDF), serve=ignores)
    report = report_of(machine, net)
    assert report.mapping is EIM
    assert report.filtering is None
    assert report.nat_type is NatType.UNKNOWN
    assert any("may ignore CHANGE-REQUEST" in note for note in report.notes)


def test_firewalled_alternate_address_leaves_filtering_unknown() -> None:
    # A server whose alternate IP is blocked: no CHANGE-REQUEST answer can arrive, which must
    # not be mistaken for address-and-port-dependent filtering.
    def primary_only(server: StunServer) -> Callable[[bytes, Address, Address], list[Transmit]]:
        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            if local[0] == A:
                return []
            return [t for t in server.handle_datagram(data, source, local) if t.source[0] != A]
        return handler

    machine, net = run(nat(EIM, EIF), serve=primary_only)
    report = report_of(machine, net)
    assert (report.mapping, report.filtering, report.nat_type) == (None, None, NatType.UNKNOWN)
    assert "the server's alternate address never answered: filtering unknown" in report.notes
    assert any("mapping test II to 198.51.100.2:3478: no answer" in n for n in report.notes)


def test_garbage_and_stray_answers_are_ignored() -> None:
    stray_rng = random.Random(5)

    def noisy(server: StunServer) -> Callable[[bytes, Address, Address], list[Transmit]]:
        def handler(data: bytes, source: Address, local: Address) -> list[Transmit]:
            out = list(server.handle_datagram(data, source, local))
            stray = StunMessage(MessageClass.SUCCESS, 1, stray_rng.randbytes(12))
            return [*out, Transmit(local, source, b"\x00garbage"),
                    Transmit(local, source, encode_message(stray))]
        return handler

    machine, net = run(nat(EIM, ADF, hairpin=True), serve=noisy)
    report = report_of(machine, net)
    assert (report.mapping, report.filtering, report.nat_type) == (EIM, ADF, NatType.RESTRICTED)
    assert machine.ignored > 0
    assert any("ignored" in note for note in report.notes)


def test_ipv6_without_nat() -> None:
    machine, net = run(None, host="2001:db8:5::5", server_ips=("2001:db8::1", "2001:db8::2"))
    report = report_of(machine, net)
    assert (report.nat, report.nat_type) == (False, NatType.PUBLIC)
    assert report.server == ("2001:db8::1", 3478)


def test_phase_table() -> None:
    assert TRANSITIONS[Phase.IDLE, "start"] is Phase.BINDING
    assert TRANSITIONS[Phase.BINDING, "answered"] is Phase.PROBING
    assert TRANSITIONS[Phase.PROBING, "settled"] is Phase.DONE
    machine = NetcheckMachine(SERVER, ("10.0.0.2", 1), ("10.0.0.2", 2))

    def phase() -> Phase:  # a call, so mypy does not keep the narrowed type across start()
        return machine.phase

    assert phase() is Phase.IDLE
    assert machine.get_timer() is None
    with pytest.raises(RuntimeError, match="not finished"):
        machine.observations()
    machine.start(0.0)
    assert phase() is Phase.BINDING
    assert machine.get_timer() == 0.0
    assert len(machine.datagrams_to_send(0.0)) == 1
    assert machine.get_timer() == 0.25
    with pytest.raises(RuntimeError, match="invalid"):
        machine.start(0.0)


def test_sockets_must_differ() -> None:
    with pytest.raises(ValueError):
        NetcheckMachine(SERVER, ("10.0.0.2", 1), ("10.0.0.2", 1))


@settings(max_examples=50)
@given(st.lists(st.tuples(st.binary(max_size=60), st.booleans()), max_size=10))
def test_fuzz_datagrams_never_break_the_machine(
    junk: list[tuple[bytes, bool]]
) -> None:
    # Random datagrams to either socket at the start of a run change nothing.
    net = SimNetwork()
    server = StunServer(ServerAddresses(P, 3478, 3479, A))
    for address in server.addresses.sockets:
        net.attach(address, server.handle_datagram)
    mapping, filtering = (PUBLIC_HOST, 50000), (PUBLIC_HOST, 50001)
    machine = NetcheckMachine(SERVER, mapping, filtering)

    def client(data: bytes, source: Address, local: Address) -> list[Transmit]:
        machine.receive_datagram(data, source, net.now, local=local)
        return []

    net.attach(mapping, client)
    net.attach(filtering, client)
    machine.start(0.0)
    for data, to_mapping in junk:
        machine.receive_datagram(data, SERVER, 0.0, local=mapping if to_mapping else filtering)
    run_machine(net, machine)
    assert build_report(machine.observations()).nat_type is NatType.PUBLIC
