"""The workload the lab kubelet runs in a pod namespace: says who it is, over TCP and UDP.

    python podserver.py --name web-abc12 --node node1 [--http-port 8080] [--udp-port 5300]

HTTP (any path, one response per connection): `pod=NAME node=NODE client=IP\n`.
UDP: each datagram is answered with `NAME:` + the datagram. Prints `ready` on stdout once both
sockets listen, so the kubelet only reports the pod Ready when it really is.
Test scaffolding (the lab plays the kubelet until Edged lands), never product code.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys


class Echo(asyncio.DatagramProtocol):
    """Answers every datagram with the pod's name in front."""

    def __init__(self, name: str) -> None:
        self.prefix = f"{name}:".encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport here

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.prefix + data, addr)


BLOCK = random.Random(7).randbytes(1 << 20)
"""`GET /bytes/N` answers N bytes: this block repeated (tunnel tests compare sha256)."""


async def bulk(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % size)
    while size > 0:
        chunk = BLOCK[:size] if size < len(BLOCK) else BLOCK
        writer.write(chunk)
        size -= len(chunk)
        await writer.drain()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            if path.startswith(b"/bytes/") and path[7:].isdigit():
                await bulk(writer, int(path[7:]))
                return
            client = writer.get_extra_info("peername")[0]
            body = f"pod={args.name} node={args.node} client={client}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(http, "0.0.0.0", args.http_port, backlog=512)
    await loop.create_datagram_endpoint(lambda: Echo(args.name),
                                        local_addr=("0.0.0.0", args.udp_port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--udp-port", type=int, default=5300)
    asyncio.run(serve(parser.parse_args()))
    sys.exit(0)


if __name__ == "__main__":
    main()
