"""Tunables of the embedded Kubernetes-compatible API server."""

from __future__ import annotations

import dataclasses
import ipaddress

KUBERNETES_VERSION = (1, 32)
"""The Kubernetes minor whose API semantics we follow (`/version` says so; kubectl dispatchers
pick a matching client by it)."""

MAX_BODY_BYTES = 3 * 1024 * 1024
"""kube-apiserver's `MaxRequestBodyBytes` (3 MiB)."""


@dataclasses.dataclass(frozen=True)
class ApiServerConfig:
    """How the API server listens and behaves. Every timing knob lives here so tests can shorten
    it instead of patching module globals."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 6443
    """TCP port; 0 picks a free one (see `RunningServer.port`)."""
    service_cidr: str = "10.96.0.0/16"
    """ClusterIP range (kube-apiserver `--service-cluster-ip-range`); `.1` is reserved for the
    `kubernetes` Service in `default`."""
    mutating_admission: bool = True
    """Service defaults and ClusterIP allocation, Secret defaults. A server over a cache of
    another API (the edge's MetaServer) turns this off: it must not invent values."""
    ensure_kubernetes_service: bool = True
    """Create `default/kubernetes` (ClusterIP `.1`, port 443) at start if missing, as
    kube-apiserver's bootstrap controller does."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Largest request body; larger ones get 413 RequestEntityTooLarge."""
    bookmark_interval_s: float = 60.0
    """Idle time after which a watch that allows bookmarks gets a BOOKMARK (Kubernetes: ~1 min)."""
    watch_timeout_s: float = 1800.0
    """Longest watch when the client gives no `timeoutSeconds` (kube-apiserver picks 30-60 min)."""
    watch_queue_events: int = 10_000
    """Events a watcher may have queued; a slower one is closed (the client re-watches)."""
    max_yaml_nodes: int = 1_000_000
    """Largest YAML body after alias expansion (guards against "billion laughs")."""
    max_nesting: int = 100
    """Deepest nesting of a request body (deeper bodies are refused before any recursion)."""
    worker_threads: int = 4
    """Threads that run the synchronous store calls."""
    shutdown_timeout_s: float = 2.0
    """How long `close()` waits for requests in flight."""

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.service_cidr, strict=True)
        if net.num_addresses < 8:
            raise ValueError(f"service_cidr {self.service_cidr} is too small (need /29 or larger)")
        if self.max_body_bytes <= 0 or self.bookmark_interval_s <= 0:
            raise ValueError("max_body_bytes and bookmark_interval_s must be positive")
