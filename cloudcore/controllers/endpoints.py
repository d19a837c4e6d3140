"""Endpoints and EndpointSlice controller: the pods behind each Service.

One key per Service. Services without a selector (their endpoints are written by hand) and
ExternalName Services are left alone, as Kubernetes' controllers leave them; headless Services
(`clusterIP: None`) are included. A pod backs a Service if it is in its namespace, matches its
selector, is not finished and has an IP (`ShouldPodBeInEndpoints`).

**Endpoints** (core/v1, named like the Service; Kubernetes' endpoints controller):
- each address is `{ip, nodeName, targetRef: {kind: Pod, namespace, name, uid}}` (+ `hostname`
  when the pod's `hostname` is set and its `subdomain` is the Service's name);
- Ready pods go to `addresses`, the others to `notReadyAddresses` (all to `addresses` with
  `publishNotReadyAddresses`); pods being deleted are left out (kept with
  `publishNotReadyAddresses`);
- ports: each Service port becomes `{name, port, protocol, appProtocol}` with `port` the
  target port resolved on the pod (a number, a named container port of the same protocol, or
  the Service port when `targetPort` is unset); a named port a pod does not have leaves that
  port out for that pod; pods with the same resolved ports share a subset (`RepackSubsets`);
  a headless Service without ports gets a subset of addresses only;
- labels: the Service's, plus `service.kubernetes.io/headless: ""` for headless Services.

**EndpointSlices** (discovery.k8s.io/v1; Kubernetes' endpointslice controller):
- `generateName: {service}-`, labels `kubernetes.io/service-name: {service}` and
  `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io` (plus the Service's
  labels and the headless label), an ownerReference to the Service (controller);
- one slice per address family and set of resolved ports, at most `max_endpoints_per_slice`
  (100) endpoints each; endpoint = `{addresses: [ip], conditions: {ready, serving,
  terminating}, nodeName, targetRef}` where `serving` = the pod is Ready, `terminating` = it is
  being deleted, `ready` = serving and not terminating (or `publishNotReadyAddresses`), so
  terminating pods stay visible but never ready;
- a Service with no endpoints keeps one empty "placeholder" slice;
- existing slices of the same family and ports are updated in place (by name order), extra
  ones deleted; only slices with our managed-by label are touched.
- The Service's address families come from `spec.ipFamilies`, else from its ClusterIP, else
  (headless) both IPv4 and IPv6.

Not done: `topology.kubernetes.io/zone` on endpoints, hints, the 1000-address cap of Endpoints
(`endpoints.kubernetes.io/over-capacity`), the `last-change-trigger-time` annotation, mirroring
of hand-written Endpoints into slices, `spec.trafficDistribution`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cloudcore.controllers import pods as p
from cloudcore.controllers.actions import Action, Create, Delete, Result, Update
from cloudcore.controllers.view import View
from edgeweave.kube.errors import StoreError
from edgeweave.kube.informer import Change
from edgeweave.kube.resources import ENDPOINTS, ENDPOINTSLICES, PODS, SERVICES, ResourceInfo
from edgeweave.kube.selectors import LabelSelector

Obj = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
PortKey = tuple[tuple[str, int, str, str], ...]
"""A resolved port set: (name, port, protocol, appProtocol) tuples, sorted."""


@dataclasses.dataclass(frozen=True)
class EndpointsConfig:
    """Tunables of the endpoints controller."""

    max_endpoints_per_slice: int = 100
    """Endpoints per EndpointSlice (kube-controller-manager's `--max-endpoints-per-slice`)."""
    slices: bool = True
    """Write EndpointSlices."""
    endpoints: bool = True
    """Write core/v1 Endpoints."""


def is_headless(service: Mapping[str, Any]) -> bool:
    return p.spec(service).get("clusterIP") == "None"


def service_selector(service: Mapping[str, Any]) -> LabelSelector | None:
    """The Service's selector, or None if it has none (or an invalid one): such a Service is
    not ours to manage."""
    raw = p.spec(service).get("selector")
    if not isinstance(raw, Mapping) or not raw:
        return None
    try:
        return LabelSelector.from_set({str(k): str(v) for k, v in raw.items()})
    except StoreError:
        return None


def is_managed(service: Mapping[str, Any]) -> bool:
    """True if the controllers write this Service's endpoints."""
    return p.spec(service).get("type") != "ExternalName" and service_selector(service) is not None


def _family(ip: str) -> str | None:
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return None


def address_families(service: Mapping[str, Any]) -> list[str]:
    """IPv4 / IPv6, in the Service's order of preference."""
    families = [f for f in p.spec(service).get("ipFamilies") or [] if f in ("IPv4", "IPv6")]
    if families:
        return families
    family = _family(str(p.spec(service).get("clusterIP") or ""))
    return [family] if family else ["IPv4", "IPv6"]


def pod_ip(pod: Mapping[str, Any], family: str | None) -> str | None:
    """The pod's IP of this family (any family: its `podIP`)."""
    status = p.status(pod)
    ips = [str(i.get("ip")) for i in status.get("podIPs") or [] if isinstance(i, Mapping)]
    primary = status.get("podIP")
    if isinstance(primary, str) and primary and primary not in ips:
        ips.insert(0, primary)
    for ip in ips:
        if family is None or _family(ip) == family:
            return ip
    return None


def _container_port(pod: Mapping[str, Any], name: str, protocol: str) -> int | None:
    for container in p.spec(pod).get("containers") or []:
        for port in (container or {}).get("ports") or []:
            if (
                isinstance(port, Mapping)
                and port.get("name") == name
                and (port.get("protocol") or "TCP") == protocol
                and isinstance(port.get("containerPort"), int)
            ):
                return int(port["containerPort"])
    return None


def resolve_ports(service: Mapping[str, Any], pod: Mapping[str, Any]) -> PortKey:
    """The Service's ports as this pod serves them (`podutil.FindPort`)."""
    out: list[tuple[str, int, str, str]] = []
    for port in p.spec(service).get("ports") or []:
        if not isinstance(port, Mapping) or not isinstance(port.get("port"), int):
            continue
        protocol = str(port.get("protocol") or "TCP")
        target = port.get("targetPort")
        number: int | None
        if target is None or target == "":
            number = int(port["port"])
        elif isinstance(target, int) and not isinstance(target, bool):
            number = target
        elif isinstance(target, str) and target.isdigit():
            number = int(target)
        else:
            number = _container_port(pod, str(target), protocol)
        if number is None:
            continue
        out.append(
            (str(port.get("name") or ""), number, protocol, str(port.get("appProtocol") or ""))
        )
    return tuple(sorted(out))


def _target_ref(pod: Mapping[str, Any]) -> Obj:
    return {
        "kind": "Pod",
        "namespace": p.namespace_of(pod),
        "name": p.name_of(pod),
        "uid": p.uid_of(pod),
    }


def _hostname(service: Mapping[str, Any], pod: Mapping[str, Any]) -> str | None:
    spec = p.spec(pod)
    hostname = spec.get("hostname")
    if isinstance(hostname, str) and hostname and spec.get("subdomain") == p.name_of(service):
        return hostname
    return None


def selected_pods(service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """Pods that back the Service (not finished; terminating ones included)."""
    selector = service_selector(service)
    if selector is None:
        return []
    ns = p.namespace_of(service)
    return [
        dict(pod)
        for pod in pods
        if p.namespace_of(pod) == ns and selector.matches(p.labels(pod)) and not p.is_terminal(pod)
    ]


def _labels(service: Mapping[str, Any]) -> dict[str, str]:
    labels = dict(p.labels(service))
    if is_headless(service):
        labels[HEADLESS_LABEL] = ""
    else:
        labels.pop(HEADLESS_LABEL, None)
    return labels


def endpoints_subsets(service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """The `subsets` of the Service's Endpoints."""
    publish = p.spec(service).get("publishNotReadyAddresses") is True
    # Endpoints hold one IP per pod: of the Service's primary family (a headless Service
    # without ipFamilies takes the pod's primary IP), as the endpoints controller picks it.
    explicit = not is_headless(service) or bool(p.spec(service).get("ipFamilies"))
    family = address_families(service)[0] if explicit else None
    has_ports = bool(p.spec(service).get("ports"))
    groups: dict[PortKey, tuple[list[Obj], list[Obj]]] = {}
    for pod in selected_pods(service, pods):
        if p.is_terminating(pod) and not publish:
            continue
        ip = pod_ip(pod, family)
        if ip is None:
            continue
        ports = resolve_ports(service, pod)
        if has_ports and not ports:
            continue
        address: Obj = {"ip": ip}
        hostname = _hostname(service, pod)
        if hostname:
            address["hostname"] = hostname
        if p.node_name(pod):
            address["nodeName"] = p.node_name(pod)
        address["targetRef"] = _target_ref(pod)
        ready, not_ready = groups.setdefault(ports, ([], []))
        (ready if publish or p.is_ready(pod) else not_ready).append(address)
    subsets: list[Obj] = []
    for ports in sorted(groups):
        ready, not_ready = groups[ports]
        subset: Obj = {}
        if ready:
            subset["addresses"] = sorted(ready, key=_address_order)
        if not_ready:
            subset["notReadyAddresses"] = sorted(not_ready, key=_address_order)
        if ports:
            subset["ports"] = [_endpoint_port(port) for port in ports]
        subsets.append(subset)
    return subsets


def _address_order(address: Mapping[str, Any]) -> tuple[str, str]:
    return str(address.get("ip")), str((address.get("targetRef") or {}).get("name"))


def _endpoint_port(port: tuple[str, int, str, str]) -> Obj:
    name, number, protocol, app = port
    out: Obj = {}
    if name:
        out["name"] = name
    out["port"] = number
    out["protocol"] = protocol
    if app:
        out["appProtocol"] = app
    return out


def reconcile_endpoints(
    service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], current: Mapping[str, Any] | None
) -> list[Action]:
    """Create or update the Service's Endpoints if they differ from what the pods say."""
    subsets = endpoints_subsets(service, pods)
    labels = _labels(service)
    if current is not None:
        if (current.get("subsets") or []) == subsets and p.labels(current) == labels:
            return []
        meta = dict(p.meta(current))
        meta["labels"] = labels
        body: Obj = {**current, "metadata": meta}
        body.pop("subsets", None)
        if subsets:
            body["subsets"] = subsets
        return [Update(ENDPOINTS, body, reason="pods changed")]
    meta = {"name": p.name_of(service), "namespace": p.namespace_of(service), "labels": labels}
    new: Obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta}
    if subsets:
        new["subsets"] = subsets
    return [Create(ENDPOINTS, p.namespace_of(service), new, reason="new service")]


@dataclasses.dataclass(frozen=True)
class _SliceContent:
    address_type: str
    ports: PortKey
    endpoints: tuple[Obj, ...]


def _slice_endpoints(
    service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
) -> dict[tuple[str, PortKey], list[Obj]]:
    publish = p.spec(service).get("publishNotReadyAddresses") is True
    has_ports = bool(p.spec(service).get("ports"))
    groups: dict[tuple[str, PortKey], list[Obj]] = {}
    for pod in selected_pods(service, pods):
        ports = resolve_ports(service, pod)
        if has_ports and not ports:
            continue
        serving = p.is_ready(pod)
        terminating = p.is_terminating(pod)
        for family in address_families(service):
            ip = pod_ip(pod, family)
            if ip is None:
                continue
            endpoint: Obj = {
                "addresses": [ip],
                "conditions": {
                    "ready": publish or (serving and not terminating),
                    "serving": serving,
                    "terminating": terminating,
                },
            }
            hostname = _hostname(service, pod)
            if hostname:
                endpoint["hostname"] = hostname
            if p.node_name(pod):
                endpoint["nodeName"] = p.node_name(pod)
            endpoint["targetRef"] = _target_ref(pod)
            groups.setdefault((family, ports), []).append(endpoint)
    for items in groups.values():
        items.sort(key=lambda e: (e["addresses"][0], e["targetRef"]["name"]))
    return groups


def _slice_ports(ports: PortKey) -> list[Obj]:
    out = []
    for name, number, protocol, app in ports:
        port: Obj = {"name": name, "port": number, "protocol": protocol}
        if app:
            port["appProtocol"] = app
        out.append(port)
    return out


def _slice_key(slice_: Mapping[str, Any]) -> tuple[str, PortKey]:
    ports = []
    for port in slice_.get("ports") or []:
        if isinstance(port, Mapping):
            ports.append(
                (
                    str(port.get("name") or ""),
                    int(port.get("port") or 0),
                    str(port.get("protocol") or "TCP"),
                    str(port.get("appProtocol") or ""),
                )
            )
    return str(slice_.get("addressType") or ""), tuple(sorted(ports))


def _owner_ref(service: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "name": p.name_of(service),
        "uid": p.uid_of(service),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_our_slice(slice_: Mapping[str, Any]) -> bool:
    return p.labels(slice_).get(MANAGED_BY_LABEL) == MANAGED_BY


def reconcile_slices(
    service: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    slices: Sequence[Mapping[str, Any]],
    *,
    max_per_slice: int = 100,
) -> list[Action]:
    """Create, update and delete the Service's EndpointSlices (`slices`: the existing ones
    labelled with its name; only ours are touched)."""
    ns, name = p.namespace_of(service), p.name_of(service)
    labels = {**_labels(service), SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}
    groups = _slice_endpoints(service, pods)
    if not groups:
        groups = {(address_families(service)[0], ()): []}  # the placeholder slice
    ours = sorted((s for s in slices if is_our_slice(s)), key=p.name_of)
    existing: dict[tuple[str, PortKey], list[Mapping[str, Any]]] = {}
    for slice_ in ours:
        existing.setdefault(_slice_key(slice_), []).append(slice_)
    owner = _owner_ref(service)
    actions: list[Action] = []
    for key in sorted(groups):
        endpoints = groups[key]
        chunks = [
            endpoints[i : i + max_per_slice] for i in range(0, len(endpoints), max_per_slice)
        ] or [[]]
        have = existing.pop(key, [])
        for index, chunk in enumerate(chunks):
            content: Obj = {
                "addressType": key[0],
                "endpoints": chunk,
                "ports": _slice_ports(key[1]),
            }
            if index < len(have):
                current = have[index]
                same = (
                    p.labels(current) == labels
                    and (current.get("endpoints") or []) == chunk
                    and (current.get("ports") or []) == content["ports"]
                    and (p.meta(current).get("ownerReferences") or []) == [owner]
                )
                if not same:
                    meta = {**p.meta(current), "labels": labels, "ownerReferences": [owner]}
                    body = {**current, **content, "metadata": meta}
                    actions.append(Update(ENDPOINTSLICES, body, reason="pods changed"))
                continue
            meta = {
                "generateName": f"{name}-",
                "namespace": ns,
                "labels": labels,
                "ownerReferences": [owner],
            }
            body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta}
            actions.append(Create(ENDPOINTSLICES, ns, {**body, **content}, reason="new slice"))
        for extra in have[len(chunks) :]:
            actions.append(_delete_slice(extra, "fewer endpoints"))
    for leftovers in existing.values():
        for extra in leftovers:
            actions.append(_delete_slice(extra, "ports or address family gone"))
    return actions


def _delete_slice(slice_: Mapping[str, Any], reason: str) -> Delete:
    return Delete(
        ENDPOINTSLICES,
        p.namespace_of(slice_),
        p.name_of(slice_),
        uid=p.uid_of(slice_),
        reason=reason,
    )


def reconcile_service(
    namespace: str,
    name: str,
    service: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    endpoints: Mapping[str, Any] | None,
    slices: Sequence[Mapping[str, Any]],
    *,
    config: EndpointsConfig = EndpointsConfig(),
) -> Result:
    """Everything for one Service key: its Endpoints and EndpointSlices. A deleted Service's
    Endpoints and our slices are deleted."""
    if service is None or p.is_terminating(service):
        actions: list[Action] = []
        if endpoints is not None and service is None and config.endpoints:
            actions.append(
                Delete(ENDPOINTS, namespace, name, uid=p.uid_of(endpoints), reason="service gone")
            )
        if config.slices:
            actions.extend(_delete_slice(s, "service gone") for s in slices if is_our_slice(s))
        return Result(tuple(actions)) if service is None else Result()
    if not is_managed(service):
        return Result()
    pods = list(pods)
    actions = []
    if config.endpoints:
        actions.extend(reconcile_endpoints(service, pods, endpoints))
    if config.slices:
        actions.extend(
            reconcile_slices(service, pods, slices, max_per_slice=config.max_endpoints_per_slice)
        )
    return Result(tuple(actions))


class EndpointsController:
    """Endpoints + EndpointSlices as a runner `Controller`: one key per Service; a pod change
    wakes every Service of its namespace whose selector matches the pod before or after."""

    name = "endpoints"
    resources: tuple[ResourceInfo, ...] = (SERVICES, PODS, ENDPOINTS, ENDPOINTSLICES)

    def __init__(self, config: EndpointsConfig = EndpointsConfig()) -> None:
        self.config = config

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> list[tuple[str, str]]:
        ns = change.key[0]
        if resource.key in (SERVICES.key, ENDPOINTS.key):
            return [change.key]
        if resource.key == ENDPOINTSLICES.key:
            svc = p.labels(change.object).get(SERVICE_NAME_LABEL)
            return [(ns, svc)] if svc else []
        keys = []
        for service in view.list(SERVICES, ns):
            selector = service_selector(service)
            if selector is None:
                continue
            if any(
                obj is not None and selector.matches(p.labels(obj))
                for obj in (change.object, change.old)
            ):
                keys.append((ns, p.name_of(service)))
        return keys

    def initial_keys(self, view: View) -> list[tuple[str, str]]:
        return [(p.namespace_of(s), p.name_of(s)) for s in view.list(SERVICES)]

    def reconcile(self, key: tuple[str, str], view: View, now: float) -> Result:
        ns, name = key
        slices = [
            s for s in view.list(ENDPOINTSLICES, ns) if p.labels(s).get(SERVICE_NAME_LABEL) == name
        ]
        return reconcile_service(
            ns,
            name,
            view.get(SERVICES, name, ns),
            view.list(PODS, ns),
            view.get(ENDPOINTS, name, ns),
            slices,
            config=self.config,
        )
