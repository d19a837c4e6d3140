"""The three patch formats the Kubernetes API accepts, as pure functions over JSON values.

- JSON merge patch (RFC 7386, `application/merge-patch+json`): `json_merge_patch`.
- JSON patch (RFC 6902, `application/json-patch+json`) with RFC 6901 pointers: `json_patch`.
- Strategic merge patch (`application/strategic-merge-patch+json`): `strategic_merge_patch`,
  with lists merged by key per `mergekeys` and the directives kubectl sends: `$patch`
  (`merge`/`replace`/`delete`, on maps and on list items), `$retainKeys`,
  `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>`.

`apply_patch` picks one by content type. Inputs are never modified; a result may share
untouched sub-objects with the original. A malformed patch document is a `BadRequest` (400); a
well-formed patch that cannot apply (a failed `test`, a path that does not exist) is a
`PatchError` (422) whose message names the operation and path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edgeweave.kube.errors import BadRequest, PatchError, UnsupportedMediaType
from edgeweave.kube.mergekeys import Field, Schema, schema_for

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars); faster than `copy.deepcopy`."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: copy_json(v) for k, v in value.items()}
    return value


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes | str) -> Any:
    """Parse a JSON request body; anything that is not strict JSON is a BadRequest."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the patch is not valid JSON: {exc}") from None


# ---- RFC 7386 ---------------------------------------------------------------------------------


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes a member, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy_json(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# ---- RFC 6901 / RFC 6902 ----------------------------------------------------------------------


def parse_pointer(pointer: str) -> list[str]:
    """RFC 6901: `/a~1b/0` -> ['a/b', '0']; '' is the whole document. ValueError if malformed."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ValueError("a JSON pointer must be empty or start with '/'")
    tokens = []
    for raw in pointer[1:].split("/"):
        i = raw.find("~")
        while i >= 0:
            if raw[i + 1 : i + 2] not in ("0", "1"):
                raise ValueError(f"'~' must be followed by 0 or 1 in {raw!r}")
            i = raw.find("~", i + 2)
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


class _OpFailed(Exception):
    """Internal: one JSON patch operation failed; `json_patch` adds which one."""


def _index(token: str, size: int, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return size
    if not token.isascii() or not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise _OpFailed(f"{token!r} is not an array index")
    index = int(token)
    limit = size if allow_end else size - 1
    if index > limit:
        raise _OpFailed(f"array index {index} is out of range (length {size})")
    return index


def _walk(doc: Any, tokens: list[str]) -> Any:
    cur = doc
    for depth, token in enumerate(tokens):
        where = "/" + "/".join(tokens[: depth + 1])
        if isinstance(cur, dict):
            if token not in cur:
                raise _OpFailed(f"path {where} does not exist")
            cur = cur[token]
        elif isinstance(cur, list):
            cur = cur[_index(token, len(cur), allow_end=False)]
        else:
            raise _OpFailed(f"path {where} does not exist (parent is not an object or array)")
    return cur


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), allow_end=True), value)
    else:
        raise _OpFailed("the parent of the target is not an object or array")
    return doc


def _remove(doc: Any, tokens: list[str]) -> tuple[Any, Any]:
    if not tokens:
        raise _OpFailed("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _OpFailed(f"path /{'/'.join(tokens)} does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(last, len(parent), allow_end=False))
    raise _OpFailed("the parent of the target is not an object or array")


def _replace(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _OpFailed(f"path /{'/'.join(tokens)} does not exist")
        parent[last] = value
    elif isinstance(parent, list):
        parent[_index(last, len(parent), allow_end=False)] = value
    else:
        raise _OpFailed("the parent of the target is not an object or array")
    return doc


def _member(op: Mapping[str, Any], name: str) -> Any:
    if name not in op:
        raise _OpFailed(f"missing {name!r}")
    return op[name]


def _pointer(op: Mapping[str, Any], name: str) -> list[str]:
    value = _member(op, name)
    if not isinstance(value, str):
        raise _OpFailed(f"{name!r} must be a string")
    try:
        return parse_pointer(value)
    except ValueError as exc:
        raise _OpFailed(f"bad {name!r} {value!r}: {exc}") from None


def _apply_op(doc: Any, op: Mapping[str, Any]) -> Any:
    kind = op.get("op")
    path = _pointer(op, "path")
    if kind == "add":
        return _add(doc, path, copy_json(_member(op, "value")))
    if kind == "remove":
        return _remove(doc, path)[0]
    if kind == "replace":
        return _replace(doc, path, copy_json(_member(op, "value")))
    if kind in ("move", "copy"):
        source = _pointer(op, "from")
        if kind == "move":
            if source == path:
                _walk(doc, source)
                return doc
            if path[: len(source)] == source:
                raise _OpFailed("cannot move a value into one of its own children")
            doc, value = _remove(doc, source)
        else:
            value = copy_json(_walk(doc, source))
        return _add(doc, path, value)
    if kind == "test":
        expected = _member(op, "value")
        if not json_equal(_walk(doc, path), expected):
            raise _OpFailed(f"test failed: value is not {json.dumps(expected)}")
        return doc
    raise _OpFailed(f"unknown op {kind!r}")


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902: apply the operations in order, all or nothing."""
    if not isinstance(operations, list):
        raise BadRequest("a JSON patch must be an array of operations")
    result = copy_json(doc)
    for i, op in enumerate(operations):
        if not isinstance(op, Mapping):
            raise BadRequest(f"JSON patch operation {i} is not an object")
        try:
            result = _apply_op(result, op)
        except _OpFailed as exc:
            kind = op.get("op")
            path = op.get("path")
            raise PatchError(f"JSON patch operation {i} ({kind} {path}) failed: {exc}") from None
    return result


# ---- strategic merge patch --------------------------------------------------------------------

_DELETE = object()  # a map patched with {"$patch": "delete"}
_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"
_NO_FIELD = Field()


def _key_of(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _merge_map(
    original: Mapping[str, Any], patch: Mapping[str, Any], schema: Schema, path: str
) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        body = {k: v for k, v in patch.items() if k != "$patch"}
        return _merge_map({}, body, schema, path)
    if directive not in (None, "merge"):
        raise BadRequest(f"strategic merge patch: unknown $patch {directive!r} at {path or '/'}")
    result = dict(original)
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list) or not all(isinstance(k, str) for k in retain):
            raise BadRequest(
                f"strategic merge patch: $retainKeys at {path or '/'} must list strings"
            )
        for key in [k for k in result if k not in retain]:
            del result[key]
    for key, value in patch.items():
        if key.startswith(_DELETE_PRIMITIVE):
            name = key[len(_DELETE_PRIMITIVE) :]
            if not isinstance(value, list):
                raise BadRequest(f"strategic merge patch: {key} at {path or '/'} must be a list")
            current = result.get(name)
            if isinstance(current, list):
                drop = {_key_of(v) for v in value}
                result[name] = [v for v in current if _key_of(v) not in drop]
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith((_ORDER, _DELETE_PRIMITIVE)):
            continue
        field = schema.get(key, _NO_FIELD)
        where = f"{path}.{key}"
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            current = result.get(key)
            merged = _merge_map(
                current if isinstance(current, Mapping) else {}, value, field.fields, where
            )
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            current = result.get(key)
            result[key] = _merge_list(
                current if isinstance(current, list) else [], value, field, where
            )
        else:
            result[key] = value
    for key, order in patch.items():
        if key.startswith(_ORDER):
            name = key[len(_ORDER) :]
            if not isinstance(order, list):
                raise BadRequest(f"strategic merge patch: {key} at {path or '/'} must be a list")
            if isinstance(result.get(name), list):
                result[name] = _reorder(result[name], order, schema.get(name, _NO_FIELD), path)
    return result


def _clean(item: Any, field: Field, path: str) -> Any:
    """A new list item or value, with any directives inside it processed away."""
    if isinstance(item, Mapping):
        merged = _merge_map({}, item, field.fields, path)
        return {} if merged is _DELETE else merged
    return copy_json(item)


def _merge_list(original: list[Any], patch: list[Any], field: Field, path: str) -> list[Any]:
    if field.set_merge:
        result = list(original)
        seen = {_key_of(v) for v in result}
        for value in patch:
            if _key_of(value) not in seen:
                seen.add(_key_of(value))
                result.append(copy_json(value))
        return result
    key = field.merge_key
    if key is None:
        return [_clean(v, field, path) for v in patch]
    if any(isinstance(v, Mapping) and v.get("$patch") == "replace" for v in patch):
        return [
            _clean(v, field, path)
            for v in patch
            if not (isinstance(v, Mapping) and v.get("$patch") == "replace")
        ]
    result = list(original)
    for item in patch:
        if not isinstance(item, Mapping):
            raise BadRequest(f"strategic merge patch: items of {path} must be objects with {key!r}")
        if key not in item:
            raise BadRequest(
                f"strategic merge patch: an item of {path} does not contain declared merge key "
                f"{key!r}: {json.dumps(item)[:200]}"
            )
        want = _key_of(item[key])
        directive = item.get("$patch")
        if directive == "delete":
            result = [
                v for v in result if not (isinstance(v, Mapping) and _key_of(v.get(key)) == want)
            ]
            continue
        if directive not in (None, "merge"):
            raise BadRequest(f"strategic merge patch: unknown $patch {directive!r} in {path}")
        for i, current in enumerate(result):
            if isinstance(current, Mapping) and _key_of(current.get(key)) == want:
                result[i] = _merge_map(current, item, field.fields, f"{path}[{key}={item[key]}]")
                break
        else:
            result.append(_clean(item, field, path))
    return result


def _reorder(items: list[Any], order: list[Any], field: Field, path: str) -> list[Any]:
    """`$setElementOrder`: listed items take the listed order; others keep their slots."""
    key = field.merge_key

    def ident(value: Any) -> str:
        if key is not None:
            return _key_of(value.get(key)) if isinstance(value, Mapping) else _key_of(None)
        return _key_of(value)

    rank: dict[str, int] = {}
    for i, entry in enumerate(order):
        if key is not None and not isinstance(entry, Mapping):
            raise BadRequest(f"strategic merge patch: $setElementOrder at {path} must list objects")
        rank.setdefault(ident(entry), i)
    listed = sorted((v for v in items if ident(v) in rank), key=lambda v: rank[ident(v)])
    queue = iter(listed)
    return [next(queue) if ident(v) in rank else v for v in items]


def strategic_merge_patch(
    original: Mapping[str, Any], patch: Any, schema: Schema
) -> dict[str, Any]:
    """Apply a strategic merge patch to an object, merging lists per `schema`."""
    if not isinstance(patch, Mapping):
        raise BadRequest("a strategic merge patch must be a JSON object")
    result = _merge_map(original, patch, schema, "")
    return {} if result is _DELETE else dict(result)


# ---- dispatch ---------------------------------------------------------------------------------


def media_type(content_type: str) -> str:
    """`application/merge-patch+json; charset=utf-8` -> `application/merge-patch+json`."""
    return content_type.split(";", 1)[0].strip().lower()


def apply_patch(
    content_type: str,
    original: Mapping[str, Any],
    patch: Any,
    *,
    kind: str,
    strategic: bool = True,
) -> dict[str, Any]:
    """Apply a patch of the given content type; `patch` may be the raw body or parsed JSON.

    `strategic=False` (custom resources) refuses strategic merge patches with 415.
    """
    mtype = media_type(content_type)
    if mtype not in PATCH_TYPES or (mtype == STRATEGIC_MERGE_PATCH and not strategic):
        accepted = [JSON_PATCH, MERGE_PATCH] + ([STRATEGIC_MERGE_PATCH] if strategic else [])
        raise UnsupportedMediaType(
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{', '.join(accepted)}"
        )
    if isinstance(patch, bytes | str):
        patch = decode_json(patch)
    if mtype == JSON_PATCH:
        result = json_patch(original, patch)
    elif mtype == MERGE_PATCH:
        if not isinstance(patch, Mapping):
            raise BadRequest("a merge patch for an object must be a JSON object")
        result = json_merge_patch(original, patch)
    else:
        result = strategic_merge_patch(original, patch, schema_for(kind))
    if not isinstance(result, dict):
        raise PatchError("the patched document is not a JSON object")
    return result
