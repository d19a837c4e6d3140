"""JSON merge patch (RFC 7386), JSON patch (RFC 6902/6901) and strategic merge patch."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.kube.errors import BadRequest, PatchError, StoreError, UnsupportedMediaType
from edgeweave.kube.mergekeys import schema_for
from edgeweave.kube.patch import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    apply_patch,
    json_equal,
    json_merge_patch,
    json_patch,
    parse_pointer,
    strategic_merge_patch,
)

# RFC 7386 Appendix A, verbatim (original, patch, result).
RFC7386_APPENDIX_A = [
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', "{}"),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', "null", "null"),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ("[1,2]", '{"a":"b","c":null}', '{"a":"b"}'),
    ("{}", '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC7386_APPENDIX_A)
def test_rfc7386_appendix_a(original: str, patch: str, result: str) -> None:
    doc = json.loads(original)
    before = json.loads(original)
    assert json_merge_patch(doc, json.loads(patch)) == json.loads(result)
    assert doc == before  # the input is not modified


def test_rfc7386_section_3_example() -> None:
    target = {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    }
    patch = {
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {"familyName": None},
        "tags": ["example"],
    }
    assert json_merge_patch(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    }


# RFC 6902 Appendix A (A.13, duplicate "op" members, cannot survive JSON parsing).
RFC6902_APPENDIX_A: list[tuple[str, Any, list[dict[str, Any]], Any]] = [
    (
        "A.1",
        {"foo": "bar"},
        [{"op": "add", "path": "/baz", "value": "qux"}],
        {"baz": "qux", "foo": "bar"},
    ),
    (
        "A.2",
        {"foo": ["bar", "baz"]},
        [{"op": "add", "path": "/foo/1", "value": "qux"}],
        {"foo": ["bar", "qux", "baz"]},
    ),
    ("A.3", {"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    (
        "A.4",
        {"foo": ["bar", "qux", "baz"]},
        [{"op": "remove", "path": "/foo/1"}],
        {"foo": ["bar", "baz"]},
    ),
    (
        "A.5",
        {"baz": "qux", "foo": "bar"},
        [{"op": "replace", "path": "/baz", "value": "boo"}],
        {"baz": "boo", "foo": "bar"},
    ),
    (
        "A.6",
        {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
        [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
        {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}},
    ),
    (
        "A.7",
        {"foo": ["all", "grass", "cows", "eat"]},
        [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
        {"foo": ["all", "cows", "eat", "grass"]},
    ),
    (
        "A.8",
        {"baz": "qux", "foo": ["a", 2, "c"]},
        [
            {"op": "test", "path": "/baz", "value": "qux"},
            {"op": "test", "path": "/foo/1", "value": 2},
        ],
        {"baz": "qux", "foo": ["a", 2, "c"]},
    ),
    ("A.9", {"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], PatchError),
    (
        "A.10",
        {"foo": "bar"},
        [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
        {"foo": "bar", "child": {"grandchild": {}}},
    ),
    (
        "A.11",
        {"foo": "bar"},
        [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}],
        {"foo": "bar", "baz": "qux"},
    ),
    ("A.12", {"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], PatchError),
    ("A.14", {"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    ("A.15", {"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": "10"}], PatchError),
    (
        "A.16",
        {"foo": ["bar"]},
        [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
        {"foo": ["bar", ["abc", "def"]]},
    ),
]


@pytest.mark.parametrize(("case", "doc", "ops", "result"), RFC6902_APPENDIX_A)
def test_rfc6902_appendix_a(case: str, doc: Any, ops: list[dict[str, Any]], result: Any) -> None:
    before = json.loads(json.dumps(doc))
    if result is PatchError:
        with pytest.raises(PatchError):
            json_patch(doc, ops)
    else:
        assert json_patch(doc, ops) == result, case
    assert doc == before


def test_rfc6901_pointers() -> None:
    doc = {
        "foo": ["bar", "baz"],
        "": 0,
        "a/b": 1,
        "c%d": 2,
        "e^f": 3,
        "g|h": 4,
        "i\\j": 5,
        'k"l': 6,
        " ": 7,
        "m~n": 8,
    }
    cases = [
        ("", doc),
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ]
    for pointer, value in cases:
        assert json_patch(doc, [{"op": "test", "path": pointer, "value": value}]) == doc
    assert parse_pointer("/a~1b/~0") == ["a/b", "~"]
    for bad in ("a", "/~2", "/~"):
        with pytest.raises(ValueError):
            parse_pointer(bad)


@pytest.mark.parametrize(
    ("ops", "names"),
    [
        ([{"op": "replace", "path": "/missing", "value": 1}], "operation 0 (replace /missing)"),
        (
            [{"op": "add", "path": "/a", "value": 1}, {"op": "remove", "path": "/b/9"}],
            "operation 1 (remove /b/9)",
        ),
        ([{"op": "frob", "path": "/a"}], "unknown op 'frob'"),
        ([{"op": "add", "path": "/a"}], "missing 'value'"),
        ([{"op": "add", "value": 1}], "missing 'path'"),
        ([{"op": "add", "path": "a", "value": 1}], "bad 'path'"),
        ([{"op": "add", "path": "/b/01", "value": 1}], "not an array index"),
        ([{"op": "add", "path": "/b/5", "value": 1}], "out of range"),
        ([{"op": "remove", "path": "/b/-"}], "not an array index"),
        ([{"op": "move", "from": "/c", "path": "/c/d"}], "own children"),
        ([{"op": "remove", "path": ""}], "whole document"),
        ([{"op": "test", "path": "/a", "value": True}], "test failed"),
    ],
)
def test_json_patch_errors_name_the_operation(ops: list[dict[str, Any]], names: str) -> None:
    doc = {"a": 1, "b": [1, 2], "c": {"d": 1}}
    with pytest.raises(PatchError) as info:
        json_patch(doc, ops)
    assert names in str(info.value)
    assert info.value.code == 422


def test_json_patch_document_shape_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        json_patch({}, {"op": "add"})
    with pytest.raises(BadRequest):
        json_patch({}, [1])


def test_json_patch_whole_document_and_move_in_place() -> None:
    assert json_patch({"a": 1}, [{"op": "replace", "path": "", "value": [1]}]) == [1]
    assert json_patch({"a": 1}, [{"op": "move", "from": "/a", "path": "/a"}]) == {"a": 1}
    doc = {"a": {"x": [1]}}
    out = json_patch(doc, [{"op": "copy", "from": "/a", "path": "/b"}])
    out["b"]["x"].append(2)
    assert out["a"] == {"x": [1]}  # copies are deep


def test_json_equal_keeps_booleans_apart_from_numbers() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal({"a": [0]}, {"a": [False]})
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})


# ---- strategic merge patch: what kubectl sends --------------------------------------------------

DEPLOY: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a", "b"]},
    "spec": {
        "replicas": 1,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [
                    {
                        "name": "web",
                        "image": "nginx:1.25",
                        "args": ["-a", "-b"],
                        "ports": [{"containerPort": 80}, {"containerPort": 443}],
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    },
                    {"name": "sidecar", "image": "busybox"},
                ],
                "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
            },
        },
    },
}
SMP = schema_for("Deployment")


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return result


def test_kubectl_label_and_annotate() -> None:
    out = strategic_merge_patch(DEPLOY, {"metadata": {"labels": {"env": "prod"}}}, SMP)
    assert out["metadata"]["labels"] == {"app": "web", "env": "prod"}
    out = strategic_merge_patch(out, {"metadata": {"labels": {"env": None}}}, SMP)
    assert out["metadata"]["labels"] == {"app": "web"}
    assert DEPLOY["metadata"]["labels"] == {"app": "web"}  # untouched


def test_apply_changes_one_container_by_name_keeping_order() -> None:
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "$setElementOrder/containers": [{"name": "web"}, {"name": "sidecar"}],
                    "containers": [{"name": "web", "image": "nginx:1.26"}],
                }
            }
        }
    }
    out = strategic_merge_patch(DEPLOY, patch, SMP)
    web, sidecar = _containers(out)
    assert web["image"] == "nginx:1.26" and web["args"] == ["-a", "-b"]
    assert sidecar == {"name": "sidecar", "image": "busybox"}


def test_apply_reorders_adds_and_deletes_containers() -> None:
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "$setElementOrder/containers": [{"name": "new"}, {"name": "web"}],
                    "containers": [
                        {"name": "new", "image": "redis"},
                        {"$patch": "delete", "name": "sidecar"},
                    ],
                }
            }
        }
    }
    out = strategic_merge_patch(DEPLOY, patch, SMP)
    assert [c["name"] for c in _containers(out)] == ["new", "web"]
    assert "$patch" not in json.dumps(out)


def test_env_by_name_ports_by_container_port_args_replaced() -> None:
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                            "ports": [{"containerPort": 443, "name": "https"}],
                            "args": ["-c"],
                        }
                    ]
                }
            }
        }
    }
    web = _containers(strategic_merge_patch(DEPLOY, patch, SMP))[0]
    assert web["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ]
    assert web["ports"] == [{"containerPort": 80}, {"containerPort": 443, "name": "https"}]
    assert web["args"] == ["-c"]


def test_retain_keys_switches_volume_source_and_strategy() -> None:
    patch = {
        "spec": {
            "strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": None},
            "template": {
                "spec": {
                    "volumes": [
                        {
                            "$retainKeys": ["name", "secret"],
                            "name": "cfg",
                            "secret": {"secretName": "s"},
                        }
                    ]
                }
            },
        }
    }
    out = strategic_merge_patch(DEPLOY, patch, SMP)
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    assert out["spec"]["template"]["spec"]["volumes"] == [
        {"name": "cfg", "secret": {"secretName": "s"}}
    ]


def test_primitive_lists_merge_as_sets_and_delete() -> None:
    out = strategic_merge_patch(DEPLOY, {"metadata": {"finalizers": ["b", "c"]}}, SMP)
    assert out["metadata"]["finalizers"] == ["a", "b", "c"]
    out = strategic_merge_patch(
        out,
        {
            "metadata": {
                "$deleteFromPrimitiveList/finalizers": ["a"],
                "$setElementOrder/finalizers": ["c", "b"],
            }
        },
        SMP,
    )
    assert out["metadata"]["finalizers"] == ["c", "b"]


def test_patch_replace_and_delete_directives() -> None:
    out = strategic_merge_patch(
        DEPLOY, {"spec": {"strategy": {"$patch": "replace", "type": "Recreate"}}}, SMP
    )
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    out = strategic_merge_patch(DEPLOY, {"spec": {"strategy": {"$patch": "delete"}}}, SMP)
    assert "strategy" not in out["spec"]
    replace_list = {
        "spec": {
            "template": {
                "spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}
            }
        }
    }
    out = strategic_merge_patch(DEPLOY, replace_list, SMP)
    assert _containers(out) == [{"name": "only", "image": "x"}]


def test_service_ports_merge_by_port_and_pod_conditions_by_type() -> None:
    svc = {"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}}
    out = strategic_merge_patch(
        svc, {"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}, schema_for("Service")
    )
    assert out["spec"]["ports"] == [{"port": 80, "targetPort": 9090}, {"port": 443}]
    pod = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    out = strategic_merge_patch(
        pod,
        {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "PodScheduled", "status": "True"},
                ]
            }
        },
        schema_for("Pod"),
    )
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
    ]


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}, "merge key 'name'"),
        ({"spec": {"template": {"spec": {"containers": ["x"]}}}}, "must be objects"),
        ({"spec": {"$patch": "frob"}}, "unknown $patch 'frob'"),
        ({"metadata": {"$retainKeys": "name"}}, "$retainKeys"),
        ({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}}, "must be a list"),
    ],
)
def test_strategic_merge_errors(patch: dict[str, Any], names: str) -> None:
    with pytest.raises(BadRequest) as info:
        strategic_merge_patch(DEPLOY, patch, SMP)
    assert names in str(info.value)


def test_apply_patch_dispatch() -> None:
    body = b'{"spec":{"replicas":3}}'
    for ctype in (MERGE_PATCH, STRATEGIC_MERGE_PATCH + "; charset=utf-8"):
        assert apply_patch(ctype, DEPLOY, body, kind="Deployment")["spec"]["replicas"] == 3
    ops = '[{"op":"replace","path":"/spec/replicas","value":2}]'
    assert apply_patch(JSON_PATCH, DEPLOY, ops, kind="Deployment")["spec"]["replicas"] == 2
    with pytest.raises(UnsupportedMediaType, match="accepted media types"):
        apply_patch(STRATEGIC_MERGE_PATCH, DEPLOY, body, kind="NodeGroup", strategic=False)
    with pytest.raises(UnsupportedMediaType):
        apply_patch("application/apply-patch+yaml", DEPLOY, body, kind="Deployment")
    with pytest.raises(BadRequest, match="not valid JSON"):
        apply_patch(MERGE_PATCH, DEPLOY, b"{nope", kind="Deployment")
    with pytest.raises(BadRequest, match="not valid JSON"):
        apply_patch(MERGE_PATCH, DEPLOY, b'{"a": NaN}', kind="Deployment")
    with pytest.raises(PatchError, match="not a JSON object"):
        apply_patch(JSON_PATCH, DEPLOY, '[{"op":"replace","path":"","value":1}]', kind="Pod")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["a", "b", ""]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "c", "~", "/"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_pointers = st.lists(st.sampled_from(["a", "b", "0", "1", "-", "~0", "~1", "c"]), max_size=3).map(
    lambda toks: "".join("/" + t for t in toks)
)
_ops = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bogus"]),
        "path": _pointers,
    },
    optional={"value": _json, "from": _pointers},
)


@settings(max_examples=300, deadline=None)
@given(_json, st.lists(_ops, max_size=4))
def test_json_patch_fuzz_applies_or_raises_store_error(doc: Any, ops: list[dict[str, Any]]) -> None:
    before = json.dumps(doc)
    with contextlib.suppress(StoreError):
        json_patch(doc, ops)
    assert json.dumps(doc) == before


@settings(max_examples=300, deadline=None)
@given(_json, _json)
def test_merge_patch_is_idempotent(target: Any, patch: Any) -> None:
    once = json_merge_patch(target, patch)
    assert json_merge_patch(once, patch) == once


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["metadata", "spec", "$patch", "status"]), _json), _json)
def test_strategic_merge_fuzz_applies_or_raises_store_error(patch: Any, other: Any) -> None:
    for doc in (DEPLOY, {"spec": other}):
        with contextlib.suppress(StoreError):
            strategic_merge_patch(doc, patch, SMP)
