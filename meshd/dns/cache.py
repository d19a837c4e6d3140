"""A TTL-respecting cache of upstream answers, stored as wire bytes and aged in place.

Positive answers (NOERROR with records in the answer section) live for the smallest TTL of their
answer and authority records; negative ones (NXDOMAIN, or NOERROR without answers = NODATA) for
the SOA's `min(TTL, MINIMUM)` from the authority section (RFC 2308 §5) and are not cached without
an SOA. Both are capped by configuration. Other rcodes are never cached. On a hit every TTL in the
copy handed out (answer, authority, additional; not OPT) is lowered by the whole seconds the
entry has been held (RFC 1035 §7.4 / RFC 2181 §8), so clients never cache past the source's TTL.

Bounded: least recently used entries go first. Time is the caller's `now` (seconds, monotonic).
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Hashable
from dataclasses import dataclass

from meshd.dns import wire

_U32 = struct.Struct("!I")
_MAX_TTL = 2**31 - 1  # RFC 2181 §8: larger values are treated as 0


@dataclass(frozen=True, slots=True)
class _Entry:
    data: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    expires: float


def _ttl(value: int) -> int:
    return value if value <= _MAX_TTL else 0


def cache_ttl(data: bytes, response: wire.Response, max_ttl: int, max_negative_ttl: int) -> int:
    """How many seconds `response` (scanned from `data`) may be cached; 0: not at all."""
    rcode = response.rcode
    if rcode == wire.NOERROR and response.answer:
        ttl = min(_ttl(r.ttl) for r in (*response.answer, *response.authority)
                  if r.rtype != wire.OPT)
        return max(0, min(ttl, max_ttl))
    if rcode in (wire.NOERROR, wire.NXDOMAIN):
        for record in response.authority:
            if record.rtype == wire.SOA:
                try:
                    minimum = wire.soa_minimum(data, record)
                except wire.DnsWireError:
                    return 0
                return max(0, min(_ttl(record.ttl), _ttl(minimum), max_negative_ttl))
    return 0


class AnswerCache:
    """Upstream answers by question key (whatever hashable key the caller chooses)."""

    def __init__(self, max_entries: int, max_ttl: int, max_negative_ttl: int) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, data: bytes, response: wire.Response, now: float) -> bool:
        """Store `data` (a whole response, scanned as `response`); False if it is not
        cacheable."""
        if self.max_entries <= 0:
            return False
        ttl = cache_ttl(data, response, self.max_ttl, self.max_negative_ttl)
        if ttl <= 0:
            return False
        records = [r for r in (*response.answer, *response.authority, *response.additional)
                   if r.rtype != wire.OPT]
        entry = _Entry(data, tuple(r.ttl_offset for r in records),
                       tuple(_ttl(r.ttl) for r in records), now, now + ttl)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, key: Hashable, now: float) -> bytes | None:
        """The cached response with aged TTLs (transaction id as stored), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        elapsed = int(now - entry.stored)
        if elapsed <= 0:
            return entry.data
        out = bytearray(entry.data)
        for offset, ttl in zip(entry.ttl_offsets, entry.ttls, strict=True):
            _U32.pack_into(out, offset, max(0, ttl - elapsed))
        return bytes(out)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
