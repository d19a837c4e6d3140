"""Admission: what kube-apiserver's registry strategies, defaulting and admission plugins do to
an object between decoding and storage. Runs inside the write transaction (`rest.py`).

- Services (`SetDefaults_Service`, the service REST allocator): `spec.type: ClusterIP`,
  `sessionAffinity: None` (ClientIP gets `timeoutSeconds: 10800`), ports' `protocol: TCP` and
  `targetPort` = `port`, `internalTrafficPolicy: Cluster`, `externalTrafficPolicy: Cluster` for
  NodePort/LoadBalancer, `ipFamilies`/`ipFamilyPolicy`; a ClusterIP from `ClusterIPAllocator`
  (`clusterIP: None` = headless, ExternalName gets none); on update an omitted ClusterIP is
  kept and a changed one is 422 (immutable). Ports are validated (number, protocol, names).
- Secrets: `type: Opaque` by default; `stringData` is merged into `data` (base64), as the
  Secret conversion does; `data` values must be base64.
- NodeRestriction (`node_restriction`): a node may create only its own Node and Lease, and
  change the status of / delete only pods with `spec.nodeName` set to itself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any, Literal

from edgeweave.apiserver.serviceip import ClusterIPAllocator
from edgeweave.kube.errors import Cause, Forbidden, StoreError, invalid
from edgeweave.kube.objects import Obj
from edgeweave.kube.resources import ResourceInfo
from edgeweave.kube.store import Store
from edgeweave.pki import Identity

Operation = Literal["CREATE", "UPDATE", "DELETE"]
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes: 3 hours


@dataclasses.dataclass(frozen=True)
class AdmissionRequest:
    """One object passing admission."""

    operation: Operation
    """CREATE, UPDATE (also patches) or DELETE."""
    res: ResourceInfo
    """The resource."""
    subresource: str
    """'' or `status`/`scale`."""
    namespace: str
    """Namespace ('' for cluster-scoped)."""
    name: str
    """Name (from the body for creates)."""
    user: Identity | None
    """Who asks (None for in-process callers)."""


def _core(res: ResourceInfo, kind: str) -> bool:
    return res.group == "" and res.kind == kind


class Admission:
    """The admission chain of one server."""

    def __init__(self, allocator: ClusterIPAllocator, *, mutating: bool = True) -> None:
        self.allocator = allocator
        self.mutating = mutating

    def admit(
        self, store: Store, req: AdmissionRequest, new: Obj | None, old: Obj | None
    ) -> Obj | None:
        """Mutate and validate `new` (None for DELETE); raises a StoreError to refuse."""
        node_restriction(req, new, old)
        if new is None or req.subresource or not self.mutating:
            return new
        if _core(req.res, "Service"):
            return self._service(store, req, new, old)
        if _core(req.res, "Secret"):
            return secret_defaults(req.name, new)
        return new

    def _service(self, store: Store, req: AdmissionRequest, new: Obj, old: Obj | None) -> Obj:
        obj = dict(new)
        spec = obj.get("spec")
        spec = dict(spec) if isinstance(spec, dict) else {}
        obj["spec"] = spec
        service_defaults(req.name, spec)
        old_spec = old.get("spec") if isinstance(old, dict) else None
        old_ip = old_spec.get("clusterIP") if isinstance(old_spec, dict) else None
        if spec["type"] == "ExternalName":
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                spec.pop(key, None)
            return obj
        ip = spec.get("clusterIP") or None
        ips = spec.get("clusterIPs")
        first = ips[0] if isinstance(ips, list) and ips and isinstance(ips[0], str) else None
        if old_ip:
            # Kubernetes keeps allocated values an update omits, and refuses to change them.
            for field, value in (("spec.clusterIP", ip), ("spec.clusterIPs[0]", first)):
                if value and value != old_ip:
                    raise invalid(
                        "Service",
                        req.name,
                        [Cause(field, f'Invalid value: "{value}": may not change once set')],
                    )
            ip = old_ip
        else:
            if ip and first and ip != first:
                raise invalid(
                    "Service",
                    req.name,
                    [
                        Cause(
                            "spec.clusterIPs[0]", f'Invalid value: "{first}": must match clusterIP'
                        )
                    ],
                )
            ip = ip or first
            if not ip:
                ip = self.allocator.allocate(store, req.namespace, req.name)
            elif ip != "None":
                ip = self.allocator.check_requested(store, req.namespace, req.name, str(ip))
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        if ip != "None" or spec.get("selector"):
            family = "IPv6" if ":" in str(ip) or self.allocator.network.version == 6 else "IPv4"
            spec.setdefault("ipFamilies", [family])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        return obj


def _port_causes(ports: Any) -> list[Cause]:
    if ports is None:
        return []
    if not isinstance(ports, list):
        return [Cause("spec.ports", "Invalid value: must be a list")]
    causes: list[Cause] = []
    seen: set[tuple[Any, Any]] = set()
    names: set[str] = set()
    for i, port in enumerate(ports):
        where = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            causes.append(Cause(where, "Invalid value: must be an object"))
            continue
        number = port.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            causes.append(
                Cause(
                    f"{where}.port",
                    f"Invalid value: {number!r}: must be between 1 and 65535, inclusive",
                )
            )
        proto = port.get("protocol")
        if proto not in PROTOCOLS:
            causes.append(
                Cause(
                    f"{where}.protocol",
                    f'Unsupported value: "{proto}": supported values: "SCTP", "TCP", "UDP"',
                    "FieldValueNotSupported",
                )
            )
        target = port.get("targetPort")
        if isinstance(target, bool) or not (
            (isinstance(target, int) and 1 <= target <= 65535)
            or (isinstance(target, str) and 0 < len(target) <= 15)
        ):
            causes.append(Cause(f"{where}.targetPort", f"Invalid value: {target!r}"))
        name = port.get("name")
        if len(ports) > 1 and not name:
            causes.append(Cause(f"{where}.name", "Required value", "FieldValueRequired"))
        if isinstance(name, str) and name:
            if name in names:
                causes.append(
                    Cause(f"{where}.name", f'Duplicate value: "{name}"', "FieldValueDuplicate")
                )
            names.add(name)
        key = (number, proto)
        if key in seen:
            causes.append(
                Cause(where, f"Duplicate value: {{{number!r}, {proto!r}}}", "FieldValueDuplicate")
            )
        seen.add(key)
    return causes


def service_defaults(name: str, spec: dict[str, Any]) -> None:
    """Kubernetes' Service defaults, in place; Invalid for a bad type or bad ports."""
    spec.setdefault("type", "ClusterIP")
    if spec["type"] not in SERVICE_TYPES:
        raise invalid(
            "Service",
            name,
            [
                Cause(
                    "spec.type",
                    f'Unsupported value: "{spec["type"]}": supported values: "ClusterIP", '
                    '"ExternalName", "LoadBalancer", "NodePort"',
                    "FieldValueNotSupported",
                )
            ],
        )
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        cfg = dict(spec.get("sessionAffinityConfig") or {})
        client = dict(cfg.get("clientIP") or {})
        client.setdefault("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        cfg["clientIP"] = client
        spec["sessionAffinityConfig"] = cfg
    ports = spec.get("ports")
    if isinstance(ports, list):
        fixed = []
        for port in ports:
            if isinstance(port, dict):
                port = dict(port)
                port.setdefault("protocol", "TCP")
                if port.get("targetPort") in (None, 0, ""):
                    port["targetPort"] = port.get("port")
            fixed.append(port)
        spec["ports"] = fixed
    if spec["type"] != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    elif not spec.get("externalName"):
        raise invalid(
            "Service", name, [Cause("spec.externalName", "Required value", "FieldValueRequired")]
        )
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    causes = _port_causes(spec.get("ports"))
    if causes:
        raise invalid("Service", name, causes)


def secret_defaults(name: str, obj: Obj) -> Obj:
    """`type: Opaque`, `stringData` folded into `data`, `data` values checked as base64."""
    out = dict(obj)
    out.setdefault("type", "Opaque")
    data = out.get("data")
    data = dict(data) if isinstance(data, dict) else ({} if data is None else data)
    if not isinstance(data, dict):
        raise invalid("Secret", name, [Cause("data", "Invalid value: must be a map")])
    causes: list[Cause] = []
    for key, value in data.items():
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            causes.append(Cause(f"data[{key}]", "Invalid value: must be base64-encoded bytes"))
    string_data = out.pop("stringData", None)
    if isinstance(string_data, dict):
        for key, value in string_data.items():
            if not isinstance(value, str):
                causes.append(Cause(f"stringData[{key}]", "Invalid value: must be a string"))
                continue
            data[key] = base64.b64encode(value.encode("utf-8")).decode("ascii")
    elif string_data is not None:
        causes.append(Cause("stringData", "Invalid value: must be a map of strings"))
    if causes:
        raise invalid("Secret", name, causes)
    if data or "data" in out:
        out["data"] = data
    return out


def _forbidden(req: AdmissionRequest, why: str) -> StoreError:
    qualified = req.res.plural + (f".{req.res.group}" if req.res.group else "")
    return Forbidden(
        f'{qualified} "{req.name}" is forbidden: {why}',
        name=req.name,
        kind=req.res.plural,
        group=req.res.group,
    )


def node_restriction(req: AdmissionRequest, new: Obj | None, old: Obj | None) -> None:
    """Kubernetes' NodeRestriction for the requests the Node authorizer lets through."""
    node = req.user.node_name if req.user is not None else None
    if node is None:
        return
    res = req.res
    if _core(res, "Node") and req.operation == "CREATE" and req.name != node:
        raise _forbidden(req, f'node "{node}" is not allowed to modify node "{req.name}"')
    if res.group == "coordination.k8s.io" and res.kind == "Lease" and req.name != node:
        raise _forbidden(
            req, "can only access node lease with the same name as the requesting node"
        )
    if _core(res, "Pod") and req.operation in ("UPDATE", "DELETE"):
        spec = old.get("spec") if isinstance(old, dict) else None
        bound = spec.get("nodeName") if isinstance(spec, dict) else None
        if bound != node:
            what = "delete pods" if req.operation == "DELETE" else "update pod status for pods"
            raise _forbidden(req, f'node "{node}" can only {what} with spec.nodeName set to itself')
