"""edgeweave.ratelimit: token buckets on an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeweave.ratelimit import KeyedBuckets, TokenBucket


def test_a_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(10.5)  # one token back after 0.5 s
    assert not bucket.take(10.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped
    assert not bucket.take(99.0)  # time running backwards adds nothing
    assert bucket.take(101.0, amount=2.0) and not bucket.take(101.0, amount=0.5)


@pytest.mark.parametrize("rate,burst", [(0.0, 1.0), (1.0, 0.0), (-1.0, 5.0)])
def test_rates_and_bursts_must_be_positive(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket.full(rate, burst, 0.0)
    with pytest.raises(ValueError):
        KeyedBuckets(rate, burst, 10)


def test_keys_have_their_own_buckets_and_the_least_recently_used_go_first() -> None:
    buckets: KeyedBuckets[str] = KeyedBuckets(rate=1.0, burst=1.0, max_keys=2)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0) and not buckets.take("a", 0.0)  # touches a: b is oldest
    assert buckets.take("c", 0.0)  # full: b is forgotten
    assert len(buckets) == 2
    assert not buckets.take("a", 0.0)  # a was kept, still empty
    assert buckets.take("b", 0.0)  # b comes back full
    with pytest.raises(ValueError):
        KeyedBuckets(1.0, 1.0, 0)


@given(st.floats(0.1, 100.0), st.floats(1.0, 50.0),
       st.lists(st.tuples(st.floats(0.0, 10.0), st.floats(0.1, 5.0)), max_size=200))
def test_never_more_than_the_burst_plus_what_the_rate_adds(
        rate: float, burst: float, steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket.full(rate, burst, 0.0)
    now, taken = 0.0, 0.0
    for advance, amount in steps:
        now += advance
        if bucket.take(now, amount):
            taken += amount
        assert -1e-9 <= bucket.tokens <= burst + 1e-9
    assert taken <= burst + rate * now + 1e-6
