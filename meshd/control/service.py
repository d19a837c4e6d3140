"""asyncio adapters of the control channel: the server's TLS listener and the agent's connector.

    service = await ControlService.start(ControlServer(config, store), server_tls, "0.0.0.0",
                                         20004)
    ...
    await service.close()

    connector = ControlConnector(ControlClient(client_config), "cloud.example", 20004,
                                 agent_tls_context(kubeconfig=Path("edge-1.kubeconfig")),
                                 on_event=handle)
    connector.start()
    connector.send_signal("edge-2", {...})
    ...
    await connector.close()

TLS: the listener requires a client certificate that chains to the cluster CA
(`server_tls_context`, `edgeweave.pki.server_context` with `ClientAuth.REQUIRED`): anything
else fails the handshake, counted as an auth failure. The node name comes from the verified
certificate (`edgeweave.pki.peer_identity`). The agent verifies the server's certificate and
host name against the same CA and presents its node certificate, taken from the node kubeconfig
`cloudcore certs node` writes (`agent_tls_context(kubeconfig=...)`, via
`edgeweave.kube.client.load_kubeconfig`) or from files.

The adapters only move bytes and time: the cores decide everything. One timer each, re-armed
to the core's `get_timer()`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeweave.kube.client import load_kubeconfig
from edgeweave.log import event
from edgeweave.pki import ClientAuth, client_context, peer_identity, server_context
from meshd.control.client import Close, ControlClient, ControlEvent, Dial, Send
from meshd.control.nodes import NodeNotFound, NodesRequestError, NodeTable, nodes_document, select
from meshd.control.revoked import Revocations, RevokedFile
from meshd.control.server import (
    REFUSAL_LOG_S,
    CloseConnection,
    ConnectionId,
    ControlServer,
    Output,
    RefusalLog,
    SendFrame,
)
from meshd.udp import BindError, canonical

log = logging.getLogger("meshd.control")

_READ_SIZE = 65536
_WRITE_LIMIT = 8 << 20  # an agent that stopped reading: drop it beyond this much queued
_CLOSE_GRACE_S = 5.0  # a closed connection's queued bytes get this long to leave
REVOKED_POLL_S = 2.0
"""How often the revocation list's mtime/size is looked at (SIGHUP re-reads at once)."""
__all__ = ["REFUSAL_LOG_S", "REVOKED_POLL_S", "ControlConnector", "ControlService", "RefusalLog",
           "RevocationWatcher", "agent_tls_context", "node_routes", "server_tls_context"]


def server_tls_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The listener's context: serves `cert_file`, requires a client certificate from the CA
    in `ca_file`. Raises `edgeweave.pki.PKIFileError` naming a bad file."""
    return server_context(cert_file, key_file, client_ca_file=ca_file,
                          client_auth=ClientAuth.REQUIRED)


def agent_tls_context(*, kubeconfig: Path | None = None, ca_file: Path | None = None,
                      cert_file: Path | None = None, key_file: Path | None = None
                      ) -> ssl.SSLContext:
    """The agent's context: trusts the cluster CA only, presents the node certificate.

    Either `kubeconfig` (the node kubeconfig: its cluster CA and its user's client certificate
    and key) or all three files. Raises `edgeweave.kube.client.KubeconfigError` or
    `edgeweave.pki.PKIFileError` for bad input, `ValueError` for a kubeconfig without TLS.
    """
    if kubeconfig is not None:
        if ca_file or cert_file or key_file:
            raise ValueError("give a kubeconfig or files, not both")
        access = load_kubeconfig(kubeconfig)
        if access.ssl is None or access.ssl.verify_mode is not ssl.CERT_REQUIRED:
            raise ValueError(f"{kubeconfig}: needs an https cluster with its CA certificate "
                             "(no insecure-skip-tls-verify) and a client certificate")
        return access.ssl
    if ca_file is None or cert_file is None or key_file is None:
        raise ValueError("give a kubeconfig, or ca_file, cert_file and key_file")
    return client_context(ca_file, cert_file=cert_file, key_file=key_file)


def _reason(exc: BaseException, certificate: str = "") -> str:
    """What went wrong, for logs; `certificate` names whose certificate a verification failure
    concerns ("client" on the server, "server" on the agent)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        # OpenSSL's verify result says why (RFC 5280 §6: path, validity, ...); the bare
        # reason would only say CERTIFICATE_VERIFY_FAILED.
        whose = f"{certificate} certificate" if certificate else "certificate"
        return f"{whose} refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _not_after(peercert: Mapping[str, Any] | None) -> float | None:
    """The verified client certificate's notAfter (Unix seconds), None when it has none."""
    text = peercert.get("notAfter") if peercert else None
    if not isinstance(text, str):
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def _serial(peercert: Mapping[str, Any] | None, ssl_object: ssl.SSLObject | None) -> int | None:
    """The verified client certificate's serial number: from `getpeercert()`'s dict (hex
    text), else parsed from the DER form."""
    text = peercert.get("serialNumber") if peercert else None
    if isinstance(text, str):
        try:
            return int(text, 16)
        except ValueError:
            pass
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    from cryptography import x509  # only when the dict lacks it

    try:
        return x509.load_der_x509_certificate(der).serial_number
    except ValueError:
        return None


# --- server --------------------------------------------------------------------------------------


class ControlService:
    """`meshd server`'s control listener around a `ControlServer`."""

    def __init__(self, server: ControlServer, tls: ssl.SSLContext, *,
                 clock: Callable[[], float] = time.time, handshake_timeout_s: float = 10.0
                 ) -> None:
        self.server = server
        """The core."""
        self.address: tuple[str, int] = ("", 0)
        """Where it listens (the real port when 0 was asked for)."""
        self._tls = tls
        self._clock = clock
        self._handshake_timeout_s = handshake_timeout_s
        self._loop = asyncio.get_running_loop()
        self._listener: asyncio.Server | None = None
        self._writers: dict[ConnectionId, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._refusals = RefusalLog()

    @classmethod
    async def start(cls, server: ControlServer, tls: ssl.SSLContext, host: str, port: int, *,
                    clock: Callable[[], float] = time.time,
                    handshake_timeout_s: float = 10.0) -> ControlService:
        """Listen on `host:port` (0 = any port). Raises `BindError`."""
        service = cls(server, tls, clock=clock, handshake_timeout_s=handshake_timeout_s)
        try:
            service._listener = await asyncio.start_server(service._accept, host, port,
                                                           reuse_address=True)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise BindError(f"cannot listen on TCP {where} (control): "
                            f"{exc.strerror or exc}", exc.errno) from None
        sockname = service._listener.sockets[0].getsockname()
        service.address = (sockname[0], sockname[1])
        event(log, logging.INFO, "control.listen", address=f"{sockname[0]}:{sockname[1]}",
              overlay=server.config.overlay_network, nodes=len(server.registry))
        return service

    async def close(self) -> None:
        """Tell agents the server stops, close every connection and the listener."""
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        self._emit(self.server.shutdown(self._clock()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers.values():
            writer.transport.abort()
        self._writers.clear()

    def set_revoked(self, revocations: Revocations) -> None:
        """Put a revocation list in force (cuts the sessions it revokes)."""
        self._emit(self.server.set_revoked(revocations.nodes, revocations.serials,
                                           self._clock()))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            await writer.start_tls(self._tls, ssl_handshake_timeout=self._handshake_timeout_s)
        except (OSError, TimeoutError) as exc:
            reason = _reason(exc, "client")
            self.server.handshake_failed(reason)
            host = peer[0] if isinstance(peer, tuple) else where
            count = self._refusals.refused(host, time.monotonic())
            if count is not None:
                event(log, logging.WARNING, "control.tls_refused", peer=where, reason=reason,
                      refusals=count)
            writer.transport.abort()
            return
        peercert = writer.get_extra_info("peercert")
        identity = peer_identity(peercert)
        node = identity.node_name if identity is not None else None
        not_after = _not_after(peercert)
        serial = _serial(peercert, writer.get_extra_info("ssl_object"))
        conn = next(self._ids)
        self._writers[conn] = writer
        event(log, logging.DEBUG, "control.accepted", conn=conn, peer=where, node=node or "-",
              serial=f"{serial:x}" if serial is not None else "-")
        remote = canonical(peer) if isinstance(peer, tuple) else None
        self._emit(self.server.connection_made(conn, node, self._clock(), not_after=not_after,
                                               serial=serial, remote=remote))
        try:
            while conn in self._writers:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                self._emit(self.server.receive_data(conn, data, self._clock()))
        except OSError as exc:
            event(log, logging.DEBUG, "control.read_error", conn=conn, error=_reason(exc))
        finally:
            if self._writers.pop(conn, None) is not None:
                writer.transport.abort()
            self._emit(self.server.connection_lost(conn, self._clock()))

    def _emit(self, outputs: list[Output]) -> None:
        for out in outputs:
            writer = self._writers.get(out.conn)
            if writer is None:
                continue
            if isinstance(out, SendFrame):
                if writer.transport.get_write_buffer_size() > _WRITE_LIMIT:
                    event(log, logging.WARNING, "control.slow_agent", conn=out.conn)
                    del self._writers[out.conn]
                    writer.transport.abort()
                    self._emit(self.server.connection_lost(out.conn, self._clock()))
                    continue
                writer.write(out.data)
            elif isinstance(out, CloseConnection):
                del self._writers[out.conn]
                writer.close()
                self._loop.call_later(_CLOSE_GRACE_S, writer.transport.abort)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.server.get_timer()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._emit(self.server.handle_timer(self._clock()))


class RevocationWatcher:
    """Keeps `control.revokedFile` in force: hands its list to every subscriber (the control
    service, the relay in the same process) at once and after each change. `reload()` re-reads
    it (SIGHUP); a timer re-reads it when its mtime/size changes. A bad or missing file keeps
    the previous list (`RevokedFile.reload` logs why)."""

    def __init__(self, file: RevokedFile, *, poll_s: float = REVOKED_POLL_S) -> None:
        self.file = file
        """The list on disk (`file.current` is in force)."""
        self._poll_s = poll_s
        self._loop = asyncio.get_running_loop()
        self._subscribers: list[Callable[[Revocations], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def subscribe(self, apply: Callable[[Revocations], None]) -> Callable[[], None]:
        """Call `apply` with the list now and after every change; returns the unsubscribe."""
        self._subscribers.append(apply)
        apply(self.file.current)

        def unsubscribe() -> None:
            if apply in self._subscribers:
                self._subscribers.remove(apply)
        return unsubscribe

    def start(self) -> None:
        """Log the list in force and start polling the file."""
        self._announce(self.file.current)
        self._arm()

    def reload(self) -> None:
        """Re-read the file now, changed or not (SIGHUP)."""
        self._apply(self.file.reload(force=True))

    def close(self) -> None:
        """Stop polling."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._poll_s, self._poll)

    def _poll(self) -> None:
        self._apply(self.file.reload())
        self._arm()

    def _apply(self, revocations: Revocations | None) -> None:
        if revocations is None:
            return
        self._announce(revocations)
        for apply in list(self._subscribers):
            try:
                apply(revocations)
            except Exception as exc:  # one subscriber's bug must not keep the list from others
                event(log, logging.ERROR, "control.revoked_apply_failed", error=repr(exc))

    def _announce(self, revocations: Revocations) -> None:
        event(log, logging.INFO, "control.revoked", nodes=len(revocations.nodes),
              serials=len(revocations.serials), file=self.file.path)


def node_routes(table: Callable[[], NodeTable] | None, *,
                clock: Callable[[], float] = time.time) -> list[web.RouteDef]:
    """`GET /nodes` and `GET /nodes/{node}` for `meshd server`'s metrics listener: the JSON
    node list of `table()`, whole or with one node's entry only (None: this server runs no
    control channel, every request gets 404 saying so). Bad requests get a JSON
    `{"error": ...}` with 400 (unknown parameter, bad `state`, not a node name) or 404
    (unknown node)."""

    def answer(request: web.Request, node: str | None) -> web.Response:
        if table is None:
            return _json_error(404, "this meshd server runs no control channel "
                                    "(control.enabled is false): it has no node list")
        current = table()
        try:
            listed = select(current, request.query, node)
        except NodesRequestError as exc:
            return _json_error(400, str(exc))
        except NodeNotFound as exc:
            return _json_error(404, str(exc))
        return web.json_response(nodes_document(current, clock(), listed))

    async def get_nodes(request: web.Request) -> web.Response:
        return answer(request, None)

    async def get_node(request: web.Request) -> web.Response:
        return answer(request, request.match_info["node"])

    return [web.get("/nodes", get_nodes), web.get("/nodes/{node}", get_node)]


def _json_error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


# --- agent ---------------------------------------------------------------------------------------


class ControlConnector:
    """Runs a `ControlClient` over TLS to `meshd server`: dials when the client says so, feeds
    it bytes and time, hands its events to `on_event`."""

    def __init__(self, client: ControlClient, host: str, port: int, tls: ssl.SSLContext, *,
                 server_hostname: str | None = None,
                 on_event: Callable[[ControlEvent], None] | None = None) -> None:
        self.client = client
        """The core."""
        self.host, self.port = host, port
        self._tls = tls
        self._server_hostname = server_hostname
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._writer: asyncio.StreamWriter | None = None
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def now(self) -> float:
        """The client's clock (the loop's monotonic time)."""
        return self._loop.time()

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        self.client.start(self.now())
        self._flush()

    def send_signal(self, peer: str, payload: Mapping[str, Any]) -> None:
        """Send a signal to `peer` (raises `ControlNotReady` without a session)."""
        self.client.send_signal(peer, payload, self.now())
        self._flush()

    def flush(self) -> None:
        """Carry out what the client queued since the last input (e.g. signals the application
        sent through `client.send_signal` directly), deliver its events, re-arm the timer."""
        self._flush()

    async def close(self) -> None:
        """Stop the client and close the connection."""
        if self._closed:
            return
        self.client.stop(self.now())
        self._flush()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        for command in self.client.commands():
            if isinstance(command, Dial):
                self._generation += 1
                self._spawn(self._dial(self._generation))
            elif isinstance(command, Send):
                if self._writer is not None:
                    self._writer.write(command.data)
            elif isinstance(command, Close):
                self._generation += 1
                writer, self._writer = self._writer, None
                if writer is not None:
                    writer.close()
                    self._loop.call_later(_CLOSE_GRACE_S, writer.transport.abort)
        while (ev := self.client.next_event()) is not None:
            if self._on_event is not None:
                try:
                    self._on_event(ev)
                except Exception as exc:  # the application's bug must not stop the channel
                    event(log, logging.ERROR, "control.event_handler_failed",
                          event=type(ev).__name__, error=repr(exc))
        self._rearm()

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.client.get_timer()
        if deadline is not None and not self._closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.now())
        self._flush()

    async def _dial(self, generation: int) -> None:
        timeout = self.client.config.connect_timeout_s
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._tls,
                                        server_hostname=self._server_hostname or self.host,
                                        ssl_handshake_timeout=timeout),
                timeout)
        except (OSError, TimeoutError) as exc:
            if generation == self._generation and not self._closed:
                self.client.connection_failed(_reason(exc, "server"), self.now())
                self._flush()
            return
        if generation != self._generation or self._closed:
            writer.transport.abort()
            return
        self._writer = writer
        self.client.connection_made(self.now())
        self._flush()
        await self._read(reader, writer, generation)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    generation: int) -> None:
        reason = "closed by the server"
        try:
            while generation == self._generation:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                if generation != self._generation:
                    break
                self.client.receive_data(data, self.now())
                self._flush()
        except OSError as exc:
            reason = _reason(exc)
        finally:
            if generation == self._generation and self._writer is writer:
                self._writer = None
                self.client.connection_lost(reason, self.now())
                self._flush()
            writer.transport.abort()

