"""Build the agent's `Catalog` from Kubernetes objects: a pure function, no I/O, no exceptions.

    result = build_catalog(node="edge-1", services=svcs, endpoint_slices=slices,
                           endpoints=eps, nodes=nodes, nodegroups=groups, revision="1234")
    for problem in result.problems:
        event(log, logging.WARNING, "catalog.problem", object=problem.object,
              reason=problem.message)
    dns.set_catalog(result.catalog)

Inputs are lists of objects as the API returns them (JSON decoded into dicts). Nothing in them is
trusted: a field of the wrong type, a missing field or an impossible value skips or degrades only
the object (or the part of it) concerned, and is reported in `problems`, naming the object and the
field. Rules:

- **Endpoints come from EndpointSlices** (`discovery.k8s.io/v1`, matched by the label
  `kubernetes.io/service-name`), all slices of a Service merged, an address seen in two slices
  counted once (its ports merged, ready if any copy is ready). `conditions.ready` absent or null
  means ready (as the API documents). Only the first address of an endpoint is used (consumers
  "should" do so, per the API). `FQDN` slices are ignored. A Service with no slice at all falls
  back to its core/v1 `Endpoints` (`addresses` ready, `notReadyAddresses` not ready); a Service
  with only an empty (placeholder) slice has no endpoints and does not fall back.
- **Services** of type ClusterIP, NodePort and LoadBalancer are served on their ClusterIPs
  (`spec.clusterIPs`, else `spec.clusterIP`); `clusterIP: None` is headless; `ExternalName` is a
  DNS CNAME only (no ports proxied, no endpoints). A Service labelled
  `service.edgemesh.kubeedge.io/service-proxy-name` (any value) is `proxied=False`: DNS answers
  for it, the proxy and iptables leave it to its own proxy. A non-headless Service without ports
  is kept (its name resolves) and reported.
- **Load balancing:** `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.
  timeoutSeconds` (1..86400, default 10800); the annotation `mesh.edgeweave.io/lb-policy`
  selects `round-robin` (default), `random` or `consistent-hash`; an unknown value is reported and
  round robin used.
- **Node groups:** a node's group is its label `apps.kubeedge.io/belonging-to` when its Node
  object is known; otherwise, the NodeGroup objects that list it (`status.nodeStatuses` with
  `selectionStatus: Succeeded`, else `spec.nodes`) — edge nodes may see only their own Node.
- **Traffic closure** (`apps.kubeedge.io/service-topology: range-nodegroup`): only endpoints on
  nodes of this node's group are kept. An endpoint without a node, on a node of no group or of
  another group is dropped; when this node is in no group the Service has no endpoints at all.
  There is never a fallback to other groups.
- An endpoint on a node that no Node or NodeGroup mentions is kept (outside closure) and reported,
  when any node information was given at all.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

from meshd.catalog import (
    LB_POLICY_ANNOTATION,
    NODEGROUP_LABEL,
    PROXY_NAME_LABEL,
    TOPOLOGY_ANNOTATION,
    TOPOLOGY_NODEGROUP,
    Catalog,
    Endpoint,
    LbPolicy,
    Protocol,
    Service,
    ServicePort,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""The EndpointSlice label naming its Service."""
DEFAULT_AFFINITY_TIMEOUT_S = 10800
"""Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours)."""
MAX_AFFINITY_TIMEOUT_S = 86400
"""Kubernetes' upper bound for the affinity timeout (1 day)."""

_PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")
_LB_POLICIES: tuple[LbPolicy, ...] = ("round-robin", "random", "consistent-hash")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?")

_PortKey = tuple[str, int, Protocol]


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something in the input that was skipped or degraded."""

    kind: str
    """The object's kind: `Service`, `EndpointSlice`, `Endpoints`, `Node`, `NodeGroup`."""
    key: str
    """`namespace/name` (or `name` for cluster-scoped objects; `#index` when it has none)."""
    message: str
    """What was wrong and what was done about it, naming the field."""

    @property
    def object(self) -> str:
        """`Service default/web`."""
        return f"{self.kind} {self.key}"

    def __str__(self) -> str:
        return f"{self.object}: {self.message}"


@dataclasses.dataclass(frozen=True)
class CatalogBuild:
    """The result of `build_catalog`."""

    catalog: Catalog
    """The catalog built from what was usable."""
    problems: tuple[Problem, ...]
    """Everything skipped or degraded, in input order per kind."""


class _Problems:
    """Collects problems for one object at a time."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, kind: str, key: str, message: str) -> None:
        self.items.append(Problem(kind, key, message))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else None


def _int(value: Any) -> int | None:
    """An integer (JSON numbers with no fraction count too); bools do not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _ip(value: Any) -> str | None:
    """The canonical text of an IP literal, or None."""
    if not isinstance(value, str) or "%" in value:
        return None
    parsed = _parse_ip(value)
    return parsed[0] if parsed is not None else None


@functools.lru_cache(maxsize=65536)
def _parse_ip(text: str) -> tuple[str, int, int] | None:
    """(canonical text, version, integer value); cached: the same addresses come back at every
    rebuild, and parsing them dominated the builder's time."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address), address.version, int(address)


def _ip_version(ip: str) -> int:
    parsed = _parse_ip(ip)
    return parsed[1] if parsed is not None else 0


def _ip_sort_key(ip: str) -> tuple[int, int]:
    parsed = _parse_ip(ip)
    return (parsed[1], parsed[2]) if parsed is not None else (0, 0)


def is_dns_label(value: Any) -> bool:
    """A DNS-1123 label: what Kubernetes allows for namespaces, Service names and hostnames."""
    return isinstance(value, str) and _DNS_LABEL.fullmatch(value) is not None


def normalise_dns_name(value: Any) -> str | None:
    """A host name for an ExternalName (letters, digits, `-`, `_`; labels of 1..63; at most
    253 characters), lower-cased and without a trailing dot; None if it is not one."""
    if not isinstance(value, str):
        return None
    name = value[:-1] if value.endswith(".") else value
    name = name.lower()
    if not name or len(name) > 253:
        return None
    if all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    return None


def _object_key(obj: Mapping[str, Any], index: int, namespaced: bool) -> tuple[str, str, str]:
    """(namespace, name, display key) of an object; '' for what is missing or malformed."""
    meta = _mapping(obj.get("metadata")) or {}
    name = meta.get("name")
    namespace = meta.get("namespace")
    name = name if isinstance(name, str) else ""
    namespace = namespace if isinstance(namespace, str) else ""
    if not name:
        display = f"#{index}"
    elif namespaced:
        display = f"{namespace or '?'}/{name}"
    else:
        display = name
    return namespace, name, display


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = _mapping(obj.get("metadata")) or {}
    return _mapping(meta.get("labels")) or {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = _mapping(obj.get("metadata")) or {}
    return _mapping(meta.get("annotations")) or {}


# --- node groups -----------------------------------------------------------------------------


def _node_groups(
    nodes: Iterable[Any], nodegroups: Iterable[Any], problems: _Problems
) -> tuple[dict[str, str | None], set[str]]:
    """(node → group or None, every node name mentioned anywhere)."""
    from_nodes: dict[str, str | None] = {}
    for index, obj in enumerate(nodes):
        if not isinstance(obj, Mapping):
            problems.add("Node", f"#{index}", f"expected a mapping, got {_describe(obj)}; skipped")
            continue
        _, name, key = _object_key(obj, index, namespaced=False)
        if not name:
            problems.add("Node", key, "metadata.name is missing; skipped")
            continue
        group = _labels(obj).get(NODEGROUP_LABEL)
        if group is not None and (not isinstance(group, str) or not group):
            problems.add("Node", key, f"label {NODEGROUP_LABEL}: expected a group name, "
                                      f"got {_describe(group)}; in no group")
            group = None
        from_nodes[name] = group
    from_groups: dict[str, str] = {}
    for index, obj in enumerate(nodegroups):
        if not isinstance(obj, Mapping):
            problems.add("NodeGroup", f"#{index}",
                         f"expected a mapping, got {_describe(obj)}; skipped")
            continue
        _, group, key = _object_key(obj, index, namespaced=False)
        if not group:
            problems.add("NodeGroup", key, "metadata.name is missing; skipped")
            continue
        for member in _group_members(obj, key, problems):
            from_groups.setdefault(member, group)
    groups = dict(from_groups)
    groups_or_none: dict[str, str | None] = {**groups, **from_nodes}
    return groups_or_none, set(groups_or_none)


def _group_members(group: Mapping[str, Any], key: str, problems: _Problems) -> list[str]:
    status = _mapping(group.get("status")) or {}
    statuses = status.get("nodeStatuses")
    if isinstance(statuses, list) and statuses:
        members = []
        for entry in statuses:
            entry_map = _mapping(entry) or {}
            name = entry_map.get("nodeName")
            if isinstance(name, str) and name and entry_map.get("selectionStatus") == "Succeeded":
                members.append(name)
        return members
    spec = _mapping(group.get("spec")) or {}
    listed = spec.get("nodes")
    if listed is None:
        return []
    if not isinstance(listed, list):
        problems.add("NodeGroup", key, f"spec.nodes: expected a list, got {_describe(listed)}")
        return []
    return [n for n in listed if isinstance(n, str) and n]


# --- services ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _ServiceDraft:
    """A Service parsed, waiting for its endpoints."""

    service: Service
    index: int


def _parse_ports(
    spec: Mapping[str, Any], key: str, problems: _Problems
) -> tuple[ServicePort, ...]:
    raw = spec.get("ports")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add("Service", key, f"spec.ports: expected a list, got {_describe(raw)}")
        return ()
    ports: list[ServicePort] = []
    seen: set[tuple[int, str]] = set()
    names: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"spec.ports[{i}]"
        item = _mapping(entry)
        if item is None:
            problems.add("Service", key, f"{where}: expected a mapping, got {_describe(entry)}; "
                                         "port skipped")
            continue
        number = _int(item.get("port"))
        if number is None or not 0 < number < 65536:
            problems.add("Service", key, f"{where}.port: expected an integer in 1..65535, got "
                                         f"{_describe(item.get('port'))}; port skipped")
            continue
        protocol = item.get("protocol", "TCP")
        if protocol is None:
            protocol = "TCP"
        if protocol not in _PROTOCOLS:
            problems.add("Service", key, f"{where}.protocol: expected TCP, UDP or SCTP, got "
                                         f"{_describe(protocol)}; port skipped")
            continue
        name = item.get("name") or ""
        if not isinstance(name, str) or (name and not is_dns_label(name)):
            problems.add("Service", key, f"{where}.name: expected a DNS label, got "
                                         f"{_describe(name)}; port skipped")
            continue
        target_port = _target_port(item.get("targetPort"), number)
        if target_port is None:
            problems.add("Service", key, f"{where}.targetPort: expected a port number or name, "
                                         f"got {_describe(item.get('targetPort'))}; port skipped")
            continue
        if (number, protocol) in seen or (name and name in names):
            problems.add("Service", key, f"{where}: duplicate port {name or number}/{protocol}; "
                                         "skipped")
            continue
        seen.add((number, protocol))
        if name:
            names.add(name)
        ports.append(ServicePort(name, number, cast(Protocol, protocol), target_port))
    return tuple(ports)


def _target_port(raw: Any, port: int) -> int | str | None:
    """`targetPort`: a number, a container port name, or (unset) the Service port."""
    if raw is None or raw == 0 or raw == "":
        return port
    if isinstance(raw, str):
        if raw.isascii() and raw.isdigit():
            raw = int(raw)
        else:
            return raw if len(raw) <= 63 else None
    number = _int(raw)
    return number if number is not None and 0 < number < 65536 else None


def _parse_cluster_ips(
    spec: Mapping[str, Any], key: str, problems: _Problems
) -> tuple[str, ...] | None:
    """The ClusterIPs; () for headless; None if the Service is unusable."""
    raw = spec.get("clusterIPs")
    if raw is None or raw == []:
        single = spec.get("clusterIP")
        raw = [] if single is None or single == "" else [single]
    if not isinstance(raw, list):
        problems.add("Service", key, f"spec.clusterIPs: expected a list, got {_describe(raw)}; "
                                     "skipped")
        return None
    if not raw:
        problems.add("Service", key, "no clusterIP allocated; skipped")
        return None
    if raw[0] == "None":
        return ()
    ips: list[str] = []
    for i, value in enumerate(raw):
        ip = _ip(value)
        if ip is None:
            problems.add("Service", key, f"spec.clusterIPs[{i}]: expected an IP address, got "
                                         f"{_describe(value)}; ignored")
        elif ip not in ips:
            ips.append(ip)
    if not ips:
        problems.add("Service", key, "no valid clusterIP; skipped")
        return None
    return tuple(ips)


def _parse_affinity(spec: Mapping[str, Any], key: str, problems: _Problems) -> int | None:
    affinity = spec.get("sessionAffinity")
    if affinity is None or affinity == "None":
        return None
    if affinity != "ClientIP":
        problems.add("Service", key, f"spec.sessionAffinity: expected None or ClientIP, got "
                                     f"{_describe(affinity)}; no affinity")
        return None
    config = _mapping(spec.get("sessionAffinityConfig")) or {}
    client_ip = _mapping(config.get("clientIP")) or {}
    raw = client_ip.get("timeoutSeconds")
    if raw is None:
        return DEFAULT_AFFINITY_TIMEOUT_S
    timeout = _int(raw)
    if timeout is None or not 0 < timeout <= MAX_AFFINITY_TIMEOUT_S:
        problems.add("Service", key,
                     f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: expected an integer "
                     f"in 1..{MAX_AFFINITY_TIMEOUT_S}, got {_describe(raw)}; using "
                     f"{DEFAULT_AFFINITY_TIMEOUT_S}")
        return DEFAULT_AFFINITY_TIMEOUT_S
    return timeout


def _parse_lb_policy(obj: Mapping[str, Any], key: str, problems: _Problems) -> LbPolicy:
    raw = _annotations(obj).get(LB_POLICY_ANNOTATION)
    if raw is None:
        return "round-robin"
    if raw in _LB_POLICIES:
        return cast(LbPolicy, raw)
    problems.add("Service", key, f"annotation {LB_POLICY_ANNOTATION}: expected one of "
                                 f"{', '.join(_LB_POLICIES)}, got {_describe(raw)}; "
                                 "using round-robin")
    return "round-robin"


def _parse_service(obj: Any, index: int, problems: _Problems) -> Service | None:
    if not isinstance(obj, Mapping):
        problems.add("Service", f"#{index}", f"expected a mapping, got {_describe(obj)}; skipped")
        return None
    namespace, name, key = _object_key(obj, index, namespaced=True)
    if not is_dns_label(name) or not is_dns_label(namespace):
        problems.add("Service", key, "metadata.name and metadata.namespace must be DNS labels; "
                                     "skipped")
        return None
    spec = _mapping(obj.get("spec"))
    if spec is None:
        problems.add("Service", key, f"spec: expected a mapping, got "
                                     f"{_describe(obj.get('spec'))}; skipped")
        return None
    kind = spec.get("type") or "ClusterIP"
    if kind not in _SERVICE_TYPES:
        problems.add("Service", key, f"spec.type: unknown type {_describe(kind)}; "
                                     "treated as ClusterIP")
        kind = "ClusterIP"
    ports = _parse_ports(spec, key, problems)
    proxied = PROXY_NAME_LABEL not in _labels(obj)
    if kind == "ExternalName":
        target = normalise_dns_name(spec.get("externalName"))
        if target is None:
            problems.add("Service", key, f"spec.externalName: expected a DNS name, got "
                                         f"{_describe(spec.get('externalName'))}; skipped")
            return None
        return Service(namespace, name, (), ports, (), None, proxied=False,
                       external_name=target)
    cluster_ips = _parse_cluster_ips(spec, key, problems)
    if cluster_ips is None:
        return None
    if cluster_ips and not ports:
        problems.add("Service", key, "no usable ports: its name resolves, nothing is proxied")
    topology = _annotations(obj).get(TOPOLOGY_ANNOTATION)
    return Service(
        namespace,
        name,
        cluster_ips,
        ports,
        (),
        _parse_affinity(spec, key, problems),
        lb_policy=_parse_lb_policy(obj, key, problems),
        nodegroup_closed=topology == TOPOLOGY_NODEGROUP,
        proxied=proxied,
    )


# --- endpoints --------------------------------------------------------------------------------


@dataclasses.dataclass
class _EndpointDraft:
    """An endpoint being merged from one or more slices or subsets."""

    ip: str
    ports: list[_PortKey]
    ready: bool
    node: str | None
    target: str | None
    hostname: str | None

    def merge(self, other: _EndpointDraft) -> None:
        self.ports.extend(p for p in other.ports if p not in self.ports)
        self.ready = self.ready or other.ready
        self.node = self.node or other.node
        self.target = self.target or other.target
        self.hostname = self.hostname or other.hostname

    def freeze(self) -> Endpoint:
        return Endpoint(self.ip, tuple(self.ports), self.ready, self.node, self.target,
                        self.hostname)


def _endpoint_ports(
    raw: Any, kind: str, key: str, where: str, problems: _Problems
) -> list[_PortKey] | None:
    """Ports of a slice or subset; None if the whole list is malformed."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(kind, key, f"{where}: expected a list, got {_describe(raw)}; skipped")
        return None
    ports: list[_PortKey] = []
    for i, entry in enumerate(raw):
        item = _mapping(entry)
        if item is None:
            problems.add(kind, key, f"{where}[{i}]: expected a mapping, got "
                                    f"{_describe(entry)}; port skipped")
            continue
        number = _int(item.get("port"))
        if number is None or not 0 < number < 65536:
            if item.get("port") is not None:
                problems.add(kind, key, f"{where}[{i}].port: expected an integer in 1..65535, "
                                        f"got {_describe(item.get('port'))}; port skipped")
            continue
        protocol = item.get("protocol") or "TCP"
        name = item.get("name") or ""
        if protocol not in _PROTOCOLS or not isinstance(name, str):
            problems.add(kind, key, f"{where}[{i}]: bad name or protocol; port skipped")
            continue
        port = (name, number, cast(Protocol, protocol))
        if port not in ports:
            ports.append(port)
    return ports


def _reference(raw: Any, default_namespace: str) -> str | None:
    ref = _mapping(raw)
    if ref is None:
        return None
    name = ref.get("name")
    namespace = ref.get("namespace") or default_namespace
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return f"{namespace}/{name}"


def _hostname(raw: Any, kind: str, key: str, where: str, problems: _Problems) -> str | None:
    if raw is None or raw == "":
        return None
    if not is_dns_label(raw):
        problems.add(kind, key, f"{where}.hostname: expected a DNS label, got {_describe(raw)}; "
                                "ignored")
        return None
    return cast(str, raw)


def _node_name(raw: Any, kind: str, key: str, where: str, problems: _Problems) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        problems.add(kind, key, f"{where}.nodeName: expected a string, got {_describe(raw)}; "
                                "ignored")
        return None
    return raw


def _parse_slice(
    obj: Any, index: int, problems: _Problems
) -> tuple[tuple[str, str], str, list[_EndpointDraft]] | None:
    """((namespace, service), slice key, endpoints) of one EndpointSlice, or None if it is
    unusable."""
    kind = "EndpointSlice"
    if not isinstance(obj, Mapping):
        problems.add(kind, f"#{index}", f"expected a mapping, got {_describe(obj)}; skipped")
        return None
    namespace, _, key = _object_key(obj, index, namespaced=True)
    service = _labels(obj).get(SERVICE_NAME_LABEL)
    if not namespace or not isinstance(service, str) or not service:
        problems.add(kind, key, f"no namespace or no {SERVICE_NAME_LABEL} label; skipped")
        return None
    family = obj.get("addressType", "IPv4")
    if family == "FQDN":
        problems.add(kind, key, "addressType FQDN is not supported; skipped")
        return None
    if family not in ("IPv4", "IPv6"):
        problems.add(kind, key, f"addressType: expected IPv4 or IPv6, got {_describe(family)}; "
                                "skipped")
        return None
    version = 4 if family == "IPv4" else 6
    ports = _endpoint_ports(obj.get("ports"), kind, key, "ports", problems)
    if ports is None:
        return None
    raw = obj.get("endpoints")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        problems.add(kind, key, f"endpoints: expected a list, got {_describe(raw)}; skipped")
        return None
    drafts: list[_EndpointDraft] = []
    for i, entry in enumerate(raw):
        where = f"endpoints[{i}]"
        item = _mapping(entry)
        if item is None:
            problems.add(kind, key, f"{where}: expected a mapping, got {_describe(entry)}; "
                                    "endpoint skipped")
            continue
        addresses = item.get("addresses")
        first = addresses[0] if isinstance(addresses, list) and addresses else None
        ip = _ip(first)
        if ip is None or _ip_version(ip) != version:
            problems.add(kind, key, f"{where}.addresses: expected an {family} address, got "
                                    f"{_describe(addresses)}; endpoint skipped")
            continue
        conditions = _mapping(item.get("conditions")) or {}
        ready_raw = conditions.get("ready")
        if ready_raw is None:
            ready = True
        elif isinstance(ready_raw, bool):
            ready = ready_raw
        else:
            problems.add(kind, key, f"{where}.conditions.ready: expected true or false, got "
                                    f"{_describe(ready_raw)}; not ready")
            ready = False
        drafts.append(_EndpointDraft(
            ip,
            list(ports),
            ready,
            _node_name(item.get("nodeName"), kind, key, where, problems),
            _reference(item.get("targetRef"), namespace),
            _hostname(item.get("hostname"), kind, key, where, problems),
        ))
    return (namespace, service), key, drafts


def _parse_endpoints(
    obj: Any, index: int, problems: _Problems
) -> tuple[tuple[str, str], list[_EndpointDraft]] | None:
    """((namespace, service), endpoints) of one core/v1 Endpoints object."""
    kind = "Endpoints"
    if not isinstance(obj, Mapping):
        problems.add(kind, f"#{index}", f"expected a mapping, got {_describe(obj)}; skipped")
        return None
    namespace, name, key = _object_key(obj, index, namespaced=True)
    if not namespace or not name:
        problems.add(kind, key, "metadata.name or metadata.namespace is missing; skipped")
        return None
    subsets = obj.get("subsets")
    if subsets is None:
        subsets = []
    if not isinstance(subsets, list):
        problems.add(kind, key, f"subsets: expected a list, got {_describe(subsets)}; skipped")
        return None
    drafts: list[_EndpointDraft] = []
    for s, subset_raw in enumerate(subsets):
        subset = _mapping(subset_raw)
        if subset is None:
            problems.add(kind, key, f"subsets[{s}]: expected a mapping; subset skipped")
            continue
        ports = _endpoint_ports(subset.get("ports"), kind, key, f"subsets[{s}].ports", problems)
        if ports is None:
            continue
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            addresses = subset.get(field)
            if addresses is None:
                continue
            if not isinstance(addresses, list):
                problems.add(kind, key, f"subsets[{s}].{field}: expected a list; skipped")
                continue
            for i, entry in enumerate(addresses):
                where = f"subsets[{s}].{field}[{i}]"
                item = _mapping(entry)
                ip = _ip(item.get("ip")) if item is not None else None
                if item is None or ip is None:
                    problems.add(kind, key, f"{where}: expected {{ip: <IP address>, ...}}; "
                                            "address skipped")
                    continue
                drafts.append(_EndpointDraft(
                    ip,
                    list(ports),
                    ready,
                    _node_name(item.get("nodeName"), kind, key, where, problems),
                    _reference(item.get("targetRef"), namespace),
                    _hostname(item.get("hostname"), kind, key, where, problems),
                ))
    return (namespace, name), drafts


def _merge(drafts: Iterable[_EndpointDraft]) -> list[_EndpointDraft]:
    """One endpoint per address, sorted by address."""
    by_ip: dict[str, _EndpointDraft] = {}
    for draft in drafts:
        seen = by_ip.get(draft.ip)
        if seen is None:
            by_ip[draft.ip] = dataclasses.replace(draft, ports=list(draft.ports))
        else:
            seen.merge(draft)
    return [by_ip[ip] for ip in sorted(by_ip, key=_ip_sort_key)]


# --- the builder ------------------------------------------------------------------------------


def build_catalog(
    *,
    node: str,
    services: Iterable[Any],
    endpoint_slices: Iterable[Any] = (),
    endpoints: Iterable[Any] = (),
    nodes: Iterable[Any] = (),
    nodegroups: Iterable[Any] = (),
    revision: str = "",
) -> CatalogBuild:
    """The catalog of node `node` from lists of API objects (dicts); never raises for content.

    `services`: core/v1 Services; `endpoint_slices`: discovery.k8s.io/v1 EndpointSlices;
    `endpoints`: core/v1 Endpoints (used for Services without any slice); `nodes`: core/v1
    Nodes; `nodegroups`: apps.kubeedge.io/v1alpha1 NodeGroups; `revision`: the API
    resourceVersion these lists were taken at (kept in `Catalog.revision`)."""
    problems = _Problems()
    groups, known_nodes = _node_groups(_iterate(nodes, "Node", problems),
                                       _iterate(nodegroups, "NodeGroup", problems), problems)
    my_group = groups.get(node)

    parsed: dict[tuple[str, str], Service] = {}
    for index, obj in enumerate(_iterate(services, "Service", problems)):
        service = _parse_service(obj, index, problems)
        if service is None:
            continue
        if (service.namespace, service.name) in parsed:
            problems.add("Service", service.key, "listed twice; the first copy is used")
            continue
        parsed[(service.namespace, service.name)] = service

    from_slices: dict[tuple[str, str], list[_EndpointDraft]] = {}
    slice_names: dict[tuple[str, str], list[str]] = {}
    for index, obj in enumerate(_iterate(endpoint_slices, "EndpointSlice", problems)):
        parsed_slice = _parse_slice(obj, index, problems)
        if parsed_slice is not None:
            service_key, slice_key, drafts = parsed_slice
            from_slices.setdefault(service_key, []).extend(drafts)
            slice_names.setdefault(service_key, []).append(slice_key)
    from_endpoints: dict[tuple[str, str], list[_EndpointDraft]] = {}
    for index, obj in enumerate(_iterate(endpoints, "Endpoints", problems)):
        parsed_endpoints = _parse_endpoints(obj, index, problems)
        if parsed_endpoints is not None and parsed_endpoints[0] not in from_endpoints:
            from_endpoints[parsed_endpoints[0]] = parsed_endpoints[1]

    services_out: dict[str, Service] = {}
    by_cluster_ip: dict[str, Service] = {}
    for service_key in sorted(parsed):
        service = parsed[service_key]
        if service.external_name is None:
            found = from_slices.get(service_key)
            if found is None:
                found = from_endpoints.get(service_key, [])
            kept: list[Endpoint] = []
            for draft in _merge(found):
                endpoint = draft.freeze()
                if known_nodes and endpoint.node is not None and endpoint.node not in known_nodes:
                    problems.add("Service", service.key,
                                 f"endpoint {endpoint.ip} is on unknown node {endpoint.node!r}"
                                 + ("; dropped (range-nodegroup)"
                                    if service.nodegroup_closed else ""))
                if service.nodegroup_closed and not _in_group(endpoint, groups, my_group):
                    continue
                kept.append(endpoint)
            service = dataclasses.replace(service, endpoints=tuple(kept))
        services_out[service.key] = service
        for ip in service.cluster_ips:
            other = by_cluster_ip.get(ip)
            if other is not None:
                problems.add("Service", service.key,
                             f"clusterIP {ip} is also used by {other.key}; not indexed by IP")
                continue
            by_cluster_ip[ip] = service

    for namespace, name in sorted(set(from_slices) - set(parsed)):
        for slice_key in slice_names[(namespace, name)]:
            problems.add("EndpointSlice", slice_key,
                         f"its Service {namespace}/{name} is not known; ignored")

    catalog = Catalog(services_out, by_cluster_ip, node, my_group, revision)
    return CatalogBuild(catalog, tuple(problems.items))


def _in_group(endpoint: Endpoint, groups: Mapping[str, str | None], my_group: str | None) -> bool:
    if my_group is None or endpoint.node is None:
        return False
    return groups.get(endpoint.node) == my_group


def _iterate(objects: Any, kind: str, problems: _Problems) -> list[Any]:
    """The input list (a `List` object's `items` too); anything else is reported."""
    if isinstance(objects, Mapping):
        objects = objects.get("items")
    if isinstance(objects, list | tuple):
        return list(objects)
    if objects is None:
        return []
    if isinstance(objects, str | bytes) or not isinstance(objects, Iterable):
        problems.add(kind, "*", f"expected a list of objects, got {_describe(objects)}; ignored")
        return []
    return list(objects)
