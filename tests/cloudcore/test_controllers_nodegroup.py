"""NodeGroup reconcile: membership, conflicts, labels, status (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from cloudcore.controllers.actions import Patch, Update
from cloudcore.controllers.nodegroup import (
    BELONGING_TO,
    NodeGroupController,
    memberships,
    reconcile_nodegroups,
)
from cloudcore.controllers.view import StaticView
from edgeweave.kube.informer import Change
from edgeweave.kube.objects import rfc3339
from edgeweave.kube.resources import NODEGROUPS, NODES

NOW = 1_700_000_000.0
Obj = dict[str, Any]


def group(
    name: str, *, nodes: list[str] | None = None, match: dict[str, str] | None = None, age: int = 0
) -> Obj:
    spec: Obj = {}
    if nodes is not None:
        spec["nodes"] = nodes
    if match is not None:
        spec["matchLabels"] = match
    return {
        "apiVersion": "apps.kubeedge.io/v1alpha1",
        "kind": "NodeGroup",
        "metadata": {"name": name, "creationTimestamp": rfc3339(NOW - age), "resourceVersion": "4"},
        "spec": spec,
    }


def node(name: str, labels: dict[str, str] | None = None, ready: str | None = "True") -> Obj:
    conditions = [] if ready is None else [{"type": "Ready", "status": ready}]
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "status": {"conditions": conditions},
    }


@pytest.mark.parametrize(
    ("groups", "nodes", "expected"),
    [
        ([group("g", nodes=["a"])], [node("a"), node("b")], {"a": "g"}),
        ([group("g", match={"zone": "x"})], [node("a", {"zone": "x"}), node("b")], {"a": "g"}),
        ([group("g", match={})], [node("a")], {}),
        (
            [group("young", nodes=["a"], age=1), group("old", match={"zone": "x"}, age=9)],
            [node("a", {"zone": "x"})],
            {"a": "old"},
        ),
        ([group("b", nodes=["a"]), group("a", nodes=["a"])], [node("a")], {"a": "a"}),
    ],
    ids=["by-name", "by-labels", "empty-match-selects-nothing", "oldest-wins", "same-age-by-name"],
)
def test_nodegroup_membership(
    groups: list[Obj], nodes: list[Obj], expected: dict[str, str]
) -> None:
    assert memberships(groups, nodes) == expected


def test_nodegroup_labels_and_status() -> None:
    groups = [
        group("east", nodes=["a", "ghost"], age=10),
        group("west", match={"zone": "w"}, age=5),
    ]
    nodes = [
        node("a", {"zone": "w"}),
        node("b", {"zone": "w", BELONGING_TO: "east"}, ready="False"),
        node("c", {BELONGING_TO: "deleted-group"}),
        node("d", {BELONGING_TO: "west", "zone": "w"}, ready=None),
    ]
    result = reconcile_nodegroups(groups, nodes)
    patches = [(a.name, a.body) for a in result.actions if isinstance(a, Patch)]
    assert patches == [
        ("a", {"metadata": {"labels": {BELONGING_TO: "east"}}}),
        ("b", {"metadata": {"labels": {BELONGING_TO: "west"}}}),
        ("c", {"metadata": {"labels": {BELONGING_TO: None}}}),
    ]
    statuses = {
        a.name: a.body["status"]["nodeStatuses"] for a in result.actions if isinstance(a, Update)
    }
    assert all(a.subresource == "status" for a in result.actions if isinstance(a, Update))
    assert statuses["east"] == [
        {"nodeName": "a", "readyStatus": "Ready", "selectionStatus": "Succeeded"},
        {
            "nodeName": "ghost",
            "readyStatus": "Unknown",
            "selectionStatus": "Failed",
            "selectionStatusReason": "node does not exist",
        },
    ]
    assert statuses["west"] == [
        {
            "nodeName": "a",
            "readyStatus": "Ready",
            "selectionStatus": "Failed",
            "selectionStatusReason": 'node already belongs to NodeGroup "east"',
        },
        {"nodeName": "b", "readyStatus": "NotReady", "selectionStatus": "Succeeded"},
        {"nodeName": "d", "readyStatus": "Unknown", "selectionStatus": "Succeeded"},
    ]
    # Applying the result makes the next reconcile a no-op.
    labelled = []
    for n in nodes:
        labels = dict(n["metadata"]["labels"])
        owner = memberships(groups, nodes).get(n["metadata"]["name"])
        labels.pop(BELONGING_TO, None)
        if owner:
            labels[BELONGING_TO] = owner
        labelled.append({**n, "metadata": {**n["metadata"], "labels": labels}})
    settled = [{**g, "status": {"nodeStatuses": statuses[g["metadata"]["name"]]}} for g in groups]
    assert reconcile_nodegroups(settled, labelled).actions == ()


def test_nodegroup_deleted_group_releases_nodes() -> None:
    going = group("g", nodes=["a"])
    going["metadata"]["deletionTimestamp"] = rfc3339(NOW)
    result = reconcile_nodegroups([going], [node("a", {BELONGING_TO: "g"})])
    assert [(a.name, a.body) for a in result.actions if isinstance(a, Patch)] == [
        ("a", {"metadata": {"labels": {BELONGING_TO: None}}})
    ]


def test_nodegroup_controller_ignores_heartbeats() -> None:
    ctl = NodeGroupController()
    view = StaticView({})
    n = node("a")
    beat = {**n, "status": {**n["status"], "heartbeat": "1"}}
    assert list(ctl.keys_for(NODES, Change("MODIFIED", beat, n), view)) == []
    relabel = node("a", {"zone": "x"})
    assert list(ctl.keys_for(NODES, Change("MODIFIED", relabel, n), view)) == [("", "*")]
    assert list(ctl.keys_for(NODEGROUPS, Change("ADDED", group("g"), None), view)) == [("", "*")]
    full = StaticView({NODEGROUPS: [group("g", nodes=["a"])], NODES: [n]})
    assert len(ctl.reconcile(("", "*"), full, NOW).actions) == 2
