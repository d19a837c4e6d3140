"""A catalog as a JSON file: the standalone proxy's input until the agent feeds it.

    {"node": "node1", "nodegroup": null, "revision": "7",
     "services": [
       {"namespace": "default", "name": "web", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "endpoints": [{"ip": "172.17.0.2", "ready": true, "node": "node1",
                       "target": "default/web-0",
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}],
        "sessionAffinityTimeoutS": null, "lbPolicy": "round-robin", "proxied": true}]}

Optional keys: `nodegroup`, `revision`, `targetPort` (defaults to `port`), `protocol` (TCP),
`name` of ports (""), `ready` (true), `node`, `target`, `hostname`, `sessionAffinityTimeoutS`,
`lbPolicy`, `nodegroupClosed`, `proxied`, `externalName`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast, get_args

from meshd.catalog import Catalog, Endpoint, LbPolicy, Protocol, Service, ServicePort


class CatalogFileError(ValueError):
    """A catalog file that cannot be read; the message names the file and the field."""


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise CatalogFileError(f"{where}.{key}: required")
        return default
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CatalogFileError(f"{where}.{key}: unexpected {value!r}")
    return value


def _protocol(value: Any, where: str) -> Protocol:
    if value not in get_args(Protocol):
        raise CatalogFileError(f"{where}.protocol: expected TCP, UDP or SCTP, got {value!r}")
    return cast(Protocol, value)


def _service(data: Any, where: str) -> Service:
    if not isinstance(data, dict):
        raise CatalogFileError(f"{where}: expected an object")
    ports = []
    for i, p in enumerate(_get(data, "ports", list, where, [])):
        at = f"{where}.ports[{i}]"
        if not isinstance(p, dict):
            raise CatalogFileError(f"{at}: expected an object")
        number = _get(p, "port", int, at)
        ports.append(ServicePort(_get(p, "name", str, at, ""), number,
                                 _protocol(p.get("protocol", "TCP"), at),
                                 _get(p, "targetPort", (int, str), at, number)))
    endpoints = []
    for i, e in enumerate(_get(data, "endpoints", list, where, [])):
        at = f"{where}.endpoints[{i}]"
        if not isinstance(e, dict):
            raise CatalogFileError(f"{at}: expected an object")
        served = []
        for j, p in enumerate(_get(e, "ports", list, at, [])):
            pat = f"{at}.ports[{j}]"
            if not isinstance(p, dict):
                raise CatalogFileError(f"{pat}: expected an object")
            served.append((_get(p, "name", str, pat, ""), _get(p, "port", int, pat),
                           _protocol(p.get("protocol", "TCP"), pat)))
        endpoints.append(Endpoint(_get(e, "ip", str, at), tuple(served),
                                  _get(e, "ready", bool, at, True),
                                  _get(e, "node", (str, type(None)), at, None),
                                  _get(e, "target", (str, type(None)), at, None),
                                  _get(e, "hostname", (str, type(None)), at, None)))
    policy = _get(data, "lbPolicy", str, where, "round-robin")
    if policy not in get_args(LbPolicy):
        raise CatalogFileError(f"{where}.lbPolicy: unknown policy {policy!r}")
    return Service(
        namespace=_get(data, "namespace", str, where),
        name=_get(data, "name", str, where),
        cluster_ips=tuple(_get(data, "clusterIPs", list, where, [])),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        session_affinity_timeout_s=_get(data, "sessionAffinityTimeoutS", (int, type(None)),
                                        where, None),
        lb_policy=cast(LbPolicy, policy),
        nodegroup_closed=_get(data, "nodegroupClosed", bool, where, False),
        proxied=_get(data, "proxied", bool, where, True),
        external_name=_get(data, "externalName", (str, type(None)), where, None),
    )


def parse_catalog(data: Any, source: str = "catalog") -> Catalog:
    """A `Catalog` from the JSON structure above."""
    if not isinstance(data, dict):
        raise CatalogFileError(f"{source}: expected an object")
    services: dict[str, Service] = {}
    by_ip: dict[str, Service] = {}
    for i, item in enumerate(_get(data, "services", list, source, [])):
        service = _service(item, f"{source}: services[{i}]")
        services[service.key] = service
        for ip in service.cluster_ips:
            by_ip[ip] = service
    return Catalog(services, by_ip, _get(data, "node", str, source, ""),
                   _get(data, "nodegroup", (str, type(None)), source, None),
                   str(_get(data, "revision", (str, int), source, "")))


def load_catalog(path: Path) -> Catalog:
    """Read a catalog file; CatalogFileError names the file and field on any problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogFileError(f"{path}: not JSON: {exc}") from None
    return parse_catalog(data, str(path))


def dump_catalog(catalog: Catalog) -> dict[str, Any]:
    """The JSON structure of `catalog` (inverse of `parse_catalog`)."""
    return {
        "node": catalog.node, "nodegroup": catalog.nodegroup, "revision": catalog.revision,
        "services": [{
            "namespace": s.namespace, "name": s.name, "clusterIPs": list(s.cluster_ips),
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol,
                       "targetPort": p.target_port} for p in s.ports],
            "endpoints": [{"ip": e.ip, "ready": e.ready, "node": e.node, "target": e.target,
                           "hostname": e.hostname,
                           "ports": [{"name": n, "port": num, "protocol": proto}
                                     for n, num, proto in e.ports]} for e in s.endpoints],
            "sessionAffinityTimeoutS": s.session_affinity_timeout_s,
            "lbPolicy": s.lb_policy, "nodegroupClosed": s.nodegroup_closed,
            "proxied": s.proxied, "externalName": s.external_name,
        } for s in catalog.services.values()],
    }
