"""The read side of a controller: a view of cached objects, by resource.

Controllers read only through `View`, so their `reconcile` methods run over informer caches in
cloudcore (`InformerView`) and over plain lists in tests (`StaticView`), with the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from edgeweave.kube.informer import SharedInformers, object_key
from edgeweave.kube.resources import ResourceInfo

Obj = dict[str, Any]


class View(Protocol):
    """Read-only access to cached objects. Returned objects are shared: never modify them."""

    def get(self, resource: ResourceInfo, name: str, namespace: str = "") -> Obj | None:
        """One object, or None."""
        ...

    def list(self, resource: ResourceInfo, namespace: str | None = None) -> list[Obj]:
        """Objects of a resource (of one namespace, or all) in (namespace, name) order."""
        ...


class InformerView:
    """A `View` over shared informers (what the runner gives controllers)."""

    def __init__(self, informers: SharedInformers) -> None:
        self.informers = informers

    def get(self, resource: ResourceInfo, name: str, namespace: str = "") -> Obj | None:
        return self.informers.get(resource).get(name, namespace)

    def list(self, resource: ResourceInfo, namespace: str | None = None) -> list[Obj]:
        return self.informers.get(resource).items(namespace)


class StaticView:
    """A `View` over fixed objects (tests): `StaticView({PODS: [...], NODES: [...]})`."""

    def __init__(self, objects: Mapping[ResourceInfo, Iterable[Obj]]) -> None:
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {}
        for res, items in objects.items():
            bucket = self._objects.setdefault(res.key, {})
            for obj in items:
                ns, name = object_key(obj)
                bucket[(ns if res.namespaced else "", name)] = obj

    def get(self, resource: ResourceInfo, name: str, namespace: str = "") -> Obj | None:
        ns = namespace if resource.namespaced else ""
        return self._objects.get(resource.key, {}).get((ns, name))

    def list(self, resource: ResourceInfo, namespace: str | None = None) -> list[Obj]:
        bucket = self._objects.get(resource.key, {})
        return [bucket[key] for key in sorted(bucket) if namespace is None or key[0] == namespace]
