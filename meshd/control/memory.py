"""An in-memory control plane: one `ControlServer` and any number of `ControlClient`s joined by
byte pipes on one virtual clock. No sockets, no sleeping; deterministic.

    plane = MemoryControlPlane(ControlServer(config, MemoryRegistryStore()))
    plane.add("edge-1", ControlClient(ControlClientConfig(key1), random.Random(1)))
    plane.start("edge-1")
    plane.advance(1.0)                    # runs every timer due, in order
    plane.events("edge-1")                # what the application would have seen

The certificate a client presents is simulated by the node name given to `add`.
`crash_server()` drops every connection as a dying process would; `start_server(server)` brings
a (new) server up; while there is none, dials are refused.
`partition(name)` makes a client's bytes vanish both ways (idle timeouts on both sides).
`chunk` splits every write (e.g. byte by byte) to exercise both decoders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from meshd.control.client import Close, ControlClient, ControlEvent, Dial, Send
from meshd.control.server import CloseConnection, ConnectionId, ControlServer, Output, SendFrame


@dataclass
class _Agent:
    client: ControlClient
    certificate_node: str | None
    conn: ConnectionId | None = None
    events: list[ControlEvent] = field(default_factory=list)
    partitioned: bool = False


class MemoryControlPlane:
    """Server and clients in one process, driven by `pump` and `advance`."""

    def __init__(self, server: ControlServer | None, *, now: float = 1_700_000_000.0,
                 chunk: Callable[[bytes], list[bytes]] | None = None) -> None:
        self.server = server
        """The running server core, or None while it is down."""
        self.now = now
        """The virtual clock (Unix seconds: the server mints TURN credentials with it)."""
        self.bytes_to_server = 0
        """Bytes the clients wrote."""
        self._chunk = chunk or (lambda data: [data])
        self._agents: dict[str, _Agent] = {}
        self._by_conn: dict[ConnectionId, str] = {}
        self._next_conn = 1
        self._queue: deque[Callable[[], None]] = deque()

    # --- set-up -------------------------------------------------------------------------------

    def add(self, name: str, client: ControlClient, *, as_node: str | None = None,
            no_node: bool = False) -> None:
        """Add a client labelled `name`. Its certificate names node `name`, or `as_node`, or
        no node at all (`no_node`: e.g. an admin certificate from the same CA)."""
        self._agents[name] = _Agent(client, None if no_node else as_node or name)

    def client(self, name: str) -> ControlClient:
        """The client labelled `name`."""
        return self._agents[name].client

    def start(self, name: str) -> None:
        """Start a client (it dials at once)."""
        self._agents[name].client.start(self.now)
        self.pump()

    def partition(self, name: str, cut: bool = True) -> None:
        """Cut (or heal) a client's network: bytes both ways vanish silently, dials fail."""
        self._agents[name].partitioned = cut

    def events(self, name: str) -> list[ControlEvent]:
        """Events of a client since the last call."""
        agent = self._agents[name]
        self._collect(agent)
        out, agent.events = agent.events, []
        return out

    # --- the server's life --------------------------------------------------------------------

    def crash_server(self) -> None:
        """The server process dies: every connection resets, dials are refused."""
        self.server = None
        for agent in self._agents.values():
            if agent.conn is not None:
                self._by_conn.pop(agent.conn, None)
                agent.conn = None
                self._queue.append(partial(self._reset, agent.client))
        self.pump()

    def stop_server(self) -> None:
        """The server stops cleanly (`shutdown`), then is down."""
        if self.server is not None:
            self._server_outputs(self.server.shutdown(self.now))
            self.pump()
        self.crash_server()

    def start_server(self, server: ControlServer) -> None:
        """A server (a new instance after a restart) accepts connections again."""
        self.server = server

    # --- running ------------------------------------------------------------------------------

    def pump(self) -> None:
        """Carry commands, bytes and closes until nothing moves."""
        while True:
            for agent in self._agents.values():
                for command in agent.client.commands():
                    self._command(agent, command)
            if not self._queue:
                break
            self._queue.popleft()()
        for agent in self._agents.values():
            self._collect(agent)

    def advance(self, seconds: float) -> None:
        """Move the clock forward, running every timer that falls due on the way, in order."""
        target = self.now + seconds
        while True:
            deadlines = [d for d in self._deadlines() if d <= target]
            if not deadlines:
                break
            self.now = max(self.now, min(deadlines))
            if self.server is not None and (self.server.get_timer() or target + 1) <= self.now:
                self._server_outputs(self.server.handle_timer(self.now))
            for agent in self._agents.values():
                timer = agent.client.get_timer()
                if timer is not None and timer <= self.now:
                    agent.client.handle_timer(self.now)
            self.pump()
        self.now = target

    def _deadlines(self) -> list[float]:
        timers = [a.client.get_timer() for a in self._agents.values()]
        if self.server is not None:
            timers.append(self.server.get_timer())
        return [t for t in timers if t is not None]

    # --- plumbing -----------------------------------------------------------------------------

    def _collect(self, agent: _Agent) -> None:
        while (ev := agent.client.next_event()) is not None:
            agent.events.append(ev)

    def _command(self, agent: _Agent, command: Dial | Send | Close) -> None:
        if isinstance(command, Dial):
            self._queue.append(partial(self._dial, agent))
        elif isinstance(command, Send):
            conn = agent.conn
            if conn is not None and not agent.partitioned:
                self.bytes_to_server += len(command.data)
                for piece in self._chunk(command.data):
                    self._queue.append(partial(self._to_server, conn, piece))
        elif agent.conn is not None:
            conn, agent.conn = agent.conn, None
            self._by_conn.pop(conn, None)
            self._queue.append(partial(self._server_lost, conn))

    def _dial(self, agent: _Agent) -> None:
        if self.server is None or agent.partitioned:
            reason = "connect timeout" if agent.partitioned else "connection refused"
            agent.client.connection_failed(reason, self.now)
            return
        conn, self._next_conn = self._next_conn, self._next_conn + 1
        agent.conn = conn
        self._by_conn[conn] = next(n for n, a in self._agents.items() if a is agent)
        agent.client.connection_made(self.now)
        self._server_outputs(self.server.connection_made(conn, agent.certificate_node,
                                                         self.now))

    def _reset(self, client: ControlClient) -> None:
        client.connection_lost("connection reset", self.now)

    def _to_server(self, conn: ConnectionId, data: bytes) -> None:
        if self.server is not None:
            self._server_outputs(self.server.receive_data(conn, data, self.now))

    def _server_lost(self, conn: ConnectionId) -> None:
        if self.server is not None:
            self._server_outputs(self.server.connection_lost(conn, self.now))

    def _server_outputs(self, outputs: list[Output]) -> None:
        for out in outputs:
            name = self._by_conn.get(out.conn)
            if name is None:
                continue
            agent = self._agents[name]
            if isinstance(out, SendFrame):
                for piece in self._chunk(out.data):
                    self._queue.append(partial(self._to_client, agent, out.conn, piece))
            elif isinstance(out, CloseConnection):
                self._queue.append(partial(self._client_lost, agent, out.conn))

    def _to_client(self, agent: _Agent, conn: ConnectionId, data: bytes) -> None:
        if agent.conn == conn and not agent.partitioned:
            agent.client.receive_data(data, self.now)

    def _client_lost(self, agent: _Agent, conn: ConnectionId) -> None:
        if agent.conn == conn:
            agent.conn = None
            self._by_conn.pop(conn, None)
            if not agent.partitioned:  # else the FIN is lost too: the client finds out by itself
                agent.client.connection_lost("closed by the server", self.now)
