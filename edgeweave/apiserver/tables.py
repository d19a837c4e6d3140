"""Server-side printing: meta.k8s.io `Table`s for `kubectl get` (pure functions).

kubectl asks `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` and prints the server's
columns; `priority: 1` columns appear only with `-o wide`. The columns follow kube-apiserver's
printers (`pkg/printers/internalversion/printers.go`); other resources get Name and Age, as
custom resources without printer columns do. Ages use `duration.HumanDuration`'s rounding.
`includeObject` = `None` | `Metadata` (default: a `PartialObjectMetadata`) | `Object` decides
what each row carries in `object`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

from edgeweave.kube.objects import Obj
from edgeweave.kube.resources import ResourceInfo

Column = tuple[str, str, str, int]  # name, type, format, priority
Row = list[Any]
_NAME: Column = ("Name", "string", "name", 0)
_AGE: Column = ("Age", "string", "", 0)


def human_duration(seconds: float) -> str:
    """Kubernetes' `duration.HumanDuration` (`5s`, `3m20s`, `2d4h`, `3y12d`)."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        s = secs % 60
        return f"{minutes}m" if s == 0 else f"{minutes}m{s}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = secs // 3600
    if hours < 8:
        m = minutes % 60
        return f"{hours}h" if m == 0 else f"{hours}h{m}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        h = hours % 24
        return f"{hours // 24}d" if h == 0 else f"{hours // 24}d{h}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if dy == 0 else f"{years}y{dy}d"
    return f"{hours // 24 // 365}y"


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text)  # 3.11 reads the trailing Z as UTC
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def age(obj: Obj, now: float) -> str:
    """`<unknown>` or the human age of `metadata.creationTimestamp`."""
    created = _parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    return "<unknown>" if created is None else human_duration(now - created)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _none(text: str) -> str:
    return text if text else "<none>"


# ---- per-kind printers ------------------------------------------------------------------------


def _pod_status(pod: Obj) -> tuple[str, int, int, int]:
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    statuses = _list(status.get("containerStatuses"))
    ready = sum(1 for c in statuses if isinstance(c, dict) and c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses if isinstance(c, dict))
    for c in reversed(statuses):
        if not isinstance(c, dict):
            continue
        waiting = _get(c, "state", "waiting", "reason")
        terminated = _get(c, "state", "terminated")
        if waiting:
            reason = waiting
        elif isinstance(terminated, dict):
            reason = terminated.get("reason") or (
                f"Signal:{terminated['signal']}"
                if terminated.get("signal")
                else f"ExitCode:{terminated.get('exitCode', 0)}"
            )
    if _get(pod, "metadata", "deletionTimestamp"):
        reason = "Terminating"
    containers = len(_list(_get(pod, "spec", "containers")))
    return str(reason), ready, containers, restarts


def _pod(obj: Obj, now: float) -> Row:
    reason, ready, total, restarts = _pod_status(obj)
    ip = _get(obj, "status", "podIP") or "<none>"
    node = _get(obj, "spec", "nodeName") or "<none>"
    return [obj["metadata"]["name"], f"{ready}/{total}", reason, restarts, age(obj, now), ip, node]


def _ports(spec: Any) -> str:
    out = []
    for port in _list(_get(spec, "ports")):
        if not isinstance(port, dict):
            continue
        text = str(port.get("port"))
        if port.get("nodePort"):
            text += f":{port['nodePort']}"
        out.append(f"{text}/{port.get('protocol', 'TCP')}")
    return ",".join(out)


def _service(obj: Obj, now: float) -> Row:
    spec = obj.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    external = list(_list(spec.get("externalIPs")))
    if kind == "ExternalName":
        external_text = spec.get("externalName") or "<none>"
    else:
        ingress = _list(_get(obj, "status", "loadBalancer", "ingress"))
        external += [i.get("ip") or i.get("hostname") for i in ingress if isinstance(i, dict)]
        if kind == "LoadBalancer" and not external:
            external_text = "<pending>"
        else:
            external_text = ",".join(str(e) for e in external if e) or "<none>"
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [
        obj["metadata"]["name"],
        kind,
        spec.get("clusterIP") or "<none>",
        external_text,
        _none(_ports(spec)),
        age(obj, now),
        _none(selector),
    ]


def _deployment(obj: Obj, now: float) -> Row:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    desired = spec.get("replicas", 1)
    template = _list(_get(spec, "template", "spec", "containers"))
    names = ",".join(str(c.get("name", "")) for c in template if isinstance(c, dict))
    images = ",".join(str(c.get("image", "")) for c in template if isinstance(c, dict))
    match = _get(spec, "selector", "matchLabels") or {}
    selector = (
        ",".join(f"{k}={v}" for k, v in sorted(match.items())) if isinstance(match, dict) else ""
    )
    return [
        obj["metadata"]["name"],
        f"{int(status.get('readyReplicas') or 0)}/{desired}",
        int(status.get("updatedReplicas") or 0),
        int(status.get("availableReplicas") or 0),
        age(obj, now),
        _none(names),
        _none(images),
        _none(selector),
    ]


def _node(obj: Obj, now: float) -> Row:
    meta, status = obj["metadata"], obj.get("status") or {}
    ready = "Unknown"
    for cond in _list(status.get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            ready = {"True": "Ready", "False": "NotReady"}.get(str(cond.get("status")), "Unknown")
    if _get(obj, "spec", "unschedulable"):
        ready += ",SchedulingDisabled"
    prefix = "node-role.kubernetes.io/"
    labels = meta.get("labels") or {}
    roles = sorted(k[len(prefix) :] for k in labels if k.startswith(prefix) and k[len(prefix) :])
    addresses = {
        a.get("type"): a.get("address")
        for a in _list(status.get("addresses"))
        if isinstance(a, dict)
    }
    info = status.get("nodeInfo") or {}
    return [
        meta["name"],
        ready,
        ",".join(roles) or "<none>",
        age(obj, now),
        info.get("kubeletVersion", ""),
        addresses.get("InternalIP") or "<none>",
        addresses.get("ExternalIP") or "<none>",
        info.get("osImage") or "<unknown>",
        info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


def _endpoints(obj: Obj, now: float) -> Row:
    shown: list[str] = []
    count = 0
    for subset in _list(obj.get("subsets")):
        if not isinstance(subset, dict):
            continue
        ports = [p.get("port") for p in _list(subset.get("ports")) if isinstance(p, dict)] or [None]
        for addr in _list(subset.get("addresses")):
            ip = addr.get("ip") if isinstance(addr, dict) else None
            for port in ports:
                count += 1
                if len(shown) < 3:
                    shown.append(f"{ip}:{port}" if port is not None else str(ip))
    text = ",".join(shown) + (f" + {count - 3} more..." if count > 3 else "")
    return [obj["metadata"]["name"], _none(text), age(obj, now)]


def _namespace(obj: Obj, now: float) -> Row:
    return [obj["metadata"]["name"], _get(obj, "status", "phase") or "", age(obj, now)]


def _nodegroup(obj: Obj, now: float) -> Row:
    spec = obj.get("spec") or {}
    nodes = ",".join(str(n) for n in _list(spec.get("nodes")))
    labels = spec.get("matchLabels") or {}
    match = (
        ",".join(f"{k}={v}" for k, v in sorted(labels.items())) if isinstance(labels, dict) else ""
    )
    return [obj["metadata"]["name"], _none(nodes), _none(match), age(obj, now)]


def _default(obj: Obj, now: float) -> Row:
    return [obj["metadata"]["name"], age(obj, now)]


_PRINTERS: dict[tuple[str, str], tuple[list[Column], Callable[[Obj, float], Row]]] = {
    ("", "Pod"): (
        [
            _NAME, ("Ready", "string", "", 0), ("Status", "string", "", 0),
            ("Restarts", "string", "", 0), _AGE, ("IP", "string", "", 1),
            ("Node", "string", "", 1),
        ],
        _pod,
    ),
    ("", "Service"): (
        [
            _NAME, ("Type", "string", "", 0), ("Cluster-IP", "string", "", 0),
            ("External-IP", "string", "", 0), ("Port(s)", "string", "", 0), _AGE,
            ("Selector", "string", "", 1),
        ],
        _service,
    ),
    ("apps", "Deployment"): (
        [
            _NAME, ("Ready", "string", "", 0), ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0), _AGE, ("Containers", "string", "", 1),
            ("Images", "string", "", 1), ("Selector", "string", "", 1),
        ],
        _deployment,
    ),
    ("", "Node"): (
        [
            _NAME, ("Status", "string", "", 0), ("Roles", "string", "", 0), _AGE,
            ("Version", "string", "", 0), ("Internal-IP", "string", "", 1),
            ("External-IP", "string", "", 1), ("OS-Image", "string", "", 1),
            ("Kernel-Version", "string", "", 1), ("Container-Runtime", "string", "", 1),
        ],
        _node,
    ),
    ("", "Endpoints"): ([_NAME, ("Endpoints", "string", "", 0), _AGE], _endpoints),
    ("", "Namespace"): ([_NAME, ("Status", "string", "", 0), _AGE], _namespace),
    ("apps.kubeedge.io", "NodeGroup"): (
        [_NAME, ("Nodes", "string", "", 0), ("Match-Labels", "string", "", 0), _AGE],
        _nodegroup,
    ),
}  # fmt: skip


def column_definitions(res: ResourceInfo) -> list[dict[str, Any]]:
    """The `columnDefinitions` of `res`'s table."""
    columns = _PRINTERS.get((res.group, res.kind), ([_NAME, _AGE], _default))[0]
    return [
        {"name": n, "type": t, "format": f, "description": "", "priority": p}
        for n, t, f, p in columns
    ]


def _row_object(obj: Obj, include: str, version: str) -> Any:
    if include == "Object":
        return obj
    meta = obj.get("metadata") or {}
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": f"meta.k8s.io/{version}",
        "metadata": meta,
    }


def table(
    res: ResourceInfo,
    objects: Iterable[Obj],
    *,
    now: float,
    include: str = "Metadata",
    version: str = "v1",
    list_meta: dict[str, Any] | None = None,
    headers: bool = True,
) -> dict[str, Any]:
    """A Table of `objects`. `include` is `includeObject`; `headers=False` leaves out the
    column definitions (watch events after the first may omit them)."""
    printer = _PRINTERS.get((res.group, res.kind), ([_NAME, _AGE], _default))[1]
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": printer(obj, now)}
        if include != "None":
            row["object"] = _row_object(obj, include, version)
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": f"meta.k8s.io/{version}",
        "metadata": dict(list_meta or {}),
        "columnDefinitions": column_definitions(res) if headers else [],
        "rows": rows,
    }


def partial_metadata(obj: Obj, version: str = "v1") -> dict[str, Any]:
    """`PartialObjectMetadata` of an object (`Accept: ...;as=PartialObjectMetadata`)."""
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": f"meta.k8s.io/{version}",
        "metadata": obj.get("metadata") or {},
    }
