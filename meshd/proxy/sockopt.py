"""Socket options of a transparent proxy on Linux, and the pure codec of what they return.

`SO_ORIGINAL_DST` (getsockopt on a REDIRECTed TCP socket) and the `IP_ORIGDSTADDR` control
message (recvmsg on a TPROXY UDP socket with `IP_RECVORIGDSTADDR`) both hand back a
`struct sockaddr_in`:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------------------------------+-------------------------------+
    |  sin_family (host order, =2)  |   sin_port (network order)    |
    +-------------------------------+-------------------------------+
    |                    sin_addr (network order)                   |
    +---------------------------------------------------------------+
    |                      sin_zero (8 bytes)                       |
    +---------------------------------------------------------------+
"""

from __future__ import annotations

import contextlib
import socket
import struct

SOL_IP = 0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP_TRANSPARENT = 19  # linux/in.h
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20  # the control message type carrying it
SOCKADDR_IN_SIZE = 16

Address = tuple[str, int]

_LINGER_RESET = struct.pack("ii", 1, 0)
_FAMILY = struct.Struct("=H")


class AddressError(ValueError):
    """Bytes that are not an AF_INET `sockaddr_in`."""


def parse_sockaddr_in(data: bytes) -> Address:
    """(IP, port) from a `struct sockaddr_in`."""
    if len(data) < 8:
        raise AddressError(f"sockaddr_in too short: {len(data)} bytes")
    (family,) = _FAMILY.unpack_from(data)
    if family != socket.AF_INET:
        raise AddressError(f"not AF_INET: family {family}")
    port = int.from_bytes(data[2:4], "big")
    return socket.inet_ntoa(data[4:8]), port


def encode_sockaddr_in(address: Address) -> bytes:
    """The inverse of `parse_sockaddr_in` (for tests and fakes)."""
    ip, port = address
    return _FAMILY.pack(socket.AF_INET) + port.to_bytes(2, "big") + socket.inet_aton(ip) \
        + bytes(8)


def original_dst(sock: socket.socket) -> Address | None:
    """Where a REDIRECTed TCP connection was going; None when it was not redirected."""
    try:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError:
        return None
    try:
        return parse_sockaddr_in(raw)
    except AddressError:
        return None


def origdst_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The original destination from recvmsg's control messages (TPROXY UDP)."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_ORIGDSTADDR:
            try:
                return parse_sockaddr_in(data)
            except AddressError:
                return None
    return None


def reset(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()
