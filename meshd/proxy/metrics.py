"""Proxy counters and their Prometheus text exposition.

Counters are plain integers bumped by the proxy's single event-loop thread; `render` turns them
into the Prometheus text format (version 0.0.4). Byte counters of long connections are folded in
at every housekeeping sweep and at close, not per chunk.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class ServiceCounters:
    """What the proxy did for one Service."""

    connections_active: int = 0
    """TCP connections being dialed or relayed."""
    connections_total: int = 0
    """TCP connections relayed to a backend since start."""
    bytes_in: int = 0
    """Bytes from clients to backends (TCP and UDP)."""
    bytes_out: int = 0
    """Bytes from backends to clients (TCP and UDP)."""
    dial_failures: int = 0
    """Backend dials that failed or timed out."""
    ejections: int = 0
    """Backends ejected after a failed dial (passive health)."""
    refused: int = 0
    """Clients reset: no endpoint, or every candidate failed."""
    limited: int = 0
    """Clients reset by the per-Service connection limit."""
    idle_closed: int = 0
    """TCP connections closed by the idle timeout."""
    udp_sessions_active: int = 0
    """UDP sessions open."""
    udp_sessions_total: int = 0
    """UDP sessions opened since start."""
    udp_sessions_expired: int = 0
    """UDP sessions closed after their idle time (or evicted by the table bound)."""
    udp_datagrams_in: int = 0
    """Datagrams from clients to backends."""
    udp_datagrams_out: int = 0
    """Datagrams from backends to clients."""


_HELP = {
    "connections_active": ("gauge", "TCP connections being dialed or relayed"),
    "connections_total": ("counter", "TCP connections relayed to a backend"),
    "bytes_in": ("counter", "bytes from clients to backends"),
    "bytes_out": ("counter", "bytes from backends to clients"),
    "dial_failures": ("counter", "backend dials that failed or timed out"),
    "ejections": ("counter", "backends ejected by passive health"),
    "refused": ("counter", "clients reset: no endpoint or every dial failed"),
    "limited": ("counter", "clients reset by the per-service connection limit"),
    "idle_closed": ("counter", "TCP connections closed by the idle timeout"),
    "udp_sessions_active": ("gauge", "UDP sessions open"),
    "udp_sessions_total": ("counter", "UDP sessions opened"),
    "udp_sessions_expired": ("counter", "UDP sessions expired or evicted"),
    "udp_datagrams_in": ("counter", "datagrams from clients to backends"),
    "udp_datagrams_out": ("counter", "datagrams from backends to clients"),
}


@dataclasses.dataclass(slots=True)
class ProxyMetrics:
    """Every counter of one proxy."""

    services: dict[str, ServiceCounters] = dataclasses.field(default_factory=dict)
    """Per Service ("namespace/name")."""
    no_service: int = 0
    """Connections or datagrams for a ClusterIP:port that no Service serves (reset/dropped)."""
    not_redirected: int = 0
    """TCP connections without an original destination (someone dialed the port itself)."""
    limited: int = 0
    """Clients reset by the global connection limit."""
    accept_errors: int = 0
    """accept() failures (e.g. out of file descriptors)."""
    relay_errors: int = 0
    """Connections ended by an error (reset, broken pipe) rather than by both sides closing."""
    udp_dropped: int = 0
    """Datagrams dropped (no original destination, no endpoint, socket full)."""
    udp_via_tproxy: int = 0
    """Client datagrams that arrived through the TPROXY listener."""
    udp_via_bound: int = 0
    """Client datagrams that arrived on a ClusterIP:port socket (TPROXY's socket assignment
    lost, e.g. bridged pods with br_netfilter)."""
    splice_fallbacks: int = 0
    """Connection halves that fell back from splice to copying."""

    def service(self, key: str) -> ServiceCounters:
        """The counters of Service `key`, created on first use."""
        counters = self.services.get(key)
        if counters is None:
            counters = self.services[key] = ServiceCounters()
        return counters

    def render(self, prefix: str = "edgeweave_proxy") -> str:
        """Prometheus text exposition of every counter."""
        lines: list[str] = []
        for name, (kind, text) in _HELP.items():
            # Counters end in _total (Prometheus naming conventions).
            total = kind == "counter" and not name.endswith("_total")
            metric = f"{prefix}_{name}_total" if total else f"{prefix}_{name}"
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
            for key in sorted(self.services):
                value = getattr(self.services[key], name)
                lines.append(f'{metric}{{service="{_label(key)}"}} {value}')
        for name in ("no_service", "not_redirected", "limited", "accept_errors",
                     "relay_errors", "udp_dropped", "udp_via_tproxy", "udp_via_bound",
                     "splice_fallbacks"):
            # The global limit's counter must not share the per-Service `limited_total` name.
            shown = "global_limit" if name == "limited" else name
            metric = f"{prefix}_{shown}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {getattr(self, name)}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
