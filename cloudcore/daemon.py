"""cloudcore's main loop: the embedded API (or a real cluster) plus the controllers.

Without `kubeconfig` cloudcore is its own control plane, the way k3s embeds one: it creates the
CA on first start (`DATA_DIR/pki`), serves the Kubernetes API over TLS from the SQLite store
(`DATA_DIR/store.db`), writes `DATA_DIR/admin.kubeconfig` once it serves, and runs the
controllers against its own API over loopback with that kubeconfig. With `kubeconfig` it skips
all of that and the controllers' client points at the given cluster: the same code either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography import x509

from cloudcore.config import CloudcoreConfig
from edgeweave.apiserver import (
    ApiServerConfig,
    CertOrToken,
    ClusterAuthorizer,
    start_api_server,
)
from edgeweave.kube.store import Store
from edgeweave.log import event
from edgeweave.pki import (
    ADMIN_KUBECONFIG,
    CA_CERT_FILE,
    PKI_SUBDIR,
    CertificateAuthority,
    IssuedCert,
    StaticTokens,
    server_context,
    write_admin_kubeconfig,
)

log = logging.getLogger("cloudcore")
STORE_FILE = "store.db"
SERVING_CERT, SERVING_KEY = "apiserver.crt", "apiserver.key"
RENEW_BEFORE = dt.timedelta(days=30)


def serving_names(config: CloudcoreConfig) -> tuple[list[str], list[str]]:
    """(IPs, DNS names) the API's certificate must carry, as kube-apiserver's does."""
    ips = ["127.0.0.1"]
    dns = ["localhost", socket.gethostname(), "kubernetes", "kubernetes.default",
           "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
    ips.append(str(config.api.service_cidr.network_address + 1))  # the `kubernetes` Service
    candidates = [config.api.bind, *config.api.advertise]
    for name in candidates:
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
            continue
        if not addr.is_unspecified:
            ips.append(str(addr))
    return sorted(set(ips)), sorted(set(dns))


def ensure_serving_cert(ca: CertificateAuthority, pki: Path, config: CloudcoreConfig) -> None:
    """Issue the API's certificate unless a valid one with the same names is on disk."""
    ips, dns = serving_names(config)
    cert_path, key_path = pki / SERVING_CERT, pki / SERVING_KEY
    if cert_path.exists() and key_path.exists():
        current = IssuedCert.load(cert_path, key_path)
        san = current.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have_ips = sorted(str(i) for i in san.get_values_for_type(x509.IPAddress))
        have_dns = sorted(san.get_values_for_type(x509.DNSName))
        fresh = current.cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
        if fresh and have_ips == ips and have_dns == dns:
            return
    issued = ca.issue_server_cert("kube-apiserver", ips=ips, dns_names=dns)
    issued.write(cert_path, key_path)
    event(log, logging.INFO, "cloudcore.serving_cert_issued", ips=",".join(ips))


@contextlib.asynccontextmanager
async def embedded_api(config: CloudcoreConfig) -> AsyncIterator[Path]:
    """Serve the embedded API; yield the admin kubeconfig's path."""
    data = config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    pki = data / PKI_SUBDIR
    ca = CertificateAuthority.load_or_create(pki)
    ensure_serving_cert(ca, pki, config)
    ctx = server_context(pki / SERVING_CERT, pki / SERVING_KEY, client_ca_file=pki / CA_CERT_FILE)
    tokens = StaticTokens.load(config.api.token_file) if config.api.token_file else None
    store = Store(data / STORE_FILE)
    try:
        server = await start_api_server(
            store,
            ApiServerConfig(host=config.api.bind, port=config.api.port,
                            service_cidr=str(config.api.service_cidr)),
            ssl_context=ctx, authenticator=CertOrToken(tokens), authorizer=ClusterAuthorizer())
        try:
            host = "127.0.0.1" if ipaddress.ip_address(config.api.bind).is_unspecified \
                else config.api.bind
            kubeconfig = data / ADMIN_KUBECONFIG
            write_admin_kubeconfig(kubeconfig, ca, f"https://{host}:{server.port}")
            event(log, logging.INFO, "cloudcore.api_ready", url=server.url,
                  kubeconfig=str(kubeconfig))
            yield kubeconfig
        finally:
            await server.close()
    finally:
        store.close()


async def run(config: CloudcoreConfig, stop: asyncio.Event) -> None:
    """Run until `stop` is set."""
    async with contextlib.AsyncExitStack() as stack:
        if config.kubeconfig is None:
            kubeconfig = await stack.enter_async_context(embedded_api(config))
        else:
            kubeconfig = config.kubeconfig
        if config.controllers:
            # Against a real cluster only ours run: its own scheduler and controllers do the rest.
            embedded = config.kubeconfig is None
            await stack.enter_async_context(controllers(kubeconfig, everything=embedded))
        await stop.wait()


@contextlib.asynccontextmanager
async def controllers(kubeconfig: Path, *, everything: bool) -> AsyncIterator[None]:
    """The controller manager against the cluster `kubeconfig` points at."""
    from cloudcore.controllers.manager import (
        ALL_CONTROLLERS,
        CLUSTER_CONTROLLERS,
        ControllerManager,
        ManagerConfig,
    )

    which = ALL_CONTROLLERS if everything else CLUSTER_CONTROLLERS
    manager = await ControllerManager.from_kubeconfig(
        kubeconfig, config=ManagerConfig(controllers=which))
    await manager.start()
    try:
        yield
    finally:
        await manager.stop()

