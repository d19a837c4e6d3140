"""The `meshd` command: `netcheck`, `server`, `config` (reference: docs/reference/meshd.md)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edgeweave import __version__
from edgeweave.cli import UserError, add_common, base_parser, run
from edgeweave.config import HostPort, dump_yaml, load_config
from edgeweave.log import event
from meshd.config import MeshdConfig, RelayConfig, StunConfig
from meshd.netcheck.classify import NetcheckReport
from meshd.netcheck.machine import NetcheckFailed
from meshd.netcheck.report import render_text, to_json
from meshd.netcheck.runner import resolve_server, run_netcheck
from meshd.stun.server import StunServer
from meshd.stun.service import StunService
from meshd.stun.transaction import RetransmitPolicy
from meshd.turn.credentials import read_secrets
from meshd.turn.server import TurnServerConfig
from meshd.udp import BindError

log = logging.getLogger("meshd.stun")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return int(text)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit()
            and 1 <= int(low) <= int(high) <= 65535):
        raise argparse.ArgumentTypeError(f"expected MIN-MAX within 1..65535, got {text!r}")
    return int(low), int(high)


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text)
    parser.add_argument("--version", action="version", version=f"meshd (edgeweave) {__version__}")
    add_common(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for docs and tests)."""
    parser = base_parser("meshd", "EdgeMesh-style traffic plane: STUN service and NAT discovery.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    netcheck = _subcommand(sub, "netcheck", "discover this host's NAT behaviour (RFC 5780)")
    netcheck.add_argument("--server", metavar="HOST[:PORT]",
                          help="STUN server with RFC 5780 support (default port 3478; "
                               "config: netcheck.server)")
    netcheck.add_argument("--bind", metavar="IP",
                          help="local IP to probe from (default: route source towards server)")
    netcheck.add_argument("--json", action="store_true", help="print one JSON object")
    netcheck.add_argument("--timeout", type=_positive, metavar="SECONDS",
                          help="seconds until a probe counts as unanswered (default 2.5; "
                               "config: netcheck.giveUpS)")

    server = _subcommand(sub, "server", "run the STUN service (and the TURN relay when enabled) "
                         "until SIGINT/SIGTERM")
    server.add_argument("--stun-address", action="append", metavar="IP",
                        help="listen IP; give twice for an RFC 5780 alternate IP "
                             "(default 0.0.0.0; config: stun.addresses)")
    server.add_argument("--stun-port", type=_port, metavar="PORT",
                        help="primary port (default 3478; 0 = any; config: stun.port)")
    server.add_argument("--stun-alt-port", type=_port, metavar="PORT",
                        help="alternate port (default 3479; 0 = any; config: stun.altPort)")
    server.add_argument("--relay", action=argparse.BooleanOptionalAction, default=None,
                        help="serve the TURN relay (RFC 8656) on the STUN ports "
                             "(config: relay.enabled)")
    server.add_argument("--relay-secret-file", type=Path, metavar="FILE",
                        help="shared secret(s) of the TURN REST credentials, one per line "
                             "(config: relay.authSecretFile)")
    server.add_argument("--relay-ip", metavar="IP",
                        help="IP of the relayed addresses (default: the first STUN address; "
                             "config: relay.relayIp)")
    server.add_argument("--relay-ports", type=_port_range, metavar="MIN-MAX",
                        help="relayed port range (default 49152-65535; config: relay.minPort, "
                             "relay.maxPort)")

    agent = _subcommand(sub, "agent", "run the node's service plane (DNS, proxy, rules) until "
                        "SIGINT/SIGTERM")
    agent.add_argument("--node", metavar="NAME", help="node name (default: host name; "
                       "config: agent.nodeName)")
    agent.add_argument("--kubeconfig", type=Path, metavar="FILE",
                       help="API credentials (config: agent.kubeconfig)")
    agent.add_argument("--server", metavar="URL",
                       help="API URL without kubeconfig (default: MetaServer "
                            "http://127.0.0.1:10550; config: agent.server)")

    status = _subcommand(sub, "status", "show what the local agent serves: services, "
                         "endpoints, policies, rules")
    status.add_argument("--address", metavar="HOST:PORT",
                        help="the agent's status address (config: agent.statusAddress)")
    status.add_argument("--json", action="store_true", help="print the JSON document")

    _subcommand(sub, "config", "print the effective configuration as YAML")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: `meshd ...`; returns the exit code."""
    return run(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    config = load_config(MeshdConfig, args.config)
    if args.command == "netcheck":
        return _netcheck(args, config)
    if args.command == "server":
        return _server(args, config)
    if args.command == "agent":
        return _agent(args, config)
    if args.command == "status":
        return _status(args, config)
    sys.stdout.write(dump_yaml(config))
    return 0


# --- netcheck ---------------------------------------------------------------------------------


def _netcheck(args: argparse.Namespace, config: MeshdConfig) -> int:
    server = args.server or config.netcheck.server
    if not server:
        raise UserError("no STUN server: give --server HOST[:PORT] or set netcheck.server")
    bind = args.bind or config.netcheck.bind
    if bind is not None:
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise UserError(f"--bind: {bind!r} is not an IP address") from None
    policy = config.netcheck.policy()
    if args.timeout is not None:
        policy = replace(policy, give_up_s=args.timeout)
    try:
        report = asyncio.run(_run_netcheck(server, bind, policy))
    except (NetcheckFailed, BindError) as exc:
        raise UserError(str(exc)) from None
    print(to_json(report) if args.json else render_text(report))
    return 0


async def _run_netcheck(server: str, bind: str | None, policy: RetransmitPolicy) -> NetcheckReport:
    address = await resolve_server(server)
    return await run_netcheck(address, bind_ip=bind, policy=policy)


# --- agent ----------------------------------------------------------------------------------


def _agent(args: argparse.Namespace, config: MeshdConfig) -> int:
    agent = replace(config.agent,
                    node_name=args.node or config.agent.node_name,
                    kubeconfig=args.kubeconfig or config.agent.kubeconfig,
                    server=args.server or config.agent.server)
    from meshd.agent import AgentError, service_plane  # imported here: netcheck stays light
    from meshd.rules import RuleError

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with service_plane(agent, config.dns, config.proxy):
            await stop.wait()

    try:
        with _event_loop(config.proxy.event_loop) as runner:
            runner.run(serve())
    except (AgentError, RuleError, BindError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"agent: {exc.strerror or exc}") from None
    return 0


def _status(args: argparse.Namespace, config: MeshdConfig) -> int:
    import json
    import urllib.error
    import urllib.request

    from meshd.status import render_status

    address = args.address or config.agent.status_address
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"no agent answers at {url}: {reason}") from None
    print(json.dumps(doc, indent=2) if args.json else render_status(doc))
    return 0


def _event_loop(kind: str) -> asyncio.Runner:
    """uvloop when configured and installed (the proxy's relay is faster on it)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.Runner()
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


# --- server -----------------------------------------------------------------------------------


def _server(args: argparse.Namespace, config: MeshdConfig) -> int:
    stun = config.stun
    try:
        stun = StunConfig(
            addresses=tuple(args.stun_address) if args.stun_address else stun.addresses,
            port=stun.port if args.stun_port is None else args.stun_port,
            alt_port=stun.alt_port if args.stun_alt_port is None else args.stun_alt_port,
            software=stun.software,
        )
    except ValueError as exc:
        raise UserError(f"stun: {exc}") from None
    relay = _relay_config(args, config.relay)
    if not relay.enabled:
        asyncio.run(_serve(stun))
        return 0
    if relay.auth_secret_file is None:
        raise UserError("relay: authSecretFile is required when the relay is enabled "
                        "(or give --relay-secret-file FILE)")
    try:
        secrets = read_secrets(relay.auth_secret_file)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"relay: authSecretFile {relay.auth_secret_file}: {reason}") from None
    try:
        turn = relay.server_config(secrets, stun)
    except ValueError as exc:
        raise UserError(f"relay: {exc}") from None
    asyncio.run(_serve_relay(stun, relay, turn))
    return 0


def _relay_config(args: argparse.Namespace, relay: RelayConfig) -> RelayConfig:
    low, high = args.relay_ports or (relay.min_port, relay.max_port)
    try:
        return replace(
            relay,
            enabled=relay.enabled if args.relay is None else args.relay,
            auth_secret_file=args.relay_secret_file or relay.auth_secret_file,
            relay_ip=args.relay_ip or relay.relay_ip,
            min_port=low,
            max_port=high,
        )
    except ValueError as exc:
        raise UserError(f"relay: {exc}") from None


async def _serve(stun: StunConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        service = await StunService.start(
            stun.addresses[0],
            alt_ip=stun.addresses[1] if len(stun.addresses) > 1 else None,
            port=stun.port,
            alt_port=stun.alt_port,
            software=stun.software,
        )
    except BindError as exc:
        raise UserError(str(exc)) from None
    try:
        await stop.wait()
    finally:
        service.close()
        core = service.server
        assert core is not None
        event(log, logging.INFO, "stun.stop", requests=core.requests, responses=core.responses,
              errors=core.errors, dropped=core.dropped)


async def _serve_relay(stun: StunConfig, relay: RelayConfig, turn: TurnServerConfig) -> None:
    from meshd.turn.service import TurnService, start_metrics

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        service = await TurnService.start(
            turn,
            primary_ip=stun.addresses[0],
            alt_ip=stun.addresses[1] if len(stun.addresses) > 1 else None,
            port=stun.port,
            alt_port=stun.alt_port,
            tcp=relay.tcp,
            software=stun.software,
        )
    except BindError as exc:
        raise UserError(str(exc)) from None
    server, stun_core = service.server, service.stun
    assert server is not None and stun_core is not None
    runner = None
    try:
        if relay.metrics_address:
            try:
                where = HostPort.parse(relay.metrics_address)
                runner = await start_metrics(where.host, where.port,
                                             lambda: server.samples() + _stun_samples(stun_core))
            except BindError as exc:
                raise UserError(str(exc)) from None
            for address in runner.addresses:
                event(log, logging.INFO, "turn.metrics", address=f"{address[0]}:{address[1]}")
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        service.close()
        event(log, logging.INFO, "stun.stop", requests=stun_core.requests,
              responses=stun_core.responses, errors=stun_core.errors, dropped=stun_core.dropped)
        m = server.metrics
        event(logging.getLogger("meshd.turn"), logging.INFO, "turn.stop",
              allocations=m.allocations_total, bytes_in=m.bytes_in, bytes_out=m.bytes_out,
              auth_failures=m.auth_failures)


def _stun_samples(core: StunServer) -> list[tuple[str, dict[str, str], int]]:
    return [("meshd_stun_requests_total", {}, core.requests),
            ("meshd_stun_responses_total", {}, core.responses),
            ("meshd_stun_errors_total", {}, core.errors),
            ("meshd_stun_dropped_total", {}, core.dropped)]
