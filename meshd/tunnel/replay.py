"""The anti-replay window for transport counters (RFC 6479's ring of bitmap blocks).

Datagrams may arrive reordered or duplicated (several paths, the relay, the network). A counter
is accepted once, and only if it is newer than the highest seen or at most `window` behind it.

The bitmap is a ring of 64-bit blocks. Moving forward clears only the blocks the highest counter
skips into (RFC 6479 §3), so each step costs O(1) whatever the window size. One block of the
ring is always the partly filled current one, which is why the window is `bits - 64`:

    ring (bits = 256):   [ block 0 | block 1 | block 2 | block 3 ]
    counters:              0..63     64..127   128..191  192..255   256.. reuse block 0

`check` before authenticating (cheap early drop), `mark` only after the AEAD accepted the
datagram, so forged datagrams never move the window.
"""

from __future__ import annotations

BLOCK_BITS = 64
DEFAULT_BITS = 2048
"""Ring size; the usable window is 1984 counters (WireGuard's Linux module uses 8192)."""


class ReplayWindow:
    """Which counters of one key have been accepted."""

    __slots__ = ("_mask", "_ring", "highest", "limit", "window")

    def __init__(self, bits: int = DEFAULT_BITS, *, limit: int = 2**64) -> None:
        blocks = bits // BLOCK_BITS
        if bits % BLOCK_BITS or blocks < 2 or blocks & (blocks - 1):
            raise ValueError("bits must be a power of two multiple of 64, at least 128")
        self._ring = [0] * blocks
        self._mask = blocks - 1
        self.window = bits - BLOCK_BITS
        """How far behind the highest counter a counter is still accepted."""
        self.limit = limit
        """Counters at or above this are refused (the key's REJECT_AFTER_MESSAGES)."""
        self.highest = -1
        """The highest counter marked so far (-1: none)."""

    def check(self, counter: int) -> bool:
        """True if `counter` is acceptable: not seen, not too old, below the limit."""
        if counter > self.highest:
            return counter < self.limit
        if self.highest - counter >= self.window:
            return False
        return not (self._ring[(counter >> 6) & self._mask] >> (counter & 63)) & 1

    def mark(self, counter: int) -> bool:
        """Record `counter` as accepted once the AEAD accepted its datagram; False, with
        nothing changed, when `check` would refuse it by now. Check and set are one step: the
        native fast path (`meshd.tunnel.fastpath`) shares its window, and of two copies of one
        datagram opened on both sides only one may be delivered."""
        if not self.check(counter):
            return False
        ring = self._ring
        block = counter >> 6
        highest = self.highest
        if counter > highest:
            top = highest >> 6  # -1 when nothing was marked yet
            if block != top:  # moving into new blocks: clear them (RFC 6479 §3)
                mask = self._mask
                if block - top > mask:
                    ring[:] = [0] * (mask + 1)
                else:
                    for b in range(top + 1, block + 1):
                        ring[b & mask] = 0
            self.highest = counter
        ring[block & self._mask] |= 1 << (counter & 63)
        return True

    def accept(self, counter: int) -> bool:
        """`mark`: True the first time a fresh counter is seen."""
        return self.mark(counter)
