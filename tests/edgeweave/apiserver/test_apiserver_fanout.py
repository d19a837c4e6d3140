"""Watch fan-out: 100 concurrent HTTPS watchers on one resource all receive every write; the
write-to-delivery latency (p50/p99) and HTTP list/write throughput are printed, not asserted
tightly (they depend on the machine)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
import pytest

from edgeweave.apiserver.testing import ApiHarness
from edgeweave.kube.resources import NAMESPACES

NS = "fanout"
WATCHERS = 100
WRITES = 20


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _fanout(api: ApiHarness) -> tuple[list[float], dict[str, float]]:
    base = api.url
    connector = aiohttp.TCPConnector(ssl=api.admin_context(), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        cms = f"{base}/api/v1/namespaces/{NS}/configmaps"
        async with session.post(cms, json={"metadata": {"name": "hot"}, "data": {"n": "0"}}) as r:
            assert r.status == 201
            rv = (await r.json())["metadata"]["resourceVersion"]
        sent: dict[str, float] = {}
        received: list[dict[str, float]] = [{} for _ in range(WATCHERS)]
        done = asyncio.Event()

        async def watch(i: int) -> None:
            url = f"{cms}?watch=1&resourceVersion={rv}&timeoutSeconds=30"
            async with session.get(url) as resp:
                async for line in resp.content:
                    event = json.loads(line)
                    value = event["object"]["data"]["n"]
                    received[i][value] = time.perf_counter()
                    if len(received[i]) == WRITES:
                        if all(len(r) == WRITES for r in received):
                            done.set()
                        return

        tasks = [asyncio.create_task(watch(i)) for i in range(WATCHERS)]
        deadline = time.monotonic() + 20
        while api.server.hub.watcher_count() < WATCHERS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert api.server.hub.watcher_count() >= WATCHERS
        for n in range(1, WRITES + 1):
            patch = {"data": {"n": str(n)}}
            sent[str(n)] = time.perf_counter()
            async with session.patch(
                f"{cms}/hot", json=patch, headers={"Content-Type": "application/merge-patch+json"}
            ) as r:
                assert r.status == 200
            await asyncio.sleep(0.02)
        await asyncio.wait_for(done.wait(), 20)
        await asyncio.gather(*tasks)
        latencies = [(got[n] - sent[n]) * 1000 for got in received for n in got]

        # HTTP throughput: sequential creates, then list them
        start = time.perf_counter()
        count = 300
        for i in range(count):
            body = {"metadata": {"name": f"t{i}"}, "data": {"i": str(i)}}
            async with session.post(cms, json=body) as r:
                assert r.status == 201
        writes = count / (time.perf_counter() - start)
        start = time.perf_counter()
        lists = 20
        for _ in range(lists):
            async with session.get(cms) as r:
                assert r.status == 200
                doc: Any = await r.json()
        list_ms = (time.perf_counter() - start) / lists * 1000
        assert len(doc["items"]) == count + 1
    return latencies, {"writes_per_s": writes, "list_ms": list_ms}


def test_fanout_to_100_watchers(api: ApiHarness, capsys: pytest.CaptureFixture[str]) -> None:
    api.store.create(NAMESPACES, {"metadata": {"name": NS}})
    latencies, rates = asyncio.run(_fanout(api))
    assert len(latencies) == WATCHERS * WRITES  # every watcher saw every write, once
    with capsys.disabled():
        print(
            f"\nfan-out to {WATCHERS} watchers, {WRITES} writes: write->delivery "
            f"p50 {statistics.median(latencies):.1f} ms, p99 {_pct(latencies, 0.99):.1f} ms; "
            f"HTTP creates {rates['writes_per_s']:.0f}/s (sequential, one client); "
            f"list of 301 configmaps {rates['list_ms']:.1f} ms"
        )
    assert statistics.median(latencies) < 1000
