"""`python -m meshd.dns --catalog FILE`: the cluster DNS server as a standalone process.

Answers the names of the catalog in a JSON file (the proxy's format: meshd/proxy/catalog_file.py)
and forwards everything else, exactly as the agent's DNS does, until SIGTERM/SIGINT; SIGHUP
re-reads the file. `--config FILE` is a meshd.yaml whose `dns:` section is used; `--address` and
`--port` override its listen address. Used by `python -m bench dns` and for trying DNS without
an API server; the agent (`meshd agent`) runs the same `DnsServer` in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edgeweave.cli import UserError, base_parser, run
from edgeweave.config import load_config
from edgeweave.log import event
from meshd.config import MeshdConfig
from meshd.dns.config import DnsConfig
from meshd.dns.core import DnsCore
from meshd.dns.resolvconf import default_upstreams
from meshd.dns.server import DnsClient, DnsServer
from meshd.eventloop import runner
from meshd.proxy.catalog_file import CatalogFileError, load_catalog
from meshd.udp import BindError

log = logging.getLogger("meshd.dns")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = base_parser("meshd-dns", "the meshd cluster DNS server on its own")
    parser.add_argument("--catalog", type=Path, required=True, metavar="FILE",
                        help="catalog JSON file (re-read on SIGHUP)")
    parser.add_argument("--address", metavar="IP",
                        help="listen address (default 169.254.96.16; config: dns.address)")
    parser.add_argument("--port", type=int, metavar="PORT",
                        help="listen port, UDP and TCP (default 53; config: dns.port)")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (default uvloop, as the agent)")
    return parser


def _config(args: argparse.Namespace) -> DnsConfig:
    config = load_config(MeshdConfig, args.config).dns
    try:
        if args.address is not None:
            config = replace(config, address=args.address)
        if args.port is not None:
            config = replace(config, port=args.port)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return config


def _main(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        catalog = load_catalog(args.catalog)
    except CatalogFileError as exc:
        raise UserError(str(exc)) from None
    core: DnsCore[DnsClient] = DnsCore(config, upstreams=default_upstreams(config),
                                       catalog=catalog)
    with runner(args.event_loop, log) as loop_runner:
        loop_runner.run(_serve(core, args.catalog, len(catalog.services)))
    return 0


async def _serve(core: DnsCore[DnsClient], path: Path, services: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            catalog = load_catalog(path)
        except CatalogFileError as exc:
            event(log, logging.ERROR, "dns.reload_failed", error=exc)
            return
        core.set_catalog(catalog)
        event(log, logging.INFO, "dns.reload", services=len(catalog.services),
              revision=catalog.revision)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        server = await DnsServer.start(core, core.config.address, core.config.port)
    except BindError as exc:
        raise UserError(str(exc)) from None
    try:
        host, port = server.address
        event(log, logging.INFO, "dns.ready", address=host, port=port, services=services)
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
