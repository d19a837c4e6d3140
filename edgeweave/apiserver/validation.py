"""Server-side field validation (`fieldValidation=Ignore|Warn|Strict`), shallow by design.

Kubernetes decodes a body into the Go type (built-ins) or prunes it with the CRD's structural
schema, so unknown fields are dropped; `Warn` (the default) reports them as `Warning` headers
and `Strict` refuses the request with 400 `strict decoding error: unknown field "x"`.

We have no full schemas, so we check what we know exactly:
- the top-level fields of every served kind (`apiVersion`, `kind`, `metadata` plus the kind's
  own: `spec`/`status`, ConfigMap `data`/`binaryData`/`immutable`, ...), and
- the fields of `metadata` (ObjectMeta),
- and duplicate keys anywhere in a JSON body.
Fields below `spec`, `status` etc. are not checked (and are kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeweave.apiserver.params import FieldValidation
from edgeweave.kube.errors import BadRequest
from edgeweave.kube.resources import ResourceInfo

_COMMON = frozenset({"apiVersion", "kind", "metadata"})
_SPEC_STATUS = frozenset({"spec", "status"})
_TOP_LEVEL: dict[tuple[str, str], frozenset[str]] = {
    ("", "Namespace"): _SPEC_STATUS,
    ("", "Node"): _SPEC_STATUS,
    ("", "Pod"): _SPEC_STATUS,
    ("", "Service"): _SPEC_STATUS,
    ("", "Endpoints"): frozenset({"subsets"}),
    ("", "ConfigMap"): frozenset({"data", "binaryData", "immutable"}),
    ("", "Secret"): frozenset({"data", "stringData", "type", "immutable"}),
    ("", "Event"): frozenset(
        {
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        }
    ),
    ("discovery.k8s.io", "EndpointSlice"): frozenset({"addressType", "endpoints", "ports"}),
    ("apps", "Deployment"): _SPEC_STATUS,
    ("coordination.k8s.io", "Lease"): frozenset({"spec"}),
}
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
        "annotations", "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip


def allowed_fields(res: ResourceInfo) -> frozenset[str]:
    """Top-level fields a `res` object may have (custom resources: spec and status)."""
    return _COMMON | _TOP_LEVEL.get((res.group, res.kind), _SPEC_STATUS)


def unknown_fields(res: ResourceInfo, obj: Any) -> list[str]:
    """Dotted paths of the unknown top-level and metadata fields of `obj`."""
    if not isinstance(obj, dict):
        return []
    allowed = allowed_fields(res)
    out = [key for key in obj if key not in allowed]
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        out.extend(f"metadata.{key}" for key in meta if key not in OBJECT_META_FIELDS)
    return out


def check_fields(
    res: ResourceInfo, obj: Any, mode: FieldValidation, duplicates: Sequence[str] = ()
) -> tuple[Any, list[str]]:
    """Apply field validation to a decoded object: returns the object without unknown fields
    and the warnings to send; raises BadRequest in Strict mode if anything is wrong."""
    unknown = unknown_fields(res, obj)
    problems = [f'unknown field "{path}"' for path in unknown]
    problems += [f'duplicate field "{key}"' for key in duplicates]
    if problems and mode == "Strict":
        raise BadRequest(f"strict decoding error: {', '.join(problems)}")
    if unknown and isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in unknown}
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            obj["metadata"] = {k: v for k, v in meta.items() if f"metadata.{k}" not in unknown}
    return obj, (problems if mode == "Warn" else [])
