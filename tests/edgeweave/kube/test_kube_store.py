"""The SQLite object store: CRUD semantics, concurrency, list/watch, compaction, restarts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeweave.kube.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    NotFound,
    PatchError,
    TooLargeResourceVersion,
    UnsupportedMediaType,
)
from edgeweave.kube.patch import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from edgeweave.kube.resources import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NAMESPACES,
    NODEGROUPS,
    NODES,
    PODS,
    SECRETS,
    SERVICES,
)
from edgeweave.kube.store import Commit, Preconditions, Store, StoreConfig, WatchEvent


class Clock:
    """A settable clock (seconds since the epoch)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    with Store(tmp_path / "kube.db", clock=clock) as s:
        yield s


def pod(name: str, *, node: str = "", labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx"}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def cm(name: str, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": dict(data)}


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


# ---- create / get -----------------------------------------------------------------------------


def test_create_sets_metadata_and_takes_the_next_revision(store: Store) -> None:
    start = store.revision
    assert start == 4  # the four bootstrap namespaces
    made = store.create(PODS, pod("web"), namespace="default")
    meta = made["metadata"]
    assert made["apiVersion"] == "v1" and made["kind"] == "Pod"
    assert len(meta["uid"]) == 36 and meta["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert meta["generation"] == 1 and meta["resourceVersion"] == str(start + 1)
    assert meta["namespace"] == "default"
    assert made["status"] == {"phase": "Pending"}  # status is reset on create
    assert store.get(PODS, "web", namespace="default") == made
    assert json.loads(store.get_raw(PODS, "web", namespace="default")) == made
    assert store.revision == start + 1


def test_create_conflicts_and_validation(store: Store) -> None:
    store.create(CONFIGMAPS, cm("a"), namespace="default")
    with pytest.raises(AlreadyExists) as exists:
        store.create(CONFIGMAPS, cm("a"), namespace="default")
    status = exists.value.to_status()
    assert status["code"] == 409 and status["reason"] == "AlreadyExists"
    assert status["message"] == 'configmaps "a" already exists'
    assert status["details"] == {"name": "a", "kind": "configmaps"}
    with pytest.raises(Invalid) as bad:
        store.create(
            CONFIGMAPS,
            {"metadata": {"name": "Bad_Name", "labels": {"a": "-x"}}},
            namespace="default",
        )
    assert bad.value.code == 422
    assert str(bad.value).startswith('ConfigMap "Bad_Name" is invalid: [metadata.name: Invalid')
    assert {c.field for c in bad.value.causes} == {"metadata.name", "metadata.labels"}
    with pytest.raises(Invalid, match="name is required"):
        store.create(CONFIGMAPS, {"data": {}}, namespace="default")
    with pytest.raises(BadRequest, match="resourceVersion should not be set"):
        store.create(
            CONFIGMAPS, {"metadata": {"name": "b", "resourceVersion": "3"}}, namespace="default"
        )
    with pytest.raises(BadRequest, match=r"kind in the data \(Secret\)"):
        store.create(CONFIGMAPS, {"kind": "Secret", "metadata": {"name": "b"}}, namespace="default")
    with pytest.raises(BadRequest, match="does not match the namespace"):
        store.create(CONFIGMAPS, {"metadata": {"name": "b", "namespace": "x"}}, namespace="default")
    with pytest.raises(Invalid, match="DNS-1035"):
        store.create(SERVICES, {"metadata": {"name": "1svc"}, "spec": {}}, namespace="default")
    with pytest.raises(NotFound, match='namespaces "nope" not found'):
        store.create(CONFIGMAPS, cm("b"), namespace="nope")
    assert store.revision == 5  # nothing failed consumed a revision


def test_generate_name_and_cluster_scope(store: Store) -> None:
    made = store.create(SECRETS, {"metadata": {"generateName": "tok-"}}, namespace="default")
    assert made["metadata"]["name"].startswith("tok-") and len(made["metadata"]["name"]) == 9
    node = store.create(
        NODES,
        {"metadata": {"name": "n1", "namespace": "ignored"}, "status": {"capacity": {"cpu": "2"}}},
    )
    assert "namespace" not in node["metadata"]
    assert node["status"] == {"capacity": {"cpu": "2"}}  # nodes may set status on create
    ng = store.create(NODEGROUPS, {"metadata": {"name": "g"}, "spec": {}, "status": {"x": 1}})
    assert "status" not in ng  # custom resources drop status on create
    assert store.get(NODES, "n1")["metadata"]["uid"] == node["metadata"]["uid"]


def test_not_found_status_names_the_object(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get(DEPLOYMENTS, "web", namespace="default")
    assert info.value.to_status() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "web" not found',
        "reason": "NotFound",
        "details": {"name": "web", "group": "apps", "kind": "deployments"},
        "code": 404,
    }
    with pytest.raises(BadRequest, match="namespace is required"):
        store.get(PODS, "x")


# ---- update: optimistic concurrency and generation ---------------------------------------------


def test_stale_resource_version_is_a_conflict(store: Store) -> None:
    first = store.create(CONFIGMAPS, cm("a", k="1"), namespace="default")
    second = store.update(CONFIGMAPS, dict(first, data={"k": "2"}))
    assert rv(second) == rv(first) + 1
    with pytest.raises(Conflict) as info:
        store.update(CONFIGMAPS, dict(first, data={"k": "3"}))
    assert str(info.value) == (
        'Operation cannot be fulfilled on configmaps "a": the object has been modified; please '
        "apply your changes to the latest version and try again"
    )
    assert info.value.code == 409 and info.value.reason == "Conflict"
    # without a resourceVersion the update is unconditional
    third = store.update(
        CONFIGMAPS, {"metadata": {"name": "a"}, "data": {"k": "3"}}, namespace="default"
    )
    assert third["data"] == {"k": "3"} and third["metadata"]["uid"] == first["metadata"]["uid"]
    with pytest.raises(Conflict, match="UID in precondition"):
        store.update(CONFIGMAPS, {"metadata": {"name": "a", "uid": "x"}}, namespace="default")
    with pytest.raises(NotFound):
        store.update(CONFIGMAPS, cm("missing"), namespace="default")
    with pytest.raises(BadRequest, match="does not match the name on the URL"):
        store.update(CONFIGMAPS, cm("a"), namespace="default", name="b")


def test_concurrent_writers_one_wins(tmp_path: Path) -> None:
    """Two connections (as two processes would) read the same version; one update wins."""
    a = Store(tmp_path / "k.db")
    b = Store(tmp_path / "k.db")
    try:
        made = a.create(CONFIGMAPS, cm("x", n="0"), namespace="default")
        seen_by_b = b.get(CONFIGMAPS, "x", namespace="default")
        a.update(CONFIGMAPS, dict(made, data={"n": "a"}))
        with pytest.raises(Conflict):
            b.update(CONFIGMAPS, dict(seen_by_b, data={"n": "b"}))
        b.create(CONFIGMAPS, cm("y"), namespace="default")  # b sees a's revision
        revs = [e.revision for e in a.events_since(0).events]
        assert revs == list(range(1, a.revision + 1))
    finally:
        a.close()
        b.close()


def test_threads_get_unique_consecutive_revisions(store: Store) -> None:
    start = store.revision
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                store.create(CONFIGMAPS, cm(f"t{t}-{i}"), namespace="default")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    revs = [e.revision for e in store.events_since(start).events]
    assert revs == list(range(start + 1, start + 101))


def test_generation_bumps_on_spec_changes_only(store: Store) -> None:
    d = store.create(
        DEPLOYMENTS, {"metadata": {"name": "d"}, "spec": {"replicas": 1}}, namespace="default"
    )
    assert d["metadata"]["generation"] == 1
    d = store.update(DEPLOYMENTS, {**d, "metadata": {**d["metadata"], "labels": {"a": "b"}}})
    assert d["metadata"]["generation"] == 1  # metadata only
    d = store.update_status(DEPLOYMENTS, {**d, "status": {"replicas": 1}})
    assert d["metadata"]["generation"] == 1 and d["status"] == {"replicas": 1}
    d = store.update(DEPLOYMENTS, {**d, "spec": {"replicas": 2}})
    assert d["metadata"]["generation"] == 2
    # a status update changes only status, a main update never changes status
    d2 = store.update_status(
        DEPLOYMENTS,
        {
            **d,
            "spec": {"replicas": 9},
            "status": {"replicas": 2},
            "metadata": {**d["metadata"], "labels": {}},
        },
    )
    assert d2["spec"] == {"replicas": 2} and d2["metadata"]["labels"] == {"a": "b"}
    assert d2["status"] == {"replicas": 2}
    d3 = store.update(DEPLOYMENTS, {**d2, "status": {"replicas": 7}})
    assert d3 == d2  # nothing it may change changed: no new revision
    # immutable metadata is kept
    d4 = store.update(
        DEPLOYMENTS,
        {
            **d2,
            "spec": {"replicas": 3},
            "metadata": {**d2["metadata"], "uid": "", "generation": 99, "creationTimestamp": "x"},
        },
    )
    assert d4["metadata"]["uid"] == d["metadata"]["uid"]
    assert d4["metadata"]["generation"] == 3
    assert d4["metadata"]["creationTimestamp"] == d["metadata"]["creationTimestamp"]
    with pytest.raises(NotFound, match="configmaps/status"):
        store.update_status(CONFIGMAPS, cm("a"), namespace="default")


def test_noop_update_writes_nothing(store: Store) -> None:
    made = store.create(CONFIGMAPS, cm("a", k="v"), namespace="default")
    again = store.update(CONFIGMAPS, made)
    assert again == made and store.revision == rv(made)


def test_put_creates_for_services_but_not_pods(store: Store) -> None:
    svc = store.update(
        SERVICES,
        {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}},
        namespace="default",
    )
    assert svc["metadata"]["generation"] == 1 and svc["status"] == {"loadBalancer": {}}
    with pytest.raises(NotFound):
        store.update(PODS, pod("p"), namespace="default")


# ---- patch and scale --------------------------------------------------------------------------


def test_patch_types(store: Store) -> None:
    store.create(
        DEPLOYMENTS,
        {
            "metadata": {"name": "d"},
            "spec": {
                "replicas": 1,
                "template": {
                    "spec": {
                        "containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]
                    }
                },
            },
        },
        namespace="default",
    )
    d = store.patch(
        DEPLOYMENTS, "d", MERGE_PATCH, b'{"metadata":{"labels":{"x":"1"}}}', namespace="default"
    )
    assert d["metadata"]["labels"] == {"x": "1"} and d["metadata"]["generation"] == 1
    d = store.patch(
        DEPLOYMENTS,
        "d",
        STRATEGIC_MERGE_PATCH,
        {"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "z"}]}}}},
        namespace="default",
    )
    assert [c["image"] for c in d["spec"]["template"]["spec"]["containers"]] == ["x", "z"]
    assert d["metadata"]["generation"] == 2
    d = store.patch(
        DEPLOYMENTS,
        "d",
        JSON_PATCH,
        [{"op": "replace", "path": "/spec/replicas", "value": 4}],
        namespace="default",
    )
    assert d["spec"]["replicas"] == 4
    before = store.revision
    with pytest.raises(PatchError):
        store.patch(
            DEPLOYMENTS,
            "d",
            JSON_PATCH,
            [{"op": "test", "path": "/spec/replicas", "value": 1}],
            namespace="default",
        )
    with pytest.raises(Conflict):
        store.patch(
            DEPLOYMENTS,
            "d",
            MERGE_PATCH,
            {"metadata": {"resourceVersion": "1"}},
            namespace="default",
        )
    with pytest.raises(BadRequest, match="does not match the name"):
        store.patch(DEPLOYMENTS, "d", MERGE_PATCH, {"metadata": {"name": "e"}}, namespace="default")
    assert store.revision == before  # failed patches leave the store unchanged
    store.create(NODEGROUPS, {"metadata": {"name": "g"}, "spec": {"nodes": ["a"]}})
    with pytest.raises(UnsupportedMediaType):
        store.patch(NODEGROUPS, "g", STRATEGIC_MERGE_PATCH, {"spec": {}})
    g = store.patch(NODEGROUPS, "g", MERGE_PATCH, {"spec": {"nodes": ["b"]}})
    assert g["spec"]["nodes"] == ["b"]
    s = store.patch(
        DEPLOYMENTS,
        "d",
        MERGE_PATCH,
        {"status": {"readyReplicas": 1}},
        namespace="default",
        subresource="status",
    )
    assert s["status"] == {"readyReplicas": 1}


def test_scale_subresource(store: Store) -> None:
    store.create(
        DEPLOYMENTS,
        {
            "metadata": {"name": "d"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "d"}}},
        },
        namespace="default",
    )
    scale = store.get_scale(DEPLOYMENTS, "d", namespace="default")
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 2} and scale["status"]["selector"] == "app=d"
    scale = store.patch(
        DEPLOYMENTS,
        "d",
        MERGE_PATCH,
        {"spec": {"replicas": 5}},
        namespace="default",
        subresource="scale",
    )
    assert scale["spec"]["replicas"] == 5
    assert store.get(DEPLOYMENTS, "d", namespace="default")["spec"]["replicas"] == 5
    stale = {"metadata": {"name": "d", "resourceVersion": "1"}, "spec": {"replicas": 1}}
    with pytest.raises(Conflict):
        store.update(DEPLOYMENTS, stale, namespace="default", subresource="scale")
    with pytest.raises(Invalid):
        store.update(
            DEPLOYMENTS,
            {"metadata": {"name": "d"}, "spec": {"replicas": -1}},
            namespace="default",
            subresource="scale",
        )
    with pytest.raises(NotFound):
        store.get_scale(PODS, "x", namespace="default")


def test_guaranteed_update(store: Store) -> None:
    store.create(CONFIGMAPS, cm("a", n="0"), namespace="default")

    def bump(obj: dict[str, Any]) -> dict[str, Any]:
        obj["data"]["n"] = str(int(obj["data"]["n"]) + 1)
        return obj

    for _ in range(3):
        out = store.guaranteed_update(CONFIGMAPS, "a", bump, namespace="default")
    assert out["data"] == {"n": "3"}


# ---- delete -----------------------------------------------------------------------------------


def test_delete_with_preconditions(store: Store) -> None:
    made = store.create(CONFIGMAPS, cm("a"), namespace="default")
    with pytest.raises(Conflict, match="UID in precondition: nope"):
        store.delete(CONFIGMAPS, "a", namespace="default", preconditions=Preconditions(uid="nope"))
    with pytest.raises(Conflict, match="ResourceVersion in precondition: 1"):
        store.delete(
            CONFIGMAPS, "a", namespace="default", preconditions=Preconditions(resource_version="1")
        )
    gone = store.delete(
        CONFIGMAPS,
        "a",
        namespace="default",
        preconditions=Preconditions(uid=made["metadata"]["uid"], resource_version=str(rv(made))),
    )
    assert gone.gone and rv(gone.object) == rv(made) + 1
    last = store.events_since(rv(made)).events[-1]
    assert (last.type, last.revision, last.name) == ("DELETED", rv(made) + 1, "a")
    with pytest.raises(NotFound):
        store.delete(CONFIGMAPS, "a", namespace="default")


def test_finalizers_hold_the_object_until_removed(store: Store) -> None:
    store.create(
        CONFIGMAPS, {"metadata": {"name": "a", "finalizers": ["x.io/keep"]}}, namespace="default"
    )
    marked = store.delete(CONFIGMAPS, "a", namespace="default")
    assert not marked.gone and marked.object["metadata"]["deletionTimestamp"]
    again = store.delete(CONFIGMAPS, "a", namespace="default")
    assert again.object == marked.object  # a second delete changes nothing
    with pytest.raises(Invalid, match="no new finalizers"):
        store.update(
            CONFIGMAPS,
            {
                **marked.object,
                "metadata": {**marked.object["metadata"], "finalizers": ["x.io/keep", "y.io/new"]},
            },
        )
    cleared = store.update(
        CONFIGMAPS, {**marked.object, "metadata": {**marked.object["metadata"], "finalizers": []}}
    )
    assert cleared["metadata"]["deletionTimestamp"]
    with pytest.raises(NotFound):
        store.get(CONFIGMAPS, "a", namespace="default")
    types = [e.type for e in store.events_since(rv(marked.object) - 1).events]
    assert types == ["MODIFIED", "DELETED"]


def test_scheduled_pods_are_deleted_gracefully(store: Store, clock: Clock) -> None:
    store.create(PODS, pod("unscheduled"), namespace="default")
    assert store.delete(PODS, "unscheduled", namespace="default").gone
    store.create(PODS, pod("p", node="n1"), namespace="default")
    marked = store.delete(PODS, "p", namespace="default")
    meta = marked.object["metadata"]
    assert not marked.gone and meta["deletionGracePeriodSeconds"] == 30
    assert meta["deletionTimestamp"] == "2023-11-14T22:13:50Z" and meta["generation"] == 2
    shorter = store.delete(PODS, "p", namespace="default", grace_period_seconds=5)
    assert shorter.object["metadata"]["deletionGracePeriodSeconds"] == 5
    assert store.delete(PODS, "p", namespace="default", grace_period_seconds=0).gone
    s = Store(store.path, config=StoreConfig(graceful_deletion=False))
    s.create(PODS, pod("q", node="n1"), namespace="default")
    assert s.delete(PODS, "q", namespace="default").gone
    s.close()


def test_namespace_delete_cascades(store: Store) -> None:
    store.create(NAMESPACES, {"metadata": {"name": "team"}})
    ns = store.get(NAMESPACES, "team")
    assert ns["spec"]["finalizers"] == ["kubernetes"] and ns["status"] == {"phase": "Active"}
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team"}
    for i in range(3):
        store.create(CONFIGMAPS, cm(f"c{i}"), namespace="team")
    store.create(PODS, pod("p", node="n1"), namespace="team")
    store.create(CONFIGMAPS, cm("other"), namespace="default")
    result = store.delete(NAMESPACES, "team")
    assert not result.gone and result.object["status"]["phase"] == "Terminating"
    assert store.list_objects(CONFIGMAPS, namespace="team").count == 0
    with pytest.raises(Forbidden, match="being terminated"):
        store.create(CONFIGMAPS, cm("late"), namespace="team")
    assert store.finalize_namespaces() == []  # the pod waits for its node
    store.delete(PODS, "p", namespace="team", grace_period_seconds=0)
    assert store.finalize_namespaces() == ["team"]
    with pytest.raises(NotFound):
        store.get(NAMESPACES, "team")
    assert store.get(CONFIGMAPS, "other", namespace="default")
    store.create(NAMESPACES, {"metadata": {"name": "empty"}})
    assert store.delete_namespace("empty").gone
    kept = store.update(NAMESPACES, {"metadata": {"name": "default"}, "spec": {"finalizers": []}})
    assert kept["spec"]["finalizers"] == ["kubernetes"]  # only the namespace controller drops it
    for name in ("x1", "x2"):
        store.create(NAMESPACES, {"metadata": {"name": name, "labels": {"tmp": "1"}}})
        store.create(CONFIGMAPS, cm("c"), namespace=name)
    deleted = store.delete_collection(NAMESPACES, label_selector="tmp")
    assert [d.gone for d in deleted] == [True, True]
    assert store.list_objects(CONFIGMAPS, field_selector="metadata.name=c").count == 0


def test_delete_collection(store: Store) -> None:
    for i in range(4):
        store.create(
            CONFIGMAPS,
            {"metadata": {"name": f"c{i}", "labels": {"odd": str(i % 2)}}},
            namespace="default",
        )
    commits: list[Commit] = []
    store.subscribe(commits.append)
    deleted = store.delete_collection(CONFIGMAPS, namespace="default", label_selector="odd=1")
    assert [d.object["metadata"]["name"] for d in deleted] == ["c1", "c3"]
    assert len(commits) == 1  # one transaction
    names = [o["metadata"]["name"] for o in store.list_objects(CONFIGMAPS).objects()]
    assert names == ["c0", "c2"]


# ---- list -------------------------------------------------------------------------------------


def _names(result: Any) -> list[str]:
    return [o["metadata"]["name"] for o in result.objects()]


def test_list_filters(store: Store) -> None:
    store.create(NAMESPACES, {"metadata": {"name": "b"}})
    for ns in ("default", "b"):
        for i, node in enumerate(["n1", "n2", ""]):
            p = pod(f"p{i}", node=node, labels={"app": "web" if i else "db", "idx": str(i)})
            store.create(PODS, p, namespace=ns)
    store.update_status(
        PODS, {"metadata": {"name": "p1"}, "status": {"phase": "Running"}}, namespace="b"
    )
    assert _names(store.list_objects(PODS, namespace="b")) == ["p0", "p1", "p2"]
    everything = store.list_objects(PODS)
    assert everything.count == 6 and everything.resource_version == store.revision
    keys = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in everything.objects()]
    assert keys == sorted(keys)
    assert _names(store.list_objects(PODS, namespace="b", label_selector="app=web")) == ["p1", "p2"]
    assert _names(store.list_objects(PODS, namespace="b", label_selector="idx>0,idx<2")) == ["p1"]
    assert store.list_objects(PODS, field_selector="spec.nodeName=n1").count == 2
    assert _names(store.list_objects(PODS, namespace="b", field_selector="spec.nodeName=")) == [
        "p2"
    ]
    assert store.list_objects(PODS, field_selector="status.phase=Running").count == 1
    assert store.list_objects(PODS, field_selector="metadata.namespace=b").count == 3
    assert store.list_objects(PODS, field_selector="metadata.name!=p0").count == 4
    assert store.list_objects(PODS, field_selector="spec.containers=x").count == 0
    assert store.list_objects(PODS, field_selector="metadata.labels.idx=2").count == 2
    assert store.list_objects(NAMESPACES, field_selector="metadata.name=b").count == 1
    with pytest.raises(BadRequest):
        store.list_objects(PODS, label_selector="a b")


def test_list_json_document(store: Store) -> None:
    store.create(CONFIGMAPS, cm("a"), namespace="default")
    doc = json.loads(store.list_objects(CONFIGMAPS).to_json(CONFIGMAPS))
    assert doc["kind"] == "ConfigMapList" and doc["apiVersion"] == "v1"
    assert doc["metadata"] == {"resourceVersion": str(store.revision)}
    assert [i["metadata"]["name"] for i in doc["items"]] == ["a"]
    empty = json.loads(store.list_objects(SECRETS).to_json(SECRETS))
    assert empty["items"] == []


def test_pagination_is_a_consistent_snapshot(store: Store) -> None:
    for i in range(10):
        store.create(CONFIGMAPS, cm(f"c{i}", v="orig"), namespace="default")
    page = store.list_objects(CONFIGMAPS, limit=4)
    assert _names(page) == ["c0", "c1", "c2", "c3"] and page.continue_token
    snapshot = page.resource_version
    # changes between pages must not show up in later pages
    store.delete(CONFIGMAPS, "c5", namespace="default")
    store.update(CONFIGMAPS, cm("c6", v="changed"), namespace="default")
    store.create(CONFIGMAPS, cm("c45"), namespace="default")
    store.delete(CONFIGMAPS, "c7", namespace="default")
    store.create(CONFIGMAPS, cm("c7", v="recreated"), namespace="default")
    seen = _names(page)
    token: str | None = page.continue_token
    while token:
        page = store.list_objects(CONFIGMAPS, limit=4, continue_token=token)
        assert page.resource_version == snapshot
        seen += _names(page)
        for obj in page.objects():
            assert obj["data"] == {"v": "orig"}
            assert int(obj["metadata"]["resourceVersion"]) <= snapshot
        token = page.continue_token
    assert seen == [f"c{i}" for i in range(10)]
    with pytest.raises(BadRequest, match="continue key is not valid"):
        store.list_objects(CONFIGMAPS, continue_token="garbage!")
    stale = store.list_objects(CONFIGMAPS, limit=2)
    store.create(CONFIGMAPS, cm("zz"), namespace="default")
    store.compact(store.revision)
    with pytest.raises(Gone) as info:
        store.list_objects(CONFIGMAPS, limit=2, continue_token=stale.continue_token)
    assert info.value.code == 410 and "continue parameter is too old" in str(info.value)


def test_list_at_exact_revision_replays_history(store: Store) -> None:
    states: dict[int, list[tuple[str, str]]] = {}

    def record() -> None:
        cur = store.list_objects(CONFIGMAPS, namespace="default")
        states[cur.resource_version] = [
            (o["metadata"]["name"], o["data"]["v"]) for o in cur.objects()
        ]

    for step in range(30):
        name = f"c{step % 7}"
        try:
            store.create(CONFIGMAPS, cm(name, v=str(step)), namespace="default")
        except AlreadyExists:
            if step % 3:
                store.update(CONFIGMAPS, cm(name, v=str(step)), namespace="default")
            else:
                store.delete(CONFIGMAPS, name, namespace="default")
        record()
    for revision, expected in states.items():
        got = store.list_objects(CONFIGMAPS, namespace="default", resource_version=revision)
        assert [(o["metadata"]["name"], o["data"]["v"]) for o in got.objects()] == expected
        paged: list[tuple[str, str]] = []
        page = store.list_objects(
            CONFIGMAPS, namespace="default", resource_version=revision, limit=2
        )
        while True:
            paged += [(o["metadata"]["name"], o["data"]["v"]) for o in page.objects()]
            if not page.continue_token:
                break
            page = store.list_objects(CONFIGMAPS, limit=2, continue_token=page.continue_token)
        assert paged == expected
    with pytest.raises(TooLargeResourceVersion) as info:
        store.list_objects(CONFIGMAPS, resource_version=store.revision + 1)
    assert info.value.code == 504


# ---- watch ------------------------------------------------------------------------------------


def _summary(events: list[WatchEvent]) -> list[tuple[str, str]]:
    return [(e.type, e.name) for e in events]


def test_watch_events_in_order_with_filters(store: Store) -> None:
    start = store.revision
    store.create(PODS, pod("a", labels={"app": "web"}), namespace="default")
    store.create(PODS, pod("b", labels={"app": "db"}), namespace="default")
    store.create(CONFIGMAPS, cm("c"), namespace="default")
    store.update(PODS, pod("b", labels={"app": "web"}), namespace="default")  # starts matching
    store.update(PODS, pod("a", labels={"app": "x"}), namespace="default")  # stops matching
    store.update(PODS, pod("b", labels={"app": "web", "v": "2"}), namespace="default")
    store.delete(PODS, "b", namespace="default")
    store.delete(PODS, "a", namespace="default")  # not matching before: invisible
    everything = store.events_since(start)
    assert [e.revision for e in everything.events] == list(range(start + 1, start + 9))
    assert everything.revision == store.revision
    assert _summary(store.events_since(start, PODS).events) == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "b"),
        ("MODIFIED", "a"),
        ("MODIFIED", "b"),
        ("DELETED", "b"),
        ("DELETED", "a"),
    ]
    filtered = store.events_since(start, PODS, label_selector="app=web")
    assert _summary(filtered.events) == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
        ("MODIFIED", "b"),
        ("DELETED", "b"),
    ]
    stopped = filtered.events[2].object()
    assert stopped["metadata"]["labels"] == {"app": "web"}  # its last matching state ...
    assert stopped["metadata"]["resourceVersion"] == str(filtered.events[2].revision)  # ... now
    assert filtered.revision == store.revision
    assert _summary(store.events_since(start, CONFIGMAPS, namespace="kube-system").events) == []
    assert store.events_since(start, PODS, field_selector="metadata.name=a").events[0].name == "a"
    line = json.loads(filtered.events[0].to_json())
    assert line["type"] == "ADDED" and line["object"]["metadata"]["name"] == "a"


def test_watch_batches_and_cursor(store: Store) -> None:
    start = store.revision
    for i in range(10):
        store.create(CONFIGMAPS, cm(f"c{i}"), namespace="default")
    batch = store.events_since(start, limit=4)
    assert len(batch.events) == 4 and batch.revision == start + 4
    batch = store.events_since(start, CONFIGMAPS, label_selector="nothing", limit=4)
    assert batch.events == [] and batch.revision == store.revision
    cursor = store.watch(CONFIGMAPS, resource_version=start + 8)
    assert [e.name for e in cursor.poll()] == ["c8", "c9"]
    assert cursor.poll() == [] and cursor.revision == store.revision
    store.delete(CONFIGMAPS, "c0", namespace="default")
    assert _summary(cursor.poll()) == [("DELETED", "c0")]
    fresh = store.watch(CONFIGMAPS)  # "get state and start at most recent"
    initial = fresh.poll()
    assert [e.type for e in initial] == ["ADDED"] * 9 and fresh.revision == store.revision
    assert initial[0].revision == start + 2
    assert fresh.poll() == []
    future = store.events_since(store.revision + 5)
    assert future.events == [] and future.revision == store.revision + 5


def test_subscribers_hear_commits(store: Store) -> None:
    commits: list[Commit] = []
    stop = store.subscribe(commits.append)
    store.subscribe(lambda c: (_ for _ in ()).throw(RuntimeError("boom")))  # logged, ignored
    store.create(CONFIGMAPS, cm("a"), namespace="default")
    with store.transaction():
        store.create(PODS, pod("p"), namespace="default")
        store.create(CONFIGMAPS, cm("b"), namespace="default")
    assert commits == [
        Commit(store.revision - 2, frozenset({"configmaps"})),
        Commit(store.revision, frozenset({"configmaps", "pods"})),
    ]
    store.update(CONFIGMAPS, store.get(CONFIGMAPS, "a", namespace="default"))  # no-op
    stop()
    store.create(CONFIGMAPS, cm("c"), namespace="default")
    assert len(commits) == 2


def test_transactions_roll_back(store: Store) -> None:
    start = store.revision
    with pytest.raises(RuntimeError), store.transaction():
        store.create(CONFIGMAPS, cm("a"), namespace="default")
        raise RuntimeError("abort")
    assert store.revision == start and store.list_objects(CONFIGMAPS).count == 0
    with store.transaction():
        store.create(CONFIGMAPS, cm("a"), namespace="default")
        with pytest.raises(AlreadyExists):
            store.create(CONFIGMAPS, cm("a"), namespace="default")
        store.create(CONFIGMAPS, cm("b"), namespace="default")
        assert store.revision == start + 2  # reads inside see the transaction
        assert store.list_objects(CONFIGMAPS).count == 2
    assert [e.revision for e in store.events_since(start).events] == [start + 1, start + 2]


def test_compaction_and_gone(tmp_path: Path) -> None:
    config = StoreConfig(history_keep=20, compact_interval=5, bootstrap_namespaces=("default",))
    store = Store(tmp_path / "k.db", config=config)
    for i in range(30):
        store.create(CONFIGMAPS, cm(f"c{i}"), namespace="default")
    # 31 revisions; once history exceeds 20 + 5 it is cut back to the last 20 (at 25 and 30)
    assert store.revision == 31 and store.compacted_revision == 10
    cursor = store.watch(CONFIGMAPS, resource_version=10)
    with pytest.raises(Gone) as info:
        store.events_since(9)
    assert str(info.value) == "too old resource version: 9 (10)"
    status = info.value.to_status()
    assert (status["code"], status["reason"]) == (410, "Expired")
    with pytest.raises(Gone):
        store.watch(CONFIGMAPS, resource_version=1)
    assert len(store.events_since(10).events) == 21
    assert store.compact(25) == 15
    with pytest.raises(Gone, match="too old resource version: 10 "):
        cursor.poll()  # the slow watcher must relist
    assert store.compact(3) == 0 and store.compact_keep(0) == 6
    assert store.events_since(store.revision).events == []
    with pytest.raises(Gone):
        store.list_objects(CONFIGMAPS, resource_version=20)
    assert store.list_objects(CONFIGMAPS).count == 30  # the objects themselves stay
    store.close()


def test_compaction_is_judged_per_resource(tmp_path: Path) -> None:
    config = StoreConfig(history_keep=0, bootstrap_namespaces=("default",))
    with Store(tmp_path / "k.db", config=config) as store:
        store.create(SECRETS, {"metadata": {"name": "s0"}}, namespace="default")
        quiet_since = store.revision
        for i in range(20):
            store.create(CONFIGMAPS, cm(f"c{i}"), namespace="default")  # revisions 3..22
        store.create(NAMESPACES, {"metadata": {"name": "other"}})  # 23
        store.create(SECRETS, {"metadata": {"name": "s1"}}, namespace="default")  # 24
        store.compact(23)
        # every configmap change but none of the secrets after quiet_since was compacted
        cursor = store.watch(SECRETS, resource_version=quiet_since)
        assert [e.name for e in cursor.poll()] == ["s1"]
        old = store.list_objects(SECRETS, resource_version=quiet_since)
        assert [o["metadata"]["name"] for o in old.objects()] == ["s0"]
        with pytest.raises(Gone, match=rf"too old resource version: {quiet_since} \(22\)"):
            store.watch(CONFIGMAPS, resource_version=quiet_since)
        with pytest.raises(Gone, match=rf"too old resource version: {quiet_since} \(23\)"):
            store.events_since(quiet_since)  # all resources: the global floor


def test_watch_resumes_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    with Store(path) as first:
        for i in range(5):
            first.create(CONFIGMAPS, cm(f"c{i}"), namespace="default")
        mark = first.revision
        first.update(CONFIGMAPS, cm("c1", v="x"), namespace="default")
        first.delete(CONFIGMAPS, "c2", namespace="default")
        cursor = first.watch(CONFIGMAPS, resource_version=mark)
        before = [(e.type, e.name, e.revision) for e in cursor.poll()]
    with Store(path) as second:
        assert second.revision == mark + 2
        cursor = second.watch(CONFIGMAPS, resource_version=mark)
        assert [(e.type, e.name, e.revision) for e in cursor.poll()] == before
        assert before == [("MODIFIED", "c1", mark + 1), ("DELETED", "c2", mark + 2)]
        made = second.create(CONFIGMAPS, cm("c9"), namespace="default")
        assert rv(made) == mark + 3
        assert second.list_objects(CONFIGMAPS).count == 5
