"""The tunnel's native fast path (meshd/tunnel/_fastpath.c, OpenSSL libcrypto).

A C thread owns the reads of the TUN fd and the tunnel's UDP socket. A lone data packet under a
peer's installed keys on a direct path goes through it without entering Python: TUN read →
ChaCha20-Poly1305 (RFC 8439) → 0xE3 datagram (or one-part 0xE4 offload frame) → sendto, and
back. Everything else is handed to Python unchanged, in arrival order (`FastPath.drain`), but
for datagrams under a route's receiver index that fail authentication (dropped, counted as
`auth_failed`). The thread never takes the GIL; it touches only the C state of the `Counter`
and `ReplayWindow` objects of installed peers, to which the fast path holds references.
"""

_Source = tuple[str, int] | tuple[str, int, int, int]
"""A datagram's source as Python's socket module gives it: (host, port) on an AF_INET socket,
(host, port, flowinfo, scope_id) on an AF_INET6 one."""

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

_PeerStats = tuple[int, int, float, int, int, float, int]
"""(tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx, auth_failed): bytes are inner
packet bytes (no virtio header), last_* time.monotonic() seconds (0.0: none in this period),
auth_failed the datagrams under the peer's receiver index that failed authentication (dropped)."""

class FastPath:
    """The thread between `tun_fd` and `udp_fd`. It works on its own dup()s of both (closed by
    `close()`; the caller's fds are never closed by it, and closing them does not stop it).

    `frames`: TUN reads and writes are offload frames (10-byte virtio_net_hdr + packet).
    `check_source`: a received packet's IPv4 source must be the peer's overlay address.
    `fragment_part`: the largest sealed 0xE4 part (frame + 16-byte tag) sent natively.
    `queue_bytes`: with this much handed off and not drained, the thread stops reading until
    `drain()` (each entry counts its bytes and 64 more).
    `busy_poll_us` (0..10000; 0: off): after an event that came within this many µs of the one
    before it, the thread polls without sleeping (yielding the core) for up to as long.
    """

    def __init__(
        self, udp_fd: int, tun_fd: int, *, frames: bool, check_source: bool,
        fragment_part: int, queue_bytes: int = 8 << 20, busy_poll_us: int = 0,
    ) -> None: ...
    def start(self) -> None:
        """Start the thread (once; RuntimeError the second time)."""

    def close(self) -> None:
        """Stop and join the thread, free the queue, the keys, the eventfds and the dups of
        the fds; idempotent. Take the eventfd out of any selector first. Stats not yet taken
        stay for `take_stats`, and `error` stays."""

    def fileno(self) -> int:
        """An eventfd, readable while handed-off reads wait and once the thread stopped on an
        error (`error`); ValueError once closed."""

    def drain(self) -> tuple[list[bytes], list[tuple[bytes, int, _Source]]]:
        """Everything waiting: (TUN reads, socket reads as (data, gro_segment or 0, source)),
        each list in arrival order; clears the eventfd, wakes the thread if it paused. Until
        `release()`, later reads of a kind that was drained go to Python too (order). Still
        works after the thread stopped on an error (not after `close()`)."""

    def release(self) -> None:
        """Python has sent / written what `drain()` gave it: native handling may resume."""

    def set_peer(
        self, key: int, *, overlay: bytes, remote_index: int, send_key: bytes,
        counter: Counter, send_limit: int, send_fragments: bool, local_index: int,
        receive_key: bytes, replay: ReplayWindow, endpoint: _Source | None,
        send_until: float, receive_until: float, channel: int | None = None,
    ) -> None:
        """Install or replace peer `key`'s route (key: a signed 64-bit int). `overlay`: its
        4-byte IPv4 overlay address; keys 32 bytes; packets are sent natively while
        `counter.value < send_limit`; `send_until` / `receive_until`: time.monotonic()
        seconds from which TUN reads for this peer / datagrams under `local_index` go to
        Python; `endpoint` None: receive natively, never send (an IPv4 endpoint on an AF_INET6
        socket is reached through its mapped address). `channel` (0x4000..0x4FFF): a relayed
        path, `endpoint` is our TURN server and every datagram to and from the peer travels in
        ChannelData of this channel (RFC 8656 §12.4)."""

    def remove_peer(self, key: int) -> None:
        """Remove peer `key`'s route (no error if absent)."""

    def take_stats(self) -> dict[int, _PeerStats]:
        """Per peer key with activity since the last call: its deltas since then."""

    def counters(self) -> dict[str, int]:
        """Cumulative: tun_reads, udp_reads, fast_tx, fast_rx, handed_tun, handed_udp,
        tun_write_errors, send_errors, replay_races, paused, auth_failed, gso_sends (messages
        of several parts sent with one UDP GSO sendmsg), gro_reads (coalesced reads taken as
        one whole message)."""

    @property
    def error(self) -> OSError | None:
        """Why the thread stopped on its own (poll failing, mesh0 gone, the socket shut down):
        an OSError with that errno, its message naming where; None if it did not. Set after
        the thread's last hand-off and signalled through `fileno()`: read it, then `drain()`
        what it left, then `close()`."""

    def _fail_for_test(self, errno: int, /) -> None:
        """Test only: the thread's next poll() fails with `errno` (1..4095), as a real failure
        would: EINTR is retried, a fatal errno stops the thread (`error`)."""
