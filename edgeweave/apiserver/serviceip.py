"""ClusterIP allocation from a CIDR, derived from the store (kube-apiserver's service IP
allocator, without a bitmap of its own).

The store is the only truth: an address is taken iff a Service holds it in `spec.clusterIP`.
Both methods must run inside `store.transaction()`; the store's write lock (and SQLite's
`BEGIN IMMEDIATE`) makes check-then-create atomic, so concurrent creates can never get the same
address, an allocation that is rolled back (failed create, dry run) leaves no trace, a delete
frees the address with the deletion itself, and a restart needs no recovery.

Checking one address is one indexed-column query (`spec.clusterIP` is a selectable field of
Services). Dynamic allocation tries the address after the last one it gave (an in-memory hint
only); if that is taken it reads all Services' addresses once, in the same transaction, and takes
the next free one, so freed addresses are reused only after a full turn (Kubernetes allocates at
random for the same reason).

Addresses: never the network or broadcast address; `.1` (the first host) belongs to
`default/kubernetes`, as kube-apiserver gives it to that Service.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from edgeweave.kube.errors import Cause, Invalid, invalid
from edgeweave.kube.resources import SERVICES
from edgeweave.kube.store import Store

KUBERNETES_SERVICE = ("default", "kubernetes")
"""The Service that owns the first address of the range."""


def cluster_ip_of(obj: Any) -> str | None:
    """`spec.clusterIP` of a Service object if it holds an address (not '' or `None`)."""
    spec = obj.get("spec") if isinstance(obj, dict) else None
    ip = spec.get("clusterIP") if isinstance(spec, dict) else None
    return ip if isinstance(ip, str) and ip and ip != "None" else None


class ClusterIPAllocator:
    """Allocates Service ClusterIPs from one CIDR; see the module docstring."""

    def __init__(self, cidr: str) -> None:
        self.network = ipaddress.ip_network(cidr, strict=True)
        self._first = int(self.network.network_address) + 1
        self._last = int(self.network.broadcast_address) - 1
        if self.network.version == 6:
            self._last += 1  # IPv6 has no broadcast address
        self._next = self._first + 1

    @property
    def reserved(self) -> str:
        """The address of `default/kubernetes`."""
        return str(ipaddress.ip_address(self._first))

    def _holder(self, store: Store, ip: str) -> tuple[str, str] | None:
        page = store.list_objects(SERVICES, field_selector=f"spec.clusterIP={ip}", limit=1)
        for obj in page.objects():
            meta = obj.get("metadata") or {}
            return meta.get("namespace", ""), meta.get("name", "")
        return None

    def _error(self, name: str, value: str, why: str) -> Invalid:
        return invalid(
            "Service", name, [Cause("spec.clusterIPs[0]", f"Invalid value: {value}: {why}")]
        )

    def check_requested(self, store: Store, namespace: str, name: str, ip: str) -> str:
        """Validate a requested address for a Service being created: 422 unless it is a free
        address of the range (`.1` only for default/kubernetes). Returns it normalised."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise self._error(name, f'"{ip}"', "must be a valid IP address") from None
        value = int(addr)
        if addr.version != self.network.version or not self._first <= value <= self._last:
            raise self._error(
                name,
                f'["{ip}"]',
                "failed to allocate IP: the provided IP is not in the valid range. The range of "
                f"valid IPs is {self.network}",
            )
        holder = self._holder(store, str(addr))
        other_holds = holder is not None and holder != (namespace, name)
        if other_holds or (value == self._first and (namespace, name) != KUBERNETES_SERVICE):
            raise self._error(
                name, f'["{ip}"]', f"failed to allocate IP {addr}: provided IP is already allocated"
            )
        return str(addr)

    def allocate(self, store: Store, namespace: str, name: str) -> str:
        """A free address for a Service being created (422 when the range is full)."""
        if (namespace, name) == KUBERNETES_SERVICE and self._holder(store, self.reserved) is None:
            return self.reserved
        low, span = self._first + 1, self._last - self._first
        if not low <= self._next <= self._last:
            self._next = low
        candidate = str(ipaddress.ip_address(self._next))
        if self._holder(store, candidate) is None:
            self._next += 1
            return candidate
        taken: set[int] = set()
        for obj in store.list_objects(SERVICES).objects():
            ip = cluster_ip_of(obj)
            if ip is not None:
                try:
                    taken.add(int(ipaddress.ip_address(ip)))
                except ValueError:
                    continue
        for step in range(span):
            value = low + (self._next - low + step) % span
            if value not in taken:
                self._next = value + 1
                return str(ipaddress.ip_address(value))
        raise invalid(
            "Service",
            name,
            [
                Cause(
                    "spec.clusterIPs",
                    f"Internal error: failed to allocate a serviceIP: range is full "
                    f"({self.network})",
                )
            ],
        )
