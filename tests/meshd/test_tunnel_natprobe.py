"""meshd.tunnel.natprobe: when the agent classifies its NAT, and the classification on loopback
against our own STUN service (the mesh's NAT class labels: test_tunnel_mesh.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshd.control.wire import NatSummary
from meshd.netcheck.classify import Behaviour, NatType, NetcheckReport
from meshd.stun.service import StunService
from meshd.stun.transaction import RetransmitPolicy
from meshd.tunnel.natprobe import NatProbeConfig, NatProber, NatProbeSchedule, summary_of
from meshd.udp import Address

CFG = NatProbeConfig(first_delay_s=1.0, min_interval_s=60.0, retry_s=10.0, max_retry_s=35.0)
A, B, C = ("203.0.113.1", 4000), ("203.0.113.1", 4001), ("203.0.113.9", 4000)


# --- the schedule -------------------------------------------------------------------------------


def test_first_run_after_the_delay_and_nothing_more_without_a_change() -> None:
    s = NatProbeSchedule(CFG, 0.0)
    assert s.get_timer() == 1.0 and not s.due(0.5) and s.due(1.0)
    assert not s.reflexive_changed(A, 0.6)  # the first address is what the first run sees
    s.started(1.0)
    assert s.get_timer() is None and not s.due(5.0)
    s.finished(True, 3.5)
    assert s.get_timer() is None
    assert not s.reflexive_changed(A, 10.0)  # told again, unchanged


def test_a_changed_reflexive_address_reruns_at_most_once_per_interval() -> None:
    s = NatProbeSchedule(CFG, 0.0)
    s.reflexive_changed(A, 0.5)
    s.started(1.0)
    s.finished(True, 3.5)
    assert s.reflexive_changed(B, 20.0)
    assert s.get_timer() == 61.0  # rate-limited: 60 s after the last start
    assert s.reflexive_changed(C, 30.0)  # merged into the same run
    assert s.get_timer() == 61.0
    s.started(61.0)
    s.finished(True, 63.0)
    assert s.reflexive_changed(A, 200.0)
    assert s.get_timer() == 200.0  # long after: at once
    assert s.runs == 2


def test_a_change_during_a_run_asks_for_one_more_after_it() -> None:
    s = NatProbeSchedule(CFG, 0.0)
    s.reflexive_changed(A, 0.5)
    s.started(1.0)
    assert s.reflexive_changed(B, 2.0)
    assert s.get_timer() is None  # not while running
    s.finished(True, 3.5)
    assert s.get_timer() == 61.0


def test_failures_retry_with_backoff_and_a_change_brings_the_retry_forward() -> None:
    s = NatProbeSchedule(CFG, 0.0)
    s.started(1.0)
    s.finished(False, 3.5)
    assert s.get_timer() == 13.5
    s.started(13.5)
    s.finished(False, 16.0)
    assert s.get_timer() == 36.0
    s.started(36.0)
    s.finished(False, 38.0)
    assert s.get_timer() == 73.0  # capped at max_retry_s
    s.reflexive_changed(A, 40.0)
    assert s.reflexive_changed(B, 50.0)  # the server answers the tunnel again
    assert s.get_timer() == 96.0  # still one run per interval
    s.started(96.0)
    s.finished(True, 98.0)
    assert s.failures == 0 and s.get_timer() is None


@pytest.mark.parametrize("bad", [{"first_delay_s": -1}, {"min_interval_s": 0},
                                 {"retry_s": 10, "max_retry_s": 5}])
def test_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NatProbeConfig(**bad)


def test_summary_keeps_what_was_learnt_only() -> None:
    def report(kind: NatType, mapping: Behaviour | None,
               filtering: Behaviour | None) -> NetcheckReport:
        return NetcheckReport(A, A, A, True, mapping, filtering, None, True, kind, (), (), ())

    eim, apdf = Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT
    assert summary_of(report(NatType.PORT_RESTRICTED, eim, apdf)) == NatSummary(
        "port-restricted", "endpoint-independent", "address-and-port-dependent")
    assert summary_of(report(NatType.UNKNOWN, eim, None)) == NatSummary(
        "unknown", "endpoint-independent", None)  # the alternate never answered: partial
    assert summary_of(report(NatType.UNKNOWN, None, None)) == NatSummary("unknown")


# --- the prober on loopback ---------------------------------------------------------------------

FAST = NatProbeConfig(first_delay_s=0.0, min_interval_s=0.2, retry_s=0.2, max_retry_s=0.4,
                      policy=RetransmitPolicy(initial_rto_s=0.05, transmissions=3,
                                              give_up_s=0.3))


async def probe(alt_ip: str | None, changes: tuple[Address, ...] = (),
                runs: int = 1) -> tuple[list[NatSummary], NatProber]:
    """Run a prober against our STUN service until `runs` results; `changes` are told to it
    (as the tunnel would) once the first result is in."""
    service = await StunService.start("127.0.0.1", alt_ip=alt_ip, port=0, alt_port=0)
    results: list[NatSummary] = []
    done = asyncio.Event()

    def on_result(summary: NatSummary) -> None:
        results.append(summary)
        if len(results) == 1:
            for address in changes:
                prober.reflexive_changed(address)
        if len(results) >= runs:
            done.set()

    prober = NatProber(("127.0.0.1", service.addresses.port), "127.0.0.1", on_result, FAST)
    try:
        await asyncio.wait_for(done.wait(), 10)
        return results, prober
    finally:
        await prober.close()
        service.close()


def test_an_rfc_5780_server_classifies_loopback_as_public() -> None:
    (summary,), prober = asyncio.run(probe("127.0.0.2"))
    assert summary == NatSummary("public", "endpoint-independent", "endpoint-independent")
    assert prober.last == summary and prober.last_error is None


def test_a_server_with_one_address_gives_a_partial_unknown_summary() -> None:
    # `meshd server` with one stun.addresses entry sends no OTHER-ADDRESS: the behaviours are
    # untested, the run still counts (published as unknown, not retried as a failure).
    (summary,), prober = asyncio.run(probe(None))
    assert summary == NatSummary("unknown")
    assert prober.schedule.failures == 0 and prober.schedule.get_timer() is None


def test_a_new_reflexive_address_runs_it_again() -> None:
    # A (the first address) asks for nothing; B, a change, for one more run.
    results, prober = asyncio.run(probe("127.0.0.2", (A, B), runs=2))
    assert len(results) == 2 and prober.schedule.runs == 2


def test_an_unanswered_server_is_retried_and_closing_stops_everything() -> None:
    async def main() -> NatProber:
        service = await StunService.start("127.0.0.1", port=0, alt_port=0)
        port = service.addresses.port
        service.close()  # nobody listens there now
        prober = NatProber(("127.0.0.1", port), "127.0.0.1", lambda s: None, FAST)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if prober.schedule.failures >= 2:
                break
        await prober.close()
        return prober

    prober = asyncio.run(main())
    assert prober.schedule.failures >= 2 and "did not answer" in (prober.last_error or "")
    assert prober.last is None
