"""OpenAPI documents: just enough for kubectl to validate on the server and compute patches.

v3 (`/openapi/v3`, kubectl >= 1.27): the index lists one document per group-version:

    {"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=..."}, ...}}

and each document has, for every resource, its paths with operations that carry
`x-kubernetes-group-version-kind` and `x-kubernetes-action`. kubectl's `QueryParamVerifierV3`
looks for the PATCH operation of a kind and a `fieldValidation` query parameter on it; finding
it, kubectl sends `fieldValidation=Strict` and leaves validation to us (`validation.py`). The
PATCH request bodies list only JSON patch and merge patch, never strategic merge patch, so
`kubectl apply` does not try to compute a strategic patch from our (schema-less) v3 document;
it falls back to v2 and then to its compiled-in types, which know the merge keys.
`components.schemas` holds one open object schema per kind, tagged with its GVK.

v2 (`/openapi/v2`), as protobuf for kubectl <= 1.2x (see `protobuf.py`) or JSON: no
definitions, so kubectl skips client-side validation and uses its compiled-in types for apply;
and one PATCH operation per resource with its GVK and the `dryRun` query parameter, which
kubectl 1.20's dry-run verifier requires before `kubectl diff` and `--dry-run=server`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from edgeweave.apiserver.config import KUBERNETES_VERSION
from edgeweave.apiserver.protobuf import PatchPath, openapi_v2_document
from edgeweave.kube.resources import Registry, ResourceInfo

TITLE = "Kubernetes"
V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
"""Content-Type of the protobuf document. Clients ask for the older `...spec.v2@v1.0+protobuf`,
but Go's `mime.ParseMediaType` refuses an `@` in a response's Content-Type (client-go turns
that into a 500), so we answer with the name current kube-openapi sends."""
_PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json")


def _version() -> str:
    return f"v{KUBERNETES_VERSION[0]}.{KUBERNETES_VERSION[1]}.0"


def gv_path(group: str, version: str) -> str:
    """The index key of a group-version: `api/v1` or `apis/{group}/{version}`."""
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def schema_name(group: str, version: str, kind: str) -> str:
    """`io.k8s.api.core.v1.Pod`; custom resources by reversed group: `io.kubeedge.apps...`."""
    if not group:
        return f"io.k8s.api.core.{version}.{kind}"
    if group.endswith(".k8s.io") or "." not in group:
        return f"io.k8s.api.{group.split('.')[0]}.{version}.{kind}"
    return ".".join(reversed(group.split("."))) + f".{version}.{kind}"


def _gvk(group: str, version: str, kind: str) -> dict[str, str]:
    return {"group": group, "version": version, "kind": kind}


def _param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": "string", "uniqueItems": True},
    }


_WRITE_PARAMS = [
    _param("dryRun", "All: validate, admit and discard the change"),
    _param("fieldManager", "accepted and ignored"),
    _param("fieldValidation", "Ignore, Warn or Strict: unknown and duplicate fields"),
]
_LIST_PARAMS = [
    _param(n, n)
    for n in (
        "labelSelector", "fieldSelector", "limit", "continue", "resourceVersion",
        "resourceVersionMatch", "timeoutSeconds", "allowWatchBookmarks", "watch",
        "sendInitialEvents",
    )
]  # fmt: skip


def _op(action: str, gvk: dict[str, str], ref: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{action}{gvk['kind']}",
        "parameters": params,
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
                },
            }
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    }
    if action in ("post", "put"):
        op["requestBody"] = {
            "content": {"*/*": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
            "required": True,
        }
    if action == "patch":
        op["requestBody"] = {
            "content": {t: {"schema": {"type": "object"}} for t in _PATCH_TYPES},
            "required": True,
        }
    return op


def _resource_paths(res: ResourceInfo) -> dict[str, dict[str, Any]]:
    root = f"/{gv_path(res.group, res.version)}"
    scope = f"{root}/namespaces/{{namespace}}" if res.namespaced else root
    gvk = _gvk(res.group, res.version, res.kind)
    ref = schema_name(res.group, res.version, res.kind)
    list_ref = schema_name(res.group, res.version, res.list_kind)
    item = f"{scope}/{res.plural}/{{name}}"
    paths: dict[str, dict[str, Any]] = {
        f"{scope}/{res.plural}": {
            "get": _op("list", gvk, list_ref, _LIST_PARAMS),
            "post": _op("post", gvk, ref, _WRITE_PARAMS),
            "delete": _op(
                "deletecollection", gvk, "io.k8s.apimachinery.pkg.apis.meta.v1.Status", _LIST_PARAMS
            ),
        },
        item: {
            "get": _op("get", gvk, ref, []),
            "put": _op("put", gvk, ref, _WRITE_PARAMS),
            "patch": _op("patch", gvk, ref, _WRITE_PARAMS),
            "delete": _op(
                "delete",
                gvk,
                "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                [
                    _param("dryRun", "All"),
                    _param("gracePeriodSeconds", "seconds"),
                    _param("propagationPolicy", "ignored"),
                ],
            ),
        },
    }
    if res.namespaced:
        paths[f"{root}/{res.plural}"] = {"get": _op("list", gvk, list_ref, _LIST_PARAMS)}
    if res.has_status:
        paths[f"{item}/status"] = {
            a: _op(a, gvk, ref, [] if a == "get" else _WRITE_PARAMS)
            for a in ("get", "put", "patch")
        }
    if res.has_scale:
        scale = _gvk("autoscaling", "v1", "Scale")
        sref = schema_name("autoscaling", "v1", "Scale")
        paths[f"{item}/scale"] = {
            a: _op(a, scale, sref, [] if a == "get" else _WRITE_PARAMS)
            for a in ("get", "put", "patch")
        }
    return paths


def _schema(group: str, version: str, kind: str) -> dict[str, Any]:
    return {
        "description": f"{kind} ({group or 'core'}/{version}); fields are not described here",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "x-kubernetes-group-version-kind": [_gvk(group, version, kind)],
    }


def v3_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    """The OpenAPI 3.0 document of one group-version, or None if it is not served."""
    served = [r for r in registry if r.group == group and r.version == version]
    if not served:
        return None
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {
        "io.k8s.apimachinery.pkg.apis.meta.v1.Status": _schema("", "v1", "Status"),
    }
    for res in served:
        paths.update(_resource_paths(res))
        schemas[schema_name(res.group, res.version, res.kind)] = _schema(
            res.group, res.version, res.kind
        )
        schemas[schema_name(res.group, res.version, res.list_kind)] = _schema(
            res.group, res.version, res.list_kind
        )
        if res.has_scale:
            schemas[schema_name("autoscaling", "v1", "Scale")] = _schema(
                "autoscaling", "v1", "Scale"
            )
    return {
        "openapi": "3.0.0",
        "info": {"title": TITLE, "version": _version()},
        "paths": paths,
        "components": {"schemas": schemas},
    }


class OpenAPI:
    """The documents of one registry, encoded once."""

    def __init__(self, registry: Registry) -> None:
        self.documents: dict[str, bytes] = {}
        index: dict[str, dict[str, str]] = {}
        for group, version in registry.group_versions():
            doc = v3_document(registry, group, version)
            if doc is None:
                continue
            body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            key = gv_path(group, version)
            digest = hashlib.sha512(body).hexdigest().upper()[:128]
            self.documents[key] = body
            index[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
        self.index = json.dumps({"paths": index}, separators=(",", ":")).encode()
        patch_paths = v2_patch_paths(registry)
        v2_paths = {
            p.path: {
                "patch": {
                    "operationId": p.operation_id,
                    "parameters": [
                        {"name": n, "in": "query", "type": "string", "uniqueItems": True}
                        for n in p.query_params
                    ],
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-group-version-kind": _gvk_of(p),
                }
            }
            for p in patch_paths
        }
        self.v2_json = json.dumps(
            {
                "swagger": "2.0",
                "info": {"title": TITLE, "version": _version()},
                "paths": v2_paths,
                "definitions": {},
            },
            separators=(",", ":"),
        ).encode()
        self.v2_protobuf = openapi_v2_document(TITLE, _version(), patch_paths)


def v2_patch_paths(registry: Registry) -> tuple[PatchPath, ...]:
    """The PATCH operation of every resource's object path, for the v2 document."""
    out = []
    for res in registry:
        root = f"/{gv_path(res.group, res.version)}"
        scope = f"{root}/namespaces/{{namespace}}" if res.namespaced else root
        gvk = f"group: {res.group!r}\nkind: {res.kind}\nversion: {res.version}\n"
        out.append(
            PatchPath(
                f"{scope}/{res.plural}/{{name}}",
                f"patch{res.kind}",
                gvk,
                ("dryRun", "fieldManager", "fieldValidation"),
            )
        )
    return tuple(out)


def _gvk_of(path: PatchPath) -> dict[str, str]:
    loaded = yaml.safe_load(path.gvk_yaml)
    return {k: str(v) for k, v in loaded.items()}
