"""Garbage collection of pods whose owning Deployment is gone.

Kubernetes' garbage collector deletes dependents whose owners no longer exist (background
cascading deletion). We do that for the one ownership our controllers create: a pod whose
controller ownerReference is an `apps/v1` Deployment that is not in the cache, or whose uid
differs (a new Deployment of the same name is a different owner). As the real collector does,
the runner confirms the owner's absence with a live GET before deleting (`Delete.owner_check`),
so a lagging cache never deletes a live Deployment's pods.

Not done: other kinds, `orphan` and `foreground` propagation, `blockOwnerDeletion`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cloudcore.controllers import pods as p
from cloudcore.controllers.actions import Delete, OwnerCheck, Result
from cloudcore.controllers.view import View
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import DEPLOYMENTS, PODS, ResourceInfo

Obj = dict[str, Any]


def deployment_ref(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod's controller reference if it names an apps/v1 Deployment."""
    ref = p.controller_ref(pod)
    if ref is None or ref.get("kind") != DEPLOYMENTS.kind:
        return None
    if ref.get("apiVersion") != DEPLOYMENTS.api_version:
        return None
    return ref


def reconcile_orphan(
    pod: Mapping[str, Any] | None, lookup: Callable[[str, str], Mapping[str, Any] | None]
) -> Result:
    """Delete the pod if its owning Deployment (`lookup(namespace, name)`) is gone."""
    if pod is None or p.is_terminating(pod):
        return Result()
    ref = deployment_ref(pod)
    if ref is None:
        return Result()
    ns, owner_name, owner_uid = p.namespace_of(pod), str(ref.get("name")), str(ref.get("uid"))
    owner = lookup(ns, owner_name)
    if owner is not None and p.uid_of(owner) == owner_uid:
        return Result()
    check = OwnerCheck(DEPLOYMENTS, ns, owner_name, owner_uid)
    reason = f"owner deployment {owner_name} ({owner_uid}) is gone"
    return Result(
        (Delete(PODS, ns, p.name_of(pod), uid=p.uid_of(pod), owner_check=check, reason=reason),)
    )


class GarbageCollector:
    """Pod garbage collection as a runner `Controller`: one key per pod with a Deployment
    owner; a deleted Deployment wakes the pods it owned."""

    name = "gc"
    resources: tuple[ResourceInfo, ...] = (PODS, DEPLOYMENTS)

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> list[tuple[str, str]]:
        if resource.key == PODS.key:
            return [change.key] if deployment_ref(change.object) is not None else []
        if change.type != "DELETED":
            return []
        uid = p.uid_of(change.object)
        return [
            (p.namespace_of(pod), p.name_of(pod))
            for pod in view.list(PODS, change.key[0])
            if p.owned_by(pod, uid)
        ]

    def initial_keys(self, view: View) -> list[tuple[str, str]]:
        return [
            (p.namespace_of(pod), p.name_of(pod))
            for pod in view.list(PODS)
            if deployment_ref(pod) is not None
        ]

    def reconcile(self, key: tuple[str, str], view: View, now: float) -> Result:
        pod = view.get(PODS, key[1], key[0])
        return reconcile_orphan(pod, lambda ns, name: view.get(DEPLOYMENTS, name, ns))
