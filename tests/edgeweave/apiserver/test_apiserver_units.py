"""The pure parts of the API server: request info, parameters, media types, bodies, tables,
OpenAPI and its protobuf encoding, ClusterIP allocation and admission, authorization rules."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeweave.apiserver import codec, params, protobuf, tables
from edgeweave.apiserver.admission import Admission, AdmissionRequest, secret_defaults
from edgeweave.apiserver.auth import Attributes, ClusterAuthorizer, forbidden_message, node_decision
from edgeweave.apiserver.openapi import OpenAPI, gv_path, schema_name, v3_document
from edgeweave.apiserver.requestinfo import RequestInfo, parse_request_info
from edgeweave.apiserver.serviceip import ClusterIPAllocator
from edgeweave.kube.errors import BadRequest, Invalid, StoreError
from edgeweave.kube.resources import DEFAULT_REGISTRY, DEPLOYMENTS, NODES, PODS, SERVICES
from edgeweave.kube.store import Store
from edgeweave.pki import ADMIN, Identity, node_identity

# ---- request info -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/default/pods", {},
         ("list", "", "v1", "default", "pods", "", "")),
        ("GET", "/api/v1/pods", {"watch": "1"}, ("watch", "", "v1", "", "pods", "", "")),
        ("GET", "/api/v1/namespaces/ns1", {}, ("get", "", "v1", "ns1", "namespaces", "", "ns1")),
        ("PUT", "/api/v1/namespaces/ns1/status", {},
         ("update", "", "v1", "ns1", "namespaces", "status", "ns1")),
        ("PATCH", "/apis/apps/v1/namespaces/d/deployments/x/scale", {},
         ("patch", "apps", "v1", "d", "deployments", "scale", "x")),
        ("DELETE", "/apis/apps/v1/namespaces/d/deployments", {},
         ("deletecollection", "apps", "v1", "d", "deployments", "", "")),
        ("POST", "/api/v1/nodes", {}, ("create", "", "v1", "", "nodes", "", "")),
        ("GET", "/api/v1/nodes/n1", {"watch": "true"}, ("watch", "", "v1", "", "nodes", "", "n1")),
    ],
)  # fmt: skip
def test_request_info(
    method: str, path: str, query: dict[str, str], expected: tuple[str, ...]
) -> None:
    info = parse_request_info(method, path, query)
    assert info.resource_request
    got = (
        info.verb,
        info.api_group,
        info.api_version,
        info.namespace,
        info.resource,
        info.subresource,
        info.name,
    )
    assert got == expected


def test_request_info_non_resource() -> None:
    for path in (
        "/",
        "/api",
        "/api/v1",
        "/apis",
        "/apis/apps",
        "/apis/apps/v1",
        "/openapi/v3",
        "/version",
    ):
        assert not parse_request_info("GET", path, {}).resource_request, path
    assert parse_request_info("GET", "/api/v1/a/b/c/d", {}).extra_parts == 1


# ---- parameters -------------------------------------------------------------------------------


def test_list_options() -> None:
    opts = params.list_options(
        {"resourceVersion": "5", "resourceVersionMatch": "Exact", "limit": "10"}, watch=False
    )
    assert (opts.resource_version, opts.resource_version_match, opts.limit) == (5, "Exact", 10)
    bad = [
        {"resourceVersionMatch": "Exact"},
        {"resourceVersion": "0", "resourceVersionMatch": "Exact"},
        {"resourceVersion": "x"},
        {"resourceVersion": "1", "resourceVersionMatch": "Newest"},
        {"limit": "-1"},
        {"allowWatchBookmarks": "maybe"},
    ]
    for query in bad:
        with pytest.raises(BadRequest):
            params.list_options(query, watch=False)
    with pytest.raises(BadRequest):
        params.list_options({"sendInitialEvents": "true"}, watch=True)
    watch_list = {
        "sendInitialEvents": "true",
        "allowWatchBookmarks": "true",
        "resourceVersionMatch": "NotOlderThan",
        "resourceVersion": "0",
    }
    assert params.list_options(watch_list, watch=True).send_initial_events


def test_write_and_delete_options() -> None:
    assert params.write_options({}, []) == params.WriteOptions(False, "Warn")
    assert params.write_options({"fieldValidation": "Strict"}, ["All"]).dry_run
    with pytest.raises(BadRequest):
        params.write_options({"fieldValidation": "strictly"}, [])
    body = {
        "kind": "DeleteOptions",
        "gracePeriodSeconds": 5,
        "propagationPolicy": "Background",
        "preconditions": {"uid": "u"},
    }
    opts = params.delete_options({"gracePeriodSeconds": "0"}, [], body)
    assert (
        opts.grace_period_seconds,
        opts.propagation_policy,
        opts.preconditions.uid if opts.preconditions else None,
    ) == (0, "Background", "u")
    with pytest.raises(Invalid):
        params.delete_options({"propagationPolicy": "Sometimes"}, [], None)
    assert params.delete_options({}, [], {"dryRun": ["All"]}).dry_run


# ---- media types and bodies -------------------------------------------------------------------


def test_negotiate() -> None:
    kubectl_get = (
        "application/json;as=Table;v=v1;g=meta.k8s.io,"
        "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
    )
    assert codec.negotiate(kubectl_get) == codec.Output("table", "v1")
    aggregated = (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    )
    assert codec.negotiate(aggregated) == codec.Output("json")
    assert codec.negotiate("application/vnd.kubernetes.protobuf,*/*") == codec.Output("json")
    assert codec.negotiate("application/yaml") == codec.Output("yaml")
    assert codec.negotiate(None) == codec.Output("json")
    assert (
        codec.negotiate("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io").kind
        == "partial"
    )
    with pytest.raises(codec.NotAcceptable):
        codec.negotiate("application/vnd.kubernetes.protobuf")


def test_decode_bodies() -> None:
    decoded = codec.decode_body(
        b'{"a": 1, "a": 2}', "application/json", max_nodes=100, max_depth=10
    )
    assert decoded.value == {"a": 2} and decoded.duplicates == ("a",)
    yaml_doc = codec.decode_body(
        b"a: 2024-01-01\nb: [1, yes]\n1: x\n", "application/yaml", max_nodes=100, max_depth=10
    )
    assert yaml_doc.value == {"a": "2024-01-01", "b": [1, True], "1": "x"}
    for data, ctype in [
        (b"[" * 50 + b"]" * 50, "application/json"),
        (b"NaN", "application/json"),
        (b"a: .nan", "application/yaml"),
        (b"a: !!binary AAAA", "application/yaml"),
        (b"--- 1\n--- 2\n", "application/yaml"),
        (b"\xff", "application/json"),
    ]:
        with pytest.raises(BadRequest):
            codec.decode_body(data, ctype, max_nodes=1000, max_depth=20)
    with pytest.raises(StoreError) as err:
        codec.decode_body(b"{}", "application/cbor", max_nodes=10, max_depth=10)
    assert err.value.code == 415


def test_warning_header_escapes() -> None:
    assert codec.warning_header('unknown field "a\fb"') == '299 - "unknown field \\"a?b\\""'


# ---- tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"), (0, "0s"), (119, "119s"), (125, "2m5s"), (600, "10m"),
        (3 * 3600 + 60, "3h1m"), (9 * 3600, "9h"), (50 * 3600, "2d2h"), (30 * 86400, "30d"),
        (3 * 365 * 86400, "3y"), (9 * 365 * 86400, "9y"),
    ],
)  # fmt: skip
def test_human_duration(seconds: int, text: str) -> None:
    assert tables.human_duration(seconds) == text


def test_tables() -> None:
    now = 1_700_000_100.0
    created = "2023-11-14T22:13:20Z"  # 1_700_000_000
    pod = {
        "metadata": {"name": "p", "creationTimestamp": created},
        "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
        "status": {
            "phase": "Running",
            "podIP": "172.17.0.2",
            "containerStatuses": [
                {"ready": True, "restartCount": 2},
                {
                    "ready": False,
                    "restartCount": 1,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                },
            ],
        },
    }
    table = tables.table(PODS, [pod], now=now)
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Ready",
        "Status",
        "Restarts",
        "Age",
        "IP",
        "Node",
    ]
    assert table["rows"][0]["cells"] == [
        "p",
        "1/2",
        "CrashLoopBackOff",
        3,
        "100s",
        "172.17.0.2",
        "n1",
    ]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    assert "object" not in tables.table(PODS, [pod], now=now, include="None")["rows"][0]
    assert tables.table(PODS, [pod], now=now, include="Object")["rows"][0]["object"] is pod
    svc = {
        "metadata": {"name": "s"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.9",
            "ports": [
                {"port": 80, "nodePort": 30080, "protocol": "TCP"},
                {"port": 53, "protocol": "UDP"},
            ],
        },
    }
    assert tables.table(SERVICES, [svc], now=now)["rows"][0]["cells"][:5] == [
        "s",
        "NodePort",
        "10.96.0.9",
        "<none>",
        "80:30080/TCP,53/UDP",
    ]
    node = {
        "metadata": {"name": "n", "labels": {"node-role.kubernetes.io/edge": ""}},
        "spec": {"unschedulable": True},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"kubeletVersion": "v1.29.5-kubeedge"},
        },
    }
    assert tables.table(NODES, [node], now=now)["rows"][0]["cells"][:5] == [
        "n",
        "Ready,SchedulingDisabled",
        "edge",
        "<unknown>",
        "v1.29.5-kubeedge",
    ]
    dep = {
        "metadata": {"name": "d"},
        "spec": {"replicas": 3},
        "status": {"readyReplicas": 1, "updatedReplicas": 2, "availableReplicas": 1},
    }
    assert tables.table(DEPLOYMENTS, [dep], now=now)["rows"][0]["cells"][:4] == ["d", "1/3", 2, 1]


# ---- OpenAPI and protobuf ---------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, bytes | int]]:
    """An independent decoder for the tests: (field, payload or varint value)."""
    out: list[tuple[int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        if key & 7 == protobuf.VARINT:
            value, pos = _read_varint(data, pos)
            out.append((key >> 3, value))
            continue
        assert key & 7 == protobuf.LENGTH_DELIMITED
        size, pos = _read_varint(data, pos)
        out.append((key >> 3, data[pos : pos + size]))
        pos += size
    return out


def _one(data: bytes | int, number: int) -> bytes:
    assert isinstance(data, bytes)
    found = [v for n, v in _fields(data) if n == number]
    assert len(found) == 1 and isinstance(found[0], bytes), (number, found)
    return found[0]


def test_protobuf_varint_vectors() -> None:
    # https://protobuf.dev/programming-guides/encoding/: 1 -> 01, 150 -> 96 01
    assert protobuf.varint(1) == b"\x01"
    assert protobuf.varint(150) == b"\x96\x01"
    assert protobuf.varint(300) == b"\xac\x02"
    assert protobuf.uint(1, 150) == b"\x08\x96\x01"
    assert protobuf.string(2, "testing") == b"\x12\x07testing"


def test_openapi_v2_protobuf_document() -> None:
    doc = OpenAPI(DEFAULT_REGISTRY).v2_protobuf
    fields = _fields(doc)
    assert [f for f, _ in fields] == [1, 2, 8, 9]
    assert fields[0][1] == b"2.0"
    info = fields[1][1]
    assert isinstance(info, bytes) and _fields(info) == [(1, b"Kubernetes"), (2, b"v1.32.0")]
    assert fields[3][1] == b""  # no definitions: kubectl 1.20 skips client-side validation
    # What kubectl 1.20's dry-run verifier reads: Paths.path[].value.patch, its GVK extension
    # (YAML) and its query parameters' names.
    paths = fields[2][1]
    assert isinstance(paths, bytes)
    found = {}
    for number, named in _fields(paths):
        assert number == 2 and isinstance(named, bytes)
        op = _one(_one(named, 2), 8)
        ext = _one(op, 13)
        assert _one(ext, 1) == b"x-kubernetes-group-version-kind"
        gvk = yaml.safe_load(_one(_one(ext, 2), 2))
        queries = [_one(_one(_one(_one(p, 1), 2), 3), 4) for n, p in _fields(op) if n == 8]
        found[_one(named, 1).decode()] = (gvk, queries)
    gvk, queries = found["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]
    assert gvk == {"group": "apps", "kind": "Deployment", "version": "v1"}
    assert b"dryRun" in queries and b"fieldValidation" in queries
    assert found["/api/v1/nodes/{name}"][0] == {"group": "", "kind": "Node", "version": "v1"}
    assert len(found) == len(DEFAULT_REGISTRY)


def test_openapi_v3_has_field_validation_for_every_kind() -> None:
    # What kubectl's QueryParamVerifierV3 checks: a PATCH operation tagged with the kind's GVK
    # that has a `fieldValidation` query parameter; and no strategic merge patch in it.
    for res in DEFAULT_REGISTRY:
        doc = v3_document(DEFAULT_REGISTRY, res.group, res.version)
        assert doc is not None
        gvk = {"group": res.group, "version": res.version, "kind": res.kind}
        patches = [
            p["patch"]
            for p in doc["paths"].values()
            if "patch" in p and p["patch"]["x-kubernetes-group-version-kind"] == gvk
        ]
        assert patches, res.key
        for op in patches:
            assert any(
                q["name"] == "fieldValidation" and q["in"] == "query" for q in op["parameters"]
            )
            assert "application/strategic-merge-patch+json" not in op["requestBody"]["content"]
        assert schema_name(res.group, res.version, res.kind) in doc["components"]["schemas"]
    index = OpenAPI(DEFAULT_REGISTRY)
    assert set(index.documents) == {gv_path(g, v) for g, v in DEFAULT_REGISTRY.group_versions()}
    assert (
        schema_name("apps.kubeedge.io", "v1alpha1", "NodeGroup")
        == "io.kubeedge.apps.v1alpha1.NodeGroup"
    )


# ---- ClusterIP allocation and admission --------------------------------------------------------


def test_cluster_ip_allocation(tmp_path: Path) -> None:
    store = Store(tmp_path / "kube.db")
    alloc = ClusterIPAllocator("10.0.0.0/29")  # hosts .1-.6; .1 reserved
    admission = Admission(alloc)

    def create(name: str, ip: str | None = None) -> str:
        spec: dict[str, Any] = {"ports": [{"port": 80}]}
        if ip:
            spec["clusterIP"] = ip
        req = AdmissionRequest("CREATE", SERVICES, "", "default", name, ADMIN)
        with store.transaction():
            obj = admission.admit(store, req, {"metadata": {"name": name}, "spec": spec}, None)
            assert obj is not None
            made = store.create(SERVICES, obj, namespace="default")
        ip_made: str = made["spec"]["clusterIP"]
        assert made["spec"]["ports"][0] == {"port": 80, "protocol": "TCP", "targetPort": 80}
        return ip_made

    assert [create(f"s{i}") for i in range(5)] == [f"10.0.0.{i}" for i in range(2, 7)]
    with pytest.raises(Invalid, match="range is full"):
        create("full")
    assert create("kubernetes") == "10.0.0.1"
    store.delete(SERVICES, "s2", namespace="default")
    assert create("again") == "10.0.0.4"  # the only free one
    with pytest.raises(Invalid, match="already allocated"):
        create("dup", "10.0.0.5")
    store.close()
    fresh = Store(tmp_path / "kube.db")  # a restart: the allocator state comes from the store
    with fresh.transaction(), pytest.raises(Invalid, match="range is full"):
        ClusterIPAllocator("10.0.0.0/29").allocate(fresh, "default", "x")
    fresh.close()


def test_secret_defaults() -> None:
    out = secret_defaults(
        "s", {"metadata": {"name": "s"}, "stringData": {"k": "vä"}, "data": {"b": "YQ=="}}
    )
    assert out["type"] == "Opaque" and "stringData" not in out
    assert base64.b64decode(out["data"]["k"]).decode() == "vä" and out["data"]["b"] == "YQ=="
    with pytest.raises(Invalid):
        secret_defaults("s", {"data": {"b": "not base64!"}})


# ---- authorization ----------------------------------------------------------------------------


def _info(
    verb: str, resource: str, name: str = "", namespace: str = "", sub: str = "", group: str = ""
) -> RequestInfo:
    return RequestInfo(verb, "/x", True, group, "v1", namespace, resource, sub, name)


def test_node_rules() -> None:
    lease = "coordination.k8s.io"
    yes = [
        _info("list", "pods"), _info("watch", "secrets", namespace="a"),
        _info("get", "nodegroups", group="apps.kubeedge.io"),
        _info("patch", "nodes", "n1", sub="status"), _info("update", "nodes", "n1"),
        _info("create", "nodes"), _info("patch", "pods", "p", "a", "status"),
        _info("delete", "pods", "p", "a"), _info("create", "events", namespace="a"),
        _info("update", "leases", "n1", "kube-node-lease", group=lease),
    ]  # fmt: skip
    no = [
        _info("create", "pods", namespace="a"), _info("patch", "nodes", "n2", sub="status"),
        _info("update", "pods", "p", "a"), _info("delete", "nodes", "n1"),
        _info("list", "deployments", group="apps"),
        _info("get", "leases", "n2", "kube-node-lease", group=lease),
        _info("create", "secrets", namespace="a"), _info("deletecollection", "pods", namespace="a"),
    ]  # fmt: skip
    assert all(node_decision("n1", i).allowed for i in yes)
    assert not any(node_decision("n1", i).allowed for i in no)
    authz = ClusterAuthorizer()
    assert authz.authorize(Attributes(ADMIN, _info("delete", "nodes", "n1"))).allowed
    assert not authz.authorize(Attributes(Identity("bob"), _info("list", "pods"))).allowed
    attrs = Attributes(node_identity("n1"), _info("create", "pods", namespace="default"))
    assert forbidden_message(attrs, authz.authorize(attrs)) == (
        'pods is forbidden: User "system:node:n1" cannot create resource "pods" in API group "" '
        'in the namespace "default"'
    )
