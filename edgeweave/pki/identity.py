"""Who a request comes from, in Kubernetes terms.

Kubernetes turns every authenticated request into a user name, a uid and a list of groups
(`k8s.io/apiserver/pkg/authentication/user.Info`). A client certificate maps CN -> user and every
O -> a group (the apiserver's `CommonNameUserConversion`); a static token maps through its file
line. Nodes are users `system:node:{name}` in group `system:nodes` (the NodeAuthorizer's
`nodeidentifier`), which is how cloudcore later limits each node to its own objects.
"""

from __future__ import annotations

import dataclasses
import re

NODE_USER_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
MASTERS_GROUP = "system:masters"

# Node names are DNS subdomains (RFC 1123), as Kubernetes validates `metadata.name` of a Node.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclasses.dataclass(frozen=True)
class Identity:
    """An authenticated user."""

    user: str
    """User name (a certificate's CN, a token file's second column)."""
    groups: tuple[str, ...] = ()
    """Group names (a certificate's O values, a token file's fourth column), in order."""
    uid: str = ""
    """User uid (a token file's third column; empty for certificates)."""

    @property
    def node_name(self) -> str | None:
        """The node this identity is, or None: user `system:node:{name}` *and* group
        `system:nodes`, both required as in Kubernetes' `nodeidentifier.NodeIdentity`."""
        if NODES_GROUP not in self.groups or not self.user.startswith(NODE_USER_PREFIX):
            return None
        name = self.user[len(NODE_USER_PREFIX) :]
        return name or None


ADMIN = Identity("admin", (MASTERS_GROUP,))
"""The cluster administrator: `system:masters` is bound to cluster-admin in Kubernetes."""


def is_valid_node_name(name: str) -> bool:
    """True for a Kubernetes node name (a DNS subdomain of at most 253 characters)."""
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


def node_identity(node_name: str) -> Identity:
    """The identity a node's certificate carries: `system:node:{name}`, group `system:nodes`."""
    if not is_valid_node_name(node_name):
        raise ValueError(f"invalid node name {node_name!r}: expected a DNS subdomain")
    return Identity(NODE_USER_PREFIX + node_name, (NODES_GROUP,))
