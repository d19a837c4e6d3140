"""The `meshd` command: `netcheck`, `server`, `agent`, `status`, `ping`, `nodes`, `config`
(reference: docs/reference/meshd.md)."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeweave import __version__
from edgeweave.cli import UserError, add_common, base_parser, run
from edgeweave.config import HostPort, dump_yaml, load_config
from edgeweave.log import event
from meshd.config import (
    ControlConfig,
    MeshdConfig,
    RelayConfig,
    StunConfig,
    parse_listen_address,
)
from meshd.control.server import ControlServerConfig
from meshd.eventloop import runner as event_loop
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

if TYPE_CHECKING:
    from aiohttp import web

    from meshd.control.nodes import NodeTable
    from meshd.control.revoked import RevokedFile
    from meshd.control.server import ControlServer
    from meshd.control.service import RevocationWatcher
    from meshd.turn.server import TurnServer

log = logging.getLogger("meshd.stun")
control_log = logging.getLogger("meshd.control")


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
    # control channel (docs/reference/meshd.md, "Control channel")
    server.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                        help="serve the control channel: TLS with node certificates, overlay "
                             "addresses, signaling, TURN credentials (config: control.enabled)")
    server.add_argument("--control-address", metavar="HOST:PORT",
                        help="control listen address (default 0.0.0.0:20004; port 0 = any; "
                             "config: control.address)")
    server.add_argument("--control-data-dir", type=Path, metavar="DIR",
                        help="control state: the node registry (config: control.dataDir)")
    server.add_argument("--control-ca", type=Path, metavar="FILE",
                        help="cluster CA that issued the node certificates "
                             "(config: control.caFile)")
    server.add_argument("--control-cert", type=Path, metavar="FILE",
                        help="serving certificate, from `cloudcore certs meshd-server` "
                             "(config: control.certFile)")
    server.add_argument("--control-key", type=Path, metavar="FILE",
                        help="its private key (config: control.keyFile)")

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

    ping = _subcommand(sub, "ping", "report the tunnel path and round-trip time to a node "
                       "(a TCP connect to its mesh connect port over the overlay)")
    ping.add_argument("peer", metavar="NODE", help="the node to reach")
    ping.add_argument("--address", metavar="HOST:PORT",
                      help="the local agent's status address (config: agent.statusAddress)")
    ping.add_argument("-c", "--count", type=int, default=3, metavar="N",
                      help="connects to time (default 3)")
    ping.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS",
                      help="give up on one connect after this long (default 5)")

    nodes = _subcommand(sub, "nodes", "list the nodes `meshd server` knows: overlay address, "
                        "online or not and since when, NAT, endpoint, relay, revocation")
    nodes.add_argument("--address", metavar="HOST:PORT",
                       help="the server's metrics listener (config: control.metricsAddress, "
                            "else relay.metricsAddress)")
    nodes.add_argument("--json", action="store_true", help="print the JSON document")

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
    if args.command == "ping":
        return _ping(args, config)
    if args.command == "nodes":
        return _nodes(args, config)
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
        async with service_plane(agent, config.dns, config.proxy, config.tunnel):
            await stop.wait()

    try:
        with event_loop(config.proxy.event_loop, logging.getLogger("meshd.agent")) as loop_runner:
            loop_runner.run(serve())
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


def _ping(args: argparse.Namespace, config: MeshdConfig) -> int:
    import json
    import socket
    import time
    import urllib.error
    import urllib.request

    address = args.address or config.agent.status_address
    url = f"http://{address}/status"

    def tunnel_status() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                doc = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"no agent answers at {url}: {reason}") from None
        tunnel = doc.get("tunnel")
        if not isinstance(tunnel, dict):
            raise UserError("the agent runs no tunnel (tunnel.enabled is false)")
        return tunnel

    tunnel = tunnel_status()
    peer = next((p for p in tunnel.get("peers", []) if p.get("node") == args.peer), None)
    if peer is None:
        raise UserError(f"no peer {args.peer} in the mesh")
    port = int(tunnel.get("connectPort", 40003))
    best: float | None = None
    for i in range(max(1, args.count)):
        started = time.perf_counter()
        try:
            with socket.create_connection((peer["overlay"], port), timeout=args.timeout):
                rtt = time.perf_counter() - started
        except OSError as exc:
            print(f"no answer from {args.peer} ({peer['overlay']}:{port}): "
                  f"{exc.strerror or exc}")
            continue
        best = rtt if best is None else min(best, rtt)
        now = next((p for p in tunnel_status().get("peers", [])
                    if p.get("node") == args.peer), peer)
        print(f"pong from {args.peer} ({peer['overlay']}) via {now['path']} "
              f"{now.get('endpoint') or '-'} in {rtt * 1000:.2f} ms")
        if i + 1 < args.count:
            time.sleep(0.2)
    return 0 if best is not None else 1


def _nodes(args: argparse.Namespace, config: MeshdConfig) -> int:
    import json
    import urllib.error
    import urllib.request

    from meshd.control.nodes import render_nodes

    address = args.address or config.control.metrics_address or config.relay.metrics_address
    if not address:
        raise UserError("no server metrics address: give --address HOST:PORT or set "
                        "control.metricsAddress (or relay.metricsAddress)")
    try:
        where = HostPort.parse(address)
    except ValueError as exc:
        raise UserError(f"--address: {exc}") from None
    # A listener on a wildcard address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(where.host, where.host)
    url = f"http://{HostPort(host, where.port)}/nodes"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # the server answered: say what it said
        try:
            reason = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError, OSError):
            reason = exc.reason
        return _fail(f"{url}: {exc.code} {reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return _fail(f"no meshd server answers at {url}: {reason}")
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        return _fail(f"{url}: not a node list (is this a meshd server's metrics address?)")
    print(json.dumps(doc, indent=2) if args.json else render_nodes(doc))
    return 0


def _fail(text: str) -> int:
    """One line on stderr and exit 1: the server is down or refused (not the operator's input,
    which is exit 2)."""
    print(f"meshd: error: {text}", file=sys.stderr)
    return 1


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
    control = _control_settings(args, config)
    if not relay.enabled:
        asyncio.run(_with_control(control, lambda _: _serve(stun)))
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
    asyncio.run(_with_control(control, lambda shared: _serve_relay(stun, relay, turn,
                                                                    shared)))
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


async def _serve_relay(stun: StunConfig, relay: RelayConfig, turn: TurnServerConfig,
                       shared: _InProcess) -> None:
    """STUN + TURN until SIGINT/SIGTERM; with `shared.revoked` (the control channel's
    revocation list), revoked nodes lose their allocations and get 403 from the moment a list
    takes effect. The relay's metrics listener serves the node list too."""
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
            native=relay.fast_path,
        )
    except BindError as exc:
        raise UserError(str(exc)) from None
    server, stun_core = service.server, service.stun
    assert server is not None and stun_core is not None
    revoked = shared.revoked
    unsubscribe = (revoked.subscribe(lambda r: service.set_revoked_nodes(r.nodes))
                   if revoked is not None else None)
    shared.relay = server
    runner = None
    try:
        if relay.metrics_address:
            try:
                where = HostPort.parse(relay.metrics_address)
                runner = await start_metrics(where.host, where.port,
                                             lambda: service.samples() + _stun_samples(stun_core),
                                             routes=shared.routes())
            except BindError as exc:
                raise UserError(str(exc)) from None
            for address in runner.addresses:
                event(log, logging.INFO, "turn.metrics", address=f"{address[0]}:{address[1]}")
        await stop.wait()
    finally:
        shared.relay = None
        if unsubscribe is not None:
            unsubscribe()
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


# --- server: control channel ------------------------------------------------------------------


@dataclass(frozen=True)
class _Control:
    """What `meshd server` needs to run the control channel, checked before anything binds."""

    config: ControlConfig
    core: ControlServerConfig
    tls: ssl.SSLContext
    revoked: RevokedFile | None
    """The revocation list, read once (a bad one stops the start)."""


def _control_settings(args: argparse.Namespace, config: MeshdConfig) -> _Control | None:
    try:
        control = replace(
            config.control,
            enabled=config.control.enabled if args.control is None else args.control,
            address=args.control_address or config.control.address,
            data_dir=args.control_data_dir or config.control.data_dir,
            ca_file=args.control_ca or config.control.ca_file,
            cert_file=args.control_cert or config.control.cert_file,
            key_file=args.control_key or config.control.key_file,
        )
    except ValueError as exc:
        raise UserError(f"control: {exc}") from None
    if not control.enabled:
        return None
    from edgeweave.pki import PKIError
    from meshd.control.service import server_tls_context  # imported here: STUN stays light

    missing = [name for name, value in (("caFile", control.ca_file),
                                        ("certFile", control.cert_file),
                                        ("keyFile", control.key_file)) if value is None]
    if missing:
        raise UserError(f"control: {', '.join(missing)} required when the control channel is "
                        "enabled (`cloudcore certs meshd-server` writes them)")
    assert control.ca_file and control.cert_file and control.key_file
    secret_file = control.turn_secret_file or config.relay.auth_secret_file
    secret: bytes | None = None
    if secret_file is not None:
        try:
            secret = read_secrets(secret_file)[0]
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UserError(f"control: TURN secret file {secret_file}: {reason}") from None
    try:
        core = control.server_config(secret, config.relay.realm)
    except ValueError as exc:
        raise UserError(f"control: {exc}") from None
    try:
        tls = server_tls_context(control.cert_file, control.key_file, control.ca_file)
    except PKIError as exc:
        raise UserError(f"control: {exc}") from None
    revoked = None
    if control.revoked_file is not None:
        from meshd.control.revoked import RevokedFile, RevokedFileError

        revoked = RevokedFile(control.revoked_file)
        try:
            revoked.load()
        except RevokedFileError as exc:
            raise UserError(f"control: revokedFile {exc}") from None
    return _Control(control, core, tls, revoked)


@dataclass
class _InProcess:
    """What the control channel and the relay of one `meshd server` share."""

    revoked: RevocationWatcher | None = None
    """Keeps the revocation list in force (None without `control.revokedFile`): the relay
    subscribes to it."""
    control: ControlServer | None = None
    """The control core; None without the control channel."""
    relay: TurnServer | None = None
    """The TURN core while the relay runs (allocations per node for the node list)."""

    def node_table(self) -> NodeTable:
        """The control core's node list with the relay's allocations per node."""
        assert self.control is not None
        allocations = None
        if self.relay is not None:  # its per-node gauge: the count the quota is checked on
            allocations = {labels["node"]: value for name, labels, value
                           in self.relay.samples() if name == "meshd_relay_node_allocations"}
        return self.control.node_table(allocations)

    def routes(self) -> list[web.RouteDef]:
        """`/nodes` for a metrics listener (404s saying why without a control channel)."""
        from meshd.control.service import node_routes

        return node_routes(self.node_table if self.control is not None else None)


async def _with_control(
        control: _Control | None,
        serving: Callable[[_InProcess], Coroutine[Any, Any, None]]) -> None:
    """Run `serving(shared)` (STUN, relay) with the control channel beside it when enabled;
    `shared` carries the revocation watcher and the control core to the relay."""
    if control is None:
        await serving(_InProcess())
        return
    from meshd.control.registry import REGISTRY_FILE, JsonRegistryStore, RegistryStoreError
    from meshd.control.server import ControlServer
    from meshd.control.service import ControlService, RevocationWatcher
    from meshd.turn.service import start_metrics

    data_dir = control.config.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(data_dir / ".control.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"control: dataDir {data_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"control: dataDir {data_dir} is in use by another meshd "
                            "server") from None
        try:
            server = ControlServer(control.core, JsonRegistryStore(data_dir / REGISTRY_FILE))
        except RegistryStoreError as exc:
            raise UserError(f"control: {exc}") from None
        host, port = parse_listen_address(control.config.address)
        try:
            service = await ControlService.start(server, control.tls, host, port)
        except BindError as exc:
            raise UserError(str(exc)) from None
        loop = asyncio.get_running_loop()
        shared = _InProcess(control=server)
        watcher = None
        if control.revoked is not None:
            # No await since the listener started: in force before any connection is served.
            watcher = RevocationWatcher(control.revoked)
            watcher.subscribe(service.set_revoked)
            watcher.start()
            loop.add_signal_handler(signal.SIGHUP, watcher.reload)
            shared.revoked = watcher
        runner = None
        try:
            if control.config.metrics_address:
                where = HostPort.parse(control.config.metrics_address)
                try:
                    runner = await start_metrics(where.host, where.port, server.samples,
                                                 routes=shared.routes())
                except BindError as exc:
                    raise UserError(str(exc)) from None
                for address in runner.addresses:
                    event(control_log, logging.INFO, "control.metrics",
                          address=f"{address[0]}:{address[1]}")
            await serving(shared)
        finally:
            if watcher is not None:
                loop.remove_signal_handler(signal.SIGHUP)
                watcher.close()
            if runner is not None:
                await runner.cleanup()
            await service.close()
            m = server.metrics
            event(control_log, logging.INFO, "control.stop", hellos=m.hellos,
                  signals=m.signals_routed, auth_failures=m.auth_failures)
    finally:
        os.close(lock)
