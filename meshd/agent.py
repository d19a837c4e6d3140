"""`meshd agent`: the node's service plane — cluster DNS, the :40001 proxy and its iptables rules,
all fed by one catalog source watching the API.

Start order: the link-local interface that carries the DNS address (this kernel has no dummy
module, so it is a bridge with no ports, as EdgeMesh's `edgemesh0`), DNS, the proxy, the
rules (only once the proxy listens, so redirected traffic always finds it), then the source; each
new catalog goes to DNS, proxy and rules in that order. Stop order is the reverse, and removes
the rules and the interface: an agent that stops leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web

from edgeweave.config import HostPort
from edgeweave.kube.client import KubeClient
from edgeweave.log import event
from meshd.catalog import Catalog
from meshd.config import AgentConfig, TunnelConfig
from meshd.dns.config import DnsConfig
from meshd.dns.core import DnsCore
from meshd.dns.resolvconf import default_upstreams
from meshd.dns.server import DnsClient, DnsServer
from meshd.proxy.config import ProxyConfig
from meshd.proxy.mesh import MeshConnectServer, MeshDialer
from meshd.proxy.server import Proxy
from meshd.rules import IptablesBackend, RuleError, RuleManager, detect_variant
from meshd.source import CatalogSource
from meshd.status import prometheus_samples, status_app, status_document
from meshd.tunnel.guess import PortGuessConfig
from meshd.tunnel.mesh import MeshConfig
from meshd.tunnel.natprobe import NatProbeConfig
from meshd.tunnel.punch import PunchConfig
from meshd.tunnel.service import TunnelError, TunnelService, TunnelSettings
from meshd.udp import Address

log = logging.getLogger("meshd.agent")


class AgentError(Exception):
    """The agent cannot start (interface, ports, rules); the message names what failed."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                          check=False)
    if proc.returncode != 0:
        raise AgentError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def link_local(interface: str, address: str) -> Iterator[None]:
    """A port-less bridge holding `address`/32 while the agent runs."""
    exists = subprocess.run(["ip", "link", "show", "dev", interface], capture_output=True,
                            check=False).returncode == 0
    if not exists:
        _ip("link", "add", "name", interface, "type", "bridge")
    try:
        _ip("addr", "replace", f"{address}/32", "dev", interface)
        _ip("link", "set", "dev", interface, "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", "dev", interface], capture_output=True, check=False)


class _TunnelPeers:
    """`PeerDirectory` over the tunnel: online peers at their overlay address."""

    def __init__(self, service: TunnelService, port: int) -> None:
        self._service, self._port = service, port

    def connect_address(self, node: str) -> Address | None:
        return self._service.connect_address(node, self._port)


async def start_tunnel(config: AgentConfig, tunnel: TunnelConfig) -> TunnelService:
    """Dial `meshd server`, open the tunnel socket (mesh0 follows the welcome) and start the
    background NAT classification (published over the control channel) unless
    `tunnel.natProbe.enabled` is false."""
    kubeconfig = tunnel.kubeconfig or config.kubeconfig
    if kubeconfig is None:
        raise AgentError("tunnel: needs a node kubeconfig (tunnel.kubeconfig or "
                         "agent.kubeconfig) for the node certificate")
    where = tunnel.server_address()
    guessing = tunnel.port_guessing
    mesh = MeshConfig(stun_server=("0.0.0.0", tunnel.stun_port), relay=tunnel.relay,
                      punch=PunchConfig(keepalive_s=tunnel.keepalive_s,
                                        prepunch_ttl=tunnel.prepunch_ttl,
                                        guess=PortGuessConfig(enabled=guessing.enabled,
                                                              sockets=guessing.sockets,
                                                              probes=guessing.probes)))
    settings = TunnelSettings(server_host=where.host, control_port=where.port,
                              stun_port=tunnel.stun_port, kubeconfig=kubeconfig,
                              interface=tunnel.interface, mtu=tunnel.mtu,
                              listen_port=tunnel.listen_port, mesh=mesh,
                              fast_path=tunnel.fast_path, busy_poll_us=tunnel.busy_poll_us)
    try:
        service = await TunnelService.start(settings)
    except (TunnelError, OSError) as exc:
        raise AgentError(str(exc)) from None
    probe = tunnel.nat_probe
    if probe.enabled:  # in the background: the tunnel does not wait for it
        service.start_nat_probe(NatProbeConfig(
            first_delay_s=probe.first_delay_s, min_interval_s=probe.min_interval_s,
            retry_s=probe.retry_s, max_retry_s=probe.max_retry_s))
    else:  # the class stays as the server stored it (welcome), or unknown
        event(log, logging.INFO, "tunnel.nat_probe_off")
    return service


@contextlib.asynccontextmanager
async def service_plane(config: AgentConfig, dns_config: DnsConfig,
                        proxy_config: ProxyConfig, tunnel_config: TunnelConfig | None = None
                        ) -> AsyncIterator[CatalogSource]:
    """Run DNS, proxy, rules, the catalog source and (when enabled) the tunnel until the
    context exits."""
    node = config.node()
    client = (KubeClient.from_kubeconfig(config.kubeconfig) if config.kubeconfig
              else KubeClient(config.server))
    with link_local(config.interface, dns_config.address):
        core: DnsCore[DnsClient] = DnsCore(dns_config, upstreams=default_upstreams(dns_config))
        dns = await DnsServer.start(core, dns_config.address, dns_config.port)
        tunnel: TunnelService | None = None
        connect: MeshConnectServer | None = None
        if tunnel_config is not None and tunnel_config.enabled:
            try:
                tunnel = await start_tunnel(config, tunnel_config)
            except BaseException:
                dns.close()
                await client.close()
                raise
            proxy = Proxy(proxy_config, Catalog.empty(node), dialer=MeshDialer(
                node, _TunnelPeers(tunnel, tunnel_config.connect_port),
                direct_routable=tunnel_config.direct_routable))
        else:
            proxy = Proxy(proxy_config, Catalog.empty(node))
        rules: RuleManager | None = None
        source: CatalogSource | None = None
        pending: set[asyncio.Task[None]] = set()
        status_runner: web.AppRunner | None = None
        try:
            await proxy.start()
            if tunnel is not None and tunnel_config is not None:
                connect = MeshConnectServer(lambda: proxy.catalog, proxy.adopt, proxy.metrics)
                port = tunnel_config.connect_port
                live = tunnel

                def listen() -> None:
                    overlay = live.node.overlay
                    assert overlay is not None and connect is not None
                    task = asyncio.get_running_loop().create_task(
                        connect.start((str(overlay.ip), port)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

                tunnel.on_ready(listen)
            variant = proxy_config.rules.backend
            rules = RuleManager(IptablesBackend(detect_variant() if variant == "auto"
                                                else variant),
                                proxy_config.rules, proxy_port=proxy.address[1])
            lock = asyncio.Lock()

            async def sync(catalog: Catalog) -> None:
                async with lock:  # one iptables-restore at a time, newest catalog last
                    assert rules is not None
                    try:
                        await asyncio.to_thread(rules.sync, catalog)
                    except RuleError as exc:
                        event(log, logging.ERROR, "rules.sync_failed", node=node, error=exc)

            def publish(catalog: Catalog) -> None:
                core.set_catalog(catalog)
                proxy.set_catalog(catalog)
                task = asyncio.get_running_loop().create_task(sync(catalog))
                pending.add(task)
                task.add_done_callback(pending.discard)

            source = CatalogSource(client, node, [publish])
            await source.start()
            if config.status_address:
                status_runner = await _serve_status(config.status_address, source, rules, proxy,
                                                    core, tunnel, tunnel_config)
            event(log, logging.INFO, "agent.ready", node=node, dns=dns_config.address,
                  proxy_port=proxy.address[1], rules=rules.backend.name)
            yield source
        finally:
            if status_runner is not None:
                await status_runner.cleanup()
            if source is not None:
                await source.stop()
            await asyncio.gather(*pending, return_exceptions=True)  # no sync after removal
            if rules is not None:
                with contextlib.suppress(RuleError):
                    await asyncio.to_thread(rules.remove)
            if connect is not None:
                await connect.stop()
            await proxy.stop()
            if tunnel is not None:
                await tunnel.stop()
            dns.close()
            await client.close()


async def _serve_status(address: str, source: CatalogSource, rules: RuleManager, proxy: Proxy,
                        core: DnsCore[DnsClient], tunnel: TunnelService | None = None,
                        tunnel_config: TunnelConfig | None = None) -> web.AppRunner:
    """`/status` and `/metrics` on `address` (loopback by default)."""
    try:
        where = HostPort.parse(address)
    except ValueError as exc:
        raise AgentError(f"agent.statusAddress: {exc}") from None

    async def rules_in_place() -> bool:
        try:
            return await asyncio.to_thread(rules.installed, source.catalog)
        except RuleError:
            return False

    async def status() -> dict[str, Any]:
        doc = status_document(source.catalog, await rules_in_place())
        if tunnel is not None and tunnel_config is not None:
            doc["tunnel"] = {**tunnel.status(), "connectPort": tunnel_config.connect_port}
        return doc

    async def metrics() -> str:
        own: list[tuple[str, dict[str, str], int]] = [
            ("meshd_catalog_builds_total", {}, source.builds),
            ("meshd_catalog_services", {}, len(source.catalog.services)),
            ("meshd_rules_in_place", {}, int(await rules_in_place())),
        ]
        samples: list[tuple[str, dict[str, str], float]] = [*core.stats.samples(), *own]
        if tunnel is not None:
            samples += tunnel.metrics_samples()
        return proxy.metrics.render(prefix="meshd_proxy") + prometheus_samples(samples)

    runner = web.AppRunner(status_app(status, metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, where.host, where.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise AgentError(f"agent.statusAddress {address}: {exc.strerror or exc}") from None
    return runner
