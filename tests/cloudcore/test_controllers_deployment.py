"""Deployment reconcile: pod naming, scaling, rolling and Recreate updates, status (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cloudcore.controllers.actions import Create, Delete, Result, Update
from cloudcore.controllers.deployment import (
    POD_TEMPLATE_HASH,
    DeploymentController,
    fenceposts,
    reconcile_deployment,
    template_hash,
)
from cloudcore.controllers.view import StaticView
from edgeweave.kube.informer import Change
from edgeweave.kube.objects import rfc3339
from edgeweave.kube.resources import DEPLOYMENTS, PODS

NOW = 1_700_000_000.0
Obj = dict[str, Any]
UID = "d-uid"


def deployment(replicas: int = 3, image: str = "nginx:1", **spec: Any) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "uid": UID,
            "generation": 2,
            "resourceVersion": "10",
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
            **spec,
        },
        "status": {},
    }


def hash_of(d: Obj) -> str:
    return template_hash(d["spec"]["template"])


def pod(
    name: str,
    hash_: str,
    *,
    ready: bool = True,
    ready_at: float = NOW - 100,
    node: str = "n1",
    created: float = NOW - 200,
    owner: str = UID,
    terminating: bool = False,
) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": "default",
        "uid": f"uid-{name}",
        "labels": {"app": "web", POD_TEMPLATE_HASH: hash_},
        "creationTimestamp": rfc3339(created),
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "web",
                "uid": owner,
                "controller": True,
            }
        ],
    }
    if terminating:
        meta["deletionTimestamp"] = rfc3339(NOW)
    status: Obj = {"phase": "Running" if node else "Pending"}
    if ready:
        status["conditions"] = [
            {"type": "Ready", "status": "True", "lastTransitionTime": rfc3339(ready_at)}
        ]
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def creates(result: Result) -> list[Create]:
    return [a for a in result.actions if isinstance(a, Create)]


def deletes(result: Result) -> list[str]:
    return [a.name for a in result.actions if isinstance(a, Delete)]


def status_update(result: Result) -> Obj | None:
    updates = [a for a in result.actions if isinstance(a, Update)]
    return updates[0].body["status"] if updates else None


def test_deployment_template_hash_is_stable_and_safe() -> None:
    d = deployment()
    h = hash_of(d)
    assert h == hash_of(copy.deepcopy(d))
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789") and 1 <= len(h) <= 10
    assert h != hash_of(deployment(image="nginx:2"))
    assert template_hash(d["spec"]["template"], 1) != h


@pytest.mark.parametrize(
    ("replicas", "strategy", "expected"),
    [
        (4, {}, (1, 1)),
        (1, {}, (1, 0)),
        (10, {"rollingUpdate": {"maxSurge": "30%", "maxUnavailable": "30%"}}, (3, 3)),
        (3, {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}, (0, 1)),
        (2, {"rollingUpdate": {"maxSurge": 2, "maxUnavailable": "50%"}}, (2, 1)),
        (0, {}, (0, 0)),
        (4, {"rollingUpdate": {"maxSurge": "bogus"}}, (1, 1)),
    ],
)
def test_deployment_fenceposts(replicas: int, strategy: Obj, expected: tuple[int, int]) -> None:
    assert fenceposts(strategy, replicas) == expected


def test_deployment_creates_named_owned_pods_and_status() -> None:
    d = deployment(replicas=3)
    result = reconcile_deployment(d, [], now=NOW)
    made = creates(result)
    assert len(made) == 3
    body = made[0].body
    h = hash_of(d)
    assert body["metadata"]["generateName"] == f"web-{h}-"
    assert body["metadata"]["labels"] == {"app": "web", POD_TEMPLATE_HASH: h}
    assert body["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "web",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert body["spec"] == d["spec"]["template"]["spec"]
    status = status_update(result)
    assert status is not None
    assert status["observedGeneration"] == 2
    assert "replicas" not in status  # zero counts are omitted, as Go's omitempty does
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Available", "False", "MinimumReplicasUnavailable"),
        ("Progressing", "True", "ReplicaSetUpdated"),
    ]
    assert result.requeue_at == NOW + 600  # the progress deadline


def test_deployment_steady_state_is_idempotent() -> None:
    d = deployment(replicas=2)
    h = hash_of(d)
    pods = [pod("web-a", h), pod("web-b", h)]
    first = reconcile_deployment(d, pods, now=NOW)
    assert creates(first) == [] and deletes(first) == []
    status = status_update(first)
    assert status is not None
    assert {k: v for k, v in status.items() if k != "conditions"} == {
        "observedGeneration": 2,
        "replicas": 2,
        "updatedReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
    }
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Available", "True", "MinimumReplicasAvailable"),
        ("Progressing", "True", "NewReplicaSetAvailable"),
    ]
    settled = {**d, "status": status}
    assert reconcile_deployment(settled, pods, now=NOW + 30).actions == ()


def test_deployment_scale_down_picks_victims_in_kubernetes_order() -> None:
    d = deployment(replicas=2)
    h = hash_of(d)
    pods = [
        pod("old-ready", h, created=NOW - 500),
        pod("new-ready", h, created=NOW - 10, ready_at=NOW - 5),
        pod("not-ready", h, ready=False),
        pod("unscheduled", h, node="", ready=False),
        pod("other-owner", h, owner="someone-else"),
        pod("terminating", h, terminating=True),
    ]
    result = reconcile_deployment(d, pods, now=NOW)
    assert deletes(result) == ["unscheduled", "not-ready"]
    assert all(a.uid == f"uid-{a.name}" for a in result.actions if isinstance(a, Delete))
    assert creates(result) == []


def test_deployment_single_replica_rollout_waits_for_the_new_pod() -> None:
    old = deployment(replicas=1, image="nginx:1")
    d = deployment(replicas=1, image="nginx:2")
    h_old, h_new = hash_of(old), hash_of(d)
    step1 = reconcile_deployment(d, [pod("web-old", h_old)], now=NOW)
    assert len(creates(step1)) == 1 and deletes(step1) == []
    assert creates(step1)[0].body["metadata"]["labels"][POD_TEMPLATE_HASH] == h_new
    pending = [pod("web-old", h_old), pod("web-new", h_new, ready=False)]
    step2 = reconcile_deployment(d, pending, now=NOW)
    assert creates(step2) == [] and deletes(step2) == []
    ready = [pod("web-old", h_old), pod("web-new", h_new)]
    step3 = reconcile_deployment(d, ready, now=NOW)
    assert creates(step3) == [] and deletes(step3) == ["web-old"]


def test_deployment_rollout_of_four_respects_surge_and_unavailable() -> None:
    d = deployment(replicas=4, image="nginx:2")
    h_old = hash_of(deployment(image="nginx:1"))
    olds = [pod(f"old-{i}", h_old, created=NOW - 100 - i) for i in range(4)]
    result = reconcile_deployment(d, olds, now=NOW)
    assert len(creates(result)) == 1  # 4 + maxSurge 1
    assert deletes(result) == ["old-0"]  # keep 4 - maxUnavailable 1 available; newest first


def test_deployment_rollout_removes_unhealthy_old_pods_first() -> None:
    d = deployment(
        replicas=3,
        image="nginx:2",
        strategy={"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
    )
    h_old = hash_of(deployment(image="nginx:1"))
    olds = [pod("old-a", h_old), pod("old-b", h_old), pod("old-sick", h_old, ready=False)]
    # With maxUnavailable 0 nothing old may go before a new pod is available, sick or not
    # (Kubernetes' maxScaledDown = all - minAvailable - newUnavailable = 0) ...
    first = reconcile_deployment(d, olds, now=NOW)
    assert len(creates(first)) == 1 and deletes(first) == []
    # ... then the unavailable old pod goes first, and no available one yet.
    second = reconcile_deployment(d, [*olds, pod("new-1", hash_of(d))], now=NOW)
    assert creates(second) == [] and deletes(second) == ["old-sick"]


def test_deployment_recreate_deletes_then_waits_then_creates() -> None:
    d = deployment(replicas=2, image="nginx:2", strategy={"type": "Recreate"})
    h_old, h_new = hash_of(deployment(image="nginx:1")), hash_of(d)
    first = reconcile_deployment(d, [pod("a", h_old), pod("b", h_old)], now=NOW)
    assert sorted(deletes(first)) == ["a", "b"] and creates(first) == []
    waiting = reconcile_deployment(d, [pod("a", h_old, terminating=True)], now=NOW)
    assert deletes(waiting) == [] and creates(waiting) == []
    done = reconcile_deployment(d, [], now=NOW)
    assert len(creates(done)) == 2
    assert creates(done)[0].body["metadata"]["labels"][POD_TEMPLATE_HASH] == h_new


def test_deployment_min_ready_seconds_delays_availability() -> None:
    d = deployment(replicas=1, minReadySeconds=10)
    h = hash_of(d)
    result = reconcile_deployment(d, [pod("p", h, ready_at=NOW - 4)], now=NOW)
    status = status_update(result)
    assert status is not None and status.get("availableReplicas") is None
    assert status["readyReplicas"] == 1
    assert result.requeue_at == NOW + 6
    later = reconcile_deployment(
        {**d, "status": status}, [pod("p", h, ready_at=NOW - 4)], now=NOW + 6
    )
    later_status = status_update(later)
    assert later_status is not None and later_status["availableReplicas"] == 1


def test_deployment_progress_deadline_exceeded() -> None:
    d = deployment(replicas=1, progressDeadlineSeconds=60)
    h = hash_of(d)
    pods = [pod("p", h, ready=False)]
    first = reconcile_deployment(d, pods, now=NOW)
    status = status_update(first)
    assert status is not None and first.requeue_at == NOW + 60
    stuck = {**d, "status": status}
    assert reconcile_deployment(stuck, pods, now=NOW + 30).actions == ()
    assert reconcile_deployment(stuck, pods, now=NOW + 30).requeue_at == NOW + 60
    late = status_update(reconcile_deployment(stuck, pods, now=NOW + 61))
    assert late is not None
    progressing = next(c for c in late["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert progressing["lastTransitionTime"] == rfc3339(NOW + 61)


@pytest.mark.parametrize(
    ("change", "expected_reason"),
    [
        ({"paused": True}, "DeploymentPaused"),
        ({"selector": {"matchLabels": {"app": "other"}}}, None),
    ],
)
def test_deployment_paused_or_invalid_makes_no_pods(
    change: Obj, expected_reason: str | None
) -> None:
    d = deployment(replicas=2, **change)
    result = reconcile_deployment(d, [], now=NOW)
    assert creates(result) == [] and deletes(result) == []
    status = status_update(result)
    assert status is not None
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    if expected_reason:
        assert reasons["Progressing"] == expected_reason
    else:
        assert reasons["ReplicaFailure"] == "InvalidSelector"


def test_deployment_being_deleted_is_left_to_gc() -> None:
    d = deployment()
    d["metadata"]["deletionTimestamp"] = rfc3339(NOW)
    assert reconcile_deployment(d, [], now=NOW) == Result()


def test_deployment_controller_maps_pods_to_owner() -> None:
    ctl = DeploymentController()
    d = deployment()
    h = hash_of(d)
    view = StaticView({DEPLOYMENTS: [d], PODS: []})
    owned = pod("p", h)
    assert list(ctl.keys_for(PODS, Change("ADDED", owned, None), view)) == [("default", "web")]
    orphan = {**owned, "metadata": {**owned["metadata"], "ownerReferences": []}}
    assert list(ctl.keys_for(PODS, Change("ADDED", orphan, None), view)) == []
    assert list(ctl.initial_keys(view)) == [("default", "web")]
    assert len(creates(ctl.reconcile(("default", "web"), view, NOW))) == 3
    assert ctl.reconcile(("default", "gone"), view, NOW) == Result()
