"""Starting and stopping the API server: the public entry point.

    server = await start_api_server(store, ApiServerConfig(port=6443),
                                    ssl_context=server_context(crt, key, client_ca_file=ca),
                                    authenticator=CertOrToken(tokens),
                                    authorizer=ClusterAuthorizer())
    ... server.url ...
    await server.close()

The store is synchronous; its calls run in a small thread pool (`worker_threads`), so the event
loop only parses, encodes and streams. One `WatchHub` per server feeds every watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from edgeweave.apiserver.admission import Admission
from edgeweave.apiserver.app import ApiApp
from edgeweave.apiserver.auth import Authenticator, Authorizer
from edgeweave.apiserver.codec import Decoded
from edgeweave.apiserver.config import ApiServerConfig
from edgeweave.apiserver.handlers import ResourceHandler
from edgeweave.apiserver.params import WriteOptions
from edgeweave.apiserver.rest import Rest
from edgeweave.apiserver.serviceip import KUBERNETES_SERVICE, ClusterIPAllocator
from edgeweave.apiserver.watch import WatchHub
from edgeweave.kube.errors import AlreadyExists, StoreError
from edgeweave.kube.resources import SERVICES
from edgeweave.kube.store import Store
from edgeweave.log import event

log = logging.getLogger(__name__)
DEFAULT_CONFIG = ApiServerConfig()


@dataclasses.dataclass
class RunningServer:
    """A started API server."""

    url: str
    """`https://HOST:PORT` (or `http://` without TLS)."""
    host: str
    """The address it listens on."""
    port: int
    """The port it listens on (the real one when the config said 0)."""
    hub: WatchHub
    """The watch hub (its `watcher_count()` is useful in tests and metrics)."""
    _runner: web.AppRunner
    _executor: ThreadPoolExecutor

    async def close(self) -> None:
        """End every watch, stop listening, wait briefly for requests in flight."""
        await self.hub.close()
        await self._runner.cleanup()
        self._executor.shutdown(wait=True)
        event(log, logging.INFO, "apiserver.stopped", url=self.url)


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def _ensure_kubernetes_service(rest: Rest, port: int) -> None:
    namespace, name = KUBERNETES_SERVICE
    body = {
        "metadata": {"name": name, "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": rest.admission.allocator.reserved,
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}],
        },
    }
    try:
        rest.store.get(SERVICES, name, namespace=namespace)
        return
    except StoreError:
        pass
    with contextlib.suppress(AlreadyExists):
        rest.create(SERVICES, namespace, Decoded(body), WriteOptions(), None)


async def start_api_server(
    store: Store,
    config: ApiServerConfig = DEFAULT_CONFIG,
    *,
    ssl_context: ssl.SSLContext | None,
    authenticator: Authenticator,
    authorizer: Authorizer,
    clock: Callable[[], float] = time.time,
) -> RunningServer:
    """Serve the Kubernetes API for `store` on `config.host:config.port` (TLS when
    `ssl_context` is given). Returns once it accepts connections."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="apiserver")

    def run(fn: Callable[[], Any]) -> Any:
        return loop.run_in_executor(executor, fn)

    hub = WatchHub(store, run, queue_limit=config.watch_queue_events)
    admission = Admission(
        ClusterIPAllocator(config.service_cidr), mutating=config.mutating_admission
    )
    rest = Rest(store, admission, max_depth=config.max_nesting)
    handler = ResourceHandler(store.registry, rest, hub, run, config, clock)
    api = ApiApp(store.registry, handler, authenticator, authorizer)
    runner = web.AppRunner(
        api.app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.shutdown_timeout_s,
    )
    await hub.start()
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context, backlog=1024)
        await site.start()
    except BaseException:
        await hub.close()
        await runner.cleanup()
        executor.shutdown(wait=False)
        raise
    port = int(runner.addresses[0][1])
    url = _url(config.host, port, ssl_context is not None)
    if config.ensure_kubernetes_service:
        try:
            await run(lambda: _ensure_kubernetes_service(rest, port))
        except StoreError as exc:
            event(log, logging.WARNING, "apiserver.kubernetes_service_failed", error=exc.message)
    event(log, logging.INFO, "apiserver.listening", url=url, tls=ssl_context is not None)
    return RunningServer(url, config.host, port, hub, runner, executor)
