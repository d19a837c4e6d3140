"""Label and field selectors with Kubernetes syntax: parse, print, match.

Label selectors (the `?labelSelector=` / `kubectl -l` language):

    selector    := "" | requirement ("," requirement)*
    requirement := ["!"] key                                  exists / does not exist
                 | key ("=" | "==" | "!=") [value]            equality (empty value allowed)
                 | key ("in" | "notin") "(" [value ("," [value])*] ")"
                 | key (">" | "<") integer                    numeric comparison
    key         := [dns-subdomain "/"] name      name: 1-63 chars [A-Za-z0-9_.-], alnum at both ends
    value       := 0-63 chars [A-Za-z0-9_.-], alnum at both ends

Whitespace between tokens is ignored. Requirements are ANDed; `!=` and `notin` match objects
that lack the key, `in`, `=`, `>` and `<` need it. Field selectors (`?fieldSelector=`) are
comma-joined `path=value`, `path==value` or `path!=value` terms over dotted paths such as
`spec.nodeName`; in values, `\\`, `\\,` and `\\=` escape a backslash, comma and equals sign.

Both parsers take any string and either return a selector or raise `ParseError` (a 400
`BadRequest`) whose message names the offending part; nothing else escapes them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from edgeweave.kube.errors import ParseError

LabelOp = Literal["=", "!=", "in", "notin", "exists", "!", ">", "<"]
FieldOp = Literal["=", "!="]

_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key (a qualified name), or None if it is."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix part must be non-empty"
        if len(prefix) > 253:
            return "prefix part must be no more than 253 characters"
        if not _SUBDOMAIN_RE.fullmatch(prefix):
            return (
                "prefix part a lowercase RFC 1123 subdomain must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character"
            )
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _NAME_RE.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a valid label value, or None if it is."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _VALUE_RE.fullmatch(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def parse_int64(text: str) -> int | None:
    """The int64 value of a decimal string (as Go's ParseInt reads it), or None."""
    if not _INT_RE.fullmatch(text):
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One label requirement: `key op values`."""

    key: str
    """The label key."""
    op: LabelOp
    """`=`, `!=`, `in`, `notin`, `exists`, `!` (does not exist), `>` or `<`."""
    values: tuple[str, ...] = ()
    """Sorted, de-duplicated values (one for `=`, `!=`, `>`, `<`; none for exists/`!`)."""

    def matches(self, labels: Mapping[str, Any]) -> bool:
        """Whether a label map satisfies this requirement."""
        op = self.op
        if op == "exists":
            return self.key in labels
        if op == "!":
            return self.key not in labels
        value = labels.get(self.key)
        if op == "!=":
            return bool(value != self.values[0])
        if op == "notin":
            return value not in self.values
        if value is None:
            return False
        if op == "=":
            return bool(value == self.values[0])
        if op == "in":
            return value in self.values
        have = parse_int64(value) if isinstance(value, str) else None
        if have is None:
            return False
        want = int(self.values[0])
        return have > want if op == ">" else have < want

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!":
            return "!" + self.key
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return f"{self.key}{self.op}{self.values[0]}"


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """An AND of label requirements. No requirements matches everything."""

    requirements: tuple[Requirement, ...] = ()
    """The requirements, in the order written."""
    match_nothing: bool = False
    """True for a nil selector in an object (`selector: null`): matches no object."""

    @property
    def empty(self) -> bool:
        """True if this selector matches every object."""
        return not self.requirements and not self.match_nothing

    def matches(self, labels: Mapping[str, Any] | None) -> bool:
        """Whether an object with these labels is selected."""
        if self.match_nothing:
            return False
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def matches_object(self, obj: Mapping[str, Any]) -> bool:
        """Whether the object's `metadata.labels` are selected."""
        meta = obj.get("metadata")
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        return self.matches(labels if isinstance(labels, Mapping) else None)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse the string form; see the module docstring."""
        return parse_label_selector(text)

    @classmethod
    def from_set(cls, labels: Mapping[str, str]) -> LabelSelector:
        """`key=value` for every entry (a Service's `spec.selector`); validated."""
        reqs = [_requirement(k, "=", [v]) for k, v in sorted(labels.items())]
        return cls(tuple(reqs))

    @classmethod
    def from_dict(cls, selector: Mapping[str, Any] | None) -> LabelSelector:
        """A `metav1.LabelSelector` (`matchLabels`, `matchExpressions`); None matches nothing."""
        if selector is None:
            return cls(match_nothing=True)
        if not isinstance(selector, Mapping):
            raise ParseError("label selector must be an object")
        reqs: list[Requirement] = []
        match_labels = selector.get("matchLabels") or {}
        if not isinstance(match_labels, Mapping):
            raise ParseError("matchLabels must be a map of strings")
        for key, value in sorted(match_labels.items()):
            if not isinstance(key, str) or not isinstance(value, str):
                raise ParseError(f"matchLabels[{key!r}] must be a string")
            reqs.append(_requirement(key, "=", [value]))
        ops: dict[str, LabelOp] = {
            "In": "in",
            "NotIn": "notin",
            "Exists": "exists",
            "DoesNotExist": "!",
        }
        expressions = selector.get("matchExpressions") or []
        if not isinstance(expressions, list):
            raise ParseError("matchExpressions must be a list")
        for i, expr in enumerate(expressions):
            where = f"matchExpressions[{i}]"
            if not isinstance(expr, Mapping):
                raise ParseError(f"{where} must be an object")
            key, op_name, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
            if not isinstance(key, str):
                raise ParseError(f"{where}.key must be a string")
            if op_name not in ops:
                raise ParseError(f"{where}.operator: {op_name!r} is not a valid selector operator")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ParseError(f"{where}.values must be a list of strings")
            op = ops[op_name]
            if op in ("in", "notin") and not values:
                raise ParseError(f"{where}.values: must be specified when operator is {op_name}")
            if op in ("exists", "!") and values:
                raise ParseError(f"{where}.values: may not be specified when operator is {op_name}")
            reqs.append(_requirement(key, op, values))
        return cls(tuple(reqs))


def _requirement(key: str, op: LabelOp, values: Iterable[str]) -> Requirement:
    why = label_key_error(key)
    if why is not None:
        raise ParseError(f'unable to parse requirement: key "{key}": {why}')
    vals = tuple(sorted(set(values)))
    if op in (">", "<") and (len(vals) != 1 or parse_int64(vals[0]) is None):
        raise ParseError(
            f"unable to parse requirement: key \"{key}\": for '{op}' the value must be "
            f"a single integer, got {list(vals)}"
        )
    for value in vals:
        why = label_value_error(value)
        if why is not None:
            raise ParseError(f'unable to parse requirement: value "{value}" of key "{key}": {why}')
    return Requirement(key, op, vals)


# ---- label selector lexer and parser ----------------------------------------------------------

_SPECIAL = "=!(),<>"
_EXACT_OPS: dict[str, LabelOp] = {"=": "=", "==": "=", "!=": "!=", ">": ">", "<": "<"}
_TWO_CHAR = ("!=", "==")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) tokens; kind is `id`, `op` or `end`."""
    out: list[tuple[str, str, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _SPECIAL:
            two = text[i : i + 2]
            if two in _TWO_CHAR:
                out.append(("op", two, i))
                i += 2
            else:
                out.append(("op", c, i))
                i += 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            out.append(("id", text[start:i], start))
    out.append(("end", "", n))
    return out


class _LabelParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.pos = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.pos]

    def take(self) -> tuple[str, str, int]:
        tok = self.toks[self.pos]
        if tok[0] != "end":
            self.pos += 1
        return tok

    def fail(self, tok: tuple[str, str, int], expected: str) -> ParseError:
        found = tok[1] if tok[0] != "end" else "end of string"
        return ParseError(
            f"unable to parse requirement: found '{found}' at offset {tok[2]} "
            f"of {self.text!r}, expected: {expected}"
        )

    def parse(self) -> LabelSelector:
        if self.peek()[0] == "end":
            return LabelSelector()
        reqs = [self.requirement()]
        while True:
            tok = self.take()
            if tok[0] == "end":
                return LabelSelector(tuple(reqs))
            if tok[1] != ",":
                raise self.fail(tok, "','")
            reqs.append(self.requirement())

    def requirement(self) -> Requirement:
        tok = self.take()
        if tok[1] == "!" and tok[0] == "op":
            key_tok = self.take()
            if key_tok[0] != "id":
                raise self.fail(key_tok, "label key after '!'")
            return _requirement(key_tok[1], "!", ())
        if tok[0] != "id":
            raise self.fail(tok, "label key")
        key = tok[1]
        nxt = self.peek()
        if nxt[0] == "end" or nxt[1] == ",":
            return _requirement(key, "exists", ())
        op_tok = self.take()
        op_text = op_tok[1]
        if op_tok[0] == "id" and op_text in ("in", "notin"):
            op: LabelOp = "in" if op_text == "in" else "notin"
            return _requirement(key, op, self.value_set())
        if op_tok[0] == "op" and op_text in ("=", "==", "!=", ">", "<"):
            return _requirement(key, _EXACT_OPS[op_text], [self.exact_value()])
        raise self.fail(op_tok, "'=', '==', '!=', 'in', 'notin', '>' or '<'")

    def exact_value(self) -> str:
        nxt = self.peek()
        if nxt[0] == "end" or nxt[1] == ",":
            return ""
        tok = self.take()
        if tok[0] != "id":
            raise self.fail(tok, "a value")
        return tok[1]

    def value_set(self) -> list[str]:
        tok = self.take()
        if tok[1] != "(":
            raise self.fail(tok, "'('")
        values: list[str] = []
        expect_value = True
        while True:
            tok = self.take()
            if tok[1] == ")" and tok[0] == "op":
                if expect_value:
                    values.append("")  # "()" and "(a,)" hold the empty value
                return values
            if tok[1] == "," and tok[0] == "op":
                if expect_value:
                    values.append("")  # "(,a)" and "(a,,b)"
                expect_value = True
            elif tok[0] == "id" and expect_value:
                values.append(tok[1])
                expect_value = False
            else:
                raise self.fail(tok, "',', ')' or a value" if not expect_value else "a value")


def parse_label_selector(text: str) -> LabelSelector:
    """Parse a label selector string; raises `ParseError` naming the bad part."""
    return _LabelParser(text).parse()


# ---- field selectors --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    """One field requirement: `path op value`."""

    path: str
    """Dotted field path, e.g. `spec.nodeName`."""
    op: FieldOp
    """`=` or `!=`."""
    value: str
    """The unescaped value; a missing field has the value ''."""

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether the object's field satisfies this requirement."""
        have = field_value(obj, self.path)
        return have == self.value if self.op == "=" else have != self.value

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
        return f"{self.path}{self.op}{escaped}"


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """An AND of field requirements. No requirements matches everything."""

    requirements: tuple[FieldRequirement, ...] = ()
    """The requirements, in the order written."""

    @property
    def empty(self) -> bool:
        """True if this selector matches every object."""
        return not self.requirements

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether the object is selected."""
        return all(r.matches(obj) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    @classmethod
    def parse(cls, text: str) -> FieldSelector:
        """Parse the string form; see the module docstring."""
        return parse_field_selector(text)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    start, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(value: str, term: str) -> str:
    out: list[str] = []
    escaped = False
    for c in value:
        if escaped:
            if c not in "\\,=":
                raise ParseError(
                    f"invalid field selector {term!r}: invalid escape sequence '\\{c}'"
                )
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in ",=":
            raise ParseError(f"invalid field selector {term!r}: unescaped '{c}' in value")
        else:
            out.append(c)
    if escaped:
        raise ParseError(f"invalid field selector {term!r}: value ends in an unfinished escape")
    return "".join(out)


def parse_field_selector(text: str) -> FieldSelector:
    """Parse a field selector string; raises `ParseError` naming the bad term."""
    reqs: list[FieldRequirement] = []
    for term in _split_unescaped(text, ","):
        if not term:
            continue
        for i in range(len(term)):
            rest = term[i:]
            op = next((o for o in ("!=", "==", "=") if rest.startswith(o)), None)
            if op is not None:
                path, value = term[:i], term[i + len(op) :]
                break
        else:
            raise ParseError(f"invalid field selector: can't understand {term!r} (no operator)")
        if not _PATH_RE.fullmatch(path):
            raise ParseError(
                f"invalid field selector {term!r}: field {path!r} is not a dotted path of "
                "letters, digits, '_' and '-'"
            )
        reqs.append(FieldRequirement(path, "!=" if op == "!=" else "=", _unescape(value, term)))
    return FieldSelector(tuple(reqs))


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A field's value as Kubernetes field selectors see it: a string, '' when absent.

    Booleans print as `true`/`false`, numbers in decimal, null as ''; objects and lists (which
    Kubernetes never offers as selectable fields) as compact JSON.
    """
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
        if cur is None:
            return ""
    if isinstance(cur, str):
        return cur
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if isinstance(cur, int | float):
        return str(cur)
    return json.dumps(cur, separators=(",", ":"))
