"""Discovery and OpenAPI over HTTP: legacy documents (also when aggregated discovery is asked
for), `/openapi/v3` as kubectl's verifier reads it, `/openapi/v2` as protobuf and JSON, health."""

from __future__ import annotations

import json

import pytest

from edgeweave.apiserver.testing import ApiHarness, Client

AGGREGATED = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
)


@pytest.fixture(scope="module")
def admin(api: ApiHarness) -> Client:
    return api.client("admin")


def test_aggregated_discovery_falls_back_to_legacy(admin: Client) -> None:
    for path, kind in (("/api", "APIVersions"), ("/apis", "APIGroupList")):
        resp = admin.request("GET", path, headers={"Accept": AGGREGATED})
        assert resp.status == 200
        assert resp.header_values("Content-Type") == ["application/json"]  # no as=... parameter
        assert resp.json()["kind"] == kind


def test_group_and_resource_lists(admin: Client) -> None:
    groups = admin.request("GET", "/apis").json()
    names = [g["name"] for g in groups["groups"]]
    assert "apps" in names and "apps.kubeedge.io" in names
    apps = admin.request("GET", "/apis/apps").json()
    assert apps["kind"] == "APIGroup" and apps["preferredVersion"]["groupVersion"] == "apps/v1"
    core = admin.request("GET", "/api/v1").json()
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods/status"]["verbs"]
    apps_v1 = admin.request("GET", "/apis/apps/v1").json()
    scale = next(r for r in apps_v1["resources"] if r["name"] == "deployments/scale")
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    for missing in ("/apis/nope", "/apis/apps/v9", "/api/v2", "/nothing"):
        assert admin.request("GET", missing).status == 404


def test_openapi_v3_as_kubectl_reads_it(admin: Client) -> None:
    index = admin.request("GET", "/openapi/v3").json()
    url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/apps/v1?hash=")
    doc = admin.request("GET", url).json()
    item = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]
    patch = item["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "apps",
        "version": "v1",
        "kind": "Deployment",
    }
    assert {"name": "fieldValidation", "in": "query"}.items() <= patch["parameters"][2].items()
    ng = admin.request("GET", index["paths"]["apis/apps.kubeedge.io/v1alpha1"]["serverRelativeURL"])
    assert "/apis/apps.kubeedge.io/v1alpha1/nodegroups/{name}" in ng.json()["paths"]
    assert admin.request("GET", "/openapi/v3/apis/nope/v1").status == 404


def test_openapi_v2(admin: Client) -> None:
    proto = admin.request(
        "GET",
        "/openapi/v2",
        headers={"Accept": "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"},
    )
    assert proto.status == 200
    assert proto.header_values("Content-Type") == [
        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    ]
    assert proto.body.startswith(b"\x0a\x032.0\x12")  # field 1 "2.0", then field 2 (info)
    as_json = admin.request("GET", "/openapi/v2", headers={"Accept": "application/json"}).json()
    assert as_json["swagger"] == "2.0" and as_json["definitions"] == {}


def test_metrics(admin: Client) -> None:
    admin.request("GET", "/api/v1/namespaces/default/configmaps")
    text = admin.request("GET", "/metrics").body.decode()
    assert 'apiserver_request_total{verb="list",resource="configmaps",code="200"}' in text
    assert "apiserver_watchers 0" in text
    assert "apiserver_request_duration_seconds_count" in text


def test_version_and_health(api: ApiHarness, admin: Client) -> None:
    version = admin.request("GET", "/version").json()
    assert (version["major"], version["minor"]) == ("1", "32")
    assert json.loads(admin.request("GET", "/version").body)["gitVersion"] == "v1.32.0-edgeweave"
    for path in ("/healthz", "/livez", "/readyz"):
        assert admin.request("GET", path).body == b"ok"
    assert admin.request("POST", "/api").status == 405
