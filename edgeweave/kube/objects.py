"""Kubernetes object semantics, without storage: validation, defaults, and the update rules.

Pure functions over JSON-shaped dicts. The store calls them inside its transactions:

- `prepare_create` checks apiVersion/kind, namespace and name (or `generateName`), validates
  metadata, sets `uid`, `creationTimestamp` and `generation: 1`, and applies create-time
  defaults (status is reset for resources with a status subresource, as the API server does).
- `prepare_update` enforces optimistic concurrency (a stale `resourceVersion` is a Conflict),
  keeps immutable metadata, applies the status-subresource rule (a main update keeps the stored
  status; a status update changes only status) and bumps `generation` when anything other than
  metadata and status changed.
- `mark_deleted` sets `deletionTimestamp` for finalizers and graceful pod deletion.

Nothing here reads a clock or draws randomness: the caller passes `now` and the uid.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from edgeweave.kube.errors import (
    OPTIMISTIC_LOCK_MESSAGE,
    BadRequest,
    Cause,
    conflict,
    invalid,
)
from edgeweave.kube.patch import apply_patch
from edgeweave.kube.resources import ResourceInfo
from edgeweave.kube.selectors import field_value, label_key_error, label_value_error

Obj = dict[str, Any]
Subresource = Literal["status", "scale"] | None

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "subdomain": (
        _SUBDOMAIN,
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
        "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
        "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?"
        "(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ),
    "label": (
        _LABEL,
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
        "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
        "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    ),
    "label1035": (
        _LABEL1035,
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
        "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
        "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
    ),
}
_ANNOTATIONS_MAX = 256 * 1024
_INITIAL_STATUS: dict[str, Obj] = {
    "Pod": {"phase": "Pending"},
    "Namespace": {"phase": "Active"},
    "Service": {"loadBalancer": {}},
}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
NAMESPACE_FINALIZER = "kubernetes"
DEFAULT_GRACE_SECONDS = 30

_encode = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, check_circular=False, allow_nan=False
).encode


def dumps(obj: Any) -> str:
    """Compact JSON text; a value JSON cannot hold (NaN, a set, ...) is a BadRequest."""
    try:
        return _encode(obj)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"object cannot be encoded as JSON: {exc}") from None


def rfc3339(t: float) -> str:
    """`2024-05-01T12:00:00Z`, the second-resolution UTC form Kubernetes uses in metadata."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _quote(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def name_error(rule: str, name: str) -> str | None:
    """Why `name` breaks the DNS rule (`subdomain`, `label`, `label1035`), or None."""
    pattern, limit, message = _RULES[rule]
    if len(name) > limit:
        return f"must be no more than {limit} characters"
    if not pattern.fullmatch(name):
        return message
    return None


def _string_map(causes: list[Cause], path: str, value: Any, *, labels: bool) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        causes.append(Cause(path, f"Invalid value: {_quote(value)}: must be a map of strings"))
        return
    total = 0
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            causes.append(
                Cause(path, f"Invalid value: {_quote(val)}: values of {key!r} must be strings")
            )
            continue
        why = label_key_error(key)
        if why is not None:
            causes.append(Cause(path, f"Invalid value: {_quote(key)}: {why}"))
        if labels:
            why = label_value_error(val)
            if why is not None:
                causes.append(Cause(f"{path}", f"Invalid value: {_quote(val)}: {why}"))
        total += len(key) + len(val)
    if not labels and total > _ANNOTATIONS_MAX:
        causes.append(
            Cause(
                path, f"Too long: must have at most {_ANNOTATIONS_MAX} bytes", "FieldValueTooLong"
            )
        )


def validate_meta(res: ResourceInfo, meta: Mapping[str, Any]) -> list[Cause]:
    """Field errors in `metadata` (name, namespace, labels, annotations, finalizers, owners)."""
    causes: list[Cause] = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        causes.append(
            Cause("metadata.name", "Required value: name is required", "FieldValueRequired")
        )
    else:
        why = name_error(res.name_rule, name)
        if why is not None:
            causes.append(Cause("metadata.name", f"Invalid value: {_quote(name)}: {why}"))
    if res.namespaced:
        ns = meta.get("namespace")
        why = name_error("label", ns) if isinstance(ns, str) and ns else "must be a DNS label"
        if why is not None:
            causes.append(Cause("metadata.namespace", f"Invalid value: {_quote(ns)}: {why}"))
    _string_map(causes, "metadata.labels", meta.get("labels"), labels=True)
    _string_map(causes, "metadata.annotations", meta.get("annotations"), labels=False)
    finalizers = meta.get("finalizers")
    if finalizers is not None:
        if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
            causes.append(Cause("metadata.finalizers", "Invalid value: must be a list of strings"))
        else:
            for i, fin in enumerate(finalizers):
                why = label_key_error(fin)
                if why is not None:
                    causes.append(
                        Cause(f"metadata.finalizers[{i}]", f"Invalid value: {_quote(fin)}: {why}")
                    )
    owners = meta.get("ownerReferences")
    if owners is not None:
        if not isinstance(owners, list):
            causes.append(Cause("metadata.ownerReferences", "Invalid value: must be a list"))
        else:
            for i, ref in enumerate(owners):
                ok = isinstance(ref, Mapping) and all(
                    isinstance(ref.get(k), str) and ref.get(k)
                    for k in ("apiVersion", "kind", "name", "uid")
                )
                if not ok:
                    causes.append(
                        Cause(
                            f"metadata.ownerReferences[{i}]",
                            "Invalid value: needs apiVersion, kind, name and uid strings",
                        )
                    )
    return causes


def check_type(res: ResourceInfo, obj: Mapping[str, Any]) -> None:
    """apiVersion and kind, when given, must be the resource's (BadRequest otherwise)."""
    api_version = obj.get("apiVersion")
    if api_version not in (None, "", res.api_version):
        raise BadRequest(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({res.api_version})"
        )
    kind = obj.get("kind")
    if kind not in (None, "", res.kind):
        raise BadRequest(
            f"the kind in the data ({kind}) does not match the expected kind ({res.kind})"
        )


def _meta_of(res: ResourceInfo, obj: Mapping[str, Any]) -> Obj:
    meta = obj.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise invalid(res.kind, "", [Cause("metadata", "Invalid value: must be an object")])
    return dict(meta)


def resolve_namespace(res: ResourceInfo, meta: Mapping[str, Any], namespace: str | None) -> str:
    """The namespace an object belongs in: the request's, which the object may repeat."""
    if not res.namespaced:
        return ""
    given = meta.get("namespace")
    if namespace is None:
        namespace = given if isinstance(given, str) else ""
    elif given not in (None, "", namespace):
        raise BadRequest(
            "the namespace of the provided object does not match the namespace sent on the "
            f"request ({given!r} != {namespace!r})"
        )
    if not namespace:
        raise BadRequest(f"a namespace is required for {res.key}")
    return namespace


def prepare_create(
    res: ResourceInfo,
    obj: Any,
    *,
    namespace: str | None,
    now: float,
    uid: str,
    suffix: Callable[[], str],
) -> Obj:
    """The object to store for a create, without its resourceVersion.

    `suffix()` completes a `generateName`. Raises BadRequest or Invalid.
    """
    if not isinstance(obj, Mapping):
        raise BadRequest(f"the body of a {res.kind} must be a JSON object")
    check_type(res, obj)
    meta = _meta_of(res, obj)
    ns = resolve_namespace(res, meta, namespace)
    if res.namespaced:
        meta["namespace"] = ns
    else:
        meta.pop("namespace", None)
    name = meta.get("name")
    generate = meta.get("generateName")
    if not name and isinstance(generate, str) and generate:
        name = meta["name"] = generate + suffix()
    if meta.get("resourceVersion"):
        raise BadRequest("resourceVersion should not be set on objects to be created")
    causes = validate_meta(res, meta)
    if causes:
        raise invalid(res.kind, name if isinstance(name, str) else "", causes, res.group)
    for drop in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
        meta.pop(drop, None)
    meta["uid"] = uid
    meta["creationTimestamp"] = rfc3339(now)
    meta["generation"] = 1
    out: Obj = {"apiVersion": res.api_version, "kind": res.kind, "metadata": meta}
    for key, value in obj.items():
        if key not in out:
            out[key] = value
    _defaults(res, out, creating=True)
    return out


def _defaults(res: ResourceInfo, obj: Obj, *, creating: bool) -> None:
    if creating and res.has_status and not res.keep_status_on_create:
        initial = _INITIAL_STATUS.get(res.kind)
        if initial is not None:
            obj["status"] = {k: dict(v) if isinstance(v, dict) else v for k, v in initial.items()}
        elif res.custom:
            obj.pop("status", None)
        else:
            obj["status"] = {}
    if res.kind == "Namespace" and not res.group:
        meta = obj["metadata"]
        labels = dict(meta.get("labels") or {})
        labels[NAMESPACE_NAME_LABEL] = meta["name"]
        meta["labels"] = labels
        if creating:
            spec = obj.get("spec")
            spec = dict(spec) if isinstance(spec, Mapping) else {}
            spec.setdefault("finalizers", [NAMESPACE_FINALIZER])
            obj["spec"] = spec


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _uid_mismatch(want: Any, have: Any) -> str:
    return f"Precondition failed: UID in precondition: {want}, UID in object meta: {have}"


def check_preconditions(
    res: ResourceInfo, current: Mapping[str, Any], *, uid: Any, resource_version: Any
) -> None:
    """Conflict unless the current object has this uid / resourceVersion (when given)."""
    meta = current["metadata"]
    name = meta.get("name", "")
    if uid not in (None, "") and uid != meta.get("uid"):
        raise conflict(
            res.key,
            name,
            _uid_mismatch(uid, meta.get("uid")),
            res.group,
        )
    if resource_version not in (None, "") and str(resource_version) != meta.get("resourceVersion"):
        raise conflict(
            res.key,
            name,
            f"Precondition failed: ResourceVersion in precondition: {resource_version}, "
            f"ResourceVersion in object meta: {meta.get('resourceVersion')}",
            res.group,
        )


def prepare_update(
    res: ResourceInfo, current: Obj, obj: Any, *, subresource: Subresource = None
) -> Obj:
    """The object to store for an update of `current` by `obj` (its resourceVersion still old).

    A stale `metadata.resourceVersion` in `obj` is a Conflict; none means "last write wins".
    """
    if not isinstance(obj, Mapping):
        raise BadRequest(f"the body of a {res.kind} must be a JSON object")
    check_type(res, obj)
    meta_in = _meta_of(res, obj)
    cur_meta: Obj = current["metadata"]
    name = cur_meta["name"]
    rv = meta_in.get("resourceVersion")
    if rv not in (None, "") and str(rv) != cur_meta.get("resourceVersion"):
        raise conflict(res.key, name, OPTIMISTIC_LOCK_MESSAGE, res.group)
    uid = meta_in.get("uid")
    if uid not in (None, "") and uid != cur_meta.get("uid"):
        raise conflict(
            res.key,
            name,
            _uid_mismatch(uid, cur_meta.get("uid")),
            res.group,
        )
    if subresource == "status":
        updated = dict(current)
        if "status" in obj:
            updated["status"] = obj["status"]
        else:
            updated.pop("status", None)
        return updated
    new_meta = dict(meta_in)
    for key in (
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "resourceVersion",
    ):
        if key in cur_meta:
            new_meta[key] = cur_meta[key]
        else:
            new_meta.pop(key, None)
    causes = validate_meta(res, new_meta)
    if cur_meta.get("deletionTimestamp"):
        old_fins = set(cur_meta.get("finalizers") or [])
        added = [f for f in new_meta.get("finalizers") or [] if f not in old_fins]
        if added:
            causes.append(
                Cause(
                    "metadata.finalizers",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {added}",
                    "FieldValueForbidden",
                )
            )
    if causes:
        raise invalid(res.kind, name, causes, res.group)
    new: Obj = {"apiVersion": res.api_version, "kind": res.kind, "metadata": new_meta}
    for key, value in obj.items():
        if key not in new:
            new[key] = value
    if res.has_status:
        if "status" in current:
            new["status"] = current["status"]
        else:
            new.pop("status", None)
    if res.kind == "Namespace" and not res.group:
        spec = dict(new.get("spec") or {})
        old_spec = current.get("spec") or {}
        if "finalizers" in old_spec:
            spec["finalizers"] = old_spec["finalizers"]
        else:
            spec.pop("finalizers", None)
        new["spec"] = spec
        _defaults(res, new, creating=False)
    if _content(new) != _content(current):
        new_meta["generation"] = int(cur_meta.get("generation") or 0) + 1
    return new


def deletion_ready(obj: Mapping[str, Any]) -> bool:
    """True once a marked object may go: no finalizers left and no grace period pending."""
    meta = obj["metadata"]
    if not meta.get("deletionTimestamp") or meta.get("finalizers"):
        return False
    if obj.get("kind") == "Namespace" and (obj.get("spec") or {}).get("finalizers"):
        return False
    return not meta.get("deletionGracePeriodSeconds")


def grace_period(res: ResourceInfo, obj: Mapping[str, Any], requested: int | None) -> int:
    """Seconds a delete waits for the node: 0 unless the resource deletes gracefully.

    Pods that are not scheduled or already finished go at once, as in Kubernetes.
    """
    if not res.graceful_deletion:
        return 0
    spec = obj.get("spec") or {}
    phase = (obj.get("status") or {}).get("phase")
    if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
        return 0
    if requested is not None:
        return max(0, requested)
    value = spec.get("terminationGracePeriodSeconds")
    return value if isinstance(value, int) and value >= 0 else DEFAULT_GRACE_SECONDS


def mark_deleted(obj: Obj, *, now: float, grace: int) -> Obj | None:
    """`obj` with deletionTimestamp (now + grace) set, or None if nothing changes.

    A repeated delete can only shorten a pending grace period.
    """
    meta = dict(obj["metadata"])
    old_grace = meta.get("deletionGracePeriodSeconds")
    if meta.get("deletionTimestamp") and (old_grace is None or grace >= old_grace):
        return None
    meta["deletionTimestamp"] = rfc3339(now + grace)
    meta["deletionGracePeriodSeconds"] = grace
    if not obj["metadata"].get("deletionTimestamp"):
        meta["generation"] = int(meta.get("generation") or 0) + 1
    new = dict(obj)
    new["metadata"] = meta
    if obj.get("kind") == "Namespace":
        new["status"] = {**(obj.get("status") or {}), "phase": "Terminating"}
    return new


def selectable_values(res: ResourceInfo, obj: Mapping[str, Any]) -> str | None:
    """JSON of {path: value} for the resource's selectable fields (the store's side column).

    Fields that are absent are left out (absent reads as '', like `field_value`)."""
    if not res.selectable_fields:
        return None
    values: dict[str, str] = {}
    for path in res.selectable_fields:
        head, _, rest = path.partition(".")
        cur = obj.get(head)
        if rest and isinstance(cur, Mapping):
            cur = cur.get(rest) if "." not in rest else field_value(cur, rest) or None
        elif rest:
            continue
        if cur is None or cur == "":
            continue
        values[path] = cur if isinstance(cur, str) else field_value(obj, path)
    return dumps(values) if values else None


def patch_object(res: ResourceInfo, current: Obj, content_type: str, body: Any,
                 name: str) -> Obj:
    """`current` with a patch applied; BadRequest if the result lost its metadata or was
    renamed (kube-apiserver refuses a patch that changes the name on the URL)."""
    patched = apply_patch(content_type, current, body, kind=res.kind,
                          strategic=res.strategic_merge)
    meta = patched.get("metadata")
    if not isinstance(meta, Mapping):
        raise BadRequest("the patch removed metadata")
    if meta.get("name") != name:
        raise BadRequest(
            f"the name of the object ({meta.get('name')}) does not match the name on "
            f"the URL ({name})"
        )
    return patched
