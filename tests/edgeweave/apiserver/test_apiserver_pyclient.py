"""The official Python `kubernetes` client against the embedded API: list, watch, resume from a
resourceVersion, 410 Gone after compaction, then relist."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from edgeweave.apiserver.testing import ApiHarness
from edgeweave.kube.resources import CONFIGMAPS, NAMESPACES

NS = "pyclient"
K8S: Any = kubernetes  # the client is typed only in parts; these tests use it dynamically
ApiException: type[Exception] = K8S.client.exceptions.ApiException


@pytest.fixture(scope="module")
def v1(api: ApiHarness) -> Iterator[Any]:
    api.store.create(NAMESPACES, {"metadata": {"name": NS}})
    api_client = K8S.config.new_client_from_config(config_file=str(api.admin_kubeconfig))
    try:
        yield K8S.client.CoreV1Api(api_client)
    finally:
        api_client.close()


def _cm(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def _collect(v1: Any, count: int, **kwargs: Any) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of the first `count` events of a watch."""
    w = K8S.watch.Watch()
    out: list[tuple[str, str, str]] = []
    for event in w.stream(
        v1.list_namespaced_config_map, namespace=NS, timeout_seconds=10, **kwargs
    ):
        obj = event["object"]
        out.append((event["type"], obj.metadata.name, obj.metadata.resource_version))
        if len(out) >= count:
            w.stop()
    return out


def test_list_and_create(v1: Any) -> None:
    v1.create_namespaced_config_map(NS, _cm("first", a="1"))
    listed = v1.list_namespaced_config_map(NS)
    assert [i.metadata.name for i in listed.items] == ["first"]
    assert int(listed.metadata.resource_version) > 0
    assert listed.items[0].data == {"a": "1"}
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_config_map(NS, _cm("first"))
    failure: Any = err.value
    assert failure.status == 409 and "already exists" in str(failure.body)


def test_watch_from_current_state_then_changes(v1: Any) -> None:
    v1.create_namespaced_config_map(NS, _cm("w1"))
    w = K8S.watch.Watch()
    seen: list[tuple[str, str]] = []
    for event in w.stream(v1.list_namespaced_config_map, namespace=NS, timeout_seconds=10):
        seen.append((event["type"], event["object"].metadata.name))
        if seen == [("ADDED", "first"), ("ADDED", "w1")]:
            v1.patch_namespaced_config_map("w1", NS, {"data": {"x": "y"}})
        if ("MODIFIED", "w1") in seen:
            w.stop()
    assert seen[:2] == [("ADDED", "first"), ("ADDED", "w1")]
    assert ("MODIFIED", "w1") in seen


def test_resume_from_resource_version(v1: Any) -> None:
    rv = v1.list_namespaced_config_map(NS).metadata.resource_version
    made = [v1.create_namespaced_config_map(NS, _cm(f"r{i}")) for i in range(3)]
    v1.delete_namespaced_config_map("r0", NS)
    events = _collect(v1, 4, resource_version=rv)
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "r0"), ("ADDED", "r1"), ("ADDED", "r2"), ("DELETED", "r0"),
    ]  # fmt: skip
    assert [int(r) for _, _, r in events[:3]] == [int(m.metadata.resource_version) for m in made]
    # resuming from the middle gives exactly what follows
    tail = _collect(v1, 2, resource_version=events[1][2])
    assert [(t, n) for t, n, _ in tail] == [("ADDED", "r2"), ("DELETED", "r0")]


def test_compacted_resource_version_is_410_then_relist(api: ApiHarness, v1: Any) -> None:
    old = v1.list_namespaced_config_map(NS).metadata.resource_version
    for i in range(3):
        v1.create_namespaced_config_map(NS, _cm(f"c{i}"))
    api.store.compact(api.store.revision)
    with pytest.raises(ApiException) as err:
        _collect(v1, 1, resource_version=old)
    failure: Any = err.value
    assert failure.status == 410
    assert "too old resource version" in str(failure.reason)
    fresh = v1.list_namespaced_config_map(NS)  # relist, then watch from its revision
    names = {i.metadata.name for i in fresh.items}
    assert {"c0", "c1", "c2"} <= names
    v1.create_namespaced_config_map(NS, _cm("after"))
    events = _collect(v1, 1, resource_version=fresh.metadata.resource_version)
    assert events[0][:2] == ("ADDED", "after")
    assert api.store.get(CONFIGMAPS, "after", namespace=NS)["metadata"]["name"] == "after"


def test_label_selector_watch_and_bookmarks(v1: Any) -> None:
    rv = v1.list_namespaced_config_map(NS).metadata.resource_version
    v1.create_namespaced_config_map(
        NS, {**_cm("sel"), "metadata": {"name": "sel", "labels": {"k": "v"}}}
    )
    v1.create_namespaced_config_map(NS, _cm("unsel"))
    v1.patch_namespaced_config_map("sel", NS, {"metadata": {"labels": {"k": "w"}}})
    w = K8S.watch.Watch()
    seen: list[tuple[str, str]] = []
    for event in w.stream(
        v1.list_namespaced_config_map,
        namespace=NS,
        label_selector="k=v",
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    ):
        name = event["raw_object"]["metadata"].get("name", "")
        seen.append((event["type"], name))
        if event["type"] == "BOOKMARK":
            w.stop()
    # stopped matching -> DELETED; then, idle, a BOOKMARK (after bookmark_interval_s = 1 s)
    assert seen == [("ADDED", "sel"), ("DELETED", "sel"), ("BOOKMARK", "")]
