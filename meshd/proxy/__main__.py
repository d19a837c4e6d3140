"""`python -m meshd.proxy --catalog FILE`: the proxy as a standalone process.

Serves the catalog in a JSON file (format: meshd/proxy/catalog_file.py) until SIGTERM/SIGINT;
SIGHUP re-reads the file. With `--rules` it also installs the iptables rules and policy routing
for that catalog at start (after the listeners are up), re-checks them every `rules.resyncS` and
on SIGHUP, and removes them all at exit. With `--metrics HOST:PORT` it serves the counters in the
Prometheus text format. The agent (`meshd agent`) will run the same pieces in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from edgeweave.cli import UserError, base_parser, run
from edgeweave.config import HostPort, load_config
from edgeweave.log import event
from meshd.catalog import Catalog
from meshd.eventloop import runner
from meshd.proxy.catalog_file import CatalogFileError, load_catalog
from meshd.proxy.config import ProxyConfig, ProxyFile
from meshd.proxy.server import Proxy
from meshd.rules import IptablesBackend, RuleError, RuleManager, detect_variant

log = logging.getLogger("meshd.proxy")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = base_parser("meshd-proxy", "the meshd transparent proxy on its own")
    parser.add_argument("--catalog", type=Path, required=True, metavar="FILE",
                        help="catalog JSON file (re-read on SIGHUP)")
    parser.add_argument("--port", type=int, metavar="PORT",
                        help="proxy port (default 40001; config: proxy.port)")
    parser.add_argument("--rules", action="store_true",
                        help="install iptables rules + policy routing; remove them at exit")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP on this address")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"],
                        help="event loop (default uvloop; config: proxy.eventLoop)")
    parser.add_argument("--relay", choices=["auto", "splice", "copy"],
                        help="how bytes move (default auto; config: proxy.relay)")
    parser.add_argument("--no-udp", action="store_true", help="no UDP (TPROXY) listener")
    return parser


def _config(args: argparse.Namespace) -> ProxyConfig:
    config = load_config(ProxyFile, args.config).proxy
    try:
        if args.port is not None:
            config = replace(config, port=args.port)
        if args.event_loop is not None:
            config = replace(config, event_loop=args.event_loop)
        if args.relay is not None:
            config = replace(config, relay=args.relay)
        if args.no_udp:
            config = replace(config, udp=replace(config.udp, enabled=False))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return config


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _main(args: argparse.Namespace) -> int:
    config = _config(args)
    metrics = None
    if args.metrics:
        try:
            metrics = HostPort.parse(args.metrics)
        except ValueError as exc:
            raise UserError(f"--metrics: {exc}") from None
    try:
        catalog = load_catalog(args.catalog)
    except CatalogFileError as exc:
        raise UserError(str(exc)) from None
    _raise_fd_limit()
    with runner(config.event_loop, log) as loop_runner:
        loop_runner.run(_serve(config, args.catalog, catalog, args.rules, metrics))
    return 0


async def _serve_metrics(address: HostPort, render: Callable[[], str]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = render().encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, address.host, address.port)


async def _serve(config: ProxyConfig, path: Path, catalog: Catalog, rules_on: bool,
                 metrics: HostPort | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    proxy = Proxy(config, catalog)
    try:
        await proxy.start()
    except OSError as exc:
        raise UserError(f"cannot listen on {config.bind_address}:{config.port}: "
                        f"{exc.strerror or exc}") from None
    rules: RuleManager | None = None
    server: asyncio.Server | None = None
    resync: asyncio.Task[None] | None = None
    lock = asyncio.Lock()  # one rules sync at a time
    try:
        if metrics is not None:
            server = await _serve_metrics(metrics, proxy.metrics.render)
        if rules_on:
            variant = config.rules.backend
            try:
                chosen = detect_variant() if variant == "auto" else variant
                rules = RuleManager(IptablesBackend(chosen), config.rules,
                                    proxy_port=proxy.address[1])
                rules.sync(proxy.catalog)
            except RuleError as exc:
                raise UserError(str(exc)) from None
            resync = loop.create_task(_resync_forever(rules, proxy, lock))

        background: set[asyncio.Task[None]] = set()

        def reload() -> None:
            task = loop.create_task(_reload(path, proxy, rules, lock))
            background.add(task)
            task.add_done_callback(background.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        event(log, logging.INFO, "proxy.ready", services=len(catalog.services),
              rules=rules.backend.name if rules else "none")
        await stop.wait()
    finally:
        if resync is not None:
            resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resync
        if rules is not None:
            try:
                rules.remove()
            except RuleError as exc:
                event(log, logging.ERROR, "rules.remove_failed", error=exc)
        if server is not None:
            server.close()
        await proxy.stop()


async def _resync_forever(rules: RuleManager, proxy: Proxy, lock: asyncio.Lock) -> None:
    while True:
        await asyncio.sleep(rules.config.resync_s)
        await _sync(rules, proxy.catalog, lock)


async def _sync(rules: RuleManager, catalog: Catalog, lock: asyncio.Lock) -> None:
    async with lock:
        try:
            await asyncio.to_thread(rules.sync, catalog)
        except RuleError as exc:
            event(log, logging.ERROR, "rules.sync_failed", error=exc)


async def _reload(path: Path, proxy: Proxy, rules: RuleManager | None,
                  lock: asyncio.Lock) -> None:
    try:
        catalog = load_catalog(path)
    except CatalogFileError as exc:
        event(log, logging.ERROR, "proxy.reload_failed", error=exc)
        return
    proxy.set_catalog(catalog)
    event(log, logging.INFO, "proxy.reload", services=len(catalog.services),
          revision=catalog.revision)
    if rules is not None:
        await _sync(rules, catalog, lock)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
