"""Garbage collection of pods whose owner Deployment is gone (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from cloudcore.controllers.actions import Delete, OwnerCheck, Result
from cloudcore.controllers.gc import GarbageCollector, reconcile_orphan
from cloudcore.controllers.view import StaticView
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import DEPLOYMENTS, PODS

Obj = dict[str, Any]


def pod(owner_kind: str = "Deployment", api: str = "apps/v1", uid: str = "d1", **meta: Any) -> Obj:
    ref = {"apiVersion": api, "kind": owner_kind, "name": "web", "uid": uid, "controller": True}
    return {
        "metadata": {
            "name": "web-x",
            "namespace": "default",
            "uid": "p1",
            "ownerReferences": [ref],
            **meta,
        }
    }


DEPLOY = {"metadata": {"name": "web", "namespace": "default", "uid": "d1"}}


@pytest.mark.parametrize(
    ("the_pod", "owner", "orphan"),
    [
        (pod(), DEPLOY, False),
        (pod(), None, True),
        (pod(uid="old-uid"), DEPLOY, True),
        (pod(owner_kind="ReplicaSet"), None, False),
        (pod(api="apps/v1beta1"), None, False),
        (pod(deletionTimestamp="2024-01-01T00:00:00Z"), None, False),
    ],
    ids=["owner-alive", "owner-gone", "owner-replaced", "other-kind", "other-api", "already-going"],
)
def test_gc_orphans(the_pod: Obj, owner: Obj | None, orphan: bool) -> None:
    result = reconcile_orphan(the_pod, lambda ns, name: owner)
    if not orphan:
        assert result == Result()
        return
    uid = the_pod["metadata"]["ownerReferences"][0]["uid"]
    assert result.actions == (
        Delete(
            PODS,
            "default",
            "web-x",
            uid="p1",
            owner_check=OwnerCheck(DEPLOYMENTS, "default", "web", uid),
            reason=f"owner deployment web ({uid}) is gone",
        ),
    )


def test_gc_keys_follow_deleted_deployments() -> None:
    gc = GarbageCollector()
    view = StaticView({PODS: [pod()], DEPLOYMENTS: []})
    assert list(gc.keys_for(DEPLOYMENTS, Change("DELETED", DEPLOY, DEPLOY), view)) == [
        ("default", "web-x")
    ]
    assert list(gc.keys_for(DEPLOYMENTS, Change("ADDED", DEPLOY, None), view)) == []
    assert list(gc.keys_for(PODS, Change("ADDED", pod(owner_kind="Job"), None), view)) == []
    assert list(gc.keys_for(PODS, Change("ADDED", pod(), None), view)) == [("default", "web-x")]
    assert list(gc.initial_keys(view)) == [("default", "web-x")]
    assert len(gc.reconcile(("default", "web-x"), view, 0.0).actions) == 1
