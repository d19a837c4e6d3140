"""The resource registry: what discovery serves and how names resolve."""

from __future__ import annotations

import pytest

from edgeweave.kube.objects import name_error, prepare_create, selectable_values
from edgeweave.kube.resources import (
    CLUSTEROBJECTSYNCS,
    DEFAULT_REGISTRY,
    DEPLOYMENTS,
    NAMESPACES,
    NODEGROUPS,
    PODS,
    RESOURCES,
    Registry,
    scale_of,
)

EXPECTED = {
    # key: (apiVersion, kind, namespaced, short names, status)
    "namespaces": ("v1", "Namespace", False, ("ns",), True),
    "nodes": ("v1", "Node", False, ("no",), True),
    "pods": ("v1", "Pod", True, ("po",), True),
    "services": ("v1", "Service", True, ("svc",), True),
    "endpoints": ("v1", "Endpoints", True, ("ep",), False),
    "configmaps": ("v1", "ConfigMap", True, ("cm",), False),
    "secrets": ("v1", "Secret", True, (), False),
    "events": ("v1", "Event", True, ("ev",), False),
    "endpointslices.discovery.k8s.io": ("discovery.k8s.io/v1", "EndpointSlice", True, (), False),
    "deployments.apps": ("apps/v1", "Deployment", True, ("deploy",), True),
    "leases.coordination.k8s.io": ("coordination.k8s.io/v1", "Lease", True, (), False),
    "devices.devices.kubeedge.io": ("devices.kubeedge.io/v1beta1", "Device", True, (), False),
    "devicemodels.devices.kubeedge.io": (
        "devices.kubeedge.io/v1beta1",
        "DeviceModel",
        True,
        (),
        False,
    ),
    "nodegroups.apps.kubeedge.io": ("apps.kubeedge.io/v1alpha1", "NodeGroup", False, ("ng",), True),
    "edgeapplications.apps.kubeedge.io": (
        "apps.kubeedge.io/v1alpha1",
        "EdgeApplication",
        True,
        ("eapp",),
        True,
    ),
    "objectsyncs.reliablesyncs.kubeedge.io": (
        "reliablesyncs.kubeedge.io/v1alpha1",
        "ObjectSync",
        True,
        (),
        True,
    ),
    "clusterobjectsyncs.reliablesyncs.kubeedge.io": (
        "reliablesyncs.kubeedge.io/v1alpha1",
        "ClusterObjectSync",
        False,
        (),
        True,
    ),
}


def test_every_resource_of_the_issue_is_registered() -> None:
    assert {r.key for r in RESOURCES} == set(EXPECTED)
    for res in RESOURCES:
        api_version, kind, namespaced, short, status = EXPECTED[res.key]
        assert (res.api_version, res.kind, res.namespaced, res.short_names, res.has_status) == (
            api_version,
            kind,
            namespaced,
            short,
            status,
        ), res.key
        assert res.list_kind == kind + "List"
        assert res.strategic_merge == (not res.group.endswith("kubeedge.io"))


def test_lookup_like_kubectl() -> None:
    reg = DEFAULT_REGISTRY
    for name in ("po", "pod", "pods", "Pod", "PODS"):
        assert reg.lookup(name) is PODS
    assert reg.lookup("deploy") is DEPLOYMENTS
    assert reg.lookup("deployments.apps") is DEPLOYMENTS
    assert reg.lookup("ng") is NODEGROUPS
    assert reg.lookup("nodegroup.apps.kubeedge.io") is NODEGROUPS
    assert reg.lookup("nope") is None
    assert reg.get("apps", "v1", "deployments") is DEPLOYMENTS
    assert reg.get("", "v1", "deployments") is None
    assert reg.by_kind("reliablesyncs.kubeedge.io/v1alpha1", "ClusterObjectSync") is (
        CLUSTEROBJECTSYNCS
    )
    assert reg.by_key("namespaces") is NAMESPACES
    with pytest.raises(ValueError, match="twice"):
        Registry([PODS, PODS])


def test_discovery_documents() -> None:
    core = DEFAULT_REGISTRY.api_resource_list("", "v1")
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"] == {
        "name": "pods",
        "singularName": "pod",
        "namespaced": True,
        "kind": "Pod",
        "verbs": [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
        "shortNames": ["po"],
        "categories": ["all"],
    }
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert "deletecollection" not in by_name["namespaces"]["verbs"]
    assert "configmaps/status" not in by_name
    apps = DEFAULT_REGISTRY.api_resource_list("apps", "v1")["resources"]
    scale = next(r for r in apps if r["name"] == "deployments/scale")
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    groups = DEFAULT_REGISTRY.api_group_list()
    names = [g["name"] for g in groups["groups"]]
    assert names == [
        "discovery.k8s.io",
        "apps",
        "coordination.k8s.io",
        "devices.kubeedge.io",
        "apps.kubeedge.io",
        "reliablesyncs.kubeedge.io",
    ]
    assert groups["groups"][1]["preferredVersion"] == {"groupVersion": "apps/v1", "version": "v1"}
    assert DEFAULT_REGISTRY.api_versions()["versions"] == ["v1"]


def test_scale_view() -> None:
    obj = {
        "metadata": {"name": "d", "namespace": "n", "resourceVersion": "5", "labels": {}},
        "spec": {
            "replicas": 3,
            "selector": {
                "matchLabels": {"app": "d"},
                "matchExpressions": [{"key": "t", "operator": "Exists"}],
            },
        },
        "status": {"replicas": 2},
    }
    assert scale_of(DEPLOYMENTS, obj) == {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": "d", "namespace": "n", "resourceVersion": "5"},
        "spec": {"replicas": 3},
        "status": {"replicas": 2, "selector": "app=d,t"},
    }


def test_name_rules_and_side_columns() -> None:
    assert name_error("subdomain", "a.b-c") is None
    assert name_error("label", "a.b") is not None
    assert name_error("label1035", "1abc") is not None
    assert name_error("label", "a" * 64) == "must be no more than 63 characters"
    made = prepare_create(
        PODS,
        {"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "hostNetwork": False}},
        namespace="d",
        now=0,
        uid="u",
        suffix=lambda: "x",
    )
    assert selectable_values(PODS, made) == (
        '{"spec.nodeName":"n1","status.phase":"Pending","spec.hostNetwork":"false"}'
    )
    assert selectable_values(DEPLOYMENTS, made) is None
