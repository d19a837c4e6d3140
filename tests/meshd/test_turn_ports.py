"""meshd.turn.ports: the relayed-port pool over the `RelayPorts` seam (with its in-memory fake)."""

from __future__ import annotations

import random

import pytest

from meshd.turn.ports import MemoryRelayPorts, PortPool

IP = "198.51.100.1"


def pool(low: int, high: int, taken: set[int] | None = None,
         seed: int = 1) -> tuple[PortPool, MemoryRelayPorts]:
    ports = MemoryRelayPorts(taken={(IP, p) for p in taken or set()})
    return PortPool(IP, low, high, ports, random.Random(seed)), ports


def test_random_ports_within_range_until_exhausted() -> None:
    p, ports = pool(50000, 50009)
    got = [p.acquire() or 0 for _ in range(10)]
    assert sorted(got) == list(range(50000, 50010))
    assert got != sorted(got)  # picked at random (RFC 8656 §7.2), seeded here
    assert p.acquire() is None
    assert ports.opened == {(IP, port) for port in range(50000, 50010)}
    p.release(50004)
    assert (IP, 50004) not in ports.opened
    assert p.acquire() == 50004
    assert p.in_use == 10


def test_ports_held_elsewhere_are_skipped() -> None:
    p, _ = pool(50000, 50003, taken={50000, 50001, 50003})
    assert p.acquire() == 50002
    assert p.acquire() is None


def test_even_ports_and_pairs() -> None:
    p, ports = pool(50001, 50006, taken={50004})
    assert {p.acquire(even=True), p.acquire(even=True)} == {50002, 50006}  # 50004 held
    assert p.acquire(even=True) is None
    assert p.acquire_pair() is None  # 50006 has no 50007 in range, 50002 is in use
    p.release(50002)
    assert p.acquire_pair() == 50002
    assert {(IP, 50002), (IP, 50003)} <= ports.opened


def test_pair_rolls_back_when_the_odd_port_fails() -> None:
    p, ports = pool(50000, 50003, taken={50001})
    assert p.acquire_pair() == 50002
    assert ports.opened == {(IP, 50002), (IP, 50003)}
    p2, ports2 = pool(50000, 50001, taken={50001})
    assert p2.acquire_pair() is None
    assert ports2.opened == set()


def test_dont_fragment_and_bad_range() -> None:
    p, ports = pool(50000, 50000)
    assert p.acquire() == 50000
    p.set_dont_fragment(50000)
    assert ports.dont_fragment == {(IP, 50000)}
    p.release(50000)
    assert ports.dont_fragment == set()
    p.release(50000)  # idempotent
    with pytest.raises(ValueError):
        pool(50010, 50000)
    odd, _ = pool(50001, 50001)
    assert odd.acquire(even=True) is None
