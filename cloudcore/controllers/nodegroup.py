"""NodeGroup controller: labels member nodes `apps.kubeedge.io/belonging-to={group}`.

KubeEdge's `apps.kubeedge.io/v1alpha1` NodeGroup selects nodes by name (`spec.nodes`) and/or by
labels (`spec.matchLabels`; empty selects nothing, as in KubeEdge). A node belongs to at most
one group. When several groups select a node, **the oldest group wins** (by
`creationTimestamp`, then name): a pure function of the current objects, so every replica of
the controller and every restart agrees. (KubeEdge's controller instead keeps whichever group
labelled the node first, which depends on history.)

Every reconcile computes the whole membership and:
- sets the label on member nodes whose label is missing or names another group, removes it
  from nodes no group selects any more (including nodes of deleted groups, which KubeEdge
  handles with a finalizer), with JSON merge patches of `metadata.labels`;
- writes each group's `status.nodeStatuses`, sorted by node name, as KubeEdge does:
  `{nodeName, readyStatus: Ready|NotReady|Unknown, selectionStatus: Succeeded|Failed,
  selectionStatusReason}` — Failed with `node does not exist` for a listed node that does not
  exist, and with `node already belongs to NodeGroup "X"` for a node another (older) group won.

Not done: KubeEdge's eviction of pods pinned to the group (`nodeSelector` on the label) from a
node that leaves it; the finalizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cloudcore.controllers import pods as p
from cloudcore.controllers.actions import Action, Patch, Result, Update
from cloudcore.controllers.conditions import condition, parse_time
from cloudcore.controllers.view import View
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import NODEGROUPS, NODES, ResourceInfo

Obj = dict[str, Any]

BELONGING_TO = "apps.kubeedge.io/belonging-to"
GLOBAL_KEY = ("", "*")
_READY = {"True": "Ready", "False": "NotReady"}


def _group_order(group: Mapping[str, Any]) -> tuple[float, str]:
    return parse_time(p.meta(group).get("creationTimestamp")) or 0.0, p.name_of(group)


def selects(group: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """True if the group names the node or its `matchLabels` (non-empty) all match."""
    spec = p.spec(group)
    if p.name_of(node) in (spec.get("nodes") or []):
        return True
    match = spec.get("matchLabels")
    if not isinstance(match, Mapping) or not match:
        return False
    node_labels = p.labels(node)
    return all(node_labels.get(k) == v for k, v in match.items())


def memberships(
    groups: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """node name -> the group it belongs to (oldest selecting group wins)."""
    active = sorted((g for g in groups if not p.is_terminating(g)), key=_group_order)
    owner: dict[str, str] = {}
    for node in nodes:
        for group in active:
            if selects(group, node):
                owner[p.name_of(node)] = p.name_of(group)
                break
    return owner


def ready_status(node: Mapping[str, Any] | None) -> str:
    """KubeEdge's ReadyStatus of a node: Ready, NotReady or Unknown."""
    cond = condition(node, "Ready")
    return _READY.get(str(cond.get("status")) if cond else "", "Unknown")


def node_statuses(
    group: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], owner: Mapping[str, str]
) -> list[Obj]:
    """The group's `status.nodeStatuses`."""
    name = p.name_of(group)
    by_name = {p.name_of(n): n for n in nodes}
    out: dict[str, Obj] = {}
    for node in nodes:
        if not selects(group, node):
            continue
        node_name = p.name_of(node)
        entry: Obj = {"nodeName": node_name, "readyStatus": ready_status(node)}
        winner = owner.get(node_name)
        if winner == name:
            entry["selectionStatus"] = "Succeeded"
        else:
            entry["selectionStatus"] = "Failed"
            entry["selectionStatusReason"] = f'node already belongs to NodeGroup "{winner}"'
        out[node_name] = entry
    for listed in p.spec(group).get("nodes") or []:
        if isinstance(listed, str) and listed not in by_name:
            out[listed] = {
                "nodeName": listed,
                "readyStatus": "Unknown",
                "selectionStatus": "Failed",
                "selectionStatusReason": "node does not exist",
            }
    return [out[k] for k in sorted(out)]


def reconcile_nodegroups(
    groups: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
) -> Result:
    """Node label patches and NodeGroup status updates for the whole cluster."""
    owner = memberships(groups, nodes)
    actions: list[Action] = []
    for node in sorted(nodes, key=p.name_of):
        node_name = p.name_of(node)
        want = owner.get(node_name)
        have = p.labels(node).get(BELONGING_TO)
        if want == have:
            continue
        actions.append(
            Patch(
                NODES,
                "",
                node_name,
                {"metadata": {"labels": {BELONGING_TO: want}}},
                reason=f"member of {want}" if want else f"left {have}",
            )
        )
    for group in sorted(groups, key=p.name_of):
        if p.is_terminating(group):
            continue
        statuses = node_statuses(group, nodes, owner)
        current = p.status(group)
        if (current.get("nodeStatuses") or []) == statuses:
            continue
        body = {**group, "status": {**current, "nodeStatuses": statuses}}
        actions.append(Update(NODEGROUPS, body, "status", reason="membership changed"))
    return Result(tuple(actions))


def _node_relevant(change: Change) -> bool:
    if change.type != "MODIFIED" or change.old is None:
        return True
    return p.labels(change.old) != p.labels(change.object) or ready_status(
        change.old
    ) != ready_status(change.object)


class NodeGroupController:
    """The NodeGroup controller as a runner `Controller`: one global key, reconciled when a
    group changes or a node is added, deleted, relabelled or changes readiness."""

    name = "nodegroup"
    resources: tuple[ResourceInfo, ...] = (NODEGROUPS, NODES)

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> list[tuple[str, str]]:
        if resource.key == NODES.key and not _node_relevant(change):
            return []
        return [GLOBAL_KEY]

    def initial_keys(self, view: View) -> list[tuple[str, str]]:
        return [GLOBAL_KEY]

    def reconcile(self, key: tuple[str, str], view: View, now: float) -> Result:
        return reconcile_nodegroups(view.list(NODEGROUPS), view.list(NODES))
