"""Scheduler: binds pending pods to a Ready node that fits, spreading by pod count.

A much smaller kube-scheduler. For each pending pod (no `spec.nodeName`, not finished, not being
deleted, `schedulerName` ours, no `schedulingGates`), oldest first, the filters run in the
order of kube-scheduler's default profile, and the first one that fails names the node's reason:

1. NodeUnschedulable: a cordoned node (`spec.unschedulable`) is skipped unless the pod
   tolerates `node.kubernetes.io/unschedulable:NoSchedule`.
2. TaintToleration: every NoSchedule/NoExecute taint must be tolerated (PreferNoSchedule is a
   preference, ignored). A node whose `Ready` condition is not True counts as tainted
   `node.kubernetes.io/not-ready:NoSchedule`, as Kubernetes' node lifecycle controller taints
   it (`TaintNodesByCondition`); on a real cluster the taint is there anyway.
3. NodeAffinity: `spec.nodeSelector` and the required node affinity terms
   (`matchExpressions` with In/NotIn/Exists/DoesNotExist/Gt/Lt, `matchFields` on
   `metadata.name`).

Among the nodes that pass, the one with the fewest pods wins (counting pods bound earlier in
the same pass); equal counts go to the alphabetically first node, so the result is
deterministic. A pod that fits nowhere gets the condition kube-scheduler writes,
`PodScheduled=False, reason Unschedulable`, with its message (`0/3 nodes are available:
1 node(s) didn't match Pod's node affinity/selector, 2 node(s) had untolerated taint
{node.kubernetes.io/not-ready: }.`), and is tried again when a pod or node changes.

Not done: resources (requests vs allocatable), ports, inter-pod (anti-)affinity, topology
spread, preferred affinity, priorities and preemption, volume binding.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cloudcore.controllers import pods as p
from cloudcore.controllers.actions import Bind, Patch, Result
from cloudcore.controllers.conditions import condition, condition_is_true, parse_time, rfc3339
from cloudcore.controllers.view import View
from edgeweave.kube.informer import Change
from edgeweave.kube.patch import STRATEGIC_MERGE_PATCH
from edgeweave.kube.resources import NODES, PODS, ResourceInfo

Obj = dict[str, Any]

DEFAULT_SCHEDULER = "default-scheduler"
TAINT_NOT_READY = "node.kubernetes.io/not-ready"
TAINT_UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
BLOCKING_EFFECTS = frozenset(("NoSchedule", "NoExecute"))
REASON_SELECTOR = "node(s) didn't match Pod's node affinity/selector"
REASON_UNSCHEDULABLE = "node(s) were unschedulable"
GLOBAL_KEY = ("", "*")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Tunables of the scheduler."""

    scheduler_name: str = DEFAULT_SCHEDULER
    """Pods whose `spec.schedulerName` is this (or unset) are ours."""
    report_unschedulable: bool = True
    """Write `PodScheduled=False` on pods that fit nowhere."""


def is_pending(pod: Mapping[str, Any], scheduler_name: str = DEFAULT_SCHEDULER) -> bool:
    """True if the pod waits for this scheduler."""
    spec = p.spec(pod)
    return (
        not p.node_name(pod)
        and p.is_active(pod)
        and (spec.get("schedulerName") or DEFAULT_SCHEDULER) == scheduler_name
        and not spec.get("schedulingGates")
    )


def node_taints(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The node's taints plus the implicit ones for not Ready and cordoned nodes."""
    taints = [t for t in p.spec(node).get("taints") or [] if isinstance(t, Mapping)]
    keys = {t.get("key") for t in taints}
    if not condition_is_true(node, "Ready") and TAINT_NOT_READY not in keys:
        taints.append({"key": TAINT_NOT_READY, "effect": "NoSchedule"})
    if p.spec(node).get("unschedulable") is True and TAINT_UNSCHEDULABLE not in keys:
        taints.append({"key": TAINT_UNSCHEDULABLE, "effect": "NoSchedule"})
    return taints


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' `Toleration.ToleratesTaint`: an empty effect matches every effect; operator
    Exists with an empty key matches every taint; Equal (the default) needs the same value."""
    for tol in tolerations:
        effect = tol.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        key = tol.get("key") or ""
        if key and key != taint.get("key"):
            continue
        operator = tol.get("operator") or "Equal"
        if operator == "Exists":
            return True
        if operator == "Equal" and key and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _match_expression(expr: Mapping[str, Any], value: str | None) -> bool:
    op, values = expr.get("operator"), [str(v) for v in expr.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and len(values) == 1:
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _term_matches(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches no objects (Kubernetes' NodeSelectorTerm)
    node_labels = p.labels(node)
    for expr in exprs:
        if not isinstance(expr, Mapping):
            return False
        key = str(expr.get("key") or "")
        if not _match_expression(expr, node_labels.get(key)):
            return False
    for expr in fields:
        if not isinstance(expr, Mapping) or expr.get("key") != "metadata.name":
            return False
        if not _match_expression(expr, p.name_of(node)):
            return False
    return True


def matches_node_affinity(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """`spec.nodeSelector` (every pair) and the required node affinity (any term)."""
    node_labels = p.labels(node)
    selector = p.spec(pod).get("nodeSelector") or {}
    if any(node_labels.get(k) != v for k, v in selector.items()):
        return False
    affinity = (p.spec(pod).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if isinstance(required, Mapping):
        terms = required.get("nodeSelectorTerms") or []
        return any(isinstance(t, Mapping) and _term_matches(t, node) for t in terms)
    return True


def _taint_text(taint: Mapping[str, Any]) -> str:
    return f"{{{taint.get('key', '')}: {taint.get('value', '')}}}"


def unfit_reason(pod: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """Why the pod cannot go to this node (kube-scheduler's words), or None if it fits."""
    tolerations = [t for t in p.spec(pod).get("tolerations") or [] if isinstance(t, Mapping)]
    if p.spec(node).get("unschedulable") is True and not tolerates(
        tolerations, {"key": TAINT_UNSCHEDULABLE, "effect": "NoSchedule"}
    ):
        return REASON_UNSCHEDULABLE
    for taint in node_taints(node):
        if taint.get("key") == TAINT_UNSCHEDULABLE:
            continue
        if taint.get("effect") in BLOCKING_EFFECTS and not tolerates(tolerations, taint):
            return f"node(s) had untolerated taint {_taint_text(taint)}"
    if not matches_node_affinity(pod, node):
        return REASON_SELECTOR
    return None


def unschedulable_message(total: int, reasons: Iterable[str]) -> str:
    """`0/3 nodes are available: 1 node(s) ..., 2 node(s) ....` (reasons sorted, as
    kube-scheduler sorts its histogram)."""
    counts = collections.Counter(reasons)
    parts = sorted(f"{n} {reason}" for reason, n in counts.items())
    if not parts:
        return f"0/{total} nodes are available: no nodes available to schedule pods."
    return f"0/{total} nodes are available: {', '.join(parts)}."


def _pod_order(pod: Mapping[str, Any]) -> tuple[float, str, str]:
    created = parse_time(p.meta(pod).get("creationTimestamp")) or 0.0
    return created, p.namespace_of(pod), p.name_of(pod)


def schedule(
    pods: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    *,
    now: float,
    config: SchedulerConfig = SchedulerConfig(),
) -> Result:
    """Bind every pending pod that fits somewhere; mark the others unschedulable."""
    counts: collections.Counter[str] = collections.Counter(
        p.node_name(pod) for pod in pods if p.node_name(pod) and not p.is_terminal(pod)
    )
    ordered_nodes = sorted(
        (n for n in nodes if not p.is_terminating(n)), key=lambda n: p.name_of(n)
    )
    pending = sorted(
        (pod for pod in pods if is_pending(pod, config.scheduler_name)), key=_pod_order
    )
    actions: list[Bind | Patch] = []
    for pod in pending:
        fits: list[str] = []
        reasons: list[str] = []
        for node in ordered_nodes:
            why = unfit_reason(pod, node)
            if why is None:
                fits.append(p.name_of(node))
            else:
                reasons.append(why)
        if fits:
            best = min(fits, key=lambda n: (counts[n], n))
            counts[best] += 1
            actions.append(
                Bind(
                    p.namespace_of(pod),
                    p.name_of(pod),
                    p.uid_of(pod),
                    str(p.meta(pod).get("resourceVersion") or ""),
                    best,
                    reason=f"fewest pods ({counts[best] - 1}) among {len(fits)} fitting node(s)",
                )
            )
            continue
        if not config.report_unschedulable:
            continue
        message = unschedulable_message(len(ordered_nodes), reasons)
        cond = condition(pod, "PodScheduled")
        if (
            cond is not None
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
            and cond.get("message") == message
        ):
            continue
        actions.append(
            Patch(
                PODS,
                p.namespace_of(pod),
                p.name_of(pod),
                {
                    "metadata": {"resourceVersion": p.meta(pod).get("resourceVersion")},
                    "status": {
                        "conditions": [
                            {
                                "type": "PodScheduled",
                                "status": "False",
                                "reason": "Unschedulable",
                                "message": message,
                                "lastProbeTime": None,
                                "lastTransitionTime": rfc3339(now),
                            }
                        ]
                    },
                },
                content_type=STRATEGIC_MERGE_PATCH,
                subresource="status",
                reason=message,
            )
        )
    return Result(tuple(actions))


def _node_relevant(change: Change) -> bool:
    if change.type != "MODIFIED" or change.old is None:
        return True
    old, new = change.old, change.object
    return (
        p.labels(old) != p.labels(new)
        or p.spec(old) != p.spec(new)
        or condition_is_true(old, "Ready") != condition_is_true(new, "Ready")
    )


class Scheduler:
    """The scheduler as a runner `Controller`: one global key, reconciled whenever a pending
    pod or a node (readiness, labels, taints) changes."""

    name = "scheduler"
    resources: tuple[ResourceInfo, ...] = (PODS, NODES)

    def __init__(self, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.config = config

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> list[tuple[str, str]]:
        if resource.key == NODES.key:
            return [GLOBAL_KEY] if _node_relevant(change) else []
        objs = [change.object] + ([change.old] if change.old is not None else [])
        if change.type == "DELETED" or any(is_pending(o, self.config.scheduler_name) for o in objs):
            return [GLOBAL_KEY]
        return []

    def initial_keys(self, view: View) -> list[tuple[str, str]]:
        return [GLOBAL_KEY]

    def reconcile(self, key: tuple[str, str], view: View, now: float) -> Result:
        return schedule(view.list(PODS), view.list(NODES), now=now, config=self.config)
