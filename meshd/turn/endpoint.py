"""The asyncio adapter for one `TurnClient`: a UDP socket or a TCP connection to the server, one
timer, events on a queue. No decisions here (those are the core's).

    endpoint = await TurnEndpoint.open(server, credentials)
    allocated = await endpoint.allocate()          # Allocated, or TurnEndpointError
    endpoint.client.create_permission(peer_ip, endpoint.now()); endpoint.flush()
    endpoint.send(b"...", peer)
    event = await endpoint.events.get()            # DataReceived, ChannelBound, ...
    await endpoint.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from meshd.turn.client import (
    Allocated,
    AllocationClosed,
    AllocationFailed,
    ClientState,
    TurnClient,
    TurnClientConfig,
    TurnEvent,
)
from meshd.turn.credentials import TurnCredentials
from meshd.turn.server import Transport
from meshd.udp import Address, UdpSocket, canonical, open_udp


class TurnEndpointError(Exception):
    """The allocation could not be made (refused, unanswered) or the server is unreachable."""


class _Stream(asyncio.Protocol):
    def __init__(self, endpoint: TurnEndpoint) -> None:
        self._endpoint = endpoint
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._endpoint.client.receive_stream(data, self._endpoint.now())
        self._endpoint.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._endpoint.client.connection_lost()
        self._endpoint.flush()


class TurnEndpoint:
    """A `TurnClient` on a real socket."""

    def __init__(self, client: TurnClient, clock: Callable[[], float]) -> None:
        self.client = client
        """The core (call its API, then `flush`)."""
        self.events: asyncio.Queue[TurnEvent] = asyncio.Queue()
        """Every event of the core, in order."""
        self._clock = clock
        self._udp: UdpSocket | None = None
        self._stream: _Stream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(
        cls,
        server: Address,
        credentials: TurnCredentials,
        *,
        local_ip: str | None = None,
        config: TurnClientConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> TurnEndpoint:
        """Bind a UDP socket (or connect over TCP when `config.transport` says so)."""
        config = config or TurnClientConfig()
        if local_ip is None:
            local_ip = "::" if ":" in server[0] else "0.0.0.0"
        endpoint = cls(TurnClient(server, credentials, local=(local_ip, 0), config=config), clock)
        if config.transport is Transport.TCP:
            try:
                transport, protocol = await endpoint._loop.create_connection(
                    lambda: _Stream(endpoint), host=server[0], port=server[1],
                    local_addr=(local_ip, 0))
            except OSError as exc:
                raise TurnEndpointError(f"cannot connect to TURN server {server}: "
                                        f"{exc.strerror or exc}") from None
            endpoint.client.local = canonical(transport.get_extra_info("sockname"))
            endpoint._stream = protocol
        else:
            endpoint._udp = await open_udp((local_ip, 0), endpoint._datagram)
            endpoint.client.local = endpoint._udp.address
        return endpoint

    def _datagram(self, data: bytes, source: Address) -> None:
        self.client.handle_datagram(data, source, self.now())
        self.flush()

    def now(self) -> float:
        """The clock the core runs on."""
        return self._clock()

    async def allocate(self, timeout: float = 60.0) -> Allocated:
        """Allocate and wait for the outcome; other events stay queued for the caller."""
        self.client.allocate(self.now())
        self.flush()
        held: list[TurnEvent] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self.events.get()
                    if isinstance(event, Allocated):
                        return event
                    if isinstance(event, AllocationFailed):
                        raise TurnEndpointError(f"allocation failed: {event.code} "
                                                f"{event.reason}")
                    held.append(event)
        finally:
            for event in held:
                self.events.put_nowait(event)

    def send(self, data: bytes, peer: Address) -> None:
        """Relay `data` to `peer` (see `TurnClient.send`)."""
        self.client.send(data, peer, self.now())
        self.flush()

    def flush(self) -> None:
        """Send what the core has queued, move its events to `events`, re-arm the timer."""
        now = self.now()
        for t in self.client.datagrams_to_send(now):
            if self._udp is not None:
                self._udp.send(t.data, t.destination)
            elif self._stream is not None and self._stream.transport is not None:
                self._stream.transport.write(t.data)
        while (event := self.client.next_event()) is not None:
            self.events.put_nowait(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.client.get_timer()
        if deadline is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.now())
        self.flush()

    async def close(self, timeout: float = 5.0) -> None:
        """Delete the allocation (waits up to `timeout` for the answer), then the socket."""
        self.client.close(self.now())
        self.flush()
        if self.client.state is not ClientState.DELETING:
            self.abort()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not isinstance(await self.events.get(), AllocationClosed):
                    pass
        self.abort()

    def abort(self) -> None:
        """Close the socket without telling the server."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._udp is not None:
            self._udp.close()
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()

    def __repr__(self) -> str:
        return f"<TurnEndpoint {self.client.server} relayed={self.client.relayed_address}>"
