"""meshd.lb: policies, table swaps, affinity, passive health — all with an injected clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from meshd.catalog import Endpoint, LbPolicy, Service, ServicePort
from meshd.lb import Backend, LbConfig, LoadBalancer

PORT = ServicePort("http", 80, "TCP", 8080)


def ep(ip: str, node: str = "n1", ready: bool = True, port: int = 8080) -> Endpoint:
    return Endpoint(ip, (("http", port, "TCP"),), ready, node, None)


def service(*endpoints: Endpoint, policy: LbPolicy = "round-robin",
            affinity: int | None = None) -> Service:
    return Service("default", "web", ("10.96.0.10",), (PORT,), tuple(endpoints), affinity,
                   policy)


def ips(backends: list[Backend]) -> list[str]:
    return [b.ip for b in backends]


def first(lb: LoadBalancer, svc: Service, client: str = "10.0.0.1", now: float = 0.0) -> str:
    picked = lb.pick(svc, PORT, client, now)
    assert picked, "no candidate"
    return picked[0].ip


def connect(lb: LoadBalancer, svc: Service, client: str, now: float) -> str:
    """Pick and report the first candidate as connected (what the proxy does)."""
    backend = lb.pick(svc, PORT, client, now)[0]
    lb.report_success(svc, PORT, client, backend, now)
    return backend.ip


THREE = (ep("172.17.0.2"), ep("172.17.0.3"), ep("172.17.0.4"))


# -- candidates ------------------------------------------------------------------------------


def test_candidates_are_distinct_ready_and_bounded() -> None:
    svc = service(*THREE, ep("172.17.0.5", ready=False), ep("172.17.0.6"),
                  Endpoint("172.17.0.7", (("other", 9, "TCP"),), True, "n1", None))
    lb = LoadBalancer(LbConfig(max_candidates=3))
    picked = lb.pick(svc, PORT, "10.0.0.1", 0)
    assert len(picked) == 3 and len(set(ips(picked))) == 3
    assert {b.ip for b in lb.backends(svc, PORT)} == {
        "172.17.0.2", "172.17.0.3", "172.17.0.4", "172.17.0.6"}
    assert all(b.port == 8080 for b in picked)


def test_no_ready_endpoint_gives_no_candidate() -> None:
    lb = LoadBalancer()
    assert lb.pick(service(ep("172.17.0.2", ready=False)), PORT, "c", 0) == []
    assert lb.pick(service(), PORT, "c", 0) == []


def test_overlapping_pod_ips_on_two_nodes_are_two_backends() -> None:
    svc = service(ep("172.17.0.2", node="a"), ep("172.17.0.2", node="b"))
    lb = LoadBalancer()
    picked = lb.pick(svc, PORT, "c", 0)
    assert {b.key for b in picked} == {("a", "172.17.0.2", 8080), ("b", "172.17.0.2", 8080)}
    lb.report_failure(picked[0], 0)
    assert [b.key for b in lb.pick(svc, PORT, "c", 0.1)] == [picked[1].key]


# -- round robin ------------------------------------------------------------------------------


def test_round_robin_spread_within_ten_percent_over_300_picks() -> None:
    lb = LoadBalancer()
    counts = Counter(first(lb, service(*THREE), now=i) for i in range(300))
    assert set(counts) == {"172.17.0.2", "172.17.0.3", "172.17.0.4"}
    assert all(90 <= n <= 110 for n in counts.values()), counts


def test_round_robin_candidates_follow_the_rotation() -> None:
    lb = LoadBalancer()
    assert ips(lb.pick(service(*THREE), PORT, "c", 0)) == ["172.17.0.2", "172.17.0.3",
                                                           "172.17.0.4"]
    assert ips(lb.pick(service(*THREE), PORT, "c", 0)) == ["172.17.0.3", "172.17.0.4",
                                                           "172.17.0.2"]


def test_table_swap_keeps_the_rotation_of_surviving_endpoints() -> None:
    lb = LoadBalancer()
    assert [first(lb, service(*THREE)) for _ in range(2)] == ["172.17.0.2", "172.17.0.3"]
    # A new table object with one more endpoint: the rotation goes on after .3, not from .2.
    grown = service(*THREE, ep("172.17.0.9"))
    assert [first(lb, grown) for _ in range(3)] == ["172.17.0.4", "172.17.0.9", "172.17.0.2"]
    # The endpoint the cursor is on disappears: continue with the next address.
    assert first(lb, grown) == "172.17.0.3"
    shrunk = service(ep("172.17.0.2"), ep("172.17.0.9"))
    assert first(lb, shrunk) == "172.17.0.9"


def test_round_robin_fair_after_many_swaps() -> None:
    """Swapping the table (an equal copy) on every pick does not bias the rotation."""
    lb = LoadBalancer()
    counts = Counter(first(lb, service(*[replace(e) for e in THREE])) for _ in range(300))
    assert sorted(counts.values()) == [100, 100, 100]


# -- random ------------------------------------------------------------------------------------


def test_random_is_seeded_and_spreads() -> None:
    svc = service(*THREE, policy="random")
    one = LoadBalancer(rng=random.Random(7))
    two = LoadBalancer(rng=random.Random(7))
    seq_one = [ips(one.pick(svc, PORT, "c", 0)) for _ in range(300)]
    seq_two = [ips(two.pick(svc, PORT, "c", 0)) for _ in range(300)]
    assert seq_one == seq_two
    assert all(len(set(c)) == 3 for c in seq_one)
    counts = Counter(c[0] for c in seq_one)
    assert all(70 <= n <= 130 for n in counts.values()), counts


# -- consistent hash ---------------------------------------------------------------------------

CLIENTS = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(500)]
FIVE = tuple(ep(f"172.17.0.{i}") for i in range(2, 7))


def test_consistent_hash_spreads_clients() -> None:
    lb = LoadBalancer()
    counts = Counter(first(lb, service(*FIVE, policy="consistent-hash"), c) for c in CLIENTS)
    assert len(counts) == 5
    assert all(50 <= n <= 150 for n in counts.values()), counts  # 100 each on average


def test_consistent_hash_is_the_same_in_every_agent() -> None:
    svc = service(*FIVE, policy="consistent-hash")
    one, two = LoadBalancer(), LoadBalancer()
    assert [first(one, svc, c) for c in CLIENTS] == [first(two, svc, c) for c in CLIENTS]


def test_consistent_hash_removing_others_keeps_every_client() -> None:
    lb = LoadBalancer(LbConfig(hash_sticky_s=0))  # the ring alone
    before = {c: first(lb, service(*FIVE, policy="consistent-hash"), c) for c in CLIENTS}
    smaller = service(*FIVE[:-1], policy="consistent-hash")
    removed = FIVE[-1].ip
    after = {c: first(lb, smaller, c) for c in CLIENTS}
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert moved and all(before[c] == removed for c in moved)


def test_consistent_hash_adding_an_endpoint_moves_nobody_with_stickiness() -> None:
    lb = LoadBalancer()
    svc = service(*FIVE, policy="consistent-hash")
    before = {c: connect(lb, svc, c, 0) for c in CLIENTS}
    bigger = service(*FIVE, ep("172.17.0.50"), policy="consistent-hash")
    assert {c: connect(lb, bigger, c, 10) for c in CLIENTS} == before
    # New clients do land on the new endpoint.
    newcomers = Counter(first(lb, bigger, f"10.9.0.{i}") for i in range(1, 200))
    assert newcomers["172.17.0.50"] > 0


def test_consistent_hash_ring_alone_moves_only_to_the_newcomer() -> None:
    lb = LoadBalancer(LbConfig(hash_sticky_s=0))
    before = {c: first(lb, service(*FIVE, policy="consistent-hash"), c) for c in CLIENTS}
    bigger = service(*FIVE, ep("172.17.0.50"), policy="consistent-hash")
    after = {c: first(lb, bigger, c) for c in CLIENTS}
    assert all(after[c] in (before[c], "172.17.0.50") for c in CLIENTS)


def test_consistent_hash_skips_an_ejected_endpoint_and_comes_back() -> None:
    lb = LoadBalancer(LbConfig(hash_sticky_s=0, ejection_base_s=5, ejection_max_s=5))
    svc = service(*FIVE, policy="consistent-hash")
    home = first(lb, svc, "10.0.0.7")
    backend = next(b for b in lb.backends(svc, PORT) if b.ip == home)
    lb.report_failure(backend, 0)
    assert first(lb, svc, "10.0.0.7", now=1) != home
    assert first(lb, svc, "10.0.0.7", now=6) == home  # re-probe after the ejection


# -- session affinity --------------------------------------------------------------------------


def test_affinity_sticks_then_expires_with_the_clock() -> None:
    lb = LoadBalancer()
    svc = service(*THREE, affinity=10)
    home = connect(lb, svc, "10.0.0.1", 0)
    assert all(connect(lb, svc, "10.0.0.1", t) == home for t in (1, 5, 14, 23))  # sliding
    assert connect(lb, svc, "10.0.0.2", 24) != home  # others still rotate
    # 10 s after the last connection (at 23) the entry has expired: rotation resumes.
    picks = {first(lb, svc, "10.0.0.1", 33.5) for _ in range(3)}
    assert len(picks) > 1


def test_affinity_survives_table_swaps_of_other_endpoints() -> None:
    lb = LoadBalancer()
    home = connect(lb, service(*THREE, affinity=60), "10.0.0.1", 0)
    others = [e for e in THREE if e.ip != home]
    swapped = service(next(e for e in THREE if e.ip == home), others[0], ep("172.17.0.9"),
                      affinity=60)
    assert connect(lb, swapped, "10.0.0.1", 1) == home
    gone = service(*others, affinity=60)
    assert connect(lb, gone, "10.0.0.1", 2) != home


def test_affinity_yields_to_ejection() -> None:
    lb = LoadBalancer()
    svc = service(*THREE, affinity=60)
    home = connect(lb, svc, "10.0.0.1", 0)
    lb.report_failure(next(b for b in lb.backends(svc, PORT) if b.ip == home), 1)
    assert first(lb, svc, "10.0.0.1", 1.5) != home


def test_affinity_table_is_bounded() -> None:
    lb = LoadBalancer(LbConfig(affinity_max_entries=10))
    svc = service(*THREE, affinity=3600)
    for i in range(100):
        connect(lb, svc, f"10.2.0.{i}", i)
    assert lb.table_sizes()["affinity"] == 10
    lb.expire(10_000)
    assert lb.table_sizes()["affinity"] == 0


# -- passive health ----------------------------------------------------------------------------


def test_ejection_backoff_doubles_and_caps_and_success_resets() -> None:
    config = LbConfig(ejection_base_s=1, ejection_multiplier=2, ejection_max_s=5)
    assert [config.ejection_period(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    lb = LoadBalancer(config)
    svc = service(*THREE)
    bad = lb.backends(svc, PORT)[0]
    assert lb.report_failure(bad, 0)
    assert not lb.report_failure(bad, 0.5)  # already ejected: no double count
    assert lb.ejected(0.5) == {bad.key: 1}
    assert lb.report_failure(bad, 1.0)  # the re-probe failed
    assert lb.ejected(1.0) == {bad.key: 3.0}
    lb.report_success(svc, PORT, "c", bad, 3.0)
    assert lb.ejected(3.0) == {}
    lb.report_failure(bad, 4.0)
    assert lb.ejected(4.0) == {bad.key: 5.0}  # history forgotten: base period again


def test_ejected_endpoint_is_skipped_then_reprobed_by_one_caller() -> None:
    lb = LoadBalancer(LbConfig(ejection_base_s=10, probe_timeout_s=2, max_candidates=1))
    svc = service(*THREE)
    bad = lb.backends(svc, PORT)[0]
    lb.report_failure(bad, 0)
    during = Counter(first(lb, svc, now=5) for _ in range(30))
    assert bad.ip not in during
    # After the ejection: the next pick in turn offers it once; the others skip it while that
    # probe is pending.
    after = [first(lb, svc, now=10 + i * 0.01) for i in range(6)]
    assert after.count(bad.ip) == 1
    # The probe went unanswered (never dialed): after the probe window it is offered again.
    later = [first(lb, svc, now=13 + i * 0.01) for i in range(3)]
    assert bad.ip in later


def test_all_ejected_tries_least_recently_ejected_first() -> None:
    lb = LoadBalancer(LbConfig(ejection_base_s=10))
    svc = service(*THREE)
    b2, b3, b4 = lb.backends(svc, PORT)
    lb.report_failure(b3, 0)
    lb.report_failure(b4, 1)
    lb.report_failure(b2, 2)
    assert ips(lb.pick(svc, PORT, "c", 3)) == ["172.17.0.3", "172.17.0.4", "172.17.0.2"]


def test_health_table_is_bounded_and_forgets() -> None:
    lb = LoadBalancer(LbConfig(health_max_entries=5, ejection_max_s=30))
    for i in range(20):
        lb.report_failure(("n", f"172.17.1.{i}", 80), 0)
    assert lb.table_sizes()["health"] == 5
    lb.expire(1000)
    assert lb.table_sizes()["health"] == 0


def test_retain_forgets_removed_services() -> None:
    lb = LoadBalancer()
    svc = service(*THREE, affinity=60)
    connect(lb, svc, "c", 0)
    assert lb.table_sizes()["pickers"] == 1 and lb.table_sizes()["affinity"] == 1
    lb.retain([])
    assert lb.table_sizes()["pickers"] == 0 and lb.table_sizes()["affinity"] == 0


@pytest.mark.parametrize("change", [
    {"max_candidates": 0}, {"ejection_base_s": 0}, {"ejection_base_s": 40},
    {"ejection_multiplier": 0.5}, {"virtual_nodes": 0}, {"affinity_max_entries": 0},
    {"probe_timeout_s": 0}, {"hash_sticky_s": -1},
])
def test_config_checks(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LbConfig(**change)  # type: ignore[arg-type]
