"""Request bodies in, media types out: pure functions, no I/O.

- `decode_body`: JSON, YAML (`application/yaml`, as some clients send) or, for the kinds
  kubectl's generators create, Kubernetes protobuf (`k8sproto`) into a JSON value,
  with the limits kube-apiserver has in spirit: bounded nesting, bounded YAML alias expansion
  ("billion laughs"), JSON-only values (no NaN, no binary, YAML timestamps stay strings as
  sigs.k8s.io/yaml keeps them). Duplicate keys are reported (`fieldValidation=Strict` refuses
  them, as Kubernetes' strict decoder does).
- `negotiate`: which representation an `Accept` header asks for: plain JSON or YAML, a
  meta.k8s.io `Table` (kubectl get), or `PartialObjectMetadata`; anything else (protobuf, the
  aggregated discovery `as=APIGroupDiscoveryList`) is skipped so clients fall back, and nothing
  acceptable at all is 406.
- `failure_status` / `success_status`: Kubernetes `Status` bodies.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from edgeweave.apiserver import k8sproto
from edgeweave.kube.errors import BadRequest, StoreError, UnsupportedMediaType

JSON = "application/json"
YAML = "application/yaml"
_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
_JSON_TYPES = frozenset({"application/json", "text/json", ""})

OutputKind = Literal["json", "yaml", "table", "partial"]


class NotAcceptable(StoreError):
    """No representation the client accepts (406)."""

    code = 406
    reason = "NotAcceptable"


class EntityTooLarge(StoreError):
    """The request body is over the limit (413)."""

    code = 413
    reason = "RequestEntityTooLarge"


class MethodNotAllowed(StoreError):
    """The resource does not support this verb (405)."""

    code = 405
    reason = "MethodNotAllowed"


class Unauthorized(StoreError):
    """No valid credentials (401)."""

    code = 401
    reason = "Unauthorized"


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded request body."""

    value: Any
    """The JSON value."""
    duplicates: tuple[str, ...] = ()
    """Keys that appeared twice in one object (the last one won)."""


class _YamlLoader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader without the timestamp resolver: `2024-01-01` stays a string."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Budget:
    def __init__(self, nodes: int, depth: int) -> None:
        self.nodes = nodes
        self.depth = depth


def _jsonify(value: Any, budget: _Budget, depth: int, source: str) -> Any:
    """A JSON-safe copy of a decoded value, within the node and depth budgets."""
    budget.nodes -= 1
    if budget.nodes < 0:
        raise BadRequest(f"the request body is too large once {source} aliases are expanded")
    if depth > budget.depth:
        raise BadRequest(f"the request body nests deeper than {budget.depth} levels")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"the request body holds {value}, which JSON cannot represent")
        return value
    if isinstance(value, list):
        return [_jsonify(v, budget, depth + 1, source) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, bool):
                key = "true" if key else "false"
            elif key is None:
                key = "null"
            elif isinstance(key, int | float):
                key = str(key)
            elif not isinstance(key, str):
                raise BadRequest(f"the request body has a map key of type {type(key).__name__}")
            out[key] = _jsonify(item, budget, depth + 1, source)
        return out
    raise BadRequest(
        f"the request body holds a {type(value).__name__}, which JSON cannot represent"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(data: bytes, *, max_depth: int) -> Decoded:
    """Strict JSON (no NaN/Infinity), UTF-8; BadRequest naming the problem."""
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not UTF-8: {exc}") from None
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    _jsonify(value, _Budget(1 << 62, max_depth), 0, "JSON")
    return Decoded(value, tuple(duplicates))


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes in the document once aliases are expanded, counted on the node graph (a DAG:
    an alias is the same node object), so a "billion laughs" costs one pass, not a billion."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, done = stack.pop()
        if id(current) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [n for pair in current.value for n in pair]
        if not done:
            stack.append((current, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 0) for c in children)
        sizes[id(current)] = min(total, limit + 1)
    return sizes[id(node)]


def decode_yaml(data: bytes, *, max_nodes: int, max_depth: int) -> Decoded:
    """One YAML document, converted to JSON as sigs.k8s.io/yaml does."""
    loader = _YamlLoader(data)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, max_nodes) > max_nodes:
            raise BadRequest("the request body is too large once YAML aliases are expanded")
        value = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).split())
        raise BadRequest(f"error converting YAML to JSON: yaml: {text}") from None
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return Decoded(_jsonify(value, _Budget(max_nodes, max_depth), 0, "YAML"))


def decode_body(
    data: bytes, content_type: str | None, *, max_nodes: int, max_depth: int
) -> Decoded:
    """Decode an object body by its Content-Type (JSON when none is given)."""
    mtype = media_type(content_type)
    if mtype in _YAML_TYPES:
        return decode_yaml(data, max_nodes=max_nodes, max_depth=max_depth)
    if mtype in _JSON_TYPES:
        return decode_json(data, max_depth=max_depth)
    if mtype == k8sproto.PROTOBUF:
        obj = k8sproto.decode_object(data)
        return Decoded(_jsonify(obj, _Budget(max_nodes, max_depth), 0, "protobuf"))
    raise UnsupportedMediaType(
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{JSON}, {YAML}, {k8sproto.PROTOBUF} (for {', '.join(k for _, k in k8sproto.KINDS)})"
    )


# ---- content negotiation ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Output:
    """The representation chosen for a response."""

    kind: OutputKind
    """json/yaml: the object itself; table: a meta.k8s.io Table; partial: metadata only."""
    version: str = "v1"
    """meta.k8s.io version of a Table or PartialObjectMetadata."""


def _params(item: str) -> tuple[str, dict[str, str], float]:
    head, *rest = item.split(";")
    params: dict[str, str] = {}
    quality = 1.0
    for part in rest:
        key, _, val = part.partition("=")
        key, val = key.strip().lower(), val.strip().strip('"')
        if key == "q":
            try:
                quality = float(val)
            except ValueError:
                quality = 0.0
        elif key:
            params[key] = val
    return head.strip().lower(), params, quality


def negotiate(accept: str | None, *, allow_table: bool = True) -> Output:
    """The first representation in `accept` (by q, then order) that we can produce."""
    if not accept or not accept.strip():
        return Output("json")
    entries = [_params(item) for item in accept.split(",") if item.strip()]
    ranked = sorted(enumerate(entries), key=lambda e: (-e[1][2], e[0]))
    for _, (mtype, params, quality) in ranked:
        if quality <= 0:
            continue
        as_kind = params.get("as")
        if mtype in ("application/json", "application/*", "*/*"):
            if as_kind is None:
                return Output("json")
            version = params.get("v", "")
            if params.get("g") != "meta.k8s.io" or version not in ("v1", "v1beta1"):
                continue
            if as_kind == "Table" and allow_table:
                return Output("table", version)
            if as_kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
                return Output("partial", version)
        elif mtype in _YAML_TYPES and as_kind is None:
            return Output("yaml")
    raise NotAcceptable(
        f"only the following media types are accepted: {JSON}, {YAML}, "
        f"{JSON};as=Table;v=v1;g=meta.k8s.io"
    )


# ---- Status bodies ----------------------------------------------------------------------------


def failure_status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A `Status` with `status: Failure`."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


def success_status(details: Mapping[str, Any]) -> dict[str, Any]:
    """A `Status` with `status: Success` (what deleting an object returns for most kinds)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": dict(details),
    }


def warning_header(text: str) -> str:
    """One RFC 7234 `Warning` value as kube-apiserver sends it (`299 - "text"`); characters
    that cannot appear in a header (control characters, say from an unknown field's name) are
    replaced by `?`."""
    printable = "".join(c if c.isprintable() else "?" for c in text)
    escaped = printable.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{escaped}"'
