"""Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{g}`, `/apis/{g}/{v}`.

Only the legacy (unaggregated) documents are served, always as `Content-Type:
application/json`. kubectl >= 1.26 first asks `/api` and `/apis` for aggregated discovery
(`Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,...,
application/json`); client-go looks at the response's Content-Type, sees plain JSON and falls
back to reading `/api/v1` and every `/apis/{g}/{v}`, exactly as with a pre-1.26 server.
"""

from __future__ import annotations

from typing import Any

from edgeweave import __version__
from edgeweave.apiserver.config import KUBERNETES_VERSION
from edgeweave.kube.resources import Registry


def version_info() -> dict[str, str]:
    """The `/version` document (`version.Info`)."""
    major, minor = KUBERNETES_VERSION
    return {
        "major": str(major),
        "minor": str(minor),
        "gitVersion": f"v{major}.{minor}.0-edgeweave",
        "gitCommit": f"edgeweave-{__version__}",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "python",
        "compiler": "edgeweave",
        "platform": "linux/amd64",
    }


def group_document(registry: Registry, group: str) -> dict[str, Any] | None:
    """The `APIGroup` document for `/apis/{group}`, or None if not served."""
    for item in registry.api_group_list()["groups"]:
        if item["name"] == group:
            return {"kind": "APIGroup", "apiVersion": "v1", **item}
    return None


def discovery_document(registry: Registry, parts: list[str]) -> dict[str, Any] | None:
    """The discovery document at `/` + `/`.join(parts), or None if there is none."""
    if parts == ["api"]:
        return registry.api_versions()
    if parts == ["apis"]:
        return registry.api_group_list()
    if len(parts) == 2 and parts[0] == "api":
        if ("", parts[1]) in registry.group_versions():
            return registry.api_resource_list("", parts[1])
        return None
    if len(parts) == 2 and parts[0] == "apis":
        return group_document(registry, parts[1])
    served = len(parts) == 3 and (parts[1], parts[2]) in registry.group_versions()
    if served and parts[0] == "apis":
        return registry.api_resource_list(parts[1], parts[2])
    return None
