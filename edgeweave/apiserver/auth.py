"""Who is asking, and may they: pluggable authentication and authorization.

Two `typing.Protocol` seams, as kube-apiserver's `authenticator.Request` and
`authorizer.Authorizer`:

- `Authenticator.authenticate(Credentials) -> Identity | None`. `CertOrToken` reads the verified
  client certificate (CN = user, O = groups) or a bearer token from a `StaticTokens` file;
  `TrustLocal` gives every request one fixed identity (the edge's MetaServer on 127.0.0.1).
- `Authorizer.authorize(Attributes) -> Decision`. `ClusterAuthorizer` = `system:masters` may do
  anything, nodes get the Node authorizer's rules (below), everyone else nothing; `AllowAll`
  for a trusted local listener.

Node rules (Kubernetes' Node authorizer + the `system:node` role + NodeRestriction admission,
simplified): a node may get/list/watch nodes, pods, services, endpoints, endpointslices,
namespaces, configmaps, secrets, nodegroups, devices and devicemodels; create nodes and
update/patch only its own Node (and `nodes/status`); update/patch `pods/status` and delete pods
(admission then checks `spec.nodeName` is the node: `admission.node_restriction`); create/update/
patch events; get/create/update/patch its own Lease in `kube-node-lease`. Kubernetes limits
configmap/secret reads to objects referenced by the node's pods (its pod graph); we let a node
read them all - the documented simplification.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Protocol

from edgeweave.apiserver.requestinfo import RequestInfo
from edgeweave.pki import Identity, StaticTokens, bearer_token, peer_identity
from edgeweave.pki.identity import MASTERS_GROUP

NODE_LEASE_NAMESPACE = "kube-node-lease"
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})
"""Served without authentication (Kubernetes' `system:public-info-viewer`)."""

_NODE_READ = frozenset(
    {
        ("", "nodes"),
        ("", "pods"),
        ("", "services"),
        ("", "endpoints"),
        ("", "namespaces"),
        ("", "configmaps"),
        ("", "secrets"),
        ("discovery.k8s.io", "endpointslices"),
        ("apps.kubeedge.io", "nodegroups"),
        ("devices.kubeedge.io", "devices"),
        ("devices.kubeedge.io", "devicemodels"),
    }
)
_READ_VERBS = frozenset({"get", "list", "watch"})


def is_public(path: str) -> bool:
    """Health and version endpoints (and their sub-checks such as `/healthz/ping`)."""
    return path in PUBLIC_PATHS or any(
        path.startswith(p + "/") for p in ("/healthz", "/livez", "/readyz")
    )


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a request presents."""

    peercert: Mapping[str, object] | None
    """The verified client certificate (`SSLSocket.getpeercert()`), or None."""
    authorization: str | None
    """The `Authorization` header."""


class Authenticator(Protocol):
    """Turns credentials into an identity, or None (401)."""

    def authenticate(self, credentials: Credentials) -> Identity | None: ...


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What authorization decides on (Kubernetes' `authorizer.Attributes`)."""

    user: Identity
    """The authenticated user."""
    info: RequestInfo
    """The request (verb, group, resource, namespace, name, subresource, path)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """An authorization decision."""

    allowed: bool
    """True to go on."""
    reason: str = ""
    """Why not (appended to the 403 message), or ''."""


class Authorizer(Protocol):
    """Decides whether a user may do what a request asks."""

    def authorize(self, attrs: Attributes) -> Decision: ...


class CertOrToken:
    """Client certificate first (as kube-apiserver's union authenticator orders x509 before
    tokens), then `Authorization: Bearer` against a static token file."""

    def __init__(self, tokens: StaticTokens | None = None) -> None:
        self.tokens = tokens

    def authenticate(self, credentials: Credentials) -> Identity | None:
        identity = peer_identity(credentials.peercert)
        if identity is not None:
            return identity
        token = bearer_token(credentials.authorization)
        if token is None or self.tokens is None:
            return None
        return self.tokens.authenticate(token)


class TrustLocal:
    """Every request is `identity` (for a listener only local, trusted clients reach)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def authenticate(self, credentials: Credentials) -> Identity | None:
        return self.identity


class AllowAll:
    """Authorizes everything (a trusted local listener)."""

    def authorize(self, attrs: Attributes) -> Decision:
        return Decision(True)


def node_decision(node: str, info: RequestInfo) -> Decision:
    """The Node authorizer's answer for node `node` (see the module docstring)."""
    key = (info.api_group, info.resource)
    verb, sub = info.verb, info.subresource
    if not info.resource_request:
        return Decision(True)  # discovery, OpenAPI: system:discovery for every authenticated user
    if verb in _READ_VERBS and key in _NODE_READ and sub in ("", "status"):
        return Decision(True)
    if key == ("", "nodes"):
        if verb == "create" and not sub:
            return Decision(True)  # NodeRestriction checks the name in the body
        if verb in ("update", "patch") and sub in ("", "status"):
            if info.name == node:
                return Decision(True)
            return Decision(False, f"node {node!r} cannot modify node {info.name!r}")
    if key == ("", "pods"):
        if verb in ("update", "patch") and sub == "status":
            return Decision(True)  # NodeRestriction: only pods bound to this node
        if verb == "delete" and not sub:
            return Decision(True)  # NodeRestriction: only pods bound to this node
    if key == ("", "events") and verb in ("create", "update", "patch") and not sub:
        return Decision(True)
    lease_verbs = ("get", "create", "update", "patch")
    in_lease_ns = info.namespace == NODE_LEASE_NAMESPACE
    if key == ("coordination.k8s.io", "leases") and not sub and in_lease_ns and verb in lease_verbs:
        if verb == "create" or info.name == node:
            return Decision(True)  # NodeRestriction checks a created lease's name
        return Decision(
            False, "can only access node lease with the same name as the requesting node"
        )
    return Decision(False)


class ClusterAuthorizer:
    """cloudcore's policy: `system:masters` (and `extra_admin_groups`) may do everything, nodes
    get `node_decision`, anyone else is refused."""

    def __init__(self, extra_admin_groups: Iterable[str] = ()) -> None:
        self.admin_groups = frozenset({MASTERS_GROUP, *extra_admin_groups})

    def authorize(self, attrs: Attributes) -> Decision:
        if self.admin_groups.intersection(attrs.user.groups):
            return Decision(True)
        node = attrs.user.node_name
        if node is not None:
            return node_decision(node, attrs.info)
        return Decision(False)


def forbidden_message(attrs: Attributes, decision: Decision) -> str:
    """kube-apiserver's 403 text, e.g. `pods is forbidden: User "system:node:n1" cannot create
    resource "pods" in API group "" in the namespace "default"`."""
    info, user = attrs.info, attrs.user.user
    if not info.resource_request:
        text = f'forbidden: User "{user}" cannot {info.verb} path "{info.path}"'
        return text + (f": {decision.reason}" if decision.reason else "")
    resource = info.resource + (f"/{info.subresource}" if info.subresource else "")
    where = f'in the namespace "{info.namespace}"' if info.namespace else "at the cluster scope"
    why = (
        f'User "{user}" cannot {info.verb} resource "{resource}" in API group '
        f'"{info.api_group}" {where}'
    )
    if decision.reason:
        why += f": {decision.reason}"
    qualified = info.resource + (f".{info.api_group}" if info.api_group else "")
    subject = f'{qualified} "{info.name}"' if info.name else qualified
    return f"{subject} is forbidden: {why}"
