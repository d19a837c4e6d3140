"""The TUN device (`mesh0`): whole IP packets between the kernel and the tunnel.

`TunDevice.open(name, address, prefix, mtu)` creates (or attaches to) a TUN interface without
packet information headers (IFF_TUN | IFF_NO_PI, so every read is exactly one IP packet), gives
it the node's overlay address with the overlay prefix (the kernel then routes the whole overlay
to it), sets the MTU and brings it up. Reads and writes are non-blocking; `read_batch` drains
up to `limit` packets per readiness callback so the hot loop costs one wake-up per batch, not
per packet (design §3). `close` deletes the interface (a non-persistent TUN disappears with its
last file descriptor; deleting it explicitly also covers a stale one left by `kill -9`).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TunError(Exception):
    """The TUN device could not be created or configured (operator's problem)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


class TunDevice:
    """An open TUN interface."""

    def __init__(self, fd: int, name: str, mtu: int) -> None:
        self.fd = fd
        self.name = name
        self.mtu = mtu
        self._closed = False

    @classmethod
    def open(cls, name: str, address: str, prefix: int, mtu: int = 1380) -> TunDevice:
        """Create `name` with `address`/`prefix`, MTU `mtu`, up (needs CAP_NET_ADMIN)."""
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise TunError(f"interface name {name!r}: 1..{IFNAMSIZ - 1} bytes")
        interface = ipaddress.ip_interface(f"{address}/{prefix}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"/dev/net/tun: {exc.strerror}") from None
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TUN | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            _ip("addr", "replace", str(interface), "dev", name)
            _ip("link", "set", "dev", name, "mtu", str(mtu), "up")
        except OSError as exc:
            os.close(fd)
            raise TunError(f"TUN device {name}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, mtu)

    def read_batch(self, limit: int = 64) -> list[bytes]:
        """Up to `limit` packets that are waiting (empty when none)."""
        packets = []
        read = os.read
        size = self.mtu + 64
        for _ in range(limit):
            try:
                packets.append(read(self.fd, size))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes) -> bool:
        """Hand one packet to the kernel; False when it was dropped (queue full, bad packet)."""
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINVAL, errno.EIO, errno.ENOBUFS):
                return False
            raise
        return True

    def close(self) -> None:
        """Close the device; the interface goes with it."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        subprocess.run(["ip", "link", "del", "dev", self.name], capture_output=True,
                       check=False)
