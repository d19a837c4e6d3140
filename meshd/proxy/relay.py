"""Moving bytes between a client and a backend socket, both ways, driven by readiness.

Each connection is two halves (client→backend, backend→client). A half's source is registered
with `loop.add_reader` once and stays registered while bytes flow; the callback moves what is
there and returns. Only when the destination cannot take everything does the half pause: it
drops its reader, keeps the unsent bytes, and waits on `add_writer` until they are out. No task,
future or buffer object is made per chunk.

Two ways to move bytes:

- splice (zero-copy): `socket → pipe → socket` with `os.splice`. All halves share one spare pipe
  from a pool: a callback splices in and straight out again, so the pipe is empty when it
  returns. A half whose destination is full keeps the pipe that holds its bytes, and the pool
  makes another spare. A quiet connection therefore holds no pipe (2 file descriptors, not 6).
- copy: `recv_into` one shared buffer and `send` from it; leftovers are copied out only when the
  destination is full.
- auto (the default): each half starts copying, switches to splice when a read fills the whole
  buffer (bulk), and back to copying when a splice brings less than `SMALL_READ`. Measured in
  the netns lab: splice moves bulk data ~1.7x faster than copying, copying answers small
  requests with lower and steadier latency (splicing a few bytes costs a page per call).

Closing follows TCP: when a source ends (EOF), the other socket gets `shutdown(SHUT_WR)` after
the last byte is out; the connection closes when both halves are done. An error on either side
(reset, broken pipe) resets both (SO_LINGER 0), so neither peer waits for bytes that will not
come.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable

from meshd.proxy.metrics import ProxyMetrics, ServiceCounters
from meshd.proxy.sockopt import reset

F_SETPIPE_SZ = 1031  # linux/fcntl.h
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
_BURST = 4  # reads per callback while each one fills the pipe/buffer
SMALL_READ = 16384  # auto mode: a splice bringing less than this goes back to copying


class PipePool:
    """Non-blocking pipes for splice: one shared spare plus a few kept for reuse."""

    def __init__(self, size: int, keep: int = 32) -> None:
        self.size = size
        """The capacity each pipe got (the kernel may round or cap what was asked)."""
        self._keep = keep
        self._free: list[tuple[int, int]] = []
        self.created = 0
        """Pipes made so far (a measure of how often destinations were full)."""
        self.spare = self._new()
        """The pipe every callback borrows; always empty between callbacks."""

    def _new(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            self.size = min(self.size, 65536)  # over fs.pipe-max-size or the user's quota
        self.created += 1
        return r, w

    def detach_spare(self) -> tuple[int, int]:
        """Hand the spare (now holding a half's bytes) over; a new spare takes its place."""
        pipe = self.spare
        self.spare = self._free.pop() if self._free else self._new()
        return pipe

    def give_back(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe."""
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in [self.spare, *self._free]:
            os.close(r)
            os.close(w)
        self._free.clear()


class _Half:
    """One direction of a connection: bytes from `src` to `dst`."""

    __slots__ = ("adaptive", "conn", "done", "dst", "dst_sock", "eof", "flushed", "leftover",
                 "nbytes", "pending", "pipe", "relay", "splice", "src", "src_sock")

    def __init__(self, conn: Connection, src: socket.socket, dst: socket.socket,
                 splice: bool, adaptive: bool) -> None:
        self.conn = conn
        self.relay = conn.relay
        self.src_sock = src
        self.dst_sock = dst
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.splice = splice  # the current way: splice or copy
        self.adaptive = adaptive  # auto mode: switch by read size
        self.pipe: tuple[int, int] | None = None  # a pipe holding unsent bytes
        self.leftover: memoryview | None = None  # copy mode: unsent bytes
        self.pending = 0  # unsent bytes held (pipe or leftover)
        self.eof = False  # src ended
        self.done = False  # dst shut down for writing (or the connection died)
        self.nbytes = 0  # bytes moved from src
        self.flushed = 0  # part of nbytes already added to the metrics

    # -- src readable ---------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.conn.closed:  # a callback queued before the close; the fd may be reused
            return
        if self.splice:
            self._splice_some()
        else:
            self._copy_some()

    def _splice_some(self) -> None:
        pool = self.relay.pool
        chunk = pool.size
        for _ in range(_BURST):
            r, w = pool.spare
            try:
                n = _splice(self.src, w, chunk, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # this socket cannot splice; nothing was read
                    self._fall_back()
                    self._copy_some()
                else:
                    self.conn.fail(exc)
                return
            if n == 0:
                self._source_ended()
                return
            self.nbytes += n
            try:
                m = _splice(r, self.dst, n, flags=SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # the destination cannot splice: copy instead
                    self.leftover = memoryview(os.read(r, n))
                    self.pending = n
                    self._fall_back()
                    self._pause()
                    return
                self.pipe = pool.detach_spare()  # holds bytes: never back to the pool
                self.pending = n
                self.conn.fail(exc)
                return
            if m < n:
                self.pipe = pool.detach_spare()
                self.pending = n - m
                self._pause()
                return
            if n < chunk:
                if n < SMALL_READ and self.adaptive:
                    self.splice = False
                return

    def _copy_some(self) -> None:
        relay = self.relay
        buf = relay.buffer
        size = len(buf)
        for _ in range(_BURST):
            try:
                n = self.src_sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self.conn.fail(exc)
                return
            if n == 0:
                self._source_ended()
                return
            self.nbytes += n
            data = buf[:n] if n < size else buf
            try:
                m = self.dst_sock.send(data)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                self.conn.fail(exc)
                return
            if m < n:
                self.leftover = memoryview(bytes(data[m:]))
                self.pending = n - m
                self._pause()
                return
            if n < size:
                return
            if self.adaptive:  # the buffer was full: bulk data, move it without copying
                self.splice = True
                self._splice_some()
                return

    def _fall_back(self) -> None:
        self.splice = self.adaptive = False
        self.relay.metrics.splice_fallbacks += 1

    def _pause(self) -> None:
        loop = self.relay.loop
        loop.remove_reader(self.src)
        loop.add_writer(self.dst, self.on_writable)

    # -- dst writable (only while paused) -------------------------------------------------

    def on_writable(self) -> None:
        if self.conn.closed:
            return
        try:
            if self.pipe is not None:
                try:
                    m = _splice(self.pipe[0], self.dst, self.pending, flags=SPLICE_FLAGS)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # The destination cannot splice: take the bytes out and copy from now on.
                    self.leftover = memoryview(os.read(self.pipe[0], self.pending))
                    self.relay.pool.give_back(self.pipe)
                    self.pipe = None
                    self._fall_back()
                    return
            else:
                assert self.leftover is not None
                m = self.dst_sock.send(self.leftover)
                self.leftover = self.leftover[m:]
        except BlockingIOError:
            return
        except OSError as exc:
            self.conn.fail(exc)
            return
        self.pending -= m
        if self.pending:
            return
        if self.pipe is not None:
            self.relay.pool.give_back(self.pipe)
            self.pipe = None
        self.leftover = None
        loop = self.relay.loop
        loop.remove_writer(self.dst)
        if self.eof:
            self._shut_dst()
        else:
            loop.add_reader(self.src, self.on_readable)

    # -- ends -----------------------------------------------------------------------------

    def _source_ended(self) -> None:
        self.eof = True
        self.relay.loop.remove_reader(self.src)
        if not self.pending:
            self._shut_dst()

    def _shut_dst(self) -> None:
        with contextlib.suppress(OSError):  # the peer is gone: the other half will see it
            self.dst_sock.shutdown(socket.SHUT_WR)
        self.done = True
        self.conn.half_done()

    def release(self) -> None:
        """Drop what the half holds (at connection close)."""
        if self.pipe is not None:
            r, w = self.pipe
            if self.pending:
                os.close(r)
                os.close(w)
            else:
                self.relay.pool.give_back(self.pipe)
            self.pipe = None
        self.leftover = None
        self.pending = 0


class Connection:
    """A client socket and a backend socket relayed both ways."""

    __slots__ = ("active_at", "backend", "client", "closed", "counters", "down", "on_close",
                 "relay", "seen", "up")

    def __init__(self, relay: Relay, client: socket.socket, backend: socket.socket,
                 counters: ServiceCounters, on_close: Callable[[Connection], None] | None,
                 mode: str, now: float) -> None:
        self.relay = relay
        self.client = client
        self.backend = backend
        self.counters = counters
        self.on_close = on_close
        self.closed = False
        self.seen = 0  # bytes moved as of the last sweep
        self.active_at = now  # when bytes last moved (as seen by sweeps)
        splice, adaptive = mode == "splice", mode == "auto"
        self.up = _Half(self, client, backend, splice, adaptive)
        self.down = _Half(self, backend, client, splice, adaptive)

    @property
    def bytes_up(self) -> int:
        """Bytes relayed client → backend."""
        return self.up.nbytes

    @property
    def bytes_down(self) -> int:
        """Bytes relayed backend → client."""
        return self.down.nbytes

    def half_done(self) -> None:
        if self.up.done and self.down.done:
            self.close(reset_peers=False)

    def fail(self, exc: OSError) -> None:
        """An error on either socket: reset both peers."""
        self.relay.metrics.relay_errors += 1
        self.close(reset_peers=True)

    def flush_counters(self) -> None:
        """Add the bytes moved since the last flush to the Service's counters."""
        up, down = self.up, self.down
        self.counters.bytes_in += up.nbytes - up.flushed
        self.counters.bytes_out += down.nbytes - down.flushed
        up.flushed, down.flushed = up.nbytes, down.nbytes

    def close(self, reset_peers: bool = False) -> None:
        """Stop relaying and close both sockets (with RSTs when `reset_peers`)."""
        if self.closed:
            return
        self.closed = True
        loop = self.relay.loop
        for half in (self.up, self.down):
            loop.remove_reader(half.src)
            loop.remove_writer(half.dst)
            half.release()
        for sock in (self.client, self.backend):
            if reset_peers:
                reset(sock)
            else:
                sock.close()
        self.flush_counters()
        self.relay.connections.discard(self)
        if self.on_close is not None:
            self.on_close(self)


class Relay:
    """All relayed connections of one event loop, with their shared pipe pool and buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: ProxyMetrics, *,
                 mode: str = "auto", pipe_size: int = 1048576,
                 buffer_size: int = 65536) -> None:
        if mode not in ("auto", "splice", "copy"):
            raise ValueError(f"relay mode: expected auto, splice or copy, got {mode!r}")
        self.loop = loop
        self.metrics = metrics
        self.mode = mode
        self.pool = PipePool(pipe_size)
        self.buffer = memoryview(bytearray(buffer_size))
        self.connections: set[Connection] = set()

    def start(self, client: socket.socket, backend: socket.socket, counters: ServiceCounters,
              now: float, on_close: Callable[[Connection], None] | None = None) -> Connection:
        """Relay between two connected non-blocking sockets until both sides are done."""
        conn = Connection(self, client, backend, counters, on_close, self.mode, now)
        self.connections.add(conn)
        self.loop.add_reader(conn.up.src, conn.up.on_readable)
        self.loop.add_reader(conn.down.src, conn.down.on_readable)
        return conn

    def sweep(self, now: float, idle_timeout: float) -> int:
        """Fold byte counts into the metrics and close idle connections; returns how many."""
        idle = []
        for conn in self.connections:
            moved = conn.up.nbytes + conn.down.nbytes
            if moved != conn.seen:
                conn.seen = moved
                conn.active_at = now
                conn.flush_counters()
            elif now - conn.active_at >= idle_timeout:
                idle.append(conn)
        for conn in idle:
            conn.counters.idle_closed += 1
            conn.close(reset_peers=False)
        return len(idle)

    def close(self) -> None:
        """Close every connection (resetting the peers) and the pipes."""
        for conn in list(self.connections):
            conn.close(reset_peers=True)
        self.pool.close()
