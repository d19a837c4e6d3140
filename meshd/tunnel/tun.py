"""The TUN device (`mesh0`): whole IP packets between the kernel and the tunnel.

`TunDevice.open(name, address, prefix, mtu)` creates (or attaches to) a TUN interface without
packet information headers (IFF_TUN | IFF_NO_PI, so every read is exactly one IP packet), gives
it the node's overlay address with the overlay prefix (the kernel then routes the whole overlay
to it), sets the MTU and brings it up. Reads and writes are non-blocking; `read_batch` drains
up to `limit` packets per readiness callback so the hot loop costs one wake-up per batch, not
per packet (design §3).

Offloads (`offload=True`, the default): the device is opened with IFF_VNET_HDR, the header size
set to 10 (TUNSETVNETHDRSZ) and TUNSETOFFLOAD given TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 (and
TUN_F_USO4 | TUN_F_USO6 where the kernel has them, Linux 6.2+). Then every read and write is a
*frame* (`meshd.tunnel.offload`): a virtio_net_hdr and an IP packet that may be a TCP (UDP)
super-packet of up to 64 KB with its checksum left partial, so one read brings what the kernel
would otherwise hand over as ~45 packets, and one write gives the kernel a whole super-packet
(it segments it, or delivers it as one to a local socket). A kernel that refuses any of it gets
the device reopened without (`offload` False, `offload_error` says why): one packet per read.
`gso_max_size` caps the super-packets (the agent keeps each frame's 0xE4 message within one UDP
GSO send, `wire.whole_message_packet`, so that the receiver gets it as one coalesced read).

`close` deletes the interface (a non-persistent TUN disappears with its
last file descriptor; deleting it explicitly also covers a stale one left by `kill -9`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import struct
import subprocess

from meshd.tunnel.offload import VNET_HDR_LEN

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
"""What the tunnel asks for; USO is added when the kernel takes it."""
IFNAMSIZ = 16
MAX_FRAME = VNET_HDR_LEN + 0xFFFF


class TunError(Exception):
    """The TUN device could not be created or configured (operator's problem)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


class TunDevice:
    """An open TUN interface."""

    def __init__(self, fd: int, name: str, mtu: int, offloads: int = 0,
                 offload_error: str | None = None) -> None:
        self.fd = fd
        self.name = name
        self.mtu = mtu
        self.offloads = offloads
        """TUN_F_* flags the kernel took (0: no IFF_VNET_HDR, plain packets)."""
        self.offload_error = offload_error
        """Why offloads were asked for and refused (None otherwise)."""
        self._read_size = MAX_FRAME if offloads else mtu + 64
        self._closed = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @property
    def offload(self) -> bool:
        """Reads and writes are offload frames (virtio_net_hdr + packet)."""
        return bool(self.offloads)

    @classmethod
    def open(cls, name: str, address: str, prefix: int, mtu: int = 1380, *,
             offload: bool = True, gso_max_size: int | None = None) -> TunDevice:
        """Create `name` with `address`/`prefix`, MTU `mtu`, up (needs CAP_NET_ADMIN); with
        offloads when `offload` and the kernel allows them, and then super-packets of at most
        `gso_max_size` bytes when given (best effort: a kernel that refuses keeps 64 KB)."""
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise TunError(f"interface name {name!r}: 1..{IFNAMSIZ - 1} bytes")
        interface = ipaddress.ip_interface(f"{address}/{prefix}")
        offloads, refused = 0, None
        if offload:
            try:
                fd, offloads = _open_device(name, with_offloads=True)
            except OSError as exc:  # this kernel (or sandbox) refuses: one packet per read
                refused = f"{exc.strerror or exc}"
        if not offloads:
            try:
                fd, _ = _open_device(name, with_offloads=False)
            except OSError as exc:
                raise TunError(f"TUN device {name}: {exc.strerror}") from None
        try:
            _ip("addr", "replace", str(interface), "dev", name)
            _ip("link", "set", "dev", name, "mtu", str(mtu), "up")
            if offloads and gso_max_size is not None:
                with contextlib.suppress(TunError):  # IFLA_GSO_MAX_SIZE: Linux 5.19+
                    _ip("link", "set", "dev", name, "gso_max_size", str(gso_max_size))
        except OSError as exc:
            os.close(fd)
            raise TunError(f"TUN device {name}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, mtu, offloads, refused)

    def read_batch(self, limit: int = 64) -> list[bytes]:
        """Up to `limit` packets that are waiting (empty when none). After the first read a
        zero-timeout poll asks whether more wait: a lone packet then costs no failed read
        (whose BlockingIOError is dearer than the poll); a burst is drained until EAGAIN."""
        read = os.read
        fd, size = self.fd, self._read_size
        try:
            packets = [read(fd, size)]
        except BlockingIOError:
            return []
        if limit < 2 or not self._poll.poll(0):
            return packets
        for _ in range(limit - 1):
            try:
                packets.append(read(fd, size))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes) -> bool:
        """Hand one packet (frame, with offloads) to the kernel; False when it was dropped
        (queue full, a packet or offload header the kernel refuses)."""
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


def _open_device(name: str, *, with_offloads: bool) -> tuple[int, int]:
    """An attached TUN file descriptor and the offload flags set on it; raises OSError (the
    descriptor closed) when the kernel refuses a step."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"/dev/net/tun: {exc.strerror}") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if with_offloads else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags))
        if not with_offloads:
            return fd, 0
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        for offloads in (OFFLOADS | TUN_F_USO4 | TUN_F_USO6, OFFLOADS):
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
            except OSError as exc:
                if exc.errno != errno.EINVAL or offloads == OFFLOADS:
                    raise
                continue  # no USO before Linux 6.2
            return fd, offloads
    except BaseException:
        os.close(fd)
        raise
    raise AssertionError("unreachable")
