"""The tunnel's native fast path: what the sessions share with it, and which peers it serves.

Interactive round trips paid ~50 µs of interpreter work per wake-up, four wake-ups per round
trip (bench/RESULTS.md, "where the round trip goes"). `meshd.tunnel._fastpath` (C, OpenSSL's
libcrypto) runs a thread that owns the reads of mesh0 and the tunnel socket. It seals and
opens lone data packets under a peer's current keys on a direct path without entering Python;
everything else (handshakes, STUN, TURN, coalesced reads, bulk offload frames, other keys,
anything it does not like) is handed to the asyncio adapter unchanged through a queue and an
eventfd, and the sans-I/O core handles it as before. Two things it settles itself: a datagram
under a route's keys that fails authentication is dropped and counted (`FastStats.auth_failed`,
which the core adds to its `auth-failed` rejections), and a replay that lost the race to Python.
If the thread stops on an error it cannot get past, the adapter drains what it queued and reads
the socket and mesh0 itself again.

The two sides share each keypair's send `Counter` (a nonce is never used twice) and its
`ReplayWindow` (`mark` is one atomic check-and-set, so a datagram is delivered once whichever
side opens it). Without the extension (no compiler at install time) both are the pure-Python
classes below and the adapter reads its sockets itself.

`FastRoute` is the sans-I/O half: what the thread needs to know about one peer, computed by
`TunnelSession.fast_route` and `MeshNode.fast_routes`; the adapter installs a route when it
changes and folds the thread's per-peer counters back into the core (`MeshNode.fast_stats`),
so keepalives, consent checks and metrics see the traffic they did not carry.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.tunnel import replay as _replay
from meshd.udp import Address


class SendCounter(Protocol):
    """A keypair's next transport counter."""

    def take(self, n: int = 1) -> int: ...

    @property
    def value(self) -> int: ...


class Replay(Protocol):
    """`meshd.tunnel.replay.ReplayWindow`'s interface."""

    @property
    def highest(self) -> int: ...

    @property
    def limit(self) -> int: ...

    @property
    def window(self) -> int: ...

    def check(self, counter: int) -> bool: ...

    def mark(self, counter: int) -> bool: ...

    def accept(self, counter: int) -> bool: ...


class PyCounter:
    """The counter without the extension (nothing else sends with the keys then)."""

    __slots__ = ("value",)

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def take(self, n: int = 1) -> int:
        first = self.value
        self.value = first + n
        return first


PURE_ENV = "MESHD_PURE_PYTHON"
"""Set to 1: ignore the extension (the pure-Python data path, as without a compiler)."""

_native: Any = None
if os.environ.get(PURE_ENV) != "1":
    with contextlib.suppress(ImportError):  # built without a C compiler: pure Python
        _native = importlib.import_module("meshd.tunnel._fastpath")

NATIVE: Any = _native
"""The extension module, or None."""
AVAILABLE = _native is not None


def new_counter() -> SendCounter:
    """A send counter the fast path can share (native when built)."""
    return _native.Counter() if _native is not None else PyCounter()


def new_replay_window(bits: int, *, limit: int) -> Replay:
    """A replay window the fast path can share (native when built)."""
    if _native is not None:
        window: Replay = _native.ReplayWindow(bits, limit=limit)
        return window
    return _replay.ReplayWindow(bits, limit=limit)


@dataclass(frozen=True)
class FastRoute:
    """What the fast path needs to serve one peer: its current keypair and direct endpoint."""

    overlay: bytes
    """The peer's IPv4 overlay address (4 bytes): packets to it are sealed, its source is
    checked on packets from it."""
    remote_index: int
    send_key: bytes = field(repr=False)
    counter: SendCounter
    send_limit: int
    """Counters at or above this go to Python (it starts the rekey)."""
    send_fragments: bool
    """Offload frames go out as one-fragment 0xE4 messages (the peer announced them)."""
    local_index: int
    receive_key: bytes = field(repr=False)
    replay: Replay
    endpoint: Address | None
    """Where datagrams go (a direct path from the tunnel socket, or our TURN server for a
    relayed one); None: receive only."""
    send_until: float
    """Caller's clock: from here on Python sends for this peer (the initiator's rekey on send,
    expiry)."""
    receive_until: float
    """Caller's clock: from here on Python opens what the peer sends under these keys (the
    initiator's rekey on receive, expiry)."""
    channel: int | None = None
    """A relayed path through a TURN channel bound on our allocation: datagrams go to
    `endpoint` (the server) in ChannelData of this channel, and come back in it."""

    def same_keys(self, other: FastRoute) -> bool:
        """The same keypair and path (only the deadlines may differ, which move with
        nothing but the keys)."""
        return (self.local_index == other.local_index and self.counter is other.counter
                and self.endpoint == other.endpoint and self.channel == other.channel
                and self.send_fragments == other.send_fragments)


@dataclass(frozen=True)
class FastStats:
    """One peer's traffic on the fast path since the last report (caller's clock)."""

    tx_packets: int
    tx_bytes: int
    last_tx: float | None
    rx_packets: int
    rx_bytes: int
    last_rx: float | None
    auth_failed: int = 0
    """Datagrams under the route's receiver index that failed authentication: the thread
    dropped them (Python would have rejected them as `auth-failed`)."""
