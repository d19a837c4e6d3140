"""The catalog source against a live API: catalogs follow changes, survive the API going away."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeweave.apiserver.testing import ApiHarness
from edgeweave.kube.client import KubeClient
from edgeweave.kube.informer import InformerConfig
from edgeweave.kube.resources import ENDPOINTSLICES, NODES, SERVICES
from meshd.catalog import Catalog
from meshd.source import CatalogSource, SourceConfig


def service(name: str) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}}


def slice_for(name: str, ips: list[str], node: str) -> dict[str, object]:
    return {"metadata": {"name": f"{name}-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
                          for ip in ips]}


async def wait_catalog(seen: list[Catalog], predicate: object, timeout: float = 10) -> Catalog:
    async with asyncio.timeout(timeout):
        while True:
            if seen and callable(predicate) and predicate(seen[-1]):
                return seen[-1]
            await asyncio.sleep(0.02)


def test_catalog_follows_the_api_and_outlives_it(tmp_path: Path) -> None:
    harness = ApiHarness(tmp_path)
    closed = False
    try:
        async def scenario() -> None:
            nonlocal closed
            client = KubeClient.from_kubeconfig(harness.admin_kubeconfig)
            seen: list[Catalog] = []
            source = CatalogSource(client, "edge-1", [seen.append],
                                   config=SourceConfig(debounce_s=0.01, sync_timeout_s=10),
                                   informer_config=InformerConfig())
            await client.create(NODES, {"metadata": {"name": "edge-1"}})
            await source.start()
            try:
                await client.create(SERVICES, service("web"), namespace="default")
                await client.create(ENDPOINTSLICES,
                                    slice_for("web", ["172.17.0.2", "172.17.0.3"], "edge-1"),
                                    namespace="default")
                cat = await wait_catalog(seen, lambda c: "default/web" in c.services and len(
                    c.services["default/web"].ready_endpoints()) == 2)
                web = cat.services["default/web"]
                assert web.cluster_ips and web.cluster_ips[0] in cat.by_cluster_ip
                builds = source.builds
                # The API goes away: the last catalog stays with the consumers.
                harness.close()
                closed = True
                await asyncio.sleep(0.5)
                assert seen[-1].services["default/web"] == web
                assert source.builds == builds
            finally:
                await source.stop()
                await client.close()

        asyncio.run(scenario())
    finally:
        if not closed:
            harness.close()
