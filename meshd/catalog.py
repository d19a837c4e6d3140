"""The agent's view of the cluster's Services: what DNS, the iptables rules and the proxy serve.

Built from Kubernetes objects (Services, EndpointSlices or Endpoints, Nodes, NodeGroups) by a
pure function and replaced whole on every change, so readers never see a half-applied update.
Traffic closure is decided here, once: for a Service annotated
`apps.kubeedge.io/service-topology: range-nodegroup` the catalog of a node in group G only ever
holds the endpoints on nodes of G (KubeEdge's node-group traffic closure).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Protocol = Literal["TCP", "UDP", "SCTP"]
LbPolicy = Literal["round-robin", "random", "consistent-hash"]

TOPOLOGY_ANNOTATION = "apps.kubeedge.io/service-topology"
TOPOLOGY_NODEGROUP = "range-nodegroup"
NODEGROUP_LABEL = "apps.kubeedge.io/belonging-to"
PROXY_NAME_LABEL = "service.edgemesh.kubeedge.io/service-proxy-name"
LB_POLICY_ANNOTATION = "mesh.edgeweave.io/lb-policy"


@dataclasses.dataclass(frozen=True)
class ServicePort:
    """One port of a Service."""

    name: str  # "" for an unnamed single port
    port: int  # the Service (ClusterIP) port
    protocol: Protocol
    target_port: int | str  # number, or the name of a container port


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One backend address of a Service (a pod)."""

    ip: str
    ports: tuple[tuple[str, int, Protocol], ...]  # (port name, number, protocol) it serves
    ready: bool
    node: str | None  # the node the pod runs on, if known
    target: str | None  # "namespace/pod-name" of the pod, if known
    hostname: str | None = None  # for headless Services with a subdomain

    def port_for(self, port: ServicePort) -> int | None:
        """The backend port serving `port` (matched by name, as EndpointSlices do)."""
        for name, number, protocol in self.ports:
            if name == port.name and protocol == port.protocol:
                return number
        return None


@dataclasses.dataclass(frozen=True)
class Service:
    """A Service as the mesh serves it."""

    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless Services
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]  # after traffic closure; ready and not-ready
    session_affinity_timeout_s: int | None  # sessionAffinity: ClientIP, else None
    lb_policy: LbPolicy = "round-robin"
    nodegroup_closed: bool = False  # range-nodegroup: endpoints limited to our node group
    proxied: bool = True  # False when another proxy owns it (service-proxy-name label)
    external_name: str | None = None  # type ExternalName: DNS CNAME target, never proxied

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        """`clusterIP: None`: DNS answers with the ready pod IPs, nothing is proxied."""
        return not self.cluster_ips and self.external_name is None

    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints that may receive traffic."""
        return tuple(e for e in self.endpoints if e.ready)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Every Service the agent knows, indexed the ways its readers look them up."""

    services: dict[str, Service]  # by "namespace/name"
    by_cluster_ip: dict[str, Service]  # ClusterIP → Service
    node: str  # this agent's node
    nodegroup: str | None  # this node's group (label apps.kubeedge.io/belonging-to)
    revision: str = ""  # the API resourceVersion it was built from (for `meshd status`)

    @classmethod
    def empty(cls, node: str) -> Catalog:
        """The catalog before the first list."""
        return cls({}, {}, node, None)
