"""Authentication and authorization: client certificates, bearer tokens, 401 without either,
and the Node authorizer + NodeRestriction rules for `system:node:*`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeweave.apiserver import AllowAll, ApiServerConfig, TrustLocal, start_api_server
from edgeweave.apiserver.testing import ADMIN_TOKEN, NODE_TOKEN, ApiHarness
from edgeweave.kube.resources import LEASES, NODES, PODS
from edgeweave.kube.store import Store
from edgeweave.pki import ADMIN


def _pod(name: str, node: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def objects(api: ApiHarness) -> None:
    api.store.create(NODES, {"metadata": {"name": "n2"}})
    api.store.create(PODS, _pod("on-n1", "n1"), namespace="default")
    api.store.create(PODS, _pod("on-n2", "n2"), namespace="default")


def test_public_endpoints_need_no_credentials(api: ApiHarness) -> None:
    anon = api.client("anonymous")
    for path in ("/healthz", "/livez", "/readyz", "/healthz/ping"):
        resp = anon.request("GET", path)
        assert (resp.status, resp.body) == (200, b"ok")
    version = anon.request("GET", "/version").json()
    assert version["major"] == "1" and version["gitVersion"].endswith("-edgeweave")


def test_no_credentials_is_401(api: ApiHarness) -> None:
    for path in ("/api/v1/pods", "/api", "/openapi/v3"):
        resp = api.client("anonymous").request("GET", path)
        assert resp.status == 401
        assert resp.json() == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }
    assert api.client("token:wrong-token").request("GET", "/api/v1/pods").status == 401


def test_bearer_token_works(api: ApiHarness) -> None:
    resp = api.client(f"token:{ADMIN_TOKEN}").request("GET", "/api/v1/namespaces")
    assert resp.status == 200 and resp.json()["kind"] == "NamespaceList"
    node = api.client(f"token:{NODE_TOKEN}")
    assert node.request("GET", "/api/v1/pods").status == 200
    assert node.request("GET", "/apis/apps/v1/deployments").status == 403


def test_node_updates_its_own_node_status(api: ApiHarness, objects: None) -> None:
    n1 = api.client("node:n1")
    made = n1.request("POST", "/api/v1/nodes", {"metadata": {"name": "n1"}})
    assert made.status == 201, made.body
    status = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    resp = n1.request(
        "PATCH", "/api/v1/nodes/n1/status", status, content_type="application/merge-patch+json"
    )
    assert resp.status == 200, resp.body
    assert api.store.get(NODES, "n1")["status"]["conditions"][0]["status"] == "True"
    full = api.store.get(NODES, "n1")
    full["status"]["conditions"][0]["status"] = "False"
    assert n1.request("PUT", "/api/v1/nodes/n1/status", full).status == 200


def test_node_cannot_touch_another_node(api: ApiHarness, objects: None) -> None:
    n1 = api.client("node:n1")
    resp = n1.request(
        "PATCH",
        "/api/v1/nodes/n2/status",
        {"status": {}},
        content_type="application/merge-patch+json",
    )
    assert resp.status == 403
    body = resp.json()
    assert body["reason"] == "Forbidden"
    assert body["message"].startswith(
        'nodes "n2" is forbidden: User "system:node:n1" cannot patch resource "nodes/status" in '
        'API group "" at the cluster scope'
    )
    assert body["details"] == {"name": "n2", "kind": "nodes"}
    created = n1.request("POST", "/api/v1/nodes", {"metadata": {"name": "n3"}})
    assert (
        created.status == 403
        and 'node "n1" is not allowed to modify node "n3"' in created.json()["message"]
    )


def test_node_cannot_create_pods(api: ApiHarness) -> None:
    resp = api.client("node:n1").request("POST", "/api/v1/namespaces/default/pods", _pod("x", "n1"))
    assert resp.status == 403
    assert resp.json()["message"] == (
        'pods is forbidden: User "system:node:n1" cannot create resource "pods" in API group "" '
        'in the namespace "default"'
    )


def test_node_pod_status_and_delete_only_for_its_pods(api: ApiHarness, objects: None) -> None:
    n1 = api.client("node:n1")
    patch = {"status": {"phase": "Running"}}
    mine = n1.request(
        "PATCH",
        "/api/v1/namespaces/default/pods/on-n1/status",
        patch,
        content_type="application/merge-patch+json",
    )
    assert mine.status == 200
    assert api.store.get(PODS, "on-n1", namespace="default")["status"]["phase"] == "Running"
    theirs = n1.request(
        "PATCH",
        "/api/v1/namespaces/default/pods/on-n2/status",
        patch,
        content_type="application/merge-patch+json",
    )
    assert theirs.status == 403
    assert theirs.json()["message"] == (
        'pods "on-n2" is forbidden: node "n1" can only update pod status for pods with '
        "spec.nodeName set to itself"
    )
    spec_change = n1.request(
        "PATCH",
        "/api/v1/namespaces/default/pods/on-n1",
        {"metadata": {"labels": {"a": "b"}}},
        content_type="application/merge-patch+json",
    )
    assert spec_change.status == 403
    assert n1.request("DELETE", "/api/v1/namespaces/default/pods/on-n2").status == 403
    gone = n1.request("DELETE", "/api/v1/namespaces/default/pods/on-n1?gracePeriodSeconds=0")
    assert gone.status == 200, gone.body


def test_node_lease_and_events(api: ApiHarness) -> None:
    n1 = api.client("node:n1")
    lease = {"metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}}
    base = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    assert n1.request("POST", base, lease).status == 201
    assert n1.request("GET", f"{base}/n1").status == 200
    lease2 = api.store.get(LEASES, "n1", namespace="kube-node-lease")
    lease2["spec"]["renewTime"] = "2026-01-01T00:00:00.000000Z"
    assert n1.request("PUT", f"{base}/n1", lease2).status == 200
    other = n1.request("POST", base, {"metadata": {"name": "n2"}})
    assert other.status == 403
    assert "can only access node lease with the same name" in other.json()["message"]
    assert n1.request("GET", f"{base}/n2").status == 403
    event = {
        "metadata": {"name": "n1.1"},
        "involvedObject": {"kind": "Node", "name": "n1"},
        "reason": "Starting",
    }
    assert n1.request("POST", "/api/v1/namespaces/default/events", event).status == 201
    assert n1.request("GET", "/api/v1/namespaces/default/events").status == 403


def test_trust_local_plain_http(tmp_path: Path) -> None:
    """The MetaServer shape: plain HTTP on 127.0.0.1, one trusted identity, no admission."""

    async def scenario() -> tuple[int, str, str]:
        store = Store(tmp_path / "kube.db")
        config = ApiServerConfig(port=0, mutating_admission=False, ensure_kubernetes_service=False)
        server = await start_api_server(
            store, config, ssl_context=None, authenticator=TrustLocal(ADMIN), authorizer=AllowAll()
        )
        try:
            assert server.url.startswith("http://127.0.0.1:")
            async with aiohttp.ClientSession() as session:
                svc = {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
                url = f"{server.url}/api/v1/namespaces/default/services"
                async with session.post(url, json=svc) as resp:
                    made = await resp.json()
                async with session.get(f"{server.url}/api/v1/namespaces") as resp:
                    kind = (await resp.json())["kind"]
                return resp.status, kind, str(made["spec"].get("clusterIP"))
        finally:
            await server.close()
            store.close()

    status, kind, cluster_ip = asyncio.run(scenario())
    assert (status, kind) == (200, "NamespaceList")
    assert cluster_ip == "None"  # no allocation without mutating admission (key absent)
