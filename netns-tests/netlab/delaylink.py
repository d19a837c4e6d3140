"""A lab link with delay and loss, for a kernel without `tc netem`.

Two TAP devices, one in each namespace, and this process between them: every Ethernet frame
read on one side is written to the other `delay` seconds later, unless the seeded loss draw
drops it. Delay is constant, so each direction is a FIFO. Rate limits are left to `tc tbf` on
the devices. Accuracy and limits are measured by `netns-tests/test_lab_linkdelay.py` and
written up in docs/lab.md.

Run as `python -m netlab.delaylink NS_A IF_A NS_B IF_B --delay-ms D --loss-percent P --seed S`;
it prints `ready` once both devices exist and ends with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import os
import random
import selectors
import signal
import struct
import sys
import time

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_MAX_FRAME = 65536
_QUEUE_LIMIT = 4096  # frames in flight per direction, like a router's buffer

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move this thread into network namespace `name` (os.setns arrived only in 3.12)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(name: str) -> int:
    """Create TAP device `name` in the current namespace; it lives while the fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


class Direction:
    """Frames from one TAP to the other, each released `delay` seconds after it arrived."""

    def __init__(self, src: int, dst: int, delay: float, loss: float, rng: random.Random):
        self.src, self.dst, self.delay, self.loss, self.rng = src, dst, delay, loss, rng
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.dropped = 0

    def read(self, now: float) -> None:
        """Take every frame waiting on `src`."""
        while True:
            try:
                frame = os.read(self.src, _MAX_FRAME)
            except BlockingIOError:
                return
            if (self.loss and self.rng.random() < self.loss) or len(self.queue) >= _QUEUE_LIMIT:
                self.dropped += 1
            else:
                self.queue.append((now + self.delay, frame))

    def flush(self, now: float) -> float | None:
        """Write the frames that are due; return when the next one is."""
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, frame = queue.popleft()
            try:
                os.write(self.dst, frame)
            except BlockingIOError:
                self.dropped += 1  # the receiving side is full: the link drops, as a wire would
            except OSError as exc:
                if exc.errno == errno.EIO:
                    # The receiving device is down (the lab sets the node side up after the
                    # switch side): drop the frame, as a wire without carrier would.
                    self.dropped += 1
                    continue
                if exc.errno in (errno.EBADFD, errno.ENODEV):
                    raise SystemExit(0) from None  # the device or its namespace is gone
                raise
        return queue[0][0] if queue else None


def serve(a: int, b: int, delay: float, loss: float, seed: int) -> None:
    """Forward frames both ways until killed."""
    rng = random.Random(seed)
    dirs = {a: Direction(a, b, delay, loss, rng), b: Direction(b, a, delay, loss, rng)}
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    sel.register(b, selectors.EVENT_READ)
    timeout: float | None = None
    while True:
        for key, _ in sel.select(timeout):
            try:
                dirs[key.fd].read(time.monotonic())
            except OSError as exc:
                if exc.errno == errno.EIO:
                    continue  # a device that is down has nothing to give
                if exc.errno in (errno.EBADFD, errno.ENODEV):
                    return
                raise
        now = time.monotonic()
        deadlines = [d for d in (x.flush(now) for x in dirs.values()) if d is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the forwarder process the lab starts for an impaired link."""
    parser = argparse.ArgumentParser(prog="python -m netlab.delaylink")
    parser.add_argument("ns_a")
    parser.add_argument("if_a")
    parser.add_argument("ns_b")
    parser.add_argument("if_b")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    enter_netns(args.ns_a)
    fd_a = open_tap(args.if_a)
    enter_netns(args.ns_b)
    fd_b = open_tap(args.if_b)
    print("ready", flush=True)
    serve(fd_a, fd_b, args.delay_ms / 1000.0, args.loss_percent / 100.0, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
