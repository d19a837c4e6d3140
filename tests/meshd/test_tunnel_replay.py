"""meshd.tunnel.replay: the sliding window against a plain set-based model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.tunnel.replay import ReplayWindow


class Model:
    """What the window must decide, written the obvious way."""

    def __init__(self, window: int, limit: int) -> None:
        self.seen: set[int] = set()
        self.window, self.limit = window, limit

    def accept(self, counter: int) -> bool:
        highest = max(self.seen, default=-1)
        if counter >= self.limit or counter in self.seen or highest - counter >= self.window:
            return False
        self.seen.add(counter)
        return True


def test_duplicates_and_too_old_counters_are_refused() -> None:
    w = ReplayWindow(2048)
    assert w.window == 1984
    assert w.accept(0) and not w.accept(0)
    assert w.accept(5) and w.accept(3) and not w.accept(3)
    assert w.accept(3000)
    assert not w.accept(3000 - 1984)  # exactly one window behind
    assert w.accept(3000 - 1983)
    assert not w.accept(5)
    assert w.highest == 3000


def test_check_does_not_mark() -> None:
    w = ReplayWindow(128)
    assert w.check(10) and w.check(10)
    w.mark(10)
    assert not w.check(10)


def test_big_jumps_clear_the_whole_ring() -> None:
    w = ReplayWindow(256)
    for c in range(200):
        assert w.accept(c)
    assert w.accept(10_000)
    # Everything in the new window that was never seen is acceptable, despite old bits.
    assert all(w.check(c) for c in range(10_000 - 192 + 1, 10_000))


def test_limit_is_the_reject_after_messages_bound() -> None:
    w = ReplayWindow(128, limit=100)
    assert w.accept(99)
    assert not w.check(100)


@pytest.mark.parametrize("bits", [0, 64, 96, 192, 1000])
def test_sizes_must_be_powers_of_two_blocks(bits: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(bits)


@settings(max_examples=300)
@given(
    st.sampled_from([128, 256, 2048]),
    st.lists(
        st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)), max_size=300
    ),
)
def test_agrees_with_the_model(bits: int, counters: list[int]) -> None:
    limit = 2**64 - 2**13 - 1
    w, model = ReplayWindow(bits, limit=limit), Model(bits - 64, limit)
    for c in counters:
        assert w.accept(c) == model.accept(c), c


@settings(max_examples=200)
@given(st.permutations(list(range(300))))
def test_reordering_inside_the_window_loses_nothing(order: list[int]) -> None:
    w = ReplayWindow(2048)
    assert all(w.accept(c) for c in order)
    assert not any(w.check(c) for c in range(300))
