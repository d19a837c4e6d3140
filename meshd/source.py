"""The agent's source of truth: informers over the API, one catalog rebuilt per burst of changes.

`meshd agent` list/watches Services, EndpointSlices, Endpoints, Nodes and NodeGroups — from
edgecore's MetaServer on edge nodes, from the API directly on cloud nodes — through the shared
informer (relist on 410 or reconnect, diffs emitted so nothing is missed). Changes arrive in
bursts (a Deployment scaling touches pods, slices and endpoints), so a rebuild waits
`debounce_s` after the first change and then builds the whole catalog once
(`meshd.catalog_build`), hands it to every consumer (DNS, proxy, rules) and logs the problems
found in the objects. While the API is away the informers keep their last state and so does the
catalog: the node keeps resolving and proxying (offline autonomy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from edgeweave.kube.client import KubeClient
from edgeweave.kube.informer import Change, InformerConfig, SharedInformers
from edgeweave.kube.resources import ENDPOINTS, ENDPOINTSLICES, NODEGROUPS, NODES, SERVICES
from edgeweave.log import event
from meshd.catalog import Catalog
from meshd.catalog_build import build_catalog

log = logging.getLogger("meshd.source")
WATCHED = (SERVICES, ENDPOINTSLICES, ENDPOINTS, NODES, NODEGROUPS)
Consumer = Callable[[Catalog], None]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Timings of the catalog source."""

    debounce_s: float = 0.05  # wait this long after a change for more before rebuilding
    sync_timeout_s: float = 30.0  # first lists; the agent starts serving an empty catalog after


class CatalogSource:
    """Keeps `catalog` in step with the API and pushes each new one to the consumers."""

    def __init__(self, client: KubeClient, node: str, consumers: list[Consumer], *,
                 config: SourceConfig = SourceConfig(),
                 informer_config: InformerConfig | None = None) -> None:
        self.node = node
        self.config = config
        self.consumers = consumers
        self.catalog = Catalog.empty(node)
        self.builds = 0  # catalogs built (a metric: rule and DNS resyncs follow it)
        self._informers = SharedInformers(client, informer_config or InformerConfig())
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._removers: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Start the informers, wait (bounded) for their first lists, publish a catalog."""
        for res in WATCHED:
            informer = self._informers.get(res)
            self._removers.append(informer.add_listener(self._changed))
        self._informers.start()
        if not await self._informers.wait_synced(self.config.sync_timeout_s):
            event(log, logging.WARNING, "source.not_synced", node=self.node,
                  timeout_s=self.config.sync_timeout_s)
        self.rebuild()
        self._task = asyncio.create_task(self._loop(), name="catalog-source")

    async def stop(self) -> None:
        """Stop watching; the last catalog stays with the consumers."""
        for remove in self._removers:
            remove()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._informers.stop()

    def _changed(self, change: Change) -> None:
        self._dirty.set()

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.config.debounce_s)
            self._dirty.clear()
            self.rebuild()

    def rebuild(self) -> Catalog:
        """Build the catalog from the informers' caches now and publish it."""
        inf = self._informers
        revision = max((inf.get(r).resource_version for r in WATCHED), key=_rv_order,
                       default="")
        built = build_catalog(
            node=self.node, services=inf.get(SERVICES).items(),
            endpoint_slices=inf.get(ENDPOINTSLICES).items(), endpoints=inf.get(ENDPOINTS).items(),
            nodes=inf.get(NODES).items(), nodegroups=inf.get(NODEGROUPS).items(),
            revision=revision)
        for problem in built.problems:
            event(log, logging.WARNING, "source.object_problem", problem=str(problem))
        self.catalog = built.catalog
        self.builds += 1
        for consumer in self.consumers:
            consumer(built.catalog)
        event(log, logging.DEBUG, "source.catalog", services=len(built.catalog.services),
              revision=revision)
        return built.catalog


def _rv_order(rv: str) -> tuple[int, str]:
    """resourceVersions compare as numbers where they are (ours and etcd's are)."""
    return (int(rv), rv) if rv.isdigit() else (-1, rv)
