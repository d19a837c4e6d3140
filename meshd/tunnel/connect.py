"""The mesh connect header: how one node's proxy asks another node's agent to dial a pod.

Pod addresses overlap between edge nodes (every Docker bridge is 172.17.0.0/16), so the node
that owns an endpoint dials it, not the caller (design §2 item 5). The caller's proxy opens a
TCP connection over the overlay to the owner's agent, sends one request, reads one reply, and
from then on the stream carries the client's bytes unchanged.

Request (caller → owner), 8 bytes then the address and the Service name:

     0       1       2       3
    +-------+-------+-------+-------+
    |  'E'  |  'W'  |  ver  |  fam  |   ver = 1, fam = 4 (IPv4) or 6 (IPv6)
    +-------+-------+-------+-------+
    |     port      |  service len  |   big-endian; service len 1..253
    +-------+-------+-------+-------+
    |  address (4 or 16 bytes)      |
    +-------------------------------+
    |  service "namespace/name"     |   UTF-8, what the owner checks the target against
    +-------------------------------+

Reply (owner → caller), 4 bytes:

    +-------+-------+-------+-------+
    |  'E'  |  'W'  |  ver  | status|   0 connected; others: `Status`
    +-------+-------+-------+-------+

The owner only dials addresses that its catalog lists as endpoints of that Service on its own
node: the connect port is not an open proxy into the node's networks.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"EW"
VERSION = 1
HEAD = struct.Struct("!2sBBHH")
REPLY = struct.Struct("!2sBB")
MAX_SERVICE = 253
_ADDRESS_SIZE = {4: 4, 6: 16}


class ConnectProtocolError(Exception):
    """The peer sent something that is not a connect request or reply (a remote error)."""


class Status(IntEnum):
    """Outcome of the owner's dial."""

    CONNECTED = 0
    REFUSED = 1  # the pod reset the connection (nothing listens)
    UNREACHABLE = 2  # no route to the pod, or the host is down
    TIMEOUT = 3  # the dial did not complete within the owner's connect timeout
    NOT_ALLOWED = 4  # not an endpoint of that Service on this node
    BAD_REQUEST = 5  # the request did not parse


@dataclass(frozen=True)
class ConnectRequest:
    """Dial `ip`:`port`, an endpoint of `service` on the receiving node."""

    ip: str
    """The pod address, canonical text form."""
    port: int
    """The pod port (the Service's target port)."""
    service: str
    """The Service as "namespace/name"."""

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.ip)  # ValueError: local misuse
        if not 0 < self.port < 65536:
            raise ValueError(f"port: expected 1..65535, got {self.port}")
        size = len(self.service.encode())
        if not 0 < size <= MAX_SERVICE:
            raise ValueError(f"service: expected 1..{MAX_SERVICE} bytes, got {size}")


def encode_request(request: ConnectRequest) -> bytes:
    """The request's bytes."""
    ip = ipaddress.ip_address(request.ip)
    service = request.service.encode()
    return HEAD.pack(MAGIC, VERSION, ip.version, request.port, len(service)) + ip.packed + \
        service


def request_size(head: bytes) -> int:
    """The whole request's size, from its first `HEAD.size` bytes (ConnectProtocolError)."""
    if len(head) < HEAD.size:
        raise ConnectProtocolError(f"request head needs {HEAD.size} bytes, got {len(head)}")
    magic, version, family, _, service_len = HEAD.unpack_from(head)
    if magic != MAGIC:
        raise ConnectProtocolError("not a mesh connect request (bad magic)")
    if version != VERSION:
        raise ConnectProtocolError(f"unsupported connect version {version}")
    if family not in _ADDRESS_SIZE:
        raise ConnectProtocolError(f"unknown address family {family}")
    if not 0 < service_len <= MAX_SERVICE:
        raise ConnectProtocolError(f"service length {service_len} out of 1..{MAX_SERVICE}")
    return int(HEAD.size + _ADDRESS_SIZE[family] + service_len)


def parse_request(data: bytes) -> ConnectRequest:
    """A whole request (exactly `request_size` bytes) or ConnectProtocolError."""
    size = request_size(data[:HEAD.size])
    if len(data) != size:
        raise ConnectProtocolError(f"request is {size} bytes, got {len(data)}")
    _, _, family, port, _ = HEAD.unpack_from(data)
    raw = data[HEAD.size:HEAD.size + _ADDRESS_SIZE[family]]
    ip = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
    try:
        service = data[HEAD.size + len(raw):].decode()
    except UnicodeDecodeError:
        raise ConnectProtocolError("service name is not UTF-8") from None
    if port == 0:
        raise ConnectProtocolError("port 0")
    return ConnectRequest(str(ip), port, service)


def encode_reply(status: Status) -> bytes:
    """The reply's bytes."""
    return REPLY.pack(MAGIC, VERSION, status)


def parse_reply(data: bytes) -> Status:
    """A reply (exactly `REPLY.size` bytes) or ConnectProtocolError."""
    if len(data) != REPLY.size:
        raise ConnectProtocolError(f"reply is {REPLY.size} bytes, got {len(data)}")
    magic, version, status = REPLY.unpack(data)
    if magic != MAGIC or version != VERSION:
        raise ConnectProtocolError("not a mesh connect reply")
    try:
        return Status(status)
    except ValueError:
        raise ConnectProtocolError(f"unknown connect status {status}") from None
