"""The tunnel's native fast path (meshd/tunnel/_fastpath.c, OpenSSL libcrypto).

A C thread owns the reads of the TUN fd and the tunnel's UDP socket. A lone data packet under a
peer's installed keys on a direct path goes through it without entering Python: TUN read →
ChaCha20-Poly1305 (RFC 8439) → 0xE3 datagram (or one-part 0xE4 offload frame) → sendto, and
back. Everything else is handed to Python unchanged, in arrival order (`FastPath.drain`). The
thread never takes the GIL; it touches only the C state of the `Counter` and `ReplayWindow`
objects of installed peers, to which the fast path holds references.
"""

_Address = tuple[str, int]

class Counter:
    """A keypair's send counter, shared by Python and the fast path thread (an atomic)."""

    def __init__(self, start: int = 0) -> None:
        """`start` in 0..2**64-1 (ValueError otherwise)."""

    def take(self, n: int = 1) -> int:
        """Reserve `n` consecutive counters atomically; the first of them. OverflowError when
        the counter would pass 2**64-1."""

    @property
    def value(self) -> int:
        """The next counter `take()` would return."""

class ReplayWindow:
    """meshd.tunnel.replay.ReplayWindow's semantics (RFC 6479), thread-safe; counters are
    0..2**64-1 (ValueError otherwise)."""

    def __init__(self, bits: int = 2048, *, limit: int = 2**64) -> None:
        """ValueError unless `bits` is a power of two multiple of 64, at least 128."""

    def check(self, counter: int) -> bool:
        """True if `counter` is acceptable: not seen, not too old, below the limit."""

    def mark(self, counter: int) -> bool:
        """Check and record as one atomic step; False, with nothing changed, if the check
        fails (then another thread accepted the counter first, or it is not acceptable)."""

    def accept(self, counter: int) -> bool:
        """The same as `mark`."""

    @property
    def highest(self) -> int:
        """The highest counter marked so far (-1: none)."""

    @property
    def limit(self) -> int:
        """Counters at or above this are refused."""

    @property
    def window(self) -> int:
        """How far behind the highest counter a counter is still accepted (bits - 64)."""

_PeerStats = tuple[int, int, float, int, int, float]
"""(tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx): bytes are inner packet
bytes (no virtio header), last_* time.monotonic() seconds (0.0: none in this period)."""

class FastPath:
    """The thread between `tun_fd` and `udp_fd` (neither is ever closed by it).

    `frames`: TUN reads and writes are offload frames (10-byte virtio_net_hdr + packet).
    `check_source`: a received packet's IPv4 source must be the peer's overlay address.
    `fragment_part`: the largest sealed 0xE4 part (frame + 16-byte tag) sent natively.
    `queue_bytes`: with this much handed off and not drained, the thread stops reading until
    `drain()` (each entry counts its bytes and 64 more).
    """

    def __init__(
        self, udp_fd: int, tun_fd: int, *, frames: bool, check_source: bool,
        fragment_part: int, queue_bytes: int = 8 << 20,
    ) -> None: ...
    def start(self) -> None:
        """Start the thread (once; RuntimeError the second time)."""

    def close(self) -> None:
        """Stop and join the thread, free the queue, the keys and the eventfd; idempotent.
        Take the eventfd out of any selector first. Stats not yet taken stay for
        `take_stats`."""

    def fileno(self) -> int:
        """An eventfd, readable while handed-off reads wait (ValueError once closed)."""

    def drain(self) -> tuple[list[bytes], list[tuple[bytes, int, _Address]]]:
        """Everything waiting: (TUN reads, socket reads as (data, gro_segment or 0, source)),
        each list in arrival order; clears the eventfd, wakes the thread if it paused. Until
        `release()`, later reads of a kind that was drained go to Python too (order)."""

    def release(self) -> None:
        """Python has sent / written what `drain()` gave it: native handling may resume."""

    def set_peer(
        self, key: int, *, overlay: bytes, remote_index: int, send_key: bytes,
        counter: Counter, send_limit: int, send_fragments: bool, local_index: int,
        receive_key: bytes, replay: ReplayWindow, endpoint: _Address | None, until: float,
    ) -> None:
        """Install or replace peer `key`'s route (key: a signed 64-bit int). `overlay`: its
        4-byte IPv4 overlay address; keys 32 bytes; packets are sent natively while
        `counter.value < send_limit`; `until`: time.monotonic() seconds from which nothing is
        done natively for this peer; `endpoint` None: receive natively, never send."""

    def remove_peer(self, key: int) -> None:
        """Remove peer `key`'s route (no error if absent)."""

    def take_stats(self) -> dict[int, _PeerStats]:
        """Per peer key with activity since the last call: its deltas since then."""

    def counters(self) -> dict[str, int]:
        """Cumulative: tun_reads, udp_reads, fast_tx, fast_rx, handed_tun, handed_udp,
        tun_write_errors, send_errors, replay_races, paused."""
