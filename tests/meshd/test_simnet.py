"""meshd.simnet: the simulated NAT follows RFC 4787, the network is seeded and virtual-time."""

from __future__ import annotations

from meshd.netcheck.classify import Behaviour
from meshd.simnet import ADF, ADM, APDF, APDM, EIF, EIM, SimNat, SimNetwork
from meshd.udp import Address, Transmit

IN: Address = ("10.0.0.2", 5000)
S1: Address = ("198.51.100.1", 3478)
S1B: Address = ("198.51.100.1", 3479)
S2: Address = ("198.51.100.2", 3478)


def make(mapping: Behaviour | None, filtering: Behaviour, *, hairpin: bool = False,
         preserve_ports: bool = False) -> SimNat:
    return SimNat("203.0.113.1", "10.0.0.0/24", mapping=mapping, filtering=filtering,
                  hairpin=hairpin, preserve_ports=preserve_ports)


def test_mapping_behaviours() -> None:
    eim, adm, apdm = make(EIM, EIF), make(ADM, EIF), make(APDM, EIF)
    assert eim.outbound(IN, S1) == eim.outbound(IN, S2) == eim.outbound(IN, S1B)
    assert adm.outbound(IN, S1) == adm.outbound(IN, S1B) != adm.outbound(IN, S2)
    assert len({apdm.outbound(IN, S1), apdm.outbound(IN, S1B), apdm.outbound(IN, S2)}) == 3


def test_port_preservation() -> None:
    nat = make(APDM, EIF, preserve_ports=True)
    assert nat.outbound(IN, S1) == ("203.0.113.1", 5000)
    assert nat.outbound(IN, S2)[1] != 5000  # taken by the first mapping
    assert make(EIM, EIF).outbound(IN, S1)[1] == 40000


def test_filtering_behaviours() -> None:
    for filtering, allowed in [(EIF, {S1, S1B, S2}), (ADF, {S1, S1B}), (APDF, {S1})]:
        nat = make(EIM, filtering)
        external = nat.outbound(IN, S1)
        for source in (S1, S1B, S2):
            expected = IN if source in allowed else None
            assert nat.inbound(source, external) == expected, (filtering, source)
        assert nat.inbound(S1, ("203.0.113.1", 1)) is None  # no mapping, no entry


def test_hairpin() -> None:
    nat = make(EIM, APDF, hairpin=True)
    external = nat.outbound(IN, S1)
    assert nat.hairpin_target(external) == IN
    assert make(EIM, APDF).hairpin_target(external) is None


def echo(data: bytes, source: Address, local: Address) -> list[Transmit]:
    return [Transmit(local, source, data)]


def test_network_delivers_through_nat_in_virtual_time() -> None:
    net = SimNetwork(latency_s=0.5)
    net.add_nat(make(EIM, APDF))
    got: list[tuple[float, bytes, Address]] = []
    net.attach(S1, echo)

    def record(data: bytes, source: Address, local: Address) -> list[Transmit]:
        got.append((net.now, data, source))
        return []

    net.attach(IN, record)
    net.send(Transmit(IN, S1, b"hi"))
    assert net.next_time() == 0.5
    net.advance(10.0)
    assert got == [(1.0, b"hi", S1)]
    assert net.now == 10.0
    assert len(net.trace) == 2


def test_unsolicited_inbound_is_filtered() -> None:
    net = SimNetwork()
    net.add_nat(make(EIM, ADF))
    net.attach(IN, echo)
    net.send(Transmit(S2, ("203.0.113.1", 40000), b"x"))
    net.advance(1.0)
    assert net.trace[-1].endswith("dropped: filtered")


def test_loss_is_seeded() -> None:
    def lost(seed: int) -> list[bool]:
        net = SimNetwork(seed=seed, loss=0.5)
        for _ in range(20):
            net.send(Transmit(S1, S2, b"x"))
        return ["lost" in line for line in net.trace]

    assert lost(1) == lost(1)
    assert lost(1) != lost(2)
