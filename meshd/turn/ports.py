"""Relayed-port management: the seam to the sockets, an in-memory fake, and the port pool.

A TURN server hands out relayed transport addresses from a configured IP and port range
(RFC 8656 §7.2 asks for ports picked at random from the range, so that they are hard to guess).
The core cannot bind sockets itself; it asks a `RelayPorts` implementation, which may say no
(another process holds the port), and tries the next port.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from meshd.udp import Address

_RANDOM_TRIES = 16  # random picks before a linear scan from a random start


class RelayPorts(Protocol):
    """Opens and closes the UDP sockets of relayed addresses (the service binds real ones)."""

    def open(self, address: Address) -> bool:
        """Bind a UDP socket on `address` and deliver what arrives on it to the core; False
        when it cannot be bound (port in use)."""
        ...

    def set_dont_fragment(self, address: Address) -> None:
        """Send from `address` with the IP DF bit set (RFC 8656 §7.2, DONT-FRAGMENT)."""
        ...

    def close(self, address: Address) -> None:
        """Release the socket on `address`."""
        ...


class MemoryRelayPorts:
    """An honest in-memory `RelayPorts` for tests: `taken` ports fail to open, like ports held
    by another process; `on_open` lets a test attach the address to a simulated network."""

    def __init__(self, taken: set[Address] | None = None,
                 on_open: Callable[[Address], None] | None = None) -> None:
        self.taken: set[Address] = set() if taken is None else taken
        """Addresses another process holds."""
        self.opened: set[Address] = set()
        """Addresses currently open."""
        self.dont_fragment: set[Address] = set()
        """Open addresses that send with DF set."""
        self._on_open = on_open

    def open(self, address: Address) -> bool:
        if address in self.taken or address in self.opened:
            return False
        self.opened.add(address)
        if self._on_open is not None:
            self._on_open(address)
        return True

    def set_dont_fragment(self, address: Address) -> None:
        assert address in self.opened, f"{address} is not open"
        self.dont_fragment.add(address)

    def close(self, address: Address) -> None:
        assert address in self.opened, f"{address} is not open"
        self.opened.discard(address)
        self.dont_fragment.discard(address)


class PortPool:
    """Which ports of `min_port..max_port` on `ip` are in use, and binding new ones."""

    def __init__(self, ip: str, min_port: int, max_port: int, ports: RelayPorts,
                 rng: random.Random) -> None:
        if not 1 <= min_port <= max_port <= 65535:
            raise ValueError(f"bad relay port range {min_port}..{max_port}")
        self.ip = ip
        self.min_port = min_port
        self.max_port = max_port
        self._ports = ports
        self._rng = rng
        self._in_use: set[int] = set()

    @property
    def in_use(self) -> int:
        """Ports bound by this pool."""
        return len(self._in_use)

    def acquire(self, *, even: bool = False) -> int | None:
        """Bind a free port (an even one when asked); None when none can be bound."""
        return self._search(lambda p: self._try(p), even=even)

    def acquire_pair(self) -> int | None:
        """Bind an even port and the next one (EVEN-PORT with R, RFC 8656 §7.2); returns the
        even port, or None."""

        def both(port: int) -> bool:
            if port + 1 > self.max_port or port + 1 in self._in_use or not self._try(port):
                return False
            if self._try(port + 1):
                return True
            self.release(port)
            return False

        return self._search(both, even=True)

    def release(self, port: int) -> None:
        """Close `port` and make it available again."""
        if port in self._in_use:
            self._in_use.discard(port)
            self._ports.close((self.ip, port))

    def set_dont_fragment(self, port: int) -> None:
        """Ask for the DF bit on datagrams sent from `port`."""
        self._ports.set_dont_fragment((self.ip, port))

    def _try(self, port: int) -> bool:
        if port in self._in_use or not self._ports.open((self.ip, port)):
            return False
        self._in_use.add(port)
        return True

    def _search(self, attempt: Callable[[int], bool], *, even: bool) -> int | None:
        first = self.min_port + (self.min_port % 2 if even else 0)
        if first > self.max_port:
            return None
        step = 2 if even else 1
        count = (self.max_port - first) // step + 1
        if len(self._in_use) >= self.max_port - self.min_port + 1:
            return None
        for _ in range(min(_RANDOM_TRIES, count)):
            port = first + step * self._rng.randrange(count)
            if port not in self._in_use and attempt(port):
                return port
        start = self._rng.randrange(count)
        for i in range(count):
            port = first + step * ((start + i) % count)
            if port not in self._in_use and attempt(port):
                return port
        return None
