"""meshd.dns.server on real loopback sockets: dig, dnslib's client, an in-test upstream, garbage.

Our server listens on 127.0.0.1, the upstream resolvers the tests run on 127.0.0.2 and 127.0.0.3
(dnslib encodes their answers); nothing here queries a real resolver.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import dnslib  # type: ignore[import-untyped]
import pytest

from meshd.catalog import Catalog, Endpoint, Service, ServicePort
from meshd.dns.config import DnsConfig
from meshd.dns.core import DnsCore
from meshd.dns.server import DnsClient, DnsServer
from meshd.udp import Address, BindError

HOST = "127.0.0.1"
HTTP = ServicePort("http", 80, "TCP", 8080)
WEB = Service("default", "web", ("10.96.0.10",), (HTTP,),
              (Endpoint("10.244.1.5", (("http", 8080, "TCP"),), True, "n1", None),), None)
BIG = Service("default", "big", (), (HTTP,), tuple(
    Endpoint(f"10.244.{i // 200}.{i % 200 + 1}", (("http", 8080, "TCP"),), True, "n1", None)
    for i in range(120)), None)
CATALOG = Catalog({s.key: s for s in (WEB, BIG)}, {"10.96.0.10": WEB}, "n1", None)

needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) missing")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))


class Upstream:
    """A tiny resolver for tests: UDP + TCP on one port, answers from `records` (dnslib)."""

    def __init__(self, records: dict[str, list[dnslib.RR]], *, mode: str = "answer") -> None:
        self.records = records
        self.mode = mode
        """`answer`, `drop` (never answers) or `tc` (UDP answers are truncated)."""
        self.udp_queries = 0
        self.tcp_queries = 0
        self.address: Address = ("", 0)
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None

    def answer(self, data: bytes, tcp: bool) -> bytes | None:
        q = dnslib.DNSRecord.parse(data)
        if self.mode == "drop":
            return None
        reply = q.reply()
        if self.mode == "tc" and not tcp:
            reply.header.tc = 1
            return bytes(reply.pack())
        name = str(q.q.qname).lower()
        if name not in self.records:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            reply.add_auth(dnslib.RR("test.", dnslib.QTYPE.SOA, ttl=60, rdata=dnslib.SOA(
                "ns.test.", "admin.test.", (1, 60, 60, 60, 30))))
        for record in self.records.get(name, []):
            if record.rtype == q.q.qtype:
                reply.add_answer(record)
        return bytes(reply.pack())

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Protocol(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                upstream.udp_queries += 1
                reply = upstream.answer(data, tcp=False)
                if reply is not None and upstream._transport is not None:
                    upstream._transport.sendto(reply, addr)

        transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(host, 0))
        self._transport = transport
        self.address = transport.get_extra_info("sockname")[:2]
        self._server = await asyncio.start_server(self._tcp, host, self.address[1])

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                self.tcp_queries += 1
                reply = self.answer(data, tcp=True)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()


EXAMPLE = {"www.example.test.": [dnslib.RR("www.example.test", rdata=dnslib.A("192.0.2.80"),
                                           ttl=300)],
           "many.example.test.": [dnslib.RR("many.example.test", rdata=dnslib.A(f"192.0.2.{i}"),
                                            ttl=300) for i in range(1, 81)]}


@asynccontextmanager
async def serving(config: DnsConfig | None = None, *, upstreams: tuple[Upstream, ...] = (),
                  catalog: Catalog = CATALOG) -> AsyncIterator[tuple[DnsServer, Address]]:
    for upstream in upstreams:
        await upstream.start(f"127.0.0.{2 + upstreams.index(upstream)}")
    config = config or DnsConfig(address=HOST, port=0, upstream_timeout_s=0.3)
    core: DnsCore[DnsClient] = DnsCore(config, upstreams=[u.address for u in upstreams],
                                       catalog=catalog, rng=random.Random(1))
    server = await DnsServer.start(core, HOST, 0)
    try:
        yield server, server.address
    finally:
        server.close()
        await server.wait_closed()
        for upstream in upstreams:
            upstream.close()


async def dig(address: Address, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{address[0]}", "-p", str(address[1]), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode()


def answers(output: str) -> list[str]:
    """The lines of dig's ANSWER SECTION, whitespace-normalised."""
    lines, inside = [], False
    for line in output.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            lines.append(" ".join(line.split()))
    return lines


def lookup(address: Address, name: str, qtype: str = "A", *, tcp: bool = False) -> Any:
    """dnslib's own client (blocking; run it in a thread)."""
    q = dnslib.DNSRecord.question(name, qtype)
    return dnslib.DNSRecord.parse(q.send(address[0], address[1], tcp=tcp, timeout=3))


@needs_dig
def test_dig_cluster_names_udp_and_tcp() -> None:
    async def main() -> None:
        async with serving() as (_, address):
            out = await dig(address, "Web.Default.svc.cluster.local")
            assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
            assert answers(out) == ["Web.Default.svc.cluster.local. 5 IN A 10.96.0.10"]
            out = await dig(address, "+tcp", "web.default.svc.cluster.local")
            assert "(TCP)" in out and answers(out) == [
                "web.default.svc.cluster.local. 5 IN A 10.96.0.10"]
            out = await dig(address, "_http._tcp.web.default.svc.cluster.local", "SRV")
            assert answers(out) == ["_http._tcp.web.default.svc.cluster.local. 5 IN SRV 0 100 "
                                    "80 web.default.svc.cluster.local."]
            out = await dig(address, "-x", "10.96.0.10")
            assert answers(out) == ["10.0.96.10.in-addr.arpa. 5 IN PTR "
                                    "web.default.svc.cluster.local."]
            out = await dig(address, "nope.default.svc.cluster.local")
            assert "status: NXDOMAIN" in out and "AUTHORITY: 1" in out
            out = await dig(address, "web.default.svc.cluster.local", "AAAA")
            assert "status: NOERROR" in out and "ANSWER: 0" in out and "AUTHORITY: 1" in out
            # Search-list expansion as a pod's resolver does it (ndots:5, one search domain).
            out = await dig(address, "+search", "+ndots=5", "+domain=svc.cluster.local",
                            "web.default")
            assert answers(out) == ["web.default.svc.cluster.local. 5 IN A 10.96.0.10"]

    run(main)


@needs_dig
def test_dig_retries_a_large_answer_over_tcp() -> None:
    async def main() -> None:
        async with serving() as (server, address):
            out = await dig(address, "+noedns", "big.default.svc.cluster.local")
            assert "Truncated, retrying in TCP mode" in out
            assert len(answers(out)) == 120 and "(TCP)" in out
            assert server.core.stats.truncated == 1
            out = await dig(address, "+ignore", "+bufsize=1232", "big.default.svc.cluster.local")
            assert "flags: qr aa tc rd ra" in out and answers(out) == []

    run(main)


def test_dnslib_client_udp_and_tcp() -> None:
    async def main() -> None:
        async with serving() as (_, address):
            msg = await asyncio.to_thread(lookup, address, "web.default.svc.cluster.local")
            assert [str(r.rdata) for r in msg.rr] == ["10.96.0.10"]
            msg = await asyncio.to_thread(lookup, address, "big.default.svc.cluster.local",
                                          tcp=True)
            assert len(msg.rr) == 120

    run(main)


@needs_dig
def test_forwarding_cache_and_failover() -> None:
    async def main() -> None:
        dead = Upstream({}, mode="drop")
        good = Upstream(EXAMPLE)
        async with serving(upstreams=(dead, good)) as (server, address):
            out = await dig(address, "www.example.test")
            assert answers(out) == ["www.example.test. 300 IN A 192.0.2.80"]
            assert dead.udp_queries == 1 and good.udp_queries == 1
            # From the cache now, and the answering upstream is preferred from now on.
            out = await dig(address, "WWW.example.test")
            [line] = answers(out)
            name, ttl, _, _, ip = line.split()
            assert (name, ip) == ("WWW.example.test.", "192.0.2.80") and 299 <= int(ttl) <= 300
            assert good.udp_queries == 1 and server.core.stats.cache_hits == 1
            out = await dig(address, "missing.example.test")
            assert "status: NXDOMAIN" in out and dead.udp_queries == 1
            out = await dig(address, "missing.example.test")
            assert good.udp_queries == 2  # negative answer cached (SOA minimum 30 s)

    run(main)


@needs_dig
def test_all_upstreams_down_gives_servfail() -> None:
    async def main() -> None:
        config = DnsConfig(address=HOST, port=0, upstream_timeout_s=0.1, forward_attempts=2)
        async with serving(config, upstreams=(Upstream({}, mode="drop"),)) as (server, address):
            out = await dig(address, "www.example.test")
            assert "status: SERVFAIL" in out
            assert server.core.stats.upstream_timeouts == 2

    run(main)


@needs_dig
def test_truncated_upstream_answer_fetched_over_tcp() -> None:
    async def main() -> None:
        upstream = Upstream(EXAMPLE, mode="tc")
        async with serving(upstreams=(upstream,)) as (_, address):
            out = await dig(address, "many.example.test")
            assert len(answers(out)) == 80
            assert "Truncated, retrying in TCP mode" in out  # 80 A records > dig's 1232 bytes
            assert upstream.udp_queries == 1 and upstream.tcp_queries == 1

    run(main)


def _tcp_exchange(address: Address, payload: bytes, count: int) -> list[bytes]:
    replies = []
    with socket.create_connection(address, timeout=3) as sock:
        sock.sendall(payload)
        reader = sock.makefile("rb")
        for _ in range(count):
            size = int.from_bytes(reader.read(2), "big")
            replies.append(reader.read(size))
    return replies


def _framed(name: str, qtype: str = "A") -> tuple[int, bytes]:
    q = dnslib.DNSRecord.question(name, qtype)
    data = bytes(q.pack())
    return q.header.id, len(data).to_bytes(2, "big") + data


def test_tcp_pipelined_queries_and_byte_by_byte() -> None:
    async def main() -> None:
        async with serving(upstreams=(Upstream(EXAMPLE),)) as (_, address):
            frames = [_framed("web.default.svc.cluster.local"), _framed("www.example.test"),
                      _framed("nope.default.svc.cluster.local")]
            replies = await asyncio.to_thread(_tcp_exchange, address,
                                              b"".join(f for _, f in frames), 3)
            parsed = {dnslib.DNSRecord.parse(r).header.id: dnslib.DNSRecord.parse(r)
                      for r in replies}
            assert set(parsed) == {i for i, _ in frames}  # forwarded one may come last
            assert str(parsed[frames[1][0]].rr[0].rdata) == "192.0.2.80"

            def slowly() -> bytes:
                _ident, frame = _framed("web.default.svc.cluster.local")
                with socket.create_connection(address, timeout=3) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for byte in frame:
                        sock.sendall(bytes((byte,)))
                    reader = sock.makefile("rb")
                    return reader.read(int.from_bytes(reader.read(2), "big"))

            reply = dnslib.DNSRecord.parse(await asyncio.to_thread(slowly))
            assert str(reply.rr[0].rdata) == "10.96.0.10"

    run(main)


def test_tcp_idle_timeout_and_connection_limit() -> None:
    async def main() -> None:
        config = DnsConfig(address=HOST, port=0, tcp_idle_timeout_s=0.2, tcp_max_connections=1)
        async with serving(config) as (_, address):
            reader, writer = await asyncio.open_connection(*address)
            reader2, writer2 = await asyncio.open_connection(*address)
            assert await asyncio.wait_for(reader2.read(), 2) == b""  # over the limit: closed
            assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed
            writer.close()
            writer2.close()

    run(main)


def test_garbage_is_survived_while_normal_queries_work() -> None:
    async def main() -> None:
        async with serving() as (server, address):
            rng = random.Random(4)
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            valid = bytes(dnslib.DNSRecord.question("web.default.svc.cluster.local").pack())
            for i in range(300):
                if i % 3 == 0:
                    data = rng.randbytes(rng.randrange(0, 600))
                else:
                    cut = rng.randrange(len(valid))
                    data = valid[:cut] + rng.randbytes(rng.randrange(1, 4)) + valid[cut + 3:]
                await loop.sock_sendto(sock, data, address)
                if i % 10 == 9:  # let the server drain its socket: a full buffer drops all
                    await asyncio.sleep(0.002)
                if i == 150:  # a normal query in the middle of it
                    msg = await asyncio.to_thread(lookup, address,
                                                  "web.default.svc.cluster.local")
                    assert str(msg.rr[0].rdata) == "10.96.0.10"
            sock.close()
            streams = [b"", b"\x00", b"\x00\x00", b"\x00\x05hello",
                       b"\xff\xff" + rng.randbytes(100), rng.randbytes(50),
                       b"\x00\x0c" + b"\x00" * 12]
            for stream in streams:
                _, writer = await asyncio.open_connection(*address)
                writer.write(stream)
                await writer.drain()
                writer.close()
            msg = await asyncio.to_thread(lookup, address, "web.default.svc.cluster.local")
            assert str(msg.rr[0].rdata) == "10.96.0.10"
            msg = await asyncio.to_thread(lookup, address, "web.default.svc.cluster.local",
                                          tcp=True)
            assert str(msg.rr[0].rdata) == "10.96.0.10"
            assert server.core.stats.malformed > 50

    run(main)


def test_catalog_swap_while_serving() -> None:
    async def main() -> None:
        async with serving(catalog=Catalog.empty("n1")) as (server, address):
            msg = await asyncio.to_thread(lookup, address, "web.default.svc.cluster.local")
            assert msg.header.rcode == dnslib.RCODE.NXDOMAIN
            server.core.set_catalog(CATALOG)
            msg = await asyncio.to_thread(lookup, address, "web.default.svc.cluster.local")
            assert str(msg.rr[0].rdata) == "10.96.0.10"

    run(main)


def test_bind_error_names_the_address_and_close_is_idempotent() -> None:
    async def main() -> None:
        async with serving() as (server, address):
            core: DnsCore[DnsClient] = DnsCore(DnsConfig())
            with pytest.raises(BindError, match=f"{address[0]}:{address[1]}"):
                await DnsServer.start(core, *address)
            server.close()
            server.close()

    run(main)
