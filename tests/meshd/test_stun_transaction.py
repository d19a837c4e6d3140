"""meshd.stun.transaction: the RFC 5389 §7.2.1 retransmission schedule."""

from __future__ import annotations

import pytest

from meshd.stun.transaction import ClientTransaction, RetransmitPolicy

SRC, DST = ("10.0.0.1", 5000), ("198.51.100.1", 3478)


def test_default_schedule() -> None:
    assert RetransmitPolicy().send_times() == [0.0, 0.25, 0.75, 1.75]


def test_rfc5389_schedule() -> None:
    # RFC 5389 §7.2.1: RTO 500 ms, Rc 7 -> 0, 500, 1500, 3500, 7500, 15500, 31500 ms; 39.5 s.
    policy = RetransmitPolicy(0.5, 7, 39.5)
    assert policy.send_times() == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


def test_give_up_cuts_the_schedule() -> None:
    assert RetransmitPolicy(0.25, 4, 0.5).send_times() == [0.0, 0.25]


@pytest.mark.parametrize("args", [(0, 4, 2.5), (0.25, 0, 2.5), (0.25, 4, 0)])
def test_policy_validation(args: tuple[float, int, float]) -> None:
    with pytest.raises(ValueError):
        RetransmitPolicy(*args)


def drive(tx: ClientTransaction, now: float) -> list[float]:
    times = []
    while not tx.expired(now):
        if tx.datagrams_to_send(now):
            times.append(now)
        now = tx.get_timer()
    return times


def test_transaction_sends_on_schedule_and_expires() -> None:
    tx = ClientTransaction(b"x" * 12, b"req", SRC, DST, RetransmitPolicy(), now=100.0)
    assert drive(tx, 100.0) == [100.0, 100.25, 100.75, 101.75]
    assert tx.sent == 4
    assert tx.get_timer() == tx.deadline == 102.5
    assert tx.expired(102.5)


def test_late_caller_gets_one_copy() -> None:
    tx = ClientTransaction(b"x" * 12, b"req", SRC, DST, RetransmitPolicy(), now=0.0)
    out = tx.datagrams_to_send(1.0)  # three copies were due
    assert len(out) == 1
    assert (out[0].source, out[0].destination, out[0].data) == (SRC, DST, b"req")
    assert tx.sent == 1
    assert tx.get_timer() == 1.75
    assert tx.datagrams_to_send(1.0) == []
    assert tx.datagrams_to_send(3.0) == []  # expired: nothing more
