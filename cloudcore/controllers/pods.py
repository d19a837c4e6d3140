"""Pod predicates the controllers share, after Kubernetes' `podutil` and `controller` helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudcore.controllers.conditions import condition, parse_time

Obj = dict[str, Any]

TERMINAL_PHASES = frozenset(("Succeeded", "Failed"))
_PHASE_RANK = {"Pending": 0, "Unknown": 1, "Running": 2}


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """`metadata` (empty if missing)."""
    value = obj.get("metadata")
    return value if isinstance(value, Mapping) else {}


def spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """`spec` (empty if missing)."""
    value = obj.get("spec")
    return value if isinstance(value, Mapping) else {}


def status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """`status` (empty if missing)."""
    value = obj.get("status")
    return value if isinstance(value, Mapping) else {}


def labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """`metadata.labels` (empty if missing)."""
    value = meta(obj).get("labels")
    return value if isinstance(value, Mapping) else {}


def name_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("name") or "")


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("namespace") or "")


def uid_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("uid") or "")


def phase(pod: Mapping[str, Any]) -> str:
    return str(status(pod).get("phase") or "")


def node_name(pod: Mapping[str, Any]) -> str:
    return str(spec(pod).get("nodeName") or "")


def is_terminal(pod: Mapping[str, Any]) -> bool:
    """Succeeded or Failed: the pod will never run again."""
    return phase(pod) in TERMINAL_PHASES


def is_terminating(obj: Mapping[str, Any]) -> bool:
    """Marked for deletion (`metadata.deletionTimestamp`)."""
    return bool(meta(obj).get("deletionTimestamp"))


def is_active(pod: Mapping[str, Any]) -> bool:
    """Kubernetes' `controller.IsPodActive`: not terminal and not being deleted."""
    return not is_terminal(pod) and not is_terminating(pod)


def is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's `Ready` condition is True (`podutil.IsPodReady`)."""
    cond = condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def ready_since(pod: Mapping[str, Any]) -> float | None:
    """When the pod last became Ready, if it is."""
    cond = condition(pod, "Ready")
    if cond is None or cond.get("status") != "True":
        return None
    return parse_time(cond.get("lastTransitionTime"))


def available_at(pod: Mapping[str, Any], min_ready_seconds: int) -> float | None:
    """When the pod is (or will be) available: Ready for `min_ready_seconds`
    (`podutil.IsPodAvailable`); None if it is not Ready. A Ready pod without a transition time
    counts as available at once."""
    if not is_ready(pod):
        return None
    if min_ready_seconds <= 0:
        return 0.0
    since = ready_since(pod)
    return 0.0 if since is None else since + min_ready_seconds


def is_available(pod: Mapping[str, Any], min_ready_seconds: int, now: float) -> bool:
    at = available_at(pod, min_ready_seconds)
    return at is not None and at <= now


def controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with `controller: true`, if any (`metav1.GetControllerOf`)."""
    refs = meta(obj).get("ownerReferences")
    for ref in refs if isinstance(refs, list) else ():
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            return ref
    return None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """True if the object's controller reference names this uid."""
    ref = controller_ref(obj)
    return ref is not None and ref.get("uid") == uid


def deletion_rank(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key putting the pods to delete first when scaling down, after Kubernetes'
    `controller.ActivePods` ordering: unassigned before assigned, Pending before Unknown
    before Running, not ready before ready, ready for less time before longer, newer before
    older (the name breaks ties, for determinism)."""
    ready = is_ready(pod)
    since = ready_since(pod) or 0.0
    created = parse_time(meta(pod).get("creationTimestamp")) or 0.0
    return (
        bool(node_name(pod)),
        _PHASE_RANK.get(phase(pod), 0),
        ready,
        -since if ready else 0.0,
        -created,
        name_of(pod),
    )
