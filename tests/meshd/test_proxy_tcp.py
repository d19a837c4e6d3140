"""meshd.proxy over loopback: relaying, half-close, failover, resets, limits, timeouts.

No iptables here: the original destination comes from a narrow seam (`original_destination`)
that maps the client's source IP (127.0.0.x) to the ClusterIP:port it "dialed". Every test runs
on both event loops and both relay modes where the byte path matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from meshd.catalog import Catalog, Endpoint, Service
from meshd.lb import LbConfig
from meshd.proxy import Proxy, ProxyConfig, UdpConfig
from meshd.proxy.catalog_file import parse_catalog
from meshd.proxy.mesh import MeshConnectServer, MeshDialer
from meshd.proxy.sockopt import Address
from meshd.tunnel.connect import ConnectRequest, encode_request, parse_reply

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]
MODES = ["auto", "splice", "copy"]
CIP = "10.96.0.10"


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    if loop == "uvloop":
        uvloop: Any = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 20))


def catalog(ports: list[int], *, policy: str = "round-robin", affinity: int | None = None,
            extra: list[dict[str, Any]] | None = None) -> Catalog:
    """Service default/web on CIP:80 with one endpoint per backend port on 127.0.0.1."""
    return parse_catalog({"node": "n1", "services": [{
        "namespace": "default", "name": "web", "clusterIPs": [CIP],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        "endpoints": [{"ip": "127.0.0.1", "node": f"n{i}",
                       "ports": [{"name": "http", "port": p}]} for i, p in enumerate(ports)],
        "lbPolicy": policy, "sessionAffinityTimeoutS": affinity,
    }, *(extra or [])]})


class OriginalDst:
    """The test's stand-in for SO_ORIGINAL_DST: client source IP → destination."""

    def __init__(self, default: Address | None = (CIP, 80)) -> None:
        self.default = default
        self.by_client: dict[str, Address | None] = {}

    def __call__(self, sock: socket.socket) -> Address | None:
        peer = sock.getpeername()[0]
        return self.by_client.get(peer, self.default)


def config(mode: str = "auto", **changes: Any) -> ProxyConfig:
    base = ProxyConfig(port=0, bind_address="127.0.0.1", relay=mode,  # type: ignore[arg-type]
                       udp=UdpConfig(enabled=False), sweep_interval_s=0.05,
                       connect_timeout_s=0.5, pipe_size=65536, buffer_size=16384)
    return replace(base, **changes)


@contextlib.asynccontextmanager
async def running(proxy: Proxy) -> AsyncIterator[Proxy]:
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def servers(handler: Handler, count: int) -> AsyncIterator[list[int]]:
    started = [await asyncio.start_server(handler, "127.0.0.1", 0) for _ in range(count)]
    try:
        yield [s.sockets[0].getsockname()[1] for s in started]
    finally:
        for s in started:
            s.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def whoami(name: str) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode())
        await writer.drain()
        writer.close()
    return handler


async def dial(proxy: Proxy, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                                    asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.address, local_addr=(source, 0))


async def is_reset(proxy: Proxy, source: str = "127.0.0.1") -> bool:
    """Connect, and tell whether the proxy resets the connection without a byte (on
    loopback the RST may already be there when the connect completes)."""
    try:
        reader, writer = await dial(proxy, source)
    except ConnectionResetError:
        return True
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    assert data == b"", data
    return False


# -- the byte path -------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_relays_large_payload_both_ways_intact(loop: str, mode: str) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def main() -> tuple[bytes, int, int]:
        async with servers(echo, 1) as ports:
            proxy = Proxy(config(mode), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)

                async def send() -> None:
                    writer.write(payload)
                    await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                got = await reader.read(-1)
                await sender
                writer.close()
                await asyncio.sleep(0.1)  # let the sweep fold the bytes into the metrics
                counters = proxy.metrics.services["default/web"]
                return got, counters.bytes_in, counters.bytes_out

    got, bytes_in, bytes_out = run(main(), loop)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert bytes_in == bytes_out == len(payload)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_slow_reader_backpressure_keeps_every_byte(loop: str, mode: str) -> None:
    """The backend reads slowly: the proxy pauses reading the client instead of buffering."""
    payload = hashlib.sha256(b"x").digest() * 65536  # 2 MiB

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # let the socket buffers fill up
        digest = hashlib.sha256()
        while data := await reader.read(4096):
            digest.update(data)
        writer.write(digest.digest())
        await writer.drain()
        writer.close()

    async def main() -> bytes:
        async with servers(slow_sink, 1) as ports:
            proxy = Proxy(config(mode), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                answer = await reader.read(-1)
                writer.close()
                return answer

    assert run(main(), loop) == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", MODES)
def test_half_close_client_still_reads_full_reply(loop: str, mode: str) -> None:
    """The client shuts down writing; the backend sees EOF, then answers; the reply arrives
    whole and is followed by EOF."""
    reply = b"R" * 300_000

    async def answer_after_eof(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)  # until the client's FIN
        writer.write(request.upper() + reply)
        await writer.drain()
        writer.close()

    async def main() -> bytes:
        async with servers(answer_after_eof, 1) as ports:
            proxy = Proxy(config(mode), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(b"question")
                writer.write_eof()
                got = await reader.read(-1)
                writer.close()
                await asyncio.sleep(0.05)
                assert proxy.connections == 0
                return got

    assert run(main(), loop) == b"QUESTION" + reply


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_reset_resets_client(loop: str) -> None:
    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.transport.abort()

    async def main() -> int:
        async with servers(rst, 1) as ports:
            proxy = Proxy(config(), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(b"x")
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(10), 5)
                writer.close()
                await asyncio.sleep(0.05)
                assert proxy.connections == 0
                return proxy.metrics.relay_errors

    assert run(main(), loop) == 1


# -- picking and failover --------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_round_robin_spreads_evenly(loop: str) -> None:
    async def main() -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        async with contextlib.AsyncExitStack() as stack:
            ports = [(await stack.enter_async_context(servers(whoami(f"b{i}"), 1)))[0]
                     for i in range(3)]
            proxy = Proxy(config(), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                for _ in range(30):
                    reader, writer = await dial(proxy)
                    name = await reader.read(-1)
                    writer.close()
                    seen[name] = seen.get(name, 0) + 1
        return seen

    assert run(main(), loop) == {b"b0": 10, b"b1": 10, b"b2": 10}


def dead_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("loop", LOOPS)
def test_dead_backend_is_ejected_and_no_client_fails(loop: str) -> None:
    async def main() -> tuple[dict[bytes, int], int, int]:
        seen: dict[bytes, int] = {}
        async with contextlib.AsyncExitStack() as stack:
            live = [(await stack.enter_async_context(servers(whoami(f"b{i}"), 1)))[0]
                    for i in range(2)]
            lb = LbConfig(ejection_base_s=30, ejection_max_s=60)
            proxy = Proxy(config(lb=lb), catalog([dead_port(), *live]),
                          original_destination=OriginalDst())
            async with running(proxy):
                for _ in range(20):
                    reader, writer = await dial(proxy)
                    name = await reader.read(-1)  # never empty: every client is served
                    writer.close()
                    seen[name] = seen.get(name, 0) + 1
                counters = proxy.metrics.services["default/web"]
                return seen, counters.dial_failures, counters.ejections

    seen, failures, ejections = run(main(), loop)
    assert sum(seen.values()) == 20 and b"" not in seen
    assert failures == 1 and ejections == 1  # tried once, then skipped while ejected
    assert abs(seen[b"b0"] - seen[b"b1"]) <= 2


class HangingDialer:
    """Dials for real, except that endpoints on node n0 never answer; `tunneled` nodes are
    reported as reached through the tunnel."""

    def __init__(self, tunneled: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str | None, int]] = []
        self.tunneled = tunneled

    async def dial(self, endpoint: Endpoint, port: int, service: Service,
                   now: float) -> socket.socket:
        self.calls.append((endpoint.node, port))
        if endpoint.node == "n0":
            await asyncio.sleep(3600)
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (endpoint.ip, port))
        return sock

    def remote(self, endpoint: Endpoint) -> bool:
        return endpoint.node in self.tunneled


def test_connect_timeout_moves_to_next_candidate() -> None:
    """A dialer that never answers for one endpoint: the connect timeout ends the attempt."""

    async def main() -> tuple[bytes, list[tuple[str | None, int]], int]:
        async with servers(whoami("live"), 2) as ports:
            dialer = HangingDialer()
            # round robin starts at the lowest address: n0, which hangs
            proxy = Proxy(config(connect_timeout_s=0.2), catalog(sorted(ports)), dialer=dialer,
                          original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                name = await reader.read(-1)
                writer.close()
                return name, dialer.calls, proxy.metrics.services["default/web"].ejections

    name, calls, ejections = run(main())
    assert name == b"live"
    assert [c[0] for c in calls] == ["n0", "n1"]  # the Endpoint (with its node) is passed
    assert ejections == 1


@pytest.mark.parametrize("tunneled,low,high", [((), 0.15, 0.45), (("n0",), 0.55, 1.2)])
def test_tunneled_backends_get_the_tunnel_connect_timeout(
        tunneled: tuple[str, ...], low: float, high: float) -> None:
    """A backend reached through the tunnel waits `tunnelConnectTimeoutS` (room for one SYN
    retransmission), a local one `connectTimeoutS`."""

    async def main() -> tuple[bytes, float]:
        async with servers(whoami("live"), 2) as ports:
            proxy = Proxy(config(connect_timeout_s=0.2, tunnel_connect_timeout_s=0.6),
                          catalog(sorted(ports)), dialer=HangingDialer(tunneled),
                          original_destination=OriginalDst())
            async with running(proxy):
                started = time.monotonic()
                reader, writer = await dial(proxy)
                name = await reader.read(-1)
                writer.close()
                return name, time.monotonic() - started

    name, waited = run(main())
    assert name == b"live"
    assert low <= waited <= high, waited


# -- resets --------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_unservable_connections_are_reset_and_others_unaffected(loop: str) -> None:
    """No Service at the destination, no endpoint, no original destination: reset at once;
    a connection in flight meanwhile keeps working."""
    empty = {"namespace": "default", "name": "empty", "clusterIPs": ["10.96.0.11"],
             "ports": [{"port": 80}], "endpoints": []}

    async def main() -> Proxy:
        async with servers(echo, 1) as ports:
            dst = OriginalDst()
            dst.by_client = {"127.0.0.2": ("10.96.0.99", 80), "127.0.0.3": ("10.96.0.11", 80),
                             "127.0.0.4": None, "127.0.0.5": (CIP, 81)}
            proxy = Proxy(config(), catalog(ports, extra=[empty]), original_destination=dst)
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(b"before")
                assert await reader.readexactly(6) == b"before"
                for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
                    assert await is_reset(proxy, source), source
                writer.write(b"after")
                assert await reader.readexactly(5) == b"after"
                writer.close()
            return proxy

    proxy = run(main(), loop)
    assert proxy.metrics.no_service == 2  # unknown ClusterIP, known IP but unknown port
    assert proxy.metrics.not_redirected == 1
    assert proxy.metrics.services["default/empty"].refused == 1


def test_garbage_then_service_keeps_working() -> None:
    """Binary garbage through the proxy is just bytes: relayed, and nothing else notices."""
    garbage = bytes(range(256)) * 100

    async def main() -> None:
        async with servers(echo, 1) as ports:
            proxy = Proxy(config(), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                for _ in range(3):
                    reader, writer = await dial(proxy)
                    writer.write(garbage)
                    writer.transport.abort()  # RST mid-stream
                reader, writer = await dial(proxy)
                writer.write(b"ok")
                assert await reader.readexactly(2) == b"ok"
                writer.close()

    run(main())


def test_connection_limits_reset_the_excess() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    async def main() -> tuple[int, int]:
        async with servers(hold, 1) as ports:
            other = {"namespace": "default", "name": "other", "clusterIPs": ["10.96.0.12"],
                     "ports": [{"port": 80}],
                     "endpoints": [{"ip": "127.0.0.1", "ports": [{"port": ports[0]}]}]}
            dst = OriginalDst()
            dst.by_client = {"127.0.0.2": ("10.96.0.12", 80)}
            proxy = Proxy(config(max_connections_per_service=2, max_connections=3),
                          catalog(ports, extra=[other]), original_destination=dst)
            async with running(proxy):
                held = [await dial(proxy) for _ in range(2)]
                await asyncio.sleep(0.1)
                assert await is_reset(proxy)  # third to default/web: per-service limit
                held.append(await dial(proxy, "127.0.0.2"))  # other service: fine
                await asyncio.sleep(0.1)
                assert await is_reset(proxy, "127.0.0.2")  # fourth overall: global limit
                for _, writer in held:
                    writer.close()
                await asyncio.sleep(0.1)
                assert proxy.connections == 0
                return proxy.metrics.services["default/web"].limited, proxy.metrics.limited

    assert run(main()) == (1, 1)


# -- time and catalog ---------------------------------------------------------------------


def test_idle_connections_are_closed() -> None:
    async def main() -> tuple[bytes, int]:
        async with servers(echo, 1) as ports:
            proxy = Proxy(config(idle_timeout_s=0.3), catalog(ports),
                          original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
                rest = await asyncio.wait_for(reader.read(-1), 3)  # closed by the proxy
                writer.close()
                return rest, proxy.metrics.services["default/web"].idle_closed

    assert run(main()) == (b"", 1)


def test_catalog_swap_serves_new_services_and_keeps_old_connections() -> None:
    async def main() -> None:
        async with servers(echo, 1) as ports, servers(whoami("new"), 1) as new_ports:
            dst = OriginalDst()
            proxy = Proxy(config(), catalog(ports), original_destination=dst)
            async with running(proxy):
                reader, writer = await dial(proxy)
                writer.write(b"a")
                assert await reader.readexactly(1) == b"a"
                dst.by_client["127.0.0.2"] = ("10.96.0.20", 8)
                assert await is_reset(proxy, "127.0.0.2")
                proxy.set_catalog(catalog(ports, extra=[{
                    "namespace": "ns", "name": "new", "clusterIPs": ["10.96.0.20"],
                    "ports": [{"port": 8}],
                    "endpoints": [{"ip": "127.0.0.1", "ports": [{"port": new_ports[0]}]}]}]))
                r2, w2 = await dial(proxy, "127.0.0.2")
                assert await r2.read(-1) == b"new"
                w2.close()
                writer.write(b"b")
                assert await reader.readexactly(1) == b"b"
                writer.close()

    run(main())


def test_stop_resets_relayed_connections() -> None:
    async def main() -> None:
        async with servers(echo, 1) as ports:
            proxy = Proxy(config(), catalog(ports), original_destination=OriginalDst())
            await proxy.start()
            reader, writer = await dial(proxy)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            await proxy.stop()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 5)
            writer.close()

    run(main())


def test_metrics_render_names_services() -> None:
    async def main() -> str:
        async with servers(whoami("x"), 1) as ports:
            proxy = Proxy(config(), catalog(ports), original_destination=OriginalDst())
            async with running(proxy):
                reader, writer = await dial(proxy)
                await reader.read(-1)
                writer.close()
                await asyncio.sleep(0.1)
                return proxy.metrics.render()

    text = run(main())
    assert 'edgeweave_proxy_connections_total{service="default/web"} 1' in text
    assert 'edgeweave_proxy_bytes_out_total{service="default/web"} 1' in text
    assert "edgeweave_proxy_no_service_total 0" in text



def test_a_dialer_bug_counts_as_a_failed_dial() -> None:
    """A dialer raising something other than OSError does not take the proxy down."""

    class BuggyDialer:
        async def dial(self, endpoint: Endpoint, port: int, service: Service,
                       now: float) -> socket.socket:
            raise RuntimeError("bug")

        def remote(self, endpoint: Endpoint) -> bool:
            return False

    async def main() -> tuple[bool, int, int]:
        async with servers(echo, 1) as ports:
            proxy = Proxy(config(), catalog(ports), dialer=BuggyDialer(),
                          original_destination=OriginalDst())
            async with running(proxy):
                reset = await is_reset(proxy)
                await asyncio.sleep(0.05)
                counters = proxy.metrics.services["default/web"]
                return reset, counters.dial_failures, proxy.connections

    assert run(main()) == (True, 1, 0)


# -- endpoints on other nodes (meshd.proxy.mesh) --------------------------------------------
# Two proxies play two nodes: `a` (the caller) dials with `MeshDialer`, whose peer directory
# points node `b` at `b`'s `MeshConnectServer`; `b`'s catalog lists the backend as its own pod.


def node_catalog(node: str, backends: list[tuple[str, int, str]]) -> Catalog:
    return parse_catalog({"node": node, "services": [{
        "namespace": "default", "name": "web", "clusterIPs": [CIP],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        "endpoints": [{"ip": ip, "node": owner, "ports": [{"name": "http", "port": port}]}
                      for ip, port, owner in backends]}]})


class Peers:
    def __init__(self) -> None:
        self.where: dict[str, Address] = {}

    def connect_address(self, node: str) -> Address | None:
        return self.where.get(node)


async def echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def call(proxy: Proxy, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_remote_endpoint_is_reached_through_the_owner(loop: str) -> None:
    async def main() -> None:
        server, port = await echo_server()
        backends = [("127.0.0.1", port, "b")]
        owner = Proxy(config(), node_catalog("b", backends))
        peers = Peers()
        caller = Proxy(config(), node_catalog("a", backends), original_destination=OriginalDst(),
                       dialer=MeshDialer("a", peers, direct_routable=False))
        async with running(owner), running(caller):
            connect = MeshConnectServer(lambda: owner.catalog, owner.adopt, owner.metrics)
            await connect.start(("127.0.0.1", 0))
            assert connect.address is not None
            peers.where["b"] = connect.address
            payload = bytes(range(256)) * 4096  # 1 MiB both ways, splice or copy
            assert await call(caller, payload) == payload
            await asyncio.sleep(0.2)  # the sweeper folds byte counts in
            assert owner.metrics.services["default/web"].connections_total == 1
            assert caller.metrics.services["default/web"].bytes_in >= len(payload)
            await connect.stop()
        server.close()

    run(main(), loop)


def test_failed_remote_dial_fails_over_and_ejects() -> None:
    async def main() -> None:
        server, port = await echo_server()
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()  # nothing listens there: the owner's dial is refused
        backends = [("127.0.0.1", dead_port, "b"), ("127.0.0.1", port, "b")]
        owner = Proxy(config(), node_catalog("b", backends))
        peers = Peers()
        caller = Proxy(config(), node_catalog("a", backends), original_destination=OriginalDst(),
                       dialer=MeshDialer("a", peers, direct_routable=False))
        async with running(owner), running(caller):
            connect = MeshConnectServer(lambda: owner.catalog, owner.adopt, owner.metrics)
            await connect.start(("127.0.0.1", 0))
            assert connect.address is not None
            peers.where["b"] = connect.address
            for _ in range(4):
                assert await call(caller, b"hello") == b"hello"
            counters = caller.metrics.services["default/web"]
            assert counters.dial_failures == 1 and counters.ejections == 1
            assert connect.refused == 1
            await connect.stop()
        server.close()

    run(main())


def test_unknown_node_without_direct_routing_fails_fast() -> None:
    async def main() -> None:
        dialer = MeshDialer("a", Peers(), direct_routable=False)
        catalog = node_catalog("a", [("127.0.0.1", 9, "c")])
        service = catalog.services["default/web"]
        with pytest.raises(OSError) as err:
            await dialer.dial(service.endpoints[0], 9, service, 0.0)
        assert err.value.errno == errno.EHOSTUNREACH and "node c" in str(err.value)

    run(main())


async def raw_connect(address: Address, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(100), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(("request_for", "expected"), [
    (("127.0.0.1", 1, "default/web"), 4),  # a port the endpoint does not serve
    (("10.1.2.3", 8080, "default/web"), 4),  # not an endpoint
    (("127.0.0.1", 8080, "default/other"), 4),  # no such Service
])
def test_connect_server_is_not_an_open_proxy(request_for: tuple[str, int, str],
                                             expected: int) -> None:
    async def main() -> Any:
        owner = Proxy(config(), node_catalog("b", [("127.0.0.1", 8080, "b"),
                                                   ("10.9.9.9", 8080, "c")]))
        async with running(owner):
            connect = MeshConnectServer(lambda: owner.catalog, owner.adopt, owner.metrics)
            await connect.start(("127.0.0.1", 0))
            assert connect.address is not None
            answer = await raw_connect(connect.address,
                                       encode_request(ConnectRequest(*request_for)))
            other_node = await raw_connect(connect.address, encode_request(
                ConnectRequest("10.9.9.9", 8080, "default/web")))  # c's pod, not ours
            garbage = await raw_connect(connect.address, b"GET / HTTP/1.1\r\n\r\n")
            await connect.stop()
            return answer, other_node, garbage

    answer, other_node, garbage = run(main())
    assert parse_reply(answer).value == expected
    assert parse_reply(other_node).value == 4
    assert garbage in (b"", b"EW\x01\x05")
