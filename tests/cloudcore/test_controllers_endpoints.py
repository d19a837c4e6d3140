"""Endpoints / EndpointSlice reconcile: addresses, ports, slices, placeholders (pure)."""

from __future__ import annotations

from typing import Any

from cloudcore.controllers.actions import Create, Delete, Result, Update
from cloudcore.controllers.endpoints import (
    HEADLESS_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    EndpointsConfig,
    EndpointsController,
    endpoints_subsets,
    reconcile_service,
)
from cloudcore.controllers.view import StaticView
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import ENDPOINTS, ENDPOINTSLICES, PODS, SERVICES

Obj = dict[str, Any]


def service(name: str = "web", *, selector: dict[str, str] | None = None, **spec: Any) -> Obj:
    body: Obj = {
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": "web"}],
        **spec,
    }
    if selector is not None:
        body["selector"] = selector
    elif "selector" not in spec:
        body["selector"] = {"app": "web"}
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"svc-{name}",
            "labels": {"team": "a"},
        },
        "spec": body,
    }


def pod(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    node: str = "n1",
    labels: dict[str, str] | None = None,
    ns: str = "default",
    port_name: str = "web",
    port: int = 8080,
    phase: str = "Running",
    terminating: bool = False,
) -> Obj:
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: Obj = {
        "name": name,
        "namespace": ns,
        "uid": f"uid-{name}",
        "labels": labels or {"app": "web"},
    }
    if terminating:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}],
        },
        "status": status,
    }


def ref(name: str) -> Obj:
    return {"kind": "Pod", "namespace": "default", "name": name, "uid": f"uid-{name}"}


def addr(ip: str, name: str, node: str = "n1") -> Obj:
    return {"ip": ip, "nodeName": node, "targetRef": ref(name)}


def test_endpoints_addresses_and_named_ports() -> None:
    pods = [
        pod("b", "10.0.0.2"),
        pod("a", "10.0.0.1", node="n2"),
        pod("slow", "10.0.0.3", ready=False),
        pod("going", "10.0.0.4", terminating=True),
        pod("done", "10.0.0.5", phase="Succeeded"),
        pod("no-ip", None),
        pod("elsewhere", "10.0.0.6", ns="other"),
        pod("unrelated", "10.0.0.7", labels={"app": "db"}),
        pod("other-port", "10.0.0.8", port_name="alt", port=9090),
    ]
    assert endpoints_subsets(service(), pods) == [
        {
            "addresses": [addr("10.0.0.1", "a", "n2"), addr("10.0.0.2", "b")],
            "notReadyAddresses": [addr("10.0.0.3", "slow")],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
    ]


def test_endpoints_group_pods_by_resolved_ports() -> None:
    svc = service(
        ports=[{"port": 80, "targetPort": "web"}, {"name": "m", "port": 9000, "targetPort": 9100}]
    )
    pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2", port_name="other")]
    assert endpoints_subsets(svc, pods) == [
        {
            "addresses": [addr("10.0.0.1", "a")],
            "ports": [
                {"port": 8080, "protocol": "TCP"},
                {"name": "m", "port": 9100, "protocol": "TCP"},
            ],
        },
        {
            "addresses": [addr("10.0.0.2", "b")],
            "ports": [{"name": "m", "port": 9100, "protocol": "TCP"}],
        },
    ]


def test_endpoints_headless_without_ports_and_publish_not_ready() -> None:
    svc = service(clusterIP="None", ports=[], publishNotReadyAddresses=True)
    pods = [pod("a", "10.0.0.1", ready=False), pod("b", "10.0.0.2", terminating=True)]
    result = reconcile_service("default", "web", svc, pods, None, [])
    made = [a for a in result.actions if isinstance(a, Create) and a.resource is ENDPOINTS]
    assert len(made) == 1
    body = made[0].body
    assert body["metadata"] == {
        "name": "web",
        "namespace": "default",
        "labels": {"team": "a", HEADLESS_LABEL: ""},
    }
    assert body["subsets"] == [{"addresses": [addr("10.0.0.1", "a"), addr("10.0.0.2", "b")]}]


def test_endpoints_update_only_when_different() -> None:
    svc = service()
    pods = [pod("a", "10.0.0.1")]
    (create_ep, create_slice) = reconcile_service("default", "web", svc, pods, None, []).actions
    assert isinstance(create_ep, Create) and isinstance(create_slice, Create)
    current = {
        **create_ep.body,
        "metadata": {**create_ep.body["metadata"], "uid": "e1", "resourceVersion": "5"},
    }
    slice_ = {
        **create_slice.body,
        "metadata": {
            **create_slice.body["metadata"],
            "name": "web-abcde",
            "uid": "s1",
            "resourceVersion": "6",
        },
    }
    again = reconcile_service("default", "web", svc, pods, current, [slice_])
    assert again == Result()
    more = reconcile_service(
        "default", "web", svc, [*pods, pod("b", "10.0.0.2")], current, [slice_]
    )
    kinds = [(type(a).__name__, a.resource.key) for a in more.actions if isinstance(a, Update)]
    assert kinds == [("Update", "endpoints"), ("Update", "endpointslices.discovery.k8s.io")]
    update = more.actions[0]
    assert isinstance(update, Update)
    assert update.body["metadata"]["resourceVersion"] == "5"
    assert len(update.body["subsets"][0]["addresses"]) == 2


def test_endpointslices_content_and_conditions() -> None:
    pods = [
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2", ready=False),
        pod("c", "10.0.0.3", terminating=True),
    ]
    result = reconcile_service("default", "web", service(), pods, None, [])
    (made,) = [a for a in result.actions if isinstance(a, Create) and a.resource is ENDPOINTSLICES]
    body = made.body
    assert body["metadata"] == {
        "generateName": "web-",
        "namespace": "default",
        "labels": {"team": "a", SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY},
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": "web",
                "uid": "svc-web",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    assert body["addressType"] == "IPv4"
    assert body["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [
        (e["addresses"], e["conditions"], e["nodeName"], e["targetRef"]["name"])
        for e in body["endpoints"]
    ] == [
        (["10.0.0.1"], {"ready": True, "serving": True, "terminating": False}, "n1", "a"),
        (["10.0.0.2"], {"ready": False, "serving": False, "terminating": False}, "n1", "b"),
        (["10.0.0.3"], {"ready": False, "serving": True, "terminating": True}, "n1", "c"),
    ]


def _existing(name: str, body: Obj) -> Obj:
    return {
        **body,
        "metadata": {
            **body["metadata"],
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "3",
        },
    }


def test_endpointslices_chunk_update_and_delete_extra() -> None:
    config = EndpointsConfig(max_endpoints_per_slice=2, endpoints=False)
    pods = [pod(n, f"10.0.0.{i}") for i, n in enumerate("abc", start=1)]
    first = reconcile_service("default", "web", service(), pods, None, [], config=config)
    bodies = [a.body for a in first.actions if isinstance(a, Create)]
    assert [len(b["endpoints"]) for b in bodies] == [2, 1]
    slices = [_existing("web-x1", bodies[0]), _existing("web-x2", bodies[1])]
    assert (
        reconcile_service("default", "web", service(), pods, None, slices, config=config)
        == Result()
    )
    fewer = reconcile_service("default", "web", service(), pods[:1], None, slices, config=config)
    assert [(type(a).__name__, getattr(a, "name", "")) for a in fewer.actions] == [
        ("Update", "web-x1"),
        ("Delete", "web-x2"),
    ]
    delete = fewer.actions[1]
    assert isinstance(delete, Delete) and delete.uid == "uid-web-x2"


def test_endpointslices_placeholder_and_foreign_slices() -> None:
    foreign = {
        "metadata": {
            "name": "web-mine",
            "namespace": "default",
            "labels": {SERVICE_NAME_LABEL: "web"},
        },
        "addressType": "IPv4",
        "endpoints": [],
    }
    result = reconcile_service(
        "default", "web", service(), [], None, [foreign], config=EndpointsConfig(endpoints=False)
    )
    (made,) = result.actions
    assert isinstance(made, Create)
    assert made.body["endpoints"] == [] and made.body["ports"] == []


def test_endpoints_left_alone_without_selector_or_for_external_name() -> None:
    plain = service(selector={})
    assert reconcile_service("default", "web", plain, [pod("a", "10.0.0.1")], None, []) == Result()
    external = service(type="ExternalName", externalName="example.com")
    assert (
        reconcile_service("default", "web", external, [pod("a", "10.0.0.1")], None, []) == Result()
    )


def test_endpoints_deleted_service_cleans_up_ours_only() -> None:
    ours = _existing(
        "web-a", {"metadata": {"labels": {SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY}}}
    )
    theirs = _existing("web-b", {"metadata": {"labels": {SERVICE_NAME_LABEL: "web"}}})
    ours["metadata"]["namespace"] = theirs["metadata"]["namespace"] = "default"
    current = {"metadata": {"name": "web", "namespace": "default", "uid": "e1"}}
    result = reconcile_service("default", "web", None, [], current, [ours, theirs])
    assert [(a.resource.key, a.name, a.uid) for a in result.actions if isinstance(a, Delete)] == [
        ("endpoints", "web", "e1"),
        ("endpointslices.discovery.k8s.io", "web-a", "uid-web-a"),
    ]


def test_endpointslices_dual_stack_families() -> None:
    svc = service(ipFamilies=["IPv6", "IPv4"])
    dual = pod("a", "10.0.0.1")
    dual["status"]["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]
    result = reconcile_service(
        "default", "web", svc, [dual], None, [], config=EndpointsConfig(endpoints=False)
    )
    assert sorted(
        (a.body["addressType"], a.body["endpoints"][0]["addresses"][0])
        for a in result.actions
        if isinstance(a, Create)
    ) == [
        ("IPv4", "10.0.0.1"),
        ("IPv6", "fd00::1"),
    ]
    (subset,) = endpoints_subsets(svc, [dual])
    assert subset["addresses"][0]["ip"] == "fd00::1"


def test_endpoints_controller_keys() -> None:
    ctl = EndpointsController()
    view = StaticView(
        {
            SERVICES: [
                service("web"),
                service("db", selector={"app": "db"}),
                service("plain", selector={}),
            ]
        }
    )
    moved = pod("a", "10.0.0.1", labels={"app": "db"})
    old = pod("a", "10.0.0.1")
    assert sorted(ctl.keys_for(PODS, Change("MODIFIED", moved, old), view)) == [
        ("default", "db"),
        ("default", "web"),
    ]
    slice_change = Change(
        "ADDED",
        {
            "metadata": {
                "name": "web-x",
                "namespace": "default",
                "labels": {SERVICE_NAME_LABEL: "web"},
            }
        },
        None,
    )
    assert list(ctl.keys_for(ENDPOINTSLICES, slice_change, view)) == [("default", "web")]
    assert sorted(ctl.initial_keys(view)) == [
        ("default", "db"),
        ("default", "plain"),
        ("default", "web"),
    ]
