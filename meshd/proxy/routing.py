"""Which Service port an original destination belongs to (pure)."""

from __future__ import annotations

from meshd.catalog import Catalog, Protocol, Service, ServicePort


def find_port(catalog: Catalog, ip: str, port: int,
              protocol: Protocol) -> tuple[Service, ServicePort] | None:
    """The proxied Service and port serving `ip:port`/`protocol`, or None."""
    service = catalog.by_cluster_ip.get(ip)
    if service is None or not service.proxied or service.external_name is not None:
        return None
    for candidate in service.ports:
        if candidate.port == port and candidate.protocol == protocol:
            return service, candidate
    return None
