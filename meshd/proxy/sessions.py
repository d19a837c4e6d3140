"""A bounded table of idle-expiring sessions (sans-I/O: `now` is a parameter).

The UDP proxy keeps one session per (client address, original destination). A session lives
while datagrams flow either way; `expire(now)` hands back those idle for longer than the idle
time, and adding beyond the bound hands back the least recently used one, so the table (and the
sockets behind it) can never grow without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SessionTable(Generic[K, V]):
    """key → session, ordered by last activity, at most `max_entries`."""

    def __init__(self, idle_s: float, max_entries: int) -> None:
        if idle_s <= 0 or max_entries < 1:
            raise ValueError("idle_s must be positive and max_entries at least 1")
        self.idle_s = idle_s
        self.max_entries = max_entries
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The session of `key`, if any (expired or not: call `expire` first)."""
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def add(self, key: K, session: V, now: float) -> list[tuple[K, V]]:
        """Insert a new session; returns the sessions evicted to stay within the bound."""
        self._entries[key] = (session, now)
        self._entries.move_to_end(key)
        evicted = []
        while len(self._entries) > self.max_entries:
            old_key, (old, _) = self._entries.popitem(last=False)
            evicted.append((old_key, old))
        return evicted

    def touch(self, key: K, now: float) -> None:
        """A datagram went through `key`'s session at `now`."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], now)
            self._entries.move_to_end(key)

    def pop(self, key: K) -> V | None:
        """Remove `key`'s session and return it."""
        entry = self._entries.pop(key, None)
        return entry[0] if entry is not None else None

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return the sessions idle for longer than `idle_s` at `now`."""
        out = []
        while self._entries:
            key, (session, last) = next(iter(self._entries.items()))
            if now - last < self.idle_s:
                break
            del self._entries[key]
            out.append((key, session))
        return out

    def next_deadline(self) -> float | None:
        """When the least recently active session expires (None when empty)."""
        if not self._entries:
            return None
        _, (_, last) = next(iter(self._entries.items()))
        return last + self.idle_s

    def items(self) -> list[tuple[K, V]]:
        """All sessions (for shutdown and status)."""
        return [(k, v) for k, (v, _) in self._entries.items()]
