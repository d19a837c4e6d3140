"""Label and field selectors: Kubernetes syntax, semantics, errors naming the bad part, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.kube.errors import BadRequest, ParseError
from edgeweave.kube.selectors import (
    FieldSelector,
    LabelOp,
    LabelSelector,
    Requirement,
    field_value,
    parse_field_selector,
    parse_label_selector,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("app", (Requirement("app", "exists"),)),
        ("!app", (Requirement("app", "!"),)),
        ("app=web", (Requirement("app", "=", ("web",)),)),
        ("app == web", (Requirement("app", "=", ("web",)),)),
        ("app!=web", (Requirement("app", "!=", ("web",)),)),
        ("app=", (Requirement("app", "=", ("",)),)),
        ("app in (web, db)", (Requirement("app", "in", ("db", "web")),)),
        ("app notin (web)", (Requirement("app", "notin", ("web",)),)),
        ("app in ()", (Requirement("app", "in", ("",)),)),
        ("app in (a,,b)", (Requirement("app", "in", ("", "a", "b")),)),
        ("app in (a,)", (Requirement("app", "in", ("", "a")),)),
        ("x>5", (Requirement("x", ">", ("5",)),)),
        ("x < 10", (Requirement("x", "<", ("10",)),)),
        ("example.com/app=web", (Requirement("example.com/app", "=", ("web",)),)),
        (
            "a=1, b!=2,!c,d",
            (
                Requirement("a", "=", ("1",)),
                Requirement("b", "!=", ("2",)),
                Requirement("c", "!"),
                Requirement("d", "exists"),
            ),
        ),
        ("in=notin", (Requirement("in", "=", ("notin",)),)),
    ],
)
def test_label_selector_parses(text: str, expected: tuple[Requirement, ...]) -> None:
    assert parse_label_selector(text).requirements == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("a b", "'b'"),
        ("=b", "'='"),
        ("a=b=c", "'='"),
        ("a in b", "'b'"),
        ("a in (b", "end of string"),
        ("a in (b c)", "'c'"),
        ("a,", "end of string"),
        (",a", "','"),
        ("a=b,", "end of string"),
        ("!", "end of string"),
        ("a!", "'!'"),
        ("a>b", "integer"),
        ("a>", "integer"),
        ("-a=b", '"-a"'),
        ("a=-b", '"-b"'),
        ("a=" + "x" * 64, "63 characters"),
        ("x" * 64, "63 characters"),
        ("Bad_Prefix/a=b", "prefix"),
        ("/a", "prefix part must be non-empty"),
        ("a/", "name part must be non-empty"),
        ("a in (", "end of string"),
        ("a=(b)", "'('"),
    ],
)
def test_label_selector_errors_name_the_bad_part(text: str, names: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_label_selector(text)
    assert names in str(info.value)
    assert isinstance(info.value, BadRequest)
    assert info.value.to_status()["code"] == 400


def test_label_semantics_match_kubernetes() -> None:
    labels = {"app": "web", "tier": "front", "n": "7"}
    yes = [
        "",
        "app",
        "app=web",
        "app!=db",
        "!missing",
        "missing!=x",
        "app in (web,db)",
        "app notin (db)",
        "missing notin (x)",
        "n>6",
        "n<8",
        "app=web,tier=front",
    ]
    no = [
        "missing",
        "!app",
        "app=db",
        "app!=web",
        "missing=x",
        "missing in (x)",
        "app notin (web)",
        "n>7",
        "n<7",
        "app>1",
        "missing>1",
        "app=web,tier=back",
        "missing=",
    ]
    for text in yes:
        assert parse_label_selector(text).matches(labels), text
    for text in no:
        assert not parse_label_selector(text).matches(labels), text
    assert parse_label_selector("x=").matches({"x": ""})
    assert not parse_label_selector("x").matches(None)


def test_selector_from_label_selector_dict() -> None:
    sel = LabelSelector.from_dict(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "old", "operator": "DoesNotExist"},
            ],
        }
    )
    assert str(sel) == "app=web,tier in (a,b),!old"
    assert sel.matches({"app": "web", "tier": "a"})
    assert not sel.matches({"app": "web", "tier": "a", "old": "1"})
    assert LabelSelector.from_dict({}).empty
    nothing = LabelSelector.from_dict(None)
    assert not nothing.matches({}) and not nothing.empty
    with pytest.raises(ParseError, match="must be specified"):
        LabelSelector.from_dict({"matchExpressions": [{"key": "a", "operator": "In"}]})
    with pytest.raises(ParseError, match="not a valid selector operator"):
        LabelSelector.from_dict({"matchExpressions": [{"key": "a", "operator": "Gt"}]})
    assert str(LabelSelector.from_set({"b": "2", "a": "1"})) == "a=1,b=2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("spec.nodeName=n1", (("spec.nodeName", "=", "n1"),)),
        ("spec.nodeName==n1", (("spec.nodeName", "=", "n1"),)),
        ("status.phase!=Running", (("status.phase", "!=", "Running"),)),
        (
            "metadata.name=a,metadata.namespace=b",
            (("metadata.name", "=", "a"), ("metadata.namespace", "=", "b")),
        ),
        ("spec.nodeName=", (("spec.nodeName", "=", ""),)),
        (r"metadata.name=a\,b\=c\\d", (("metadata.name", "=", "a,b=c\\d"),)),
        ("a=b,", (("a", "=", "b"),)),
    ],
)
def test_field_selector_parses(text: str, expected: tuple[tuple[str, str, str], ...]) -> None:
    reqs = parse_field_selector(text).requirements
    assert tuple((r.path, r.op, r.value) for r in reqs) == expected
    again = parse_field_selector(str(parse_field_selector(text)))
    assert again == parse_field_selector(text)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("spec.nodeName", "no operator"),
        ("a=b=c", "unescaped '='"),
        (r"a=b\x", "invalid escape sequence"),
        ("a=b\\", "unfinished escape"),
        ("spec nodeName=a", "'spec nodeName'"),
        ("=a", "''"),
        ("a..b=c", "'a..b'"),
    ],
)
def test_field_selector_errors_name_the_term(text: str, names: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_field_selector(text)
    assert names in str(info.value)


def test_field_values_are_kubernetes_strings() -> None:
    obj = {"spec": {"nodeName": "n1", "hostNetwork": True, "n": 3, "nul": None, "m": {"a": 1}}}
    assert field_value(obj, "spec.nodeName") == "n1"
    assert field_value(obj, "spec.hostNetwork") == "true"
    assert field_value(obj, "spec.n") == "3"
    assert field_value(obj, "spec.nul") == ""
    assert field_value(obj, "spec.missing") == ""
    assert field_value(obj, "spec.nodeName.deeper") == ""
    assert field_value(obj, "spec.m") == '{"a":1}'
    sel = FieldSelector.parse("spec.nodeName=n1,status.phase=")
    assert sel.matches(obj)
    assert not FieldSelector.parse("spec.nodeName!=n1").matches(obj)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab=!(),<> in notx/.-_5\t"), max_size=30) | st.text())
def test_any_string_parses_or_raises_parse_error(text: str) -> None:
    with contextlib.suppress(ParseError):
        parse_label_selector(text)
    with contextlib.suppress(ParseError):
        parse_field_selector(text)


_keys = st.sampled_from(["app", "tier", "example.com/role", "n"])
_values = st.sampled_from(["web", "db", "", "1", "20", "x.y-z"])


@st.composite
def _requirements(draw: st.DrawFn) -> Requirement:
    key = draw(_keys)
    ops: list[LabelOp] = ["=", "!=", "in", "notin", "exists", "!", ">", "<"]
    op = draw(st.sampled_from(ops))
    if op in ("exists", "!"):
        return Requirement(key, op)
    if op in (">", "<"):
        return Requirement(key, op, (draw(st.sampled_from(["0", "5", "15"])),))
    if op in ("in", "notin"):
        vals = draw(st.sets(_values, min_size=1, max_size=3))
        return Requirement(key, op, tuple(sorted(vals)))
    return Requirement(key, op, (draw(_values),))


@settings(max_examples=300, deadline=None)
@given(st.lists(_requirements(), max_size=4))
def test_printed_selectors_parse_back(reqs: list[Requirement]) -> None:
    sel = LabelSelector(tuple(reqs))
    assert parse_label_selector(str(sel)) == sel
