"""What a controller's `reconcile` returns: writes to make, as frozen data, and when to look again.

Reconcile functions are pure: cached objects and `now` in, a `Result` out. The runner
(`cloudcore.controllers.runner`) turns each action into one API call through
`edgeweave.kube.client.KubeClient`. Bodies are complete JSON objects; updates carry the
resourceVersion they were computed from, so a stale decision fails with Conflict and the key is
reconciled again from a fresher cache (Kubernetes' optimistic concurrency).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from edgeweave.kube.patch import MERGE_PATCH
from edgeweave.kube.resources import ResourceInfo

Obj = dict[str, Any]


def _where(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


@dataclasses.dataclass(frozen=True)
class Create:
    """Create an object (POST)."""

    resource: ResourceInfo
    """What to create."""
    namespace: str
    """Its namespace ('' for cluster-scoped resources)."""
    body: Obj
    """The object; `metadata.generateName` lets the server pick the name's suffix."""
    reason: str = ""
    """Why, for the log."""

    def describe(self) -> str:
        meta = self.body.get("metadata") or {}
        name = meta.get("name") or (str(meta.get("generateName") or "") + "*")
        return f"create {self.resource.key} {_where(self.namespace, name)}"


@dataclasses.dataclass(frozen=True)
class Update:
    """Replace an object, or only its status (PUT); Conflict if it changed meanwhile."""

    resource: ResourceInfo
    """What to update."""
    body: Obj
    """The whole object, with the `metadata.resourceVersion` it was computed from."""
    subresource: Literal["status"] | None = None
    """"status" to write only `status` (the status subresource)."""
    reason: str = ""
    """Why, for the log."""

    @property
    def namespace(self) -> str:
        """The object's namespace ('' if cluster-scoped)."""
        return str((self.body.get("metadata") or {}).get("namespace") or "")

    @property
    def name(self) -> str:
        """The object's name."""
        return str((self.body.get("metadata") or {}).get("name") or "")

    def describe(self) -> str:
        what = f"{self.resource.key}/{self.subresource}" if self.subresource else self.resource.key
        return f"update {what} {_where(self.namespace, self.name)}"


@dataclasses.dataclass(frozen=True)
class Patch:
    """Patch an object (PATCH)."""

    resource: ResourceInfo
    """What to patch."""
    namespace: str
    """Its namespace ('' for cluster-scoped resources)."""
    name: str
    """Its name."""
    body: Any
    """The patch document."""
    content_type: str = MERGE_PATCH
    """JSON merge patch by default; strategic merge or JSON patch otherwise."""
    subresource: Literal["status"] | None = None
    """"status" to patch the status subresource."""
    reason: str = ""
    """Why, for the log."""

    def describe(self) -> str:
        what = f"{self.resource.key}/{self.subresource}" if self.subresource else self.resource.key
        return f"patch {what} {_where(self.namespace, self.name)}"


@dataclasses.dataclass(frozen=True)
class OwnerCheck:
    """An owner that must be confirmed absent by a live GET before a delete (what Kubernetes'
    garbage collector does: it never trusts its cache alone to orphan-delete)."""

    resource: ResourceInfo
    """The owner's resource."""
    namespace: str
    """The owner's namespace."""
    name: str
    """The owner's name."""
    uid: str
    """The uid the dependent's ownerReference names; an owner with another uid is a
    different object, so the dependent is still an orphan."""


@dataclasses.dataclass(frozen=True)
class Delete:
    """Delete an object (DELETE); a NotFound answer counts as done."""

    resource: ResourceInfo
    """What to delete."""
    namespace: str
    """Its namespace ('' for cluster-scoped resources)."""
    name: str
    """Its name."""
    uid: str | None = None
    """Precondition: only the object with this uid (not a newer one of the same name)."""
    owner_check: OwnerCheck | None = None
    """Delete only if this owner is confirmed gone (garbage collection)."""
    reason: str = ""
    """Why, for the log."""

    def describe(self) -> str:
        return f"delete {self.resource.key} {_where(self.namespace, self.name)}"


@dataclasses.dataclass(frozen=True)
class Bind:
    """Assign a pending pod to a node: a `Binding` (kube-scheduler's way), or, where the
    server has no `pods/binding`, a patch of `spec.nodeName` guarded by resourceVersion."""

    namespace: str
    """The pod's namespace."""
    name: str
    """The pod's name."""
    uid: str
    """The pod's uid (the binding is refused for another pod of that name)."""
    resource_version: str
    """The pod's resourceVersion the decision was made on."""
    node: str
    """The chosen node."""
    reason: str = ""
    """Why this node, for the log."""

    def describe(self) -> str:
        return f"bind pods {self.namespace}/{self.name} to {self.node}"


Action = Create | Update | Patch | Delete | Bind


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one reconcile."""

    actions: tuple[Action, ...] = ()
    """Writes to make, in order."""
    requeue_at: float | None = None
    """Reconcile this key again at this time (seconds since the epoch, like `now`) even if
    nothing changes: a pod becoming available after minReadySeconds, a progress deadline."""

    def __add__(self, other: Result) -> Result:
        times = [t for t in (self.requeue_at, other.requeue_at) if t is not None]
        return Result(self.actions + other.actions, min(times) if times else None)
