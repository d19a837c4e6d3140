"""Watch semantics: the hub alone (selectors, namespaces, resume, slow watchers) and over HTTP
(timeouts, 410 as an ERROR event, Table events, sendInitialEvents, one-object watches), plus
the other list/delete shapes kubectl and controllers use."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from edgeweave.apiserver.testing import ApiHarness, Client
from edgeweave.apiserver.watch import WatchFilter, WatchHub
from edgeweave.kube.errors import Gone
from edgeweave.kube.resources import CONFIGMAPS, NAMESPACES
from edgeweave.kube.selectors import LabelSelector
from edgeweave.kube.store import Store


def _events(lines: list[bytes]) -> list[tuple[str, str, str]]:
    out = []
    for line in lines:
        event = json.loads(line)
        meta = event["object"]["metadata"]
        out.append((event["type"], meta.get("name", ""), meta.get("resourceVersion", "")))
    return out


async def _hub(store: Store, limit: int = 100) -> WatchHub:
    loop = asyncio.get_running_loop()

    def run(fn: Callable[[], Any]) -> Any:
        return loop.run_in_executor(None, fn)

    hub = WatchHub(store, run, queue_limit=limit)
    await hub.start()
    return hub


def test_hub_selector_transitions_and_namespaces(tmp_path: Path) -> None:
    store = Store(tmp_path / "kube.db")
    store.create(NAMESPACES, {"metadata": {"name": "other"}})

    async def scenario() -> list[tuple[str, str, str]]:
        hub = await _hub(store)
        flt = WatchFilter(CONFIGMAPS, "default", LabelSelector.parse("k=v"), None)
        watcher, first = await hub.watch(flt, None, None)
        assert first == []
        merge = "application/merge-patch+json"

        def label(value: str) -> dict[str, Any]:
            return {"metadata": {"labels": {"k": value}}}

        ops: list[Callable[[], Any]] = [
            lambda: store.create(CONFIGMAPS, {"metadata": {"name": "a"}}, namespace="default"),
            lambda: store.create(
                CONFIGMAPS, {"metadata": {"name": "b", "labels": {"k": "v"}}}, namespace="other"
            ),
            lambda: store.patch(CONFIGMAPS, "a", merge, label("v"), namespace="default"),
            lambda: store.patch(CONFIGMAPS, "a", merge, {"data": {"x": "1"}}, namespace="default"),
            lambda: store.patch(CONFIGMAPS, "a", merge, label("w"), namespace="default"),
            lambda: store.delete(CONFIGMAPS, "a", namespace="default"),
        ]
        for op in ops:
            await asyncio.get_running_loop().run_in_executor(None, op)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            got += await watcher.next(0.2) or []
        await asyncio.sleep(0.2)
        got += await watcher.next(0.01) or []
        await hub.close()
        return _events(got)

    events = asyncio.run(scenario())
    revs = [int(r) for _, _, r in events]
    assert [(t, n) for t, n, _ in events] == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert revs == sorted(revs) and revs[-1] == store.revision - 1  # DELETED at the label change
    store.close()


def test_hub_resume_and_gone(tmp_path: Path) -> None:
    store = Store(tmp_path / "kube.db")
    start = store.revision
    for i in range(3):
        store.create(CONFIGMAPS, {"metadata": {"name": f"c{i}"}}, namespace="default")

    async def scenario() -> tuple[list[tuple[str, str, str]], bool]:
        hub = await _hub(store)
        watcher, first = await hub.watch(WatchFilter(CONFIGMAPS), start, None)
        assert watcher.position == store.revision
        store.compact(store.revision)
        try:
            await hub.watch(WatchFilter(CONFIGMAPS), start, None)
            gone = False
        except Gone:
            gone = True
        await hub.close()
        return _events(first), gone

    events, gone = asyncio.run(scenario())
    assert [(t, n) for t, n, _ in events] == [("ADDED", "c0"), ("ADDED", "c1"), ("ADDED", "c2")]
    assert gone
    store.close()


def test_hub_closes_slow_watchers(tmp_path: Path) -> None:
    store = Store(tmp_path / "kube.db")

    async def scenario() -> tuple[str | None, str | None, int]:
        hub = await _hub(store, limit=5)
        slow, _ = await hub.watch(WatchFilter(CONFIGMAPS), store.revision, None)
        other, _ = await hub.watch(WatchFilter(CONFIGMAPS), store.revision, None)
        received = 0
        for i in range(12):
            await asyncio.get_running_loop().run_in_executor(
                None,
                partial(
                    store.create, CONFIGMAPS, {"metadata": {"name": f"s{i}"}}, namespace="default"
                ),
            )
            await asyncio.sleep(0.01)
            received += len(await other.next(0.5) or [])
        assert hub.closed_slow == 1
        await hub.close()
        return slow.closed, other.closed, received

    slow_closed, other_closed, received = asyncio.run(scenario())
    assert slow_closed == "too slow"
    assert other_closed == "server shutting down" and received == 12
    store.close()


# ---- over HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(api: ApiHarness) -> Client:
    api.store.create(NAMESPACES, {"metadata": {"name": "w"}})
    return api.client("admin")


CMS = "/api/v1/namespaces/w/configmaps"


def _lines(resp_body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp_body.splitlines() if line.strip()]


def test_timeout_ends_the_stream(api: ApiHarness, admin: Client) -> None:
    start = time.monotonic()
    resp = admin.request(
        "GET", f"{CMS}?watch=1&resourceVersion={api.store.revision}&timeoutSeconds=1"
    )
    assert resp.status == 200 and resp.body == b""
    assert 0.9 < time.monotonic() - start < 5


def test_compacted_watch_is_one_error_event(api: ApiHarness, admin: Client) -> None:
    old = api.store.revision
    api.store.create(CONFIGMAPS, {"metadata": {"name": "gone"}}, namespace="w")
    api.store.compact(api.store.revision)
    resp = admin.request("GET", f"{CMS}?watch=1&resourceVersion={old}")
    assert resp.status == 200
    (event,) = _lines(resp.body)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith(f"too old resource version: {old} (")


def test_table_watch_and_include_object(api: ApiHarness, admin: Client) -> None:
    rv = api.store.revision
    for name in ("t1", "t2"):
        api.store.create(CONFIGMAPS, {"metadata": {"name": name}}, namespace="w")
    table = "application/json;as=Table;v=v1;g=meta.k8s.io"
    url = f"{CMS}?watch=1&resourceVersion={rv}&timeoutSeconds=1&includeObject=Object"
    events = _lines(admin.request("GET", url, headers={"Accept": table}).body)
    assert [e["object"]["kind"] for e in events] == ["Table", "Table"]
    assert [c["name"] for c in events[0]["object"]["columnDefinitions"]] == ["Name", "Age"]
    assert events[1]["object"]["columnDefinitions"] == []  # sent once per stream, as Kubernetes
    assert events[1]["object"]["rows"][0]["object"]["metadata"]["name"] == "t2"
    listed = admin.request("GET", f"{CMS}?includeObject=None", headers={"Accept": table}).json()
    assert listed["kind"] == "Table" and "object" not in listed["rows"][0]
    partial = admin.request(
        "GET",
        CMS,
        headers={"Accept": "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"},
    ).json()
    assert partial["kind"] == "PartialObjectMetadataList" and "data" not in partial["items"][0]
    as_yaml = admin.request("GET", f"{CMS}/t1", headers={"Accept": "application/yaml"})
    assert as_yaml.body.startswith(b"apiVersion: v1\n") or b"kind: ConfigMap" in as_yaml.body


def test_send_initial_events_and_single_object_watch(api: ApiHarness, admin: Client) -> None:
    api.store.create(CONFIGMAPS, {"metadata": {"name": "single"}}, namespace="w")
    query = (
        "watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        "&resourceVersion=0&timeoutSeconds=1"
    )
    events = _lines(
        admin.request("GET", f"{CMS}?{query}&fieldSelector=metadata.name%3Dsingle").body
    )
    assert [e["type"] for e in events[:2]] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    one = _lines(admin.request("GET", f"{CMS}/single?watch=1&timeoutSeconds=1").body)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in one] == [("ADDED", "single")]


def test_list_pages_and_delete_collection(api: ApiHarness, admin: Client) -> None:
    api.store.create(NAMESPACES, {"metadata": {"name": "dc"}})
    for i in range(5):
        api.store.create(
            CONFIGMAPS,
            {"metadata": {"name": f"p{i}", "labels": {"g": "a" if i < 3 else "b"}}},
            namespace="dc",
        )
    base = "/api/v1/namespaces/dc/configmaps"
    page = admin.request("GET", f"{base}?limit=2").json()
    assert [i["metadata"]["name"] for i in page["items"]] == ["p0", "p1"]
    rest = admin.request("GET", f"{base}?limit=10&continue={page['metadata']['continue']}").json()
    assert [i["metadata"]["name"] for i in rest["items"]] == ["p2", "p3", "p4"]
    gone = admin.request("DELETE", f"{base}?labelSelector=g%3Da").json()
    assert gone["kind"] == "ConfigMapList" and len(gone["items"]) == 3
    left = admin.request("GET", base).json()
    assert [i["metadata"]["name"] for i in left["items"]] == ["p3", "p4"]
    deleted = admin.request(
        "DELETE",
        "/api/v1/namespaces/dc",
        {"kind": "DeleteOptions", "propagationPolicy": "Background"},
    )
    assert deleted.status == 200
    assert admin.request("GET", "/api/v1/namespaces/dc").status == 404
    assert admin.request("GET", base).json()["items"] == []
    status = admin.request("DELETE", "/api/v1/namespaces/w/configmaps/t1").json()
    assert status["kind"] == "Status" and status["status"] == "Success"
    assert status["details"]["name"] == "t1" and status["details"]["kind"] == "configmaps"
