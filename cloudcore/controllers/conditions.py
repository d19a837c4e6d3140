"""Status conditions and timestamps, as Kubernetes writes them (pure functions).

A condition is `{type, status: "True"|"False"|"Unknown", reason, message, lastTransitionTime}`
(Deployments add `lastUpdateTime`). As in Kubernetes' `SetDeploymentCondition` and the pod
status helpers, `lastTransitionTime` changes only when `status` changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from edgeweave.kube.objects import rfc3339

Obj = dict[str, Any]

__all__ = [
    "condition",
    "condition_is_true",
    "parse_time",
    "rfc3339",
    "set_condition",
]


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 timestamp (`2024-05-01T12:00:00Z`), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def condition(obj: Mapping[str, Any] | None, type_: str) -> Obj | None:
    """The object's `status.conditions` entry of this type, or None."""
    if obj is None:
        return None
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    if not isinstance(conditions, list):
        return None
    for cond in conditions:
        if isinstance(cond, dict) and cond.get("type") == type_:
            return cond
    return None


def condition_is_true(obj: Mapping[str, Any] | None, type_: str) -> bool:
    """True if the object has this condition with status "True"."""
    cond = condition(obj, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    now: float,
    update_time: bool = False,
    touch: bool = False,
) -> list[Obj]:
    """A copy of `conditions` with `type_` set (in place, order kept). Unchanged status,
    reason and message leave the condition as it is unless `touch`; `lastTransitionTime` moves
    only when `status` changes; with `update_time` the condition carries `lastUpdateTime`,
    set whenever it is written (Kubernetes' Deployment conditions)."""
    out = [dict(c) for c in conditions or ()]
    index = next((i for i, c in enumerate(out) if c.get("type") == type_), None)
    found = out[index] if index is not None else None
    if (
        found is not None
        and not touch
        and (found.get("status"), found.get("reason"), found.get("message"))
        == (status, reason, message)
    ):
        return out
    stamp = rfc3339(now)
    new: Obj = dict(found or {})
    new.update(type=type_, status=status, reason=reason, message=message)
    if found is None or found.get("status") != status or not found.get("lastTransitionTime"):
        new["lastTransitionTime"] = stamp
    if update_time:
        new["lastUpdateTime"] = stamp
    if index is None:
        out.append(new)
    else:
        out[index] = new
    return out
