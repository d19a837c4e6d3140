"""Query parameters and DeleteOptions, parsed and checked as kube-apiserver does. Pure.

| parameter | verbs | meaning here |
|---|---|---|
| `labelSelector`, `fieldSelector` | list, watch, deletecollection | filters (store syntax) |
| `limit`, `continue` | list | pagination through one snapshot |
| `resourceVersion` | list | unset/`0`: current; `N`: not older than N; with `Exact`: at N |
| `resourceVersion` | watch | unset/`0`: current objects as ADDED first; `N`: resume after N |
| `resourceVersionMatch` | list, watch | `NotOlderThan`, `Exact` (list only) |
| `timeoutSeconds` | watch | end the stream after this long |
| `allowWatchBookmarks` | watch | periodic BOOKMARK events |
| `sendInitialEvents` | watch | ADDED events, then BOOKMARK `k8s.io/initial-events-end` |
| `dryRun=All` | writes | validate, admit and run the write, then roll it back |
| `fieldValidation` | create, update, patch | `Ignore`, `Warn` (default), `Strict` |
| `includeObject` | Table responses | `None`, `Metadata` (default), `Object` |
| `gracePeriodSeconds`, `propagationPolicy` | delete(collection) | also from a DeleteOptions body |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from edgeweave.kube.errors import BadRequest, Cause, Invalid
from edgeweave.kube.store import Preconditions

FieldValidation = Literal["Ignore", "Warn", "Strict"]
_TRUE = frozenset({"1", "true", "True"})
_FALSE = frozenset({"", "0", "false", "False"})
_MATCHES = ("NotOlderThan", "Exact")
_POLICIES = ("Foreground", "Background", "Orphan")


def _bool(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"{name}: invalid boolean value {value!r}")


def _int(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name}: invalid value {value!r}: must be an integer") from None
    if number < 0:
        raise BadRequest(f"{name}: invalid value {value!r}: must be non-negative")
    return number


def parse_revision(value: str | None) -> int | None:
    """A resourceVersion string as a revision; None when unset; BadRequest if not a number."""
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise BadRequest(f"invalid resource version {value!r}: must be a non-negative integer")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ListOptions:
    """The parameters of list and watch."""

    label_selector: str | None = None
    """`labelSelector`."""
    field_selector: str | None = None
    """`fieldSelector`."""
    limit: int | None = None
    """`limit` (None or 0: no paging)."""
    continue_token: str | None = None
    """`continue`."""
    resource_version: int | None = None
    """`resourceVersion` as a number; None when unset."""
    resource_version_match: str | None = None
    """`resourceVersionMatch`."""
    timeout_s: int | None = None
    """`timeoutSeconds`."""
    allow_bookmarks: bool = False
    """`allowWatchBookmarks`."""
    send_initial_events: bool | None = None
    """`sendInitialEvents` (None when unset)."""


def list_options(query: Mapping[str, str], *, watch: bool) -> ListOptions:
    """Parse and check list/watch parameters (400 for bad combinations, as Kubernetes)."""
    rv = parse_revision(query.get("resourceVersion"))
    match = query.get("resourceVersionMatch") or None
    cont = query.get("continue") or None
    if match is not None:
        if match not in _MATCHES:
            raise BadRequest(
                f'resourceVersionMatch: Unsupported value: "{match}": supported values: '
                '"Exact", "NotOlderThan"'
            )
        if rv is None:
            raise BadRequest("resourceVersionMatch is forbidden unless resourceVersion is provided")
        if cont is not None:
            raise BadRequest("resourceVersionMatch is forbidden when continue is provided")
        if match == "Exact" and rv == 0:
            raise BadRequest('resourceVersionMatch "Exact" is forbidden for resourceVersion "0"')
        if watch and match == "Exact":
            raise BadRequest('resourceVersionMatch "Exact" is not supported for watch')
    send_initial: bool | None = None
    if "sendInitialEvents" in query:
        send_initial = _bool(query, "sendInitialEvents")
        if not watch:
            raise BadRequest("sendInitialEvents is forbidden for list")
    bookmarks = _bool(query, "allowWatchBookmarks")
    if send_initial and (not bookmarks or match != "NotOlderThan"):
        # Kubernetes' validation of the WatchList request.
        raise BadRequest(
            "sendInitialEvents needs allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan"
        )
    return ListOptions(
        label_selector=query.get("labelSelector") or None,
        field_selector=query.get("fieldSelector") or None,
        limit=_int(query, "limit") or None,
        continue_token=cont,
        resource_version=rv,
        resource_version_match=match,
        timeout_s=_int(query, "timeoutSeconds"),
        allow_bookmarks=bookmarks,
        send_initial_events=send_initial,
    )


def include_object(query: Mapping[str, str]) -> str:
    """`includeObject` of a Table request: None, Metadata (default) or Object."""
    value = query.get("includeObject") or "Metadata"
    if value not in ("None", "Metadata", "Object"):
        raise BadRequest(
            f'includeObject: Unsupported value: "{value}": supported values: "Metadata", '
            '"None", "Object"'
        )
    return value


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """The parameters of create, update and patch."""

    dry_run: bool = False
    """`dryRun=All`: run the write and roll it back."""
    field_validation: FieldValidation = "Warn"
    """What to do with unknown or duplicate fields (Kubernetes' default is Warn)."""


def _dry_run(values: list[str]) -> bool:
    for value in values:
        if value != "All":
            raise BadRequest(f'dryRun: Unsupported value: "{value}": supported values: "All"')
    return bool(values)


def write_options(query: Mapping[str, str], dry_run_values: list[str]) -> WriteOptions:
    """Parse `dryRun` (all values given) and `fieldValidation`."""
    validation = query.get("fieldValidation") or "Warn"
    if validation not in ("Ignore", "Warn", "Strict"):
        raise BadRequest(
            f"fieldValidation parameter unsupported: {validation!r}: must be one of "
            "Ignore, Warn, Strict"
        )
    mode: FieldValidation = validation  # type: ignore[assignment]
    return WriteOptions(_dry_run(dry_run_values), mode)


@dataclasses.dataclass(frozen=True)
class DeleteOptions:
    """`metav1.DeleteOptions`, from the body and the query."""

    grace_period_seconds: int | None = None
    """Grace period for pods (0 = now)."""
    propagation_policy: str | None = None
    """Foreground, Background or Orphan (there is no garbage collector: all act as Orphan)."""
    preconditions: Preconditions | None = None
    """uid / resourceVersion the object must have."""
    dry_run: bool = False
    """Do not delete, just check."""


def _invalid_delete(field: str, message: str) -> Invalid:
    return Invalid(
        f'DeleteOptions.meta.k8s.io "" is invalid: {field}: {message}',
        kind="DeleteOptions",
        group="meta.k8s.io",
        causes=[Cause(field, message)],
    )


def delete_options(
    query: Mapping[str, str], dry_run_values: list[str], body: Any | None
) -> DeleteOptions:
    """Merge a DeleteOptions body with the query (the query wins, as in Kubernetes)."""
    doc: Mapping[str, Any] = {}
    if body is not None:
        if not isinstance(body, Mapping):
            raise BadRequest("the DeleteOptions body must be a JSON object")
        kind = body.get("kind")
        if kind not in (None, "", "DeleteOptions"):
            raise BadRequest(f"expected a DeleteOptions body, got kind {kind!r}")
        doc = body
    grace = _int(query, "gracePeriodSeconds")
    if grace is None and doc.get("gracePeriodSeconds") is not None:
        value = doc["gracePeriodSeconds"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid_delete("gracePeriodSeconds", f"Invalid value: {value!r}")
        grace = max(0, value)
    policy = query.get("propagationPolicy") or doc.get("propagationPolicy")
    if policy is not None and policy not in _POLICIES:
        raise _invalid_delete(
            "propagationPolicy",
            f'Unsupported value: "{policy}": supported values: "Foreground", "Background", '
            '"Orphan"',
        )
    if doc.get("orphanDependents") is not None and policy is not None:
        raise _invalid_delete(
            "propagationPolicy", "Invalid value: orphanDependents and propagationPolicy together"
        )
    pre = doc.get("preconditions")
    preconditions = None
    if pre is not None:
        if not isinstance(pre, Mapping):
            raise _invalid_delete("preconditions", "Invalid value: must be an object")
        preconditions = Preconditions(pre.get("uid"), pre.get("resourceVersion"))
    body_dry = doc.get("dryRun") or []
    if not isinstance(body_dry, list) or not all(isinstance(v, str) for v in body_dry):
        raise _invalid_delete("dryRun", "Invalid value: must be a list of strings")
    dry = _dry_run(list(dry_run_values) or body_dry)
    return DeleteOptions(grace, policy, preconditions, dry)
