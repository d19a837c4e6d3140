"""What a request asks for, from its method and path: Kubernetes' `RequestInfoFactory`.

    /api/v1/namespaces/{ns}/{resource}[/{name}[/{subresource}]]     namespaced
    /api/v1/{resource}[/{name}[/{subresource}]]                     cluster-scoped, or a list
                                                                    across all namespaces
    /apis/{group}/{version}/...                                     the same for named groups

`/api/v1/namespaces/{name}[/status]` is the Namespace object itself (its `namespace` is also
set to the name, as Kubernetes does for authorization). Anything else (discovery, OpenAPI,
health) is a non-resource request. Pure: no I/O, no store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_TRUE = frozenset({"1", "true", "True"})


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    """The parts of a request that routing and authorization look at."""

    verb: str
    """get, list, watch, create, update, patch, delete, deletecollection; for non-resource
    requests the lower-case HTTP method."""
    path: str
    """The request path."""
    resource_request: bool
    """True for /api/... and /apis/{group}/{version}/... paths below the version."""
    api_group: str = ""
    """API group ('' for core)."""
    api_version: str = ""
    """API version."""
    namespace: str = ""
    """Namespace from the path ('' if none)."""
    resource: str = ""
    """Plural resource name."""
    subresource: str = ""
    """Subresource (`status`, `scale`) or ''."""
    name: str = ""
    """Object name, '' for collections."""
    extra_parts: int = 0
    """Path segments beyond resource/name/subresource (always a 404)."""


def is_watch(query: Mapping[str, str]) -> bool:
    """`?watch=1` / `?watch=true`."""
    return query.get("watch", "") in _TRUE


def parse_request_info(method: str, path: str, query: Mapping[str, str]) -> RequestInfo:
    """Classify a request; never raises."""
    method = method.upper()
    parts = [p for p in path.strip("/").split("/") if p != ""] if path.strip("/") else []
    nonresource = RequestInfo(method.lower(), path, False)
    if not parts or parts[0] not in ("api", "apis"):
        return nonresource
    if parts[0] == "api":
        if len(parts) < 3:
            return nonresource  # /api, /api/v1: discovery
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 4:
            return nonresource  # /apis, /apis/{g}, /apis/{g}/{v}: discovery
        group, version, rest = parts[1], parts[2], parts[3:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    extra = max(0, len(rest) - 3)
    if method == "GET":
        verb = "watch" if is_watch(query) else ("get" if name else "list")
    elif method == "POST":
        verb = "create"
    elif method == "PUT":
        verb = "update"
    elif method == "PATCH":
        verb = "patch"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = method.lower()
    return RequestInfo(
        verb, path, True, group, version, namespace, resource, subresource, name, extra
    )
