"""Scheduler reconcile: filters, spreading, unschedulable reporting (pure, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from cloudcore.controllers.actions import Bind, Patch
from cloudcore.controllers.scheduler import (
    Scheduler,
    SchedulerConfig,
    is_pending,
    schedule,
    tolerates,
    unschedulable_message,
)
from cloudcore.controllers.view import StaticView
from edgeweave.kube.informer import Change
from edgeweave.kube.objects import rfc3339
from edgeweave.kube.patch import STRATEGIC_MERGE_PATCH
from edgeweave.kube.resources import NODES, PODS

NOW = 1_700_000_000.0
Obj = dict[str, Any]


def node(
    name: str,
    *,
    ready: bool | None = True,
    labels: dict[str, str] | None = None,
    taints: list[Obj] | None = None,
    unschedulable: bool = False,
) -> Obj:
    spec: Obj = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    conditions = [] if ready is None else [{"type": "Ready", "status": str(ready)}]
    return {
        "metadata": {"name": name, "labels": labels or {}, "resourceVersion": "1"},
        "spec": spec,
        "status": {"conditions": conditions},
    }


def pod(name: str, *, on: str = "", created: int = 0, **spec: Any) -> Obj:
    body: Obj = {"containers": [{"name": "c", "image": "nginx"}], **spec}
    if on:
        body["nodeName"] = on
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "resourceVersion": "7",
            "creationTimestamp": rfc3339(NOW + created),
        },
        "spec": body,
        "status": {"phase": "Running" if on else "Pending"},
    }


def binds(actions: tuple[Any, ...]) -> list[tuple[str, str]]:
    return [(a.name, a.node) for a in actions if isinstance(a, Bind)]


@pytest.mark.parametrize(
    ("pods", "nodes", "expected"),
    [
        pytest.param(
            [pod(f"p{i}", created=i) for i in range(4)],
            [node("b"), node("a")],
            [("p0", "a"), ("p1", "b"), ("p2", "a"), ("p3", "b")],
            id="spread-ties-by-name",
        ),
        pytest.param(
            [
                pod("x1", on="a"),
                pod("x2", on="a"),
                pod("p0"),
                pod("p1", created=1),
                pod("p2", created=2),
            ],
            [node("a"), node("b")],
            [("p0", "b"), ("p1", "b"), ("p2", "a")],
            id="fewest-pods-first",
        ),
        pytest.param(
            [pod("p0")],
            [node("a", ready=False), node("b", ready=None), node("c")],
            [("p0", "c")],
            id="only-ready-nodes",
        ),
        pytest.param(
            [pod("p0", nodeSelector={"zone": "edge"})],
            [node("a"), node("b", labels={"zone": "edge"})],
            [("p0", "b")],
            id="node-selector",
        ),
        pytest.param(
            [pod("p0")],
            [node("a", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}]), node("b")],
            [("p0", "b")],
            id="untolerated-taint",
        ),
        pytest.param(
            [pod("p0", tolerations=[{"key": "k", "operator": "Equal", "value": "v"}])],
            [node("a", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}])],
            [("p0", "a")],
            id="tolerated-taint",
        ),
        pytest.param(
            [pod("p0")],
            [node("a", taints=[{"key": "k", "effect": "PreferNoSchedule"}])],
            [("p0", "a")],
            id="prefer-no-schedule-ignored",
        ),
        pytest.param(
            [pod("p0")],
            [
                node("a", unschedulable=True),
                node("b", taints=[{"key": "k", "effect": "NoExecute"}]),
            ],
            [],
            id="cordoned-and-noexecute",
        ),
        pytest.param(
            [pod("p0", tolerations=[{"operator": "Exists"}])],
            [node("a", ready=False)],
            [("p0", "a")],
            id="tolerate-everything",
        ),
        pytest.param(
            [
                pod(
                    "p0",
                    affinity={
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": "cpus", "operator": "Gt", "values": ["4"]}
                                        ]
                                    },
                                    {
                                        "matchFields": [
                                            {
                                                "key": "metadata.name",
                                                "operator": "In",
                                                "values": ["c"],
                                            }
                                        ]
                                    },
                                ]
                            }
                        }
                    },
                )
            ],
            [node("a", labels={"cpus": "2"}), node("b", labels={"cpus": "8"}), node("c")],
            [("p0", "b")],
            id="node-affinity-terms-ored",
        ),
        pytest.param(
            [
                pod("other", schedulerName="my-scheduler"),
                pod("gated", schedulingGates=[{"name": "wait"}]),
                {**pod("done"), "status": {"phase": "Succeeded"}},
                {
                    **pod("going"),
                    "metadata": {**pod("going")["metadata"], "deletionTimestamp": "x"},
                },
            ],
            [node("a")],
            [],
            id="not-ours-or-not-pending",
        ),
    ],
)
def test_scheduler_binds(
    pods: list[Obj], nodes: list[Obj], expected: list[tuple[str, str]]
) -> None:
    result = schedule(pods, nodes, now=NOW)
    assert binds(result.actions) == expected


def test_scheduler_bind_carries_pod_identity() -> None:
    (action,) = schedule([pod("p0")], [node("a")], now=NOW).actions
    assert action == Bind("default", "p0", "uid-p0", "7", "a", reason=action.reason)


def test_scheduler_reports_unschedulable_once() -> None:
    pods = [pod("p0", nodeSelector={"zone": "edge"})]
    nodes = [node("a"), node("b", ready=False), node("c", unschedulable=True)]
    (action,) = schedule(pods, nodes, now=NOW).actions
    assert isinstance(action, Patch)
    message = (
        "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
        "1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, "
        "1 node(s) were unschedulable."
    )
    assert action.subresource == "status"
    assert action.content_type == STRATEGIC_MERGE_PATCH
    assert action.body["status"]["conditions"] == [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": rfc3339(NOW),
        }
    ]
    reported = {**pods[0], "status": {"phase": "Pending", **action.body["status"]}}
    assert schedule([reported], nodes, now=NOW + 5).actions == ()
    assert (
        schedule(pods, nodes, now=NOW, config=SchedulerConfig(report_unschedulable=False)).actions
        == ()
    )


def test_scheduler_message_without_nodes() -> None:
    assert unschedulable_message(0, []) == (
        "0/0 nodes are available: no nodes available to schedule pods."
    )


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        ({"key": "k", "value": "v"}, {"key": "k", "value": "v", "effect": "NoSchedule"}, True),
        ({"key": "k", "value": "w"}, {"key": "k", "value": "v", "effect": "NoSchedule"}, False),
        (
            {"key": "k", "operator": "Exists"},
            {"key": "k", "value": "v", "effect": "NoSchedule"},
            True,
        ),
        (
            {"key": "k", "operator": "Exists", "effect": "NoExecute"},
            {"key": "k", "effect": "NoSchedule"},
            False,
        ),
        ({"operator": "Exists"}, {"key": "anything", "effect": "NoExecute"}, True),
        (
            {"operator": "Equal", "value": "v"},
            {"key": "k", "value": "v", "effect": "NoSchedule"},
            False,
        ),
    ],
)
def test_scheduler_tolerates(toleration: Obj, taint: Obj, expected: bool) -> None:
    assert tolerates([toleration], taint) is expected


def test_scheduler_controller_keys() -> None:
    scheduler = Scheduler()
    view = StaticView({})
    heartbeat = node("a")
    newer = {**heartbeat, "status": {**heartbeat["status"], "heartbeat": "later"}}
    assert list(scheduler.keys_for(NODES, Change("MODIFIED", newer, heartbeat), view)) == []
    not_ready = node("a", ready=False)
    assert list(scheduler.keys_for(NODES, Change("MODIFIED", not_ready, heartbeat), view)) == [
        ("", "*")
    ]
    assert list(scheduler.keys_for(PODS, Change("ADDED", pod("p"), None), view)) == [("", "*")]
    running = pod("q", on="a")
    assert list(scheduler.keys_for(PODS, Change("MODIFIED", running, running), view)) == []
    assert is_pending(pod("p")) and not is_pending(running)
    result = scheduler.reconcile(("", "*"), StaticView({PODS: [pod("p")], NODES: [node("a")]}), NOW)
    assert binds(result.actions) == [("p", "a")]
