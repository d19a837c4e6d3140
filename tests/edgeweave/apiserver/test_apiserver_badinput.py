"""Bad input gets the right 4xx `Status`, kubectl-readable, and leaves the store unchanged;
garbage (fuzzed with hypothesis against the live server) never gets a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgeweave.apiserver.testing import ApiHarness, Client, Response
from edgeweave.kube.resources import CONFIGMAPS, DEPLOYMENTS

CMS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture(scope="module")
def admin(api: ApiHarness) -> Client:
    api.store.create(
        CONFIGMAPS, {"metadata": {"name": "fz"}, "data": {"a": "1"}}, namespace="default"
    )
    return api.client("admin")


def _status(resp: Response, code: int, reason: str) -> dict[str, Any]:
    assert resp.status == code, resp.body
    body: dict[str, Any] = resp.json()
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert (body["code"], body["reason"]) == (code, reason), body
    return body


def _unchanged(api: ApiHarness, before: int) -> None:
    assert api.store.revision == before


def test_invalid_json_is_400(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    body = _status(
        admin.request("POST", CMS, b'{"metadata": {', content_type="application/json"),
        400,
        "BadRequest",
    )
    assert body["message"].startswith("the request body is not valid JSON:")
    _unchanged(api, before)


def test_invalid_yaml_is_400(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    bad = b"metadata:\n  name: x\n data: [1,\n"
    body = _status(
        admin.request("POST", CMS, bad, content_type="application/yaml"), 400, "BadRequest"
    )
    assert (
        body["message"].startswith("error converting YAML to JSON: yaml:")
        and "line" in body["message"]
    )
    _unchanged(api, before)


def test_yaml_body_is_accepted(api: ApiHarness, admin: Client) -> None:
    doc = (
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-yaml\ndata:\n  day: 2024-01-01\n"
    )
    resp = admin.request("POST", CMS, doc, content_type="application/yaml")
    assert resp.status == 201, resp.body
    assert api.store.get(CONFIGMAPS, "from-yaml", namespace="default")["data"] == {
        "day": "2024-01-01"
    }


def test_yaml_alias_bomb_is_400(api: ApiHarness, admin: Client) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    before = api.store.revision
    body = _status(
        admin.request("POST", CMS, "\n".join(lines).encode(), content_type="application/yaml"),
        400,
        "BadRequest",
    )
    assert "aliases are expanded" in body["message"]
    _unchanged(api, before)


def test_unknown_group_version_or_resource_is_404(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    for path in (
        "/apis/example.com/v1/namespaces/default/widgets",
        "/api/v2/namespaces/default/configmaps",
        "/api/v1/namespaces/default/widgets",
        "/api/v1/namespaces/default/configmaps/fz/bogus",
    ):
        body = _status(admin.request("POST", path, {"metadata": {"name": "w"}}), 404, "NotFound")
        assert body["message"] == "the server could not find the requested resource"
    _unchanged(api, before)


def test_wrong_kind_or_api_version_is_400(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    body = _status(
        admin.request(
            "POST", CMS, {"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}
        ),
        400,
        "BadRequest",
    )
    assert (
        body["message"]
        == "the kind in the data (Widget) does not match the expected kind (ConfigMap)"
    )
    body = _status(
        admin.request(
            "POST",
            CMS,
            {"apiVersion": "example.com/v9", "kind": "ConfigMap", "metadata": {"name": "w"}},
        ),
        400,
        "BadRequest",
    )
    assert "API version in the data (example.com/v9)" in body["message"]
    _unchanged(api, before)


def test_missing_name_is_422(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    body = _status(admin.request("POST", CMS, {"data": {"a": "b"}}), 422, "Invalid")
    assert body["message"].startswith('ConfigMap "" is invalid: metadata.name: Required value')
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    _unchanged(api, before)


def test_stale_resource_version_is_409(api: ApiHarness, admin: Client) -> None:
    current = api.store.get(CONFIGMAPS, "fz", namespace="default")
    stale = {**current, "metadata": {**current["metadata"], "resourceVersion": "1"}}
    before = api.store.revision
    body = _status(admin.request("PUT", f"{CMS}/fz", stale), 409, "Conflict")
    assert body["message"] == (
        'Operation cannot be fulfilled on configmaps "fz": the object has been modified; please '
        "apply your changes to the latest version and try again"
    )
    _unchanged(api, before)


def test_oversized_body_is_413(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    big = json.dumps({"metadata": {"name": "big"}, "data": {"a": "x" * (3 * 1024 * 1024)}}).encode()
    body = _status(
        admin.request("POST", CMS, big, content_type="application/json"),
        413,
        "RequestEntityTooLarge",
    )
    assert body["message"] == "Request entity too large: limit is 3145728"
    _unchanged(api, before)


def test_field_validation(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    doc = {"metadata": {"name": "fv", "bogus": 1}, "data": {}, "extra": True}
    body = _status(admin.request("POST", f"{CMS}?fieldValidation=Strict", doc), 400, "BadRequest")
    assert (
        body["message"]
        == 'strict decoding error: unknown field "extra", unknown field "metadata.bogus"'
    )
    dup = b'{"metadata": {"name": "fv"}, "data": {"a": "1", "a": "2"}}'
    body = _status(
        admin.request(
            "POST", f"{CMS}?fieldValidation=Strict", dup, content_type="application/json"
        ),
        400,
        "BadRequest",
    )
    assert 'duplicate field "a"' in body["message"]
    _unchanged(api, before)
    warned = admin.request("POST", CMS, doc)  # default Warn: stored without the unknown fields
    assert warned.status == 201
    assert warned.header_values("Warning") == [
        '299 - "unknown field \\"extra\\""',
        '299 - "unknown field \\"metadata.bogus\\""',
    ]
    assert "extra" not in api.store.get(CONFIGMAPS, "fv", namespace="default")
    assert admin.request("POST", f"{CMS}?fieldValidation=Bogus", doc).status == 400


def test_dry_run_stores_nothing(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    made = admin.request("POST", f"{CMS}?dryRun=All", {"metadata": {"name": "dry"}})
    assert made.status == 201 and "resourceVersion" not in made.json()["metadata"]
    patched = admin.request(
        "PATCH",
        f"{CMS}/fz?dryRun=All",
        {"data": {"b": "2"}},
        content_type="application/merge-patch+json",
    )
    assert patched.status == 200 and patched.json()["data"] == {"a": "1", "b": "2"}
    svc = {"metadata": {"name": "drysvc"}, "spec": {"ports": [{"port": 80}]}}
    shown = admin.request("POST", "/api/v1/namespaces/default/services?dryRun=All", svc)
    assert shown.status == 201 and shown.json()["spec"]["clusterIP"].startswith("10.96.")
    assert admin.request("DELETE", f"{CMS}/fz?dryRun=All").status == 200
    assert admin.request("POST", f"{CMS}?dryRun=Some", {"metadata": {"name": "dry"}}).status == 400
    _unchanged(api, before)


def test_patch_types(api: ApiHarness, admin: Client) -> None:
    before = api.store.revision
    ng = {
        "apiVersion": "apps.kubeedge.io/v1alpha1",
        "kind": "NodeGroup",
        "metadata": {"name": "pt"},
    }
    assert admin.request("POST", "/apis/apps.kubeedge.io/v1alpha1/nodegroups", ng).status == 201
    before = api.store.revision
    smp = admin.request(
        "PATCH",
        "/apis/apps.kubeedge.io/v1alpha1/nodegroups/pt",
        {"spec": {}},
        content_type="application/strategic-merge-patch+json",
    )
    assert _status(smp, 415, "UnsupportedMediaType")["message"].startswith(
        "the body of the request was in an unknown format"
    )
    apply = admin.request(
        "PATCH", f"{CMS}/fz", b"data: {}", content_type="application/apply-patch+yaml"
    )
    assert "server-side apply" in _status(apply, 415, "UnsupportedMediaType")["message"]
    bad_op = admin.request(
        "PATCH",
        f"{CMS}/fz",
        [{"op": "test", "path": "/data/a", "value": "no"}],
        content_type="application/json-patch+json",
    )
    assert bad_op.status == 422
    _status(
        admin.request(
            "PATCH", f"{CMS}/nope", {"data": {}}, content_type="application/merge-patch+json"
        ),
        404,
        "NotFound",
    )
    _unchanged(api, before)


def test_service_cluster_ip_rules(api: ApiHarness, admin: Client) -> None:
    svcs = "/api/v1/namespaces/default/services"
    one = admin.request(
        "POST",
        svcs,
        {"metadata": {"name": "ip-a"}, "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 80}]}},
    )
    assert one.status == 201 and one.json()["spec"]["clusterIP"] == "10.96.5.5"
    before = api.store.revision
    taken = _status(
        admin.request(
            "POST",
            svcs,
            {
                "metadata": {"name": "ip-b"},
                "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 80}]},
            },
        ),
        422,
        "Invalid",
    )
    assert "provided IP is already allocated" in taken["message"]
    outside = _status(
        admin.request(
            "POST",
            svcs,
            {
                "metadata": {"name": "ip-c"},
                "spec": {"clusterIP": "10.0.0.5", "ports": [{"port": 80}]},
            },
        ),
        422,
        "Invalid",
    )
    assert "not in the valid range" in outside["message"]
    reserved = _status(
        admin.request(
            "POST",
            svcs,
            {
                "metadata": {"name": "ip-d"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            },
        ),
        422,
        "Invalid",
    )
    assert "already allocated" in reserved["message"]
    moved = api.store.get(api.store.registry.by_key("services"), "ip-a", namespace="default")
    moved["spec"]["clusterIP"] = "10.96.5.6"
    assert (
        "may not change once set"
        in _status(admin.request("PUT", f"{svcs}/ip-a", moved), 422, "Invalid")["message"]
    )
    _unchanged(api, before)
    headless = admin.request(
        "POST",
        svcs,
        {"metadata": {"name": "ip-h"}, "spec": {"clusterIP": "None", "selector": {"a": "b"}}},
    )
    assert headless.status == 201 and headless.json()["spec"]["clusterIP"] == "None"
    assert admin.request("DELETE", f"{svcs}/ip-a").status == 200
    again = admin.request(
        "POST",
        svcs,
        {"metadata": {"name": "ip-b"}, "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 80}]}},
    )
    assert again.status == 201  # released by the delete


def test_method_not_allowed_and_not_acceptable(api: ApiHarness, admin: Client) -> None:
    _status(admin.request("PUT", CMS, {"metadata": {"name": "x"}}), 405, "MethodNotAllowed")
    _status(
        admin.request("POST", "/api/v1/configmaps", {"metadata": {"name": "x"}}),
        405,
        "MethodNotAllowed",
    )
    proto = admin.request("GET", CMS, headers={"Accept": "application/vnd.kubernetes.protobuf"})
    _status(proto, 406, "NotAcceptable")
    _status(admin.request("GET", f"{CMS}?resourceVersionMatch=Exact"), 400, "BadRequest")
    _status(admin.request("GET", f"{CMS}?labelSelector=a%20in%20(b"), 400, "BadRequest")
    _status(admin.request("GET", f"{CMS}?resourceVersion=999999999"), 504, "Timeout")


def test_deployment_scale_subresource(api: ApiHarness, admin: Client) -> None:
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sc"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}},
        },
    }
    assert admin.request("POST", "/apis/apps/v1/namespaces/default/deployments", dep).status == 201
    scale = admin.request("GET", "/apis/apps/v1/namespaces/default/deployments/sc/scale").json()
    assert (scale["kind"], scale["apiVersion"], scale["spec"]["replicas"]) == (
        "Scale",
        "autoscaling/v1",
        1,
    )
    assert scale["status"]["selector"] == "a=b"
    scale["spec"]["replicas"] = 4
    assert (
        admin.request("PUT", "/apis/apps/v1/namespaces/default/deployments/sc/scale", scale).status
        == 200
    )
    assert api.store.get(DEPLOYMENTS, "sc", namespace="default")["spec"]["replicas"] == 4
    neg = admin.request(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/sc/scale",
        {"spec": {"replicas": -1}},
        content_type="application/merge-patch+json",
    )
    _status(neg, 422, "Invalid")


# ---- fuzzing ----------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    _json.map(lambda v: json.dumps(v).encode()),
    _json.map(lambda v: json.dumps(v).encode()[: max(1, len(json.dumps(v)) // 2)]),
    st.binary(max_size=200).map(lambda b: b"k8s\x00" + b),
    st.sampled_from(
        [
            b"[" * 5000,
            b"{" * 3000,
            b"a: &a [*a]",
            b"!!binary AAAA",
            b"- 1\n- 2",
            b"key: .nan",
            b"\xff\xfe",
            b"{}",
            b"null",
        ]
    ),
)
_targets = st.sampled_from(
    [
        ("POST", CMS),
        ("PUT", f"{CMS}/fz"),
        ("PATCH", f"{CMS}/fz"),
        ("POST", "/api/v1/namespaces/default/services"),
        ("PATCH", "/apis/apps.kubeedge.io/v1alpha1/nodegroups/pt"),
        ("DELETE", f"{CMS}/fz?dryRun=All"),
        ("POST", "/apis/apps/v1/namespaces/default/deployments"),
        ("PUT", "/apis/apps/v1/namespaces/default/deployments/sc/scale"),
    ]
)
_types = st.sampled_from(
    [
        "application/json", "application/yaml", "application/merge-patch+json",
        "application/json-patch+json", "application/strategic-merge-patch+json",
        "application/apply-patch+yaml", "text/plain", "application/vnd.kubernetes.protobuf", "",
        "application/vnd.kubernetes.protobuf",
    ]
)  # fmt: skip


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(target=_targets, body=_bodies, content_type=_types)
def test_garbage_never_5xx(
    api: ApiHarness, admin: Client, target: tuple[str, str], body: bytes, content_type: str
) -> None:
    method, path = target
    if method == "DELETE" and not body.strip().startswith(b"{"):
        body = b""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    # a body that happens to be a valid object may be applied; garbage is what we fuzz
    assume(
        not (
            isinstance(value, dict) and ("metadata" in value or "spec" in value or "data" in value)
        )
    )
    assume(not (isinstance(value, list) and not value))
    before = api.store.revision
    resp = admin.request(method, path, body, content_type=content_type or None)
    assert resp.status < 500, (resp.status, resp.body)
    if resp.status >= 400:
        status = resp.json()
        assert status["kind"] == "Status" and status["code"] == resp.status
        assert api.store.revision == before
