"""Batched relay output: runs of datagrams that one `sendmsg` can carry (pure, no sockets).

The relay's data path (ChannelData, RFC 8656 §12.4, and what peers send to relayed addresses)
is where `meshd server` spends its time. The adapter reads a burst at once (UDP GRO hands it
`(buffer, segment size, source)`), the core relays every datagram of it, and `Batcher` joins
consecutive datagrams from one local address to one destination into a `TransmitBatch`, which
the adapter sends as one UDP GSO `sendmsg`. The kernel's segmentation rules shape the runs:
every datagram of a run has the size of the first except the last, which may be shorter, and
a run stays within `GSO_MAX_SEGMENTS` datagrams and `GSO_MAX_BYTES` bytes. Datagrams are never
reordered: a datagram that does not fit the open run closes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, Address, Transmit


def read_count(size: int, segment: int) -> int:
    """How many datagrams a read of `size` bytes holds (`meshd.udp.Read`: segment 0 = one)."""
    return -(-size // segment) if 0 < segment < size else 1


@dataclass(frozen=True, slots=True)
class TransmitBatch:
    """Several datagrams from one local address to one destination, back to back."""

    source: Address
    """The local socket address to send them from."""
    destination: Address
    """Where they all go."""
    data: bytes | bytearray
    """The datagrams, concatenated (never changed once handed out)."""
    segment: int
    """Size of every datagram but the last, which may be shorter."""

    @property
    def count(self) -> int:
        """How many datagrams `data` holds."""
        return -(-len(self.data) // self.segment)

    def datagrams(self) -> list[bytes]:
        """`data` cut back into its datagrams (tests, and adapters without GSO)."""
        data = bytes(self.data)
        return [data[i : i + self.segment] for i in range(0, len(data), self.segment)]


class Batcher:
    """Collects the datagrams of one adapter call into `Transmit`s and `TransmitBatch`es.

        batcher = Batcher()
        batcher.add(source, destination, datagram)   # in the order they are to be sent
        outputs = batcher.finish()
    """

    __slots__ = ("_bytes", "_destination", "_out", "_parts", "_size", "_source")

    def __init__(self) -> None:
        self._out: list[Transmit | TransmitBatch] = []
        self._parts: list[bytes] = []
        self._source: Address = ("", 0)
        self._destination: Address = ("", 0)
        self._size = 0
        self._bytes = 0

    def add(self, source: Address, destination: Address, datagram: bytes) -> None:
        """Queue one datagram (after the ones queued before)."""
        size = len(datagram)
        parts = self._parts
        if (parts and size <= self._size and destination == self._destination
                and source == self._source and len(parts) < GSO_MAX_SEGMENTS
                and self._bytes + size <= GSO_MAX_BYTES and size):
            parts.append(datagram)
            self._bytes += size
            if size < self._size:
                self._close()  # only the last datagram of a run may be shorter
            return
        if parts:
            self._close()
        self._parts = [datagram]
        self._source, self._destination, self._size, self._bytes = (source, destination,
                                                                    size, size)

    def add_many(self, source: Address, destination: Address, datagrams: list[bytes]) -> None:
        """Queue datagrams of one size (the last may be shorter), as `add` one by one would,
        without the per-datagram checks (a GRO read's datagrams are like that)."""
        if not datagrams:
            return
        size = len(datagrams[0])
        cap = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size) if size else 0
        if cap < 2 or not datagrams[-1]:  # empty or huge datagrams: the general rules
            for datagram in datagrams:
                self.add(source, destination, datagram)
            return
        parts = self._parts
        if parts and (size != self._size or destination != self._destination
                      or source != self._source):
            self.add(source, destination, datagrams[0])  # closes the open run or starts one
            self.add_many(source, destination, datagrams[1:])
            return
        last = datagrams[-1]
        if len(last) < size:  # it joins the last run if the byte limit allows: `add` decides
            self.add_many(source, destination, datagrams[:-1])
            self.add(source, destination, last)
            return
        i, n = 0, len(datagrams)
        if parts:  # the open run takes what it can
            i = min(n, cap - len(parts))
            parts += datagrams[:i]
            self._bytes += size * i
        while i < n:
            if parts:
                self._close()
            parts = self._parts = datagrams[i : i + cap]
            self._source, self._destination, self._size = source, destination, size
            self._bytes = size * len(parts)
            i += len(parts)

    def add_block(self, source: Address, destination: Address, data: bytes | bytearray,
                  segment: int) -> None:
        """Queue datagrams already back to back in `data` (every one `segment` bytes but the
        last, which may be shorter), cut to the kernel's limits; `data` is not copied when it
        fits one send."""
        if self._parts:
            self._close()
        size = len(data)
        most = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // segment) * segment if segment > 0 else 0
        if most < 2 * segment or size <= segment:
            step = segment if segment > 0 else max(size, 1)
            self._out += [Transmit(source, destination, bytes(data[i : i + step]))
                          for i in range(0, size, step)]
            return
        if size <= most:
            self._out.append(TransmitBatch(source, destination, data, segment))
            return
        for i in range(0, size, most):
            chunk = data[i : i + most]
            self._out.append(TransmitBatch(source, destination, chunk, segment)
                             if len(chunk) > segment else Transmit(source, destination,
                                                                    bytes(chunk)))

    def end_run(self) -> None:
        """Close the open run: datagrams queued from now on never join those before."""
        if self._parts:
            self._close()

    def finish(self) -> list[Transmit | TransmitBatch]:
        """Everything queued, in order; the batcher is empty afterwards."""
        if self._parts:
            self._close()
        out, self._out = self._out, []
        return out

    def _close(self) -> None:
        parts = self._parts
        if len(parts) == 1:
            self._out.append(Transmit(self._source, self._destination, parts[0]))
        else:
            self._out.append(TransmitBatch(self._source, self._destination, b"".join(parts),
                                           self._size))
        self._parts = []
