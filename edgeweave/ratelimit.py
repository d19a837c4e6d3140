"""Token buckets on the caller's clock (sans-I/O): a rate with a burst, and a bounded set of
them by key (per peer, per source address).

A bucket holds at most `burst` tokens, gains `rate` per second of `now`, and starts full. Time
running backwards (a caller's clock mix-up) adds nothing. `KeyedBuckets` forgets the least
recently used key once `max_keys` are held: its memory is bounded whatever the keys are
(e.g. spoofed source addresses). A forgotten key comes back with a full bucket, so the bound
must stay well above the keys that matter at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, at most `burst`."""

    rate: float
    burst: float
    tokens: float
    last: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        if not (rate > 0 and burst > 0):
            raise ValueError(f"token bucket needs a positive rate and burst, got {rate}, {burst}")
        return cls(rate, burst, burst, now)

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take `amount` tokens if there are that many (True), else take none (False)."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class KeyedBuckets(Generic[K]):
    """One `TokenBucket` per key, at most `max_keys` of them (least recently used go first)."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        TokenBucket.full(rate, burst, 0.0)  # validates rate and burst
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: K, now: float, amount: float = 1.0) -> bool:
        """`TokenBucket.take` on `key`'s bucket (a new key starts full)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket.full(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, amount)
