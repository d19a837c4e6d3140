"""Deployment controller: keeps `spec.replicas` pods of the current template, rolls updates.

Kubernetes puts a ReplicaSet per template between a Deployment and its pods; we manage the
pods directly but keep what users and tools see of that model:

- Pods are created with `generateName: {deployment}-{hash}-` (so named
  `{deployment}-{hash}-{suffix}` like a ReplicaSet's pods), the template's labels and
  annotations plus `pod-template-hash: {hash}`, and an ownerReference to the Deployment
  (`controller: true`, `blockOwnerDeletion: true`). The hash is FNV-1a (32 bit) of the
  template (and `status.collisionCount`), printed the way Kubernetes' `ComputeHash` prints it
  (decimal digits mapped to `bcdfghjklmnpqrstvwxz2456789`); the digest input is canonical JSON,
  not Go's object dump, so the values differ from a real cluster's.
- A pod belongs to the Deployment if its controller ownerReference has the Deployment's uid
  (pods are not adopted by selector). "Active" pods are the ones not finished and not being
  deleted (`controller.FilterActivePods`); those of the current hash are "new", others "old".
- **RollingUpdate** (default) follows `rollingUpdate.maxSurge` / `maxUnavailable` (ints or
  percentages, default 25% each; surge rounds up, unavailable down, both 0 means 1 unavailable,
  as `ResolveFenceposts`): new pods are created while the total stays within
  `replicas + maxSurge`; old pods are deleted while at least `replicas - maxUnavailable` pods stay
  available — first the unavailable old pods, then available ones (`cleanupUnhealthyReplicas`,
  `scaleDownOldReplicaSetsForRollingUpdate`). With one replica this means: the new pod is
  created, the old one deleted once the new one is available.
- **Recreate** deletes every old pod and creates new ones once no old pod is left.
- A pod is available once Ready for `minReadySeconds` (`IsPodAvailable`); the result asks to be
  reconciled again when the next pod becomes available.
- Scaling down removes pods in `controller.ActivePods` order (unscheduled, pending, not ready,
  newest first).
- **Status** as the Deployment controller writes it: `observedGeneration`, `replicas`,
  `updatedReplicas`, `readyReplicas`, `availableReplicas`, `unavailableReplicas` (zeros omitted,
  as Go's `omitempty` does), and conditions `Available` (MinimumReplicasAvailable /
  MinimumReplicasUnavailable) and `Progressing` (NewReplicaSetAvailable when complete,
  ReplicaSetUpdated while progressing, ProgressDeadlineExceeded after
  `progressDeadlineSeconds` (default 600) without progress, DeploymentPaused when paused), so
  `kubectl rollout status` works.

Not done: ReplicaSet objects and revision history (`kubectl rollout undo`), proportional
scaling of a paused or mid-rollout Deployment (excess new pods are simply removed),
adoption/orphaning by selector, `pod-deletion-cost`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cloudcore.controllers import pods as p
from cloudcore.controllers.actions import Action, Create, Delete, Result, Update
from cloudcore.controllers.conditions import condition, parse_time, set_condition
from cloudcore.controllers.view import View
from edgeweave.kube.errors import StoreError
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import DEPLOYMENTS, PODS, ResourceInfo
from edgeweave.kube.selectors import LabelSelector

Obj = dict[str, Any]

POD_TEMPLATE_HASH = "pod-template-hash"
DEFAULT_MAX_SURGE = "25%"
DEFAULT_MAX_UNAVAILABLE = "25%"
DEFAULT_PROGRESS_DEADLINE_S = 600
MAX_GENERATE_NAME = 58  # 63 - 5 random characters (apiserver's SimpleNameGenerator)
_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.SafeEncodeString


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bit (what Kubernetes' `ComputeHash` feeds the template into)."""
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def template_hash(template: Mapping[str, Any], collision_count: int | None = None) -> str:
    """The `pod-template-hash` of a pod template."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    if collision_count:
        text += str(collision_count)
    digits = str(fnv1a_32(text.encode()))
    return "".join(_SAFE_ALPHABET[b % len(_SAFE_ALPHABET)] for b in digits.encode())


def scaled_value(value: Any, total: int, *, round_up: bool, default: str) -> int:
    """An int-or-percent (`3`, `"25%"`) resolved against `total`
    (`intstr.GetScaledValueFromIntOrPercent`); malformed values fall back to `default`."""
    if value is None:
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%") and text[:-1].isdigit():
            exact = int(text[:-1]) * total / 100
            return math.ceil(exact) if round_up else math.floor(exact)
        if text.isdigit():
            return int(text)
    return scaled_value(default, total, round_up=round_up, default=default)


def fenceposts(strategy: Mapping[str, Any], replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as pod counts (`deploymentutil.ResolveFenceposts`)."""
    rolling = strategy.get("rollingUpdate") or {}
    surge = scaled_value(
        rolling.get("maxSurge"), replicas, round_up=True, default=DEFAULT_MAX_SURGE
    )
    unavailable = scaled_value(
        rolling.get("maxUnavailable"), replicas, round_up=False, default=DEFAULT_MAX_UNAVAILABLE
    )
    if surge == 0 and unavailable == 0:
        unavailable = 1  # Kubernetes: avoid a rollout that can never make progress
    return surge, min(unavailable, replicas)


def _int(value: Any, default: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return int(value) if ok else default


def new_pod(deploy: Mapping[str, Any], template: Mapping[str, Any], hash_: str) -> Obj:
    """The Pod to create for the current template."""
    name = p.name_of(deploy)
    tmeta = template.get("metadata") or {}
    meta: Obj = {
        "generateName": f"{name}-{hash_}-"[:MAX_GENERATE_NAME],
        "namespace": p.namespace_of(deploy),
        "labels": {**(tmeta.get("labels") or {}), POD_TEMPLATE_HASH: hash_},
        "ownerReferences": [
            {
                "apiVersion": DEPLOYMENTS.api_version,
                "kind": DEPLOYMENTS.kind,
                "name": name,
                "uid": p.uid_of(deploy),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if tmeta.get("annotations"):
        meta["annotations"] = dict(tmeta["annotations"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": json.loads(json.dumps(template.get("spec") or {})),
    }


@dataclasses.dataclass(frozen=True)
class _Counts:
    replicas: int
    updated: int
    ready: int
    available: int


def _delete(pod: Mapping[str, Any], reason: str) -> Delete:
    return Delete(PODS, p.namespace_of(pod), p.name_of(pod), uid=p.uid_of(pod), reason=reason)


def _scale_actions(
    deploy: Mapping[str, Any],
    template: Mapping[str, Any],
    hash_: str,
    new: Sequence[Obj],
    old: Sequence[Obj],
    owned: Sequence[Obj],
    replicas: int,
    available: Callable[[Mapping[str, Any]], bool],
) -> list[Action]:
    spec = p.spec(deploy)
    strategy = spec.get("strategy") or {}
    actions: list[Action] = []

    def create(n: int, why: str) -> None:
        for _ in range(max(0, n)):
            body = new_pod(deploy, template, hash_)
            actions.append(Create(PODS, p.namespace_of(deploy), body, why))

    def trim(pods_: Sequence[Obj], n: int, why: str) -> None:
        for pod in sorted(pods_, key=p.deletion_rank)[: max(0, n)]:
            actions.append(_delete(pod, why))

    if strategy.get("type") == "Recreate":
        if old:
            trim(old, len(old), "recreate: old template")
        elif any(
            p.labels(pod).get(POD_TEMPLATE_HASH) != hash_ and not p.is_terminal(pod)
            for pod in owned
        ):
            pass  # wait until the old pods are really gone, as Recreate promises
        else:
            create(replicas - len(new), "scale up")
            trim(new, len(new) - replicas, "scale down")
        return actions
    if not old:
        create(replicas - len(new), "scale up")
        trim(new, len(new) - replicas, "scale down")
        return actions
    surge, unavailable = fenceposts(strategy, replicas)
    total = len(new) + len(old)
    create(min(replicas - len(new), replicas + surge - total), "rolling update: new template")
    trim(new, len(new) - replicas, "scale down")
    min_available = replicas - unavailable
    new_unavailable = sum(1 for pod in new if not available(pod))
    max_scaled_down = total - min_available - new_unavailable
    if max_scaled_down <= 0:
        return actions
    unhealthy = [pod for pod in old if not available(pod)]
    cleanup = sorted(unhealthy, key=p.deletion_rank)[:max_scaled_down]
    for pod in cleanup:
        actions.append(_delete(pod, "rolling update: unavailable old pod"))
    total_available = sum(1 for pod in [*new, *old] if available(pod))
    healthy_old = [pod for pod in old if available(pod)]
    scale_down = min(total_available - min_available, len(healthy_old))
    trim(healthy_old, scale_down, "rolling update: old template")
    return actions


def _progressing(old_status: Mapping[str, Any], counts: _Counts) -> bool:
    """`deploymentutil.DeploymentProgressing`: the new status shows progress."""
    old_updated = _int(old_status.get("updatedReplicas"), 0)
    old_old = _int(old_status.get("replicas"), 0) - old_updated
    return (
        counts.updated > old_updated
        or counts.replicas - counts.updated < old_old
        or counts.ready > _int(old_status.get("readyReplicas"), 0)
        or counts.available > _int(old_status.get("availableReplicas"), 0)
    )


def _status(
    deploy: Mapping[str, Any],
    counts: _Counts,
    *,
    replicas: int,
    max_unavailable: int,
    hash_: str,
    invalid: str | None,
    now: float,
) -> tuple[Obj, float | None]:
    """The new status, and when the progress deadline would pass (to look again then)."""
    old = p.status(deploy)
    spec = p.spec(deploy)
    name = p.name_of(deploy)
    status: Obj = {"observedGeneration": _int(p.meta(deploy).get("generation"), 0)}
    for key, value in (
        ("replicas", counts.replicas),
        ("updatedReplicas", counts.updated),
        ("readyReplicas", counts.ready),
        ("availableReplicas", counts.available),
        ("unavailableReplicas", max(0, max(replicas, counts.replicas) - counts.available)),
    ):
        if value:
            status[key] = value
    if old.get("collisionCount") is not None:
        status["collisionCount"] = old["collisionCount"]
    conds = list(old.get("conditions") or [])
    if counts.available >= replicas - max_unavailable:
        conds = set_condition(
            conds,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            now=now,
            update_time=True,
        )
    else:
        conds = set_condition(
            conds,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            now=now,
            update_time=True,
        )
    pods_name = f'Pods "{name}-{hash_}"'
    deadline_s = _int(spec.get("progressDeadlineSeconds"), DEFAULT_PROGRESS_DEADLINE_S)
    current = condition(deploy, "Progressing")
    wake: float | None = None
    complete = (
        counts.updated == replicas and counts.replicas == replicas and counts.available == replicas
    )
    if invalid is not None:
        conds = set_condition(conds, "ReplicaFailure", "True", "InvalidSelector", invalid, now=now)
    else:
        conds = [c for c in conds if c.get("type") != "ReplicaFailure"]
    if spec.get("paused"):
        conds = set_condition(
            conds,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused",
            now=now,
            update_time=True,
        )
    elif complete:
        conds = set_condition(
            conds,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            f"{pods_name} have successfully progressed.",
            now=now,
            update_time=True,
        )
    elif (
        current is None
        or current.get("reason")
        in (
            "NewReplicaSetAvailable",
            "DeploymentPaused",
        )
        or _progressing(old, counts)
    ):
        conds = set_condition(
            conds,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            f"{pods_name} are progressing.",
            now=now,
            update_time=True,
            touch=True,
        )
        wake = now + deadline_s
    elif current.get("reason") != "ProgressDeadlineExceeded":
        since = parse_time(current.get("lastUpdateTime")) or now
        if since + deadline_s <= now:
            conds = set_condition(
                conds,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                f"{pods_name} have timed out progressing.",
                now=now,
                update_time=True,
            )
        else:
            wake = since + deadline_s
    status["conditions"] = conds
    return status, wake


def reconcile_deployment(deploy: Mapping[str, Any], pods: Sequence[Obj], *, now: float) -> Result:
    """Actions that bring the Deployment's pods and status to the desired state; `pods` are
    the pods of its namespace (the ones it owns are picked by ownerReference uid)."""
    if p.is_terminating(deploy):
        return Result()  # being deleted: the garbage collector removes the pods
    spec = p.spec(deploy)
    replicas = _int(spec.get("replicas"), 1)
    template = spec.get("template") or {}
    tlabels = (template.get("metadata") or {}).get("labels") or {}
    invalid: str | None = None
    try:
        selector = LabelSelector.from_dict(spec.get("selector"))
        if selector.empty or not selector.matches(tlabels):
            invalid = "selector does not match template labels"
    except StoreError as exc:
        invalid = f"invalid selector: {exc.message}"
    hash_ = template_hash(template, _int(p.status(deploy).get("collisionCount"), 0) or None)
    uid = p.uid_of(deploy)
    owned = [pod for pod in pods if p.owned_by(pod, uid)]
    active = [pod for pod in owned if p.is_active(pod)]
    new = [pod for pod in active if p.labels(pod).get(POD_TEMPLATE_HASH) == hash_]
    old = [pod for pod in active if p.labels(pod).get(POD_TEMPLATE_HASH) != hash_]
    min_ready = _int(spec.get("minReadySeconds"), 0)

    def available(pod: Mapping[str, Any]) -> bool:
        return p.is_available(pod, min_ready, now)

    actions: list[Action] = []
    if invalid is None and not spec.get("paused"):
        actions = _scale_actions(deploy, template, hash_, new, old, owned, replicas, available)
    counts = _Counts(
        replicas=len(active),
        updated=len(new),
        ready=sum(1 for pod in active if p.is_ready(pod)),
        available=sum(1 for pod in active if available(pod)),
    )
    _, max_unavailable = fenceposts(spec.get("strategy") or {}, replicas)
    if (spec.get("strategy") or {}).get("type") == "Recreate":
        max_unavailable = replicas
    status, deadline = _status(
        deploy,
        counts,
        replicas=replicas,
        max_unavailable=max_unavailable,
        hash_=hash_,
        invalid=invalid,
        now=now,
    )
    if status != p.status(deploy):
        actions.append(Update(DEPLOYMENTS, {**deploy, "status": status}, "status", reason="status"))
    upcoming = [
        at for pod in active if (at := p.available_at(pod, min_ready)) is not None and at > now
    ]
    wakes = [t for t in (*upcoming, deadline) if t is not None]
    return Result(tuple(actions), min(wakes) if wakes else None)


class DeploymentController:
    """The Deployment controller as a runner `Controller`: one key per Deployment, also
    reconciled when one of its pods changes."""

    name = "deployment"
    resources: tuple[ResourceInfo, ...] = (DEPLOYMENTS, PODS)

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> list[tuple[str, str]]:
        if resource.key == DEPLOYMENTS.key:
            return [change.key]
        keys = []
        for obj in (change.object, change.old):
            ref = p.controller_ref(obj) if obj is not None else None
            if ref is not None and ref.get("kind") == DEPLOYMENTS.kind:
                keys.append((change.key[0], str(ref.get("name") or "")))
        return sorted(set(keys))

    def initial_keys(self, view: View) -> list[tuple[str, str]]:
        return [(p.namespace_of(d), p.name_of(d)) for d in view.list(DEPLOYMENTS)]

    def reconcile(self, key: tuple[str, str], view: View, now: float) -> Result:
        deploy = view.get(DEPLOYMENTS, key[1], key[0])
        if deploy is None:
            return Result()
        return reconcile_deployment(deploy, view.list(PODS, key[0]), now=now)
