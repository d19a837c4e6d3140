"""meshd.catalog_build: Kubernetes objects → Catalog, table tests and hypothesis fuzzing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.catalog import (
    LB_POLICY_ANNOTATION,
    NODEGROUP_LABEL,
    PROXY_NAME_LABEL,
    TOPOLOGY_ANNOTATION,
    Catalog,
    Endpoint,
    Service,
    ServicePort,
)
from meshd.catalog_build import SERVICE_NAME_LABEL, CatalogBuild, build_catalog

Obj = dict[str, Any]


def service(name: str = "web", namespace: str = "default", *, cluster_ip: Any = "10.96.0.10",
            ports: Any = None, annotations: Obj | None = None, labels: Obj | None = None,
            **spec: Any) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    if labels:
        meta["labels"] = labels
    body: Obj = {"clusterIP": cluster_ip,
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
                 if ports is None else ports}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def endpoint(ip: str, node: str | None = "n1", ready: Any = True, **extra: Any) -> Obj:
    out: Obj = {"addresses": [ip], "conditions": {"ready": ready}}
    if ready is ...:
        del out["conditions"]
    if node is not None:
        out["nodeName"] = node
    out.update(extra)
    return out


def slice_(service_name: str = "web", *endpoints: Obj, name: str = "", namespace: str = "default",
           ports: Any = None, address_type: str = "IPv4") -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-abcde", "namespace": namespace,
                     "labels": {SERVICE_NAME_LABEL: service_name}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": list(endpoints),
    }


def node(name: str, group: str | None = None) -> Obj:
    labels = {NODEGROUP_LABEL: group} if group else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def build(**kwargs: Any) -> CatalogBuild:
    kwargs.setdefault("node", "n1")
    kwargs.setdefault("services", [])
    return build_catalog(**kwargs)


def messages(result: CatalogBuild) -> list[str]:
    return [str(p) for p in result.problems]


# --- services ---------------------------------------------------------------------------------


def test_cluster_ip_service_with_slice() -> None:
    result = build(services=[service()], endpoint_slices=[
        slice_("web", endpoint("10.244.1.5", "n2", targetRef={"kind": "Pod", "name": "web-1"}),
               endpoint("10.244.1.4", "n1", ready=False, hostname="web-0"))],
        nodes=[node("n1"), node("n2")], revision="42")
    assert result.problems == ()
    catalog = result.catalog
    assert catalog.revision == "42" and catalog.node == "n1" and catalog.nodegroup is None
    svc = catalog.services["default/web"]
    assert svc == Service(
        "default", "web", ("10.96.0.10",), (ServicePort("http", 80, "TCP", 8080),),
        (Endpoint("10.244.1.4", (("http", 8080, "TCP"),), False, "n1", None, "web-0"),
         Endpoint("10.244.1.5", (("http", 8080, "TCP"),), True, "n2", "default/web-1")),
        None)
    assert catalog.by_cluster_ip == {"10.96.0.10": svc}
    assert svc.ready_endpoints()[0].ip == "10.244.1.5"
    assert svc.endpoints[1].port_for(svc.ports[0]) == 8080
    assert not svc.headless and svc.proxied and svc.lb_policy == "round-robin"


def test_ready_absent_means_ready_and_garbage_means_not() -> None:
    result = build(services=[service()], endpoint_slices=[slice_(
        "web", endpoint("10.0.0.1", ready=...), endpoint("10.0.0.2", ready=None),
        endpoint("10.0.0.3", ready="yes"))], nodes=[node("n1")])
    ready = {e.ip: e.ready for e in result.catalog.services["default/web"].endpoints}
    assert ready == {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": False}
    assert messages(result) == [
        "EndpointSlice default/web-abcde: endpoints[2].conditions.ready: expected true or "
        "false, got 'yes'; not ready"]


def test_slices_are_merged_and_deduplicated() -> None:
    one = slice_("web", endpoint("10.0.0.2"), endpoint("10.0.0.1", ready=False), name="web-1")
    two = slice_("web", endpoint("10.0.0.1"), name="web-2",
                 ports=[{"name": "metrics", "port": 9090}])
    six = slice_("web", endpoint("fd00::1"), name="web-3", address_type="IPv6")
    result = build(services=[service(cluster_ip=None, clusterIPs=["10.96.0.10", "fd00:96::10"])],
                   endpoint_slices=[one, two, six])
    svc = result.catalog.services["default/web"]
    assert [e.ip for e in svc.endpoints] == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    merged = svc.endpoints[0]
    assert merged.ready  # ready in one of its slices
    assert merged.ports == (("http", 8080, "TCP"), ("metrics", 9090, "TCP"))
    assert svc.cluster_ips == ("10.96.0.10", "fd00:96::10")
    assert set(result.catalog.by_cluster_ip) == {"10.96.0.10", "fd00:96::10"}


def test_endpoints_fallback_only_without_slices() -> None:
    eps = {"metadata": {"name": "web", "namespace": "default"}, "subsets": [{
        "addresses": [{"ip": "10.0.0.7", "nodeName": "n1", "hostname": "h7",
                       "targetRef": {"kind": "Pod", "name": "p7", "namespace": "default"}}],
        "notReadyAddresses": [{"ip": "10.0.0.8"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]}
    result = build(services=[service()], endpoints=[eps])
    svc = result.catalog.services["default/web"]
    assert svc.endpoints == (
        Endpoint("10.0.0.7", (("http", 8080, "TCP"),), True, "n1", "default/p7", "h7"),
        Endpoint("10.0.0.8", (("http", 8080, "TCP"),), False, None, None))
    # An (empty, placeholder) slice wins over Endpoints: no fallback.
    result = build(services=[service()], endpoints=[eps], endpoint_slices=[slice_("web")])
    assert result.catalog.services["default/web"].endpoints == ()


def test_headless_and_external_name() -> None:
    headless = service("db", cluster_ip="None", ports=[])
    ext = service("ext", cluster_ip=None, type="ExternalName", externalName="Example.COM.")
    result = build(services=[headless, ext], endpoint_slices=[
        slice_("db", endpoint("10.0.0.1", hostname="db-0"), ports=[])])
    assert result.problems == ()
    db = result.catalog.services["default/db"]
    assert db.headless and db.cluster_ips == () and db.endpoints[0].hostname == "db-0"
    external = result.catalog.services["default/ext"]
    assert external.external_name == "example.com"
    assert not external.headless and not external.proxied and external.endpoints == ()
    assert result.catalog.by_cluster_ip == {}


@pytest.mark.parametrize(
    ("spec", "timeout", "problem"),
    [
        ({}, None, None),
        ({"sessionAffinity": "None"}, None, None),
        ({"sessionAffinity": "ClientIP"}, 10800, None),
        ({"sessionAffinity": "ClientIP",
          "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, 60, None),
        ({"sessionAffinity": "ClientIP",
          "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}, 10800, "timeoutSeconds"),
        ({"sessionAffinity": "ClientIP",
          "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "x"}}}, 10800,
         "timeoutSeconds"),
        ({"sessionAffinity": "Cookie"}, None, "sessionAffinity"),
    ],
)
def test_session_affinity(spec: Obj, timeout: int | None, problem: str | None) -> None:
    result = build(services=[service(**spec)])
    assert result.catalog.services["default/web"].session_affinity_timeout_s == timeout
    assert (problem is None) == (not result.problems)
    if problem:
        assert problem in messages(result)[0]


@pytest.mark.parametrize(
    ("value", "policy", "problem"),
    [(None, "round-robin", False), ("random", "random", False),
     ("consistent-hash", "consistent-hash", False), ("round-robin", "round-robin", False),
     ("fastest", "round-robin", True), (3, "round-robin", True)],
)
def test_lb_policy(value: Any, policy: str, problem: bool) -> None:
    annotations = {} if value is None else {LB_POLICY_ANNOTATION: value}
    result = build(services=[service(annotations=annotations)])
    assert result.catalog.services["default/web"].lb_policy == policy
    assert bool(result.problems) == problem
    if problem:
        assert messages(result) == [
            f"Service default/web: annotation {LB_POLICY_ANNOTATION}: expected one of "
            f"round-robin, random, consistent-hash, got {value!r}; using round-robin"]


def test_proxy_name_label_means_not_proxied() -> None:
    result = build(services=[service(labels={PROXY_NAME_LABEL: "istio"})])
    svc = result.catalog.services["default/web"]
    assert not svc.proxied
    assert svc.cluster_ips == ("10.96.0.10",)  # DNS still answers for it


def test_ports_defaults_and_bad_entries() -> None:
    ports = [
        {"port": 53, "protocol": "UDP", "name": "dns"},
        {"port": 8443, "name": "https", "targetPort": "web-tls"},
        {"port": 9000, "name": "plain"},  # targetPort defaults to port
        {"port": "80", "name": "str"},
        {"port": 70000, "name": "big"},
        {"port": 81, "protocol": "ICMP", "name": "icmp"},
        {"port": 53, "protocol": "UDP", "name": "dup"},
        "garbage",
    ]
    result = build(services=[service(ports=ports)])
    svc = result.catalog.services["default/web"]
    assert svc.ports == (ServicePort("dns", 53, "UDP", 53),
                         ServicePort("https", 8443, "TCP", "web-tls"),
                         ServicePort("plain", 9000, "TCP", 9000))
    assert len(result.problems) == 5
    assert all(p.object == "Service default/web" for p in result.problems)


def test_service_without_ports_is_kept_and_reported() -> None:
    result = build(services=[service(ports=[])])
    assert result.catalog.services["default/web"].ports == ()
    assert messages(result) == [
        "Service default/web: no usable ports: its name resolves, nothing is proxied"]


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ("not a mapping", "Service #0: expected a mapping, got 'not a mapping'; skipped"),
        ({"metadata": {"name": "Web", "namespace": "default"}, "spec": {}},
         "Service default/Web: metadata.name and metadata.namespace must be DNS labels; "
         "skipped"),
        ({"metadata": {"name": "web", "namespace": "default"}},
         "Service default/web: spec: expected a mapping, got nothing; skipped"),
        (service(cluster_ip=""), "Service default/web: no clusterIP allocated; skipped"),
        (service(cluster_ip="10.0.0.300"), "Service default/web: spec.clusterIPs[0]: expected "
                                           "an IP address, got '10.0.0.300'; ignored"),
        (service(cluster_ip=None, type="ExternalName", externalName="bad name"),
         "Service default/web: spec.externalName: expected a DNS name, got 'bad name'; skipped"),
    ],
)
def test_bad_services_are_skipped_with_a_problem(obj: Any, problem: str) -> None:
    result = build(services=[obj, service("ok")])
    assert list(result.catalog.services) == ["default/ok"]
    assert messages(result)[0] == problem


def test_duplicate_service_and_cluster_ip() -> None:
    result = build(services=[service("a"), service("a", cluster_ip="10.96.0.11"),
                             service("b")])
    assert result.catalog.services["default/a"].cluster_ips == ("10.96.0.10",)
    assert result.catalog.by_cluster_ip["10.96.0.10"].name == "a"
    assert messages(result) == [
        "Service default/a: listed twice; the first copy is used",
        "Service default/b: clusterIP 10.96.0.10 is also used by default/a; not indexed by IP"]


def test_bad_slices_and_endpoints() -> None:
    slices: list[Any] = [
        42,
        slice_("web", name="fqdn", address_type="FQDN"),
        slice_("web", endpoint("fd00::1"), name="wrong-family"),
        slice_("web", endpoint("10.0.0.1", hostname="Not_A_Label", nodeName=5), name="ok"),
        {"metadata": {"name": "orphan", "namespace": "default"}},
        slice_("gone", endpoint("10.0.0.9"), name="gone-1"),
        {"metadata": {"name": "x", "namespace": "default",
                      "labels": {SERVICE_NAME_LABEL: "web"}}, "endpoints": "nope"},
    ]
    result = build(services=[service()], endpoint_slices=slices)
    svc = result.catalog.services["default/web"]
    assert svc.endpoints == (Endpoint("10.0.0.1", (("http", 8080, "TCP"),), True, None, None),)
    assert messages(result) == [
        "EndpointSlice #0: expected a mapping, got 42; skipped",
        "EndpointSlice default/fqdn: addressType FQDN is not supported; skipped",
        "EndpointSlice default/wrong-family: endpoints[0].addresses: expected an IPv4 address, "
        "got a list; endpoint skipped",
        "EndpointSlice default/ok: endpoints[0].nodeName: expected a string, got 5; ignored",
        "EndpointSlice default/ok: endpoints[0].hostname: expected a DNS label, got "
        "'Not_A_Label'; ignored",
        "EndpointSlice default/orphan: no namespace or no kubernetes.io/service-name label; "
        "skipped",
        "EndpointSlice default/x: endpoints: expected a list, got 'nope'; skipped",
        "EndpointSlice default/gone-1: its Service default/gone is not known; ignored",
    ]


def test_endpoint_on_unknown_node_is_kept_and_reported() -> None:
    result = build(services=[service()], nodes=[node("n1")],
                   endpoint_slices=[slice_("web", endpoint("10.0.0.1", "ghost"))])
    assert result.catalog.services["default/web"].endpoints[0].node == "ghost"
    assert messages(result) == ["Service default/web: endpoint 10.0.0.1 is on unknown node "
                                "'ghost'"]
    # Without any node information nothing can be called unknown.
    result = build(services=[service()],
                   endpoint_slices=[slice_("web", endpoint("10.0.0.1", "ghost"))])
    assert result.problems == ()


# --- node groups and traffic closure ---------------------------------------------------------


CLOSED = {TOPOLOGY_ANNOTATION: "range-nodegroup"}
NODES = [node("a1", "A"), node("a2", "A"), node("b1", "B"), node("loner")]
SLICE = slice_("web", endpoint("10.0.0.1", "a1"), endpoint("10.0.0.2", "a2"),
               endpoint("10.0.0.3", "b1"), endpoint("10.0.0.4", "loner"),
               endpoint("10.0.0.5", None), endpoint("10.0.0.6", "ghost"))


@pytest.mark.parametrize(
    ("me", "group", "ips"),
    [
        ("a1", "A", ["10.0.0.1", "10.0.0.2"]),
        ("b1", "B", ["10.0.0.3"]),
        ("loner", None, []),  # in no group: no endpoints at all, never a fallback
        ("stranger", None, []),
    ],
)
def test_range_nodegroup_closure(me: str, group: str | None, ips: list[str]) -> None:
    result = build(node=me, services=[service(annotations=CLOSED), service("open")],
                   endpoint_slices=[SLICE, {**SLICE, "metadata": {
                       "name": "open-1", "namespace": "default",
                       "labels": {SERVICE_NAME_LABEL: "open"}}}], nodes=NODES)
    catalog = result.catalog
    assert catalog.nodegroup == group
    closed = catalog.services["default/web"]
    assert closed.nodegroup_closed
    assert [e.ip for e in closed.endpoints] == ips
    assert len(catalog.services["default/open"].endpoints) == 6  # no closure without the mark


def test_nodegroups_when_nodes_are_not_visible() -> None:
    groups = [
        {"metadata": {"name": "A"}, "spec": {"nodes": ["a1", "a2"]}},
        {"metadata": {"name": "B"}, "spec": {"nodes": ["b1"]},
         "status": {"nodeStatuses": [{"nodeName": "b1", "selectionStatus": "Succeeded"},
                                     {"nodeName": "a1", "selectionStatus": "Failed"}]}},
    ]
    result = build(node="a1", services=[service(annotations=CLOSED)], endpoint_slices=[SLICE],
                   nodes=[node("a1", "A")], nodegroups=groups)
    assert result.catalog.nodegroup == "A"
    assert [e.ip for e in result.catalog.services["default/web"].endpoints] == [
        "10.0.0.1", "10.0.0.2"]


def test_list_objects_and_generators_are_accepted() -> None:
    result = build(services={"kind": "ServiceList", "items": [service()]},
                   endpoint_slices=(s for s in [slice_("web", endpoint("10.0.0.1"))]))
    assert len(result.catalog.services["default/web"].endpoints) == 1


def test_empty_catalog() -> None:
    result = build(services=[])
    assert result.catalog == Catalog({}, {}, "n1", None, "")
    assert Catalog.empty("n1") == result.catalog


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["None", "ClientIP", "10.0.0.1", "fd00::1", "TCP",
                                                "ExternalName", "range-nodegroup", "IPv4"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["metadata", "spec", "name", "namespace", "labels", "annotations",
                         "ports", "port", "protocol", "clusterIP", "clusterIPs", "type",
                         "endpoints", "addresses", "conditions", "ready", "nodeName", "subsets",
                         "addressType", "hostname", "targetRef", "externalName", "items",
                         SERVICE_NAME_LABEL, NODEGROUP_LABEL, TOPOLOGY_ANNOTATION,
                         LB_POLICY_ANNOTATION, "sessionAffinity", "status", "nodes"])
        | st.text(max_size=6), children, max_size=6),
    max_leaves=30,
)


def _mutated(base: Obj) -> st.SearchStrategy[Any]:
    """A valid object with one subtree replaced by garbage."""

    def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [prefix]
        if isinstance(obj, dict):
            for k, v in obj.items():
                out += paths(v, (*prefix, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                out += paths(v, (*prefix, i))
        return out

    def replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
        if not path:
            return value
        copy = json.loads(json.dumps(obj))
        target = copy
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return copy

    return st.tuples(st.sampled_from(paths(base)), json_values).map(
        lambda pv: replace(base, pv[0], pv[1]))


ENDPOINTS = {"metadata": {"name": "web", "namespace": "default"}, "subsets": [{
    "addresses": [{"ip": "10.0.0.7", "nodeName": "a1", "hostname": "h7",
                   "targetRef": {"kind": "Pod", "name": "p7"}}],
    "notReadyAddresses": [{"ip": "10.0.0.8"}], "ports": [{"name": "http", "port": 8080}]}]}


@settings(max_examples=120, deadline=None)
@given(
    services=st.lists(json_values | _mutated(service(annotations=CLOSED)), max_size=4),
    slices=st.lists(json_values | _mutated(SLICE), max_size=4),
    endpoints=st.lists(json_values | _mutated(ENDPOINTS), max_size=3),
    nodes=st.lists(json_values | _mutated(node("a1", "A")), max_size=3),
    groups=json_values,
    me=st.text(max_size=4),
)
def test_fuzz_any_input_gives_a_catalog(services: list[Any], slices: list[Any],
                                        endpoints: list[Any], nodes: list[Any], groups: Any,
                                        me: str) -> None:
    result = build_catalog(node=me, services=services, endpoint_slices=slices,
                           endpoints=endpoints, nodes=nodes, nodegroups=groups)
    catalog = result.catalog
    assert isinstance(catalog, Catalog)
    for key, svc in catalog.services.items():
        assert key == svc.key
        assert all(catalog.by_cluster_ip[ip] is svc for ip in svc.cluster_ips
                   if catalog.by_cluster_ip.get(ip) is svc)
        if svc.nodegroup_closed:
            assert catalog.nodegroup is not None or svc.endpoints == ()
    for problem in result.problems:
        assert str(problem).startswith(problem.kind)
