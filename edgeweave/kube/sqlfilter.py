"""Compile label and field selectors into SQLite expressions, so filtering runs in C.

A list of 10k objects must not decode 10k JSON documents in Python. The store keeps, next to
each object's JSON text, its labels (as a small JSON object) and its selectable fields (see
`ResourceInfo.selectable_fields`); the expressions built here read those columns with SQLite's
JSON functions. Watch history rows hold only the object text, so for them the same selectors
compile against the full document.

The semantics match `selectors.Requirement.matches` / `FieldRequirement.matches` exactly
(tests compare both on random objects): every expression yields 0 or 1, never NULL.
"""

from __future__ import annotations

import dataclasses

from edgeweave.kube.resources import ResourceInfo
from edgeweave.kube.selectors import FieldSelector, LabelSelector, Requirement, parse_int64

INT_FUNCTION = "ew_int64"
"""Name of the SQL function (registered by the store) that parses a label value as int64."""


def int64_or_none(value: object) -> int | None:
    """The SQL function behind `INT_FUNCTION`: int64 value of a decimal string, else NULL."""
    return parse_int64(value) if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A boolean SQL expression and its parameters."""

    sql: str
    """The expression; `1` when nothing is filtered."""
    params: tuple[object, ...] = ()
    """Values for its `?` placeholders, in order."""


def _json_path(*segments: str) -> str:
    return "$" + "".join(f'."{s}"' for s in segments)


def _label_sql(value: str, req: Requirement) -> Compiled:
    op, vals = req.op, req.values
    if op == "exists":
        return Compiled(f"({value} IS NOT NULL)")
    if op == "!":
        return Compiled(f"({value} IS NULL)")
    if op == "=":
        return Compiled(f"({value} IS ?)", vals)
    if op == "!=":
        return Compiled(f"({value} IS NOT ?)", vals)
    marks = ",".join("?" * len(vals))
    if op == "in":
        return Compiled(f"COALESCE({value} IN ({marks}), 0)", vals)
    if op == "notin":
        return Compiled(f"COALESCE({value} NOT IN ({marks}), 1)", vals)
    cmp = ">" if op == ">" else "<"
    return Compiled(f"COALESCE({INT_FUNCTION}({value}) {cmp} ?, 0)", (int(vals[0]),))


def _json_field(column: str, path: str) -> Compiled:
    # Stringify as selectors.field_value does: booleans as true/false, null and absent as ''.
    jp = _json_path(*path.split("."))
    sql = (
        f"COALESCE(CASE json_type({column}, ?) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'"
        f" WHEN 'null' THEN '' ELSE CAST(json_extract({column}, ?) AS TEXT) END, '')"
    )
    return Compiled(sql, (jp, jp))


def _combine(parts: list[Compiled]) -> Compiled:
    if not parts:
        return Compiled("1")
    sql = " AND ".join(p.sql for p in parts)
    params: tuple[object, ...] = ()
    for p in parts:
        params += p.params
    return Compiled(f"({sql})", params)


def _fields(
    fields: FieldSelector | None,
    value_of: dict[str, str],
    fallback_column: str,
    fields_column: str | None,
    selectable: tuple[str, ...],
) -> list[Compiled]:
    parts: list[Compiled] = []
    for req in fields.requirements if fields else ():
        if req.path in value_of:
            expr = Compiled(value_of[req.path])
        elif fields_column is not None and req.path in selectable:
            expr = Compiled(
                f"COALESCE(json_extract({fields_column}, ?), '')", (_json_path(req.path),)
            )
        else:
            expr = _json_field(fallback_column, req.path)
        cmp = "=" if req.op == "=" else "!="
        parts.append(Compiled(f"({expr.sql} {cmp} ?)", (*expr.params, req.value)))
    return parts


def compile_for_rows(
    res: ResourceInfo, labels: LabelSelector | None, fields: FieldSelector | None
) -> Compiled:
    """Filter over the store's `objects` table (columns namespace, name, labels, fields, data)."""
    if labels is not None and labels.match_nothing:
        return Compiled("0")
    parts: list[Compiled] = []
    for req in labels.requirements if labels else ():
        value = Compiled("json_extract(labels, ?)", (_json_path(req.key),))
        inner = _label_sql(value.sql, req)
        parts.append(Compiled(inner.sql, value.params + inner.params))
    parts += _fields(
        fields,
        {"metadata.name": "name", "metadata.namespace": "namespace"},
        "data",
        "fields",
        res.selectable_fields,
    )
    return _combine(parts)


def compile_for_json(
    column: str, labels: LabelSelector | None, fields: FieldSelector | None
) -> Compiled:
    """Filter over a JSON text column (history rows), with `namespace`/`name` columns beside it."""
    if labels is not None and labels.match_nothing:
        return Compiled("0")
    parts: list[Compiled] = []
    for req in labels.requirements if labels else ():
        value = Compiled(f"json_extract({column}, ?)", (_json_path("metadata", "labels", req.key),))
        inner = _label_sql(value.sql, req)
        parts.append(Compiled(inner.sql, value.params + inner.params))
    parts += _fields(
        fields, {"metadata.name": "name", "metadata.namespace": "namespace"}, column, None, ()
    )
    return _combine(parts)
