"""Informers: a local cache of one resource kept current by list + watch, with change events.

An `Informer` does what client-go's reflector + informer do: list (paged), then watch from the
list's resourceVersion, applying every event to a cache keyed by (namespace, name) and telling
listeners. When the watch's version is compacted away (410 Gone) or the list/watch fails
otherwise, it lists again and emits the *difference* between its cache and the new list as
synthesised ADDED / MODIFIED / DELETED changes (`Change.relisted`), so a consumer sees every
object's latest state exactly once per change and never a deletion twice. (client-go instead
replays the whole list as `Replaced`/`Sync` deltas and reports vanished objects as
`DeletedFinalStateUnknown`; the diff is what its consumers compute from that anyway.)

Watch events are de-duplicated against the cache: an event carrying the resourceVersion the
cache already holds is dropped, an ADDED for a known object becomes MODIFIED, a DELETED for an
unknown one is dropped. Dropped connections and server-side watch timeouts are handled by
`edgeweave.kube.client.Watch`, which resumes from the last version seen without a relist.

    informer = Informer(client, PODS)
    informer.add_listener(lambda change: print(change.type, change.key))
    informer.start()
    await informer.wait_synced()
    pod = informer.get("web-0", namespace="default")

Timings (backoff after errors, page size) live in `InformerConfig`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Literal

from edgeweave.kube.client import (
    Backoff,
    KubeClient,
    KubeConnectionError,
    RetryPolicy,
    WatchEvent,
    WatchProtocolError,
)
from edgeweave.kube.errors import Gone, StoreError
from edgeweave.kube.resources import ResourceInfo
from edgeweave.log import event

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name); namespace is '' for cluster-scoped objects."""
ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]


def object_key(obj: Mapping[str, Any]) -> Key:
    """(namespace, name) of an object."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def resource_version(obj: Mapping[str, Any] | None) -> str:
    """The object's `metadata.resourceVersion` ('' if none)."""
    if obj is None:
        return ""
    meta = obj.get("metadata") or {}
    return str(meta.get("resourceVersion") or "")


def version_number(rv: str | None) -> int | None:
    """A resourceVersion as an integer, or None if it is not one.

    Kubernetes calls resourceVersions opaque, but both etcd's and our store's are one global,
    increasing revision, and client-go itself now compares them to tell whether a cache has
    caught up with a write (KEP-5647). We use it only for that, and fall back to a timeout
    when a server's versions are not numbers."""
    if rv and rv.isdigit():
        return int(rv)
    return None


@dataclasses.dataclass(frozen=True)
class InformerConfig:
    """Tunables of an informer."""

    page_size: int = 500
    """Objects per list page (client-go's pager default)."""
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    """Backoff before listing again after a failed list or watch (client-go: 800 ms to 30 s)."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One change of the cache, as listeners see it."""

    type: ChangeType
    """ADDED, MODIFIED or DELETED."""
    object: Obj
    """The object now (for DELETED: its last known state)."""
    old: Obj | None
    """The cached state before the change (None for ADDED)."""
    relisted: bool = False
    """True if the change was found by comparing a new list with the cache, not watched."""

    @property
    def key(self) -> Key:
        """(namespace, name) of the object."""
        return object_key(self.object)


@dataclasses.dataclass
class InformerStats:
    """Counters of one informer (for logs and metrics)."""

    lists: int = 0
    """Completed lists (the first one included)."""
    expired: int = 0
    """Watches that ended with 410 Gone and forced a relist."""
    errors: int = 0
    """Failed list or watch cycles (followed by backoff and a relist)."""
    events: int = 0
    """Watch events applied to the cache."""
    duplicates: int = 0
    """Watch events dropped because the cache already held that state."""
    synthesised: int = 0
    """Changes found by relist diffs."""
    last_error: str = ""
    """The last list/watch failure, for messages ('' if none yet)."""


Listener = Callable[[Change], None]


class Informer:
    """A cache of one resource (optionally one namespace / selectors), kept by list + watch."""

    def __init__(
        self,
        client: KubeClient,
        resource: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        config: InformerConfig = InformerConfig(),
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.config = config
        self.stats = InformerStats()
        self._cache: dict[str, dict[str, Obj]] = {}
        self._count = 0
        self._rv = ""
        self._synced = False
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- reading the cache --------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once the first list is in the cache."""
        return self._synced

    @property
    def resource_version(self) -> str:
        """The version the cache is at (last list, event or bookmark)."""
        return self._rv

    def get(self, name: str, namespace: str = "") -> Obj | None:
        """The cached object, or None. Treat it as read-only: it is shared."""
        return self._cache.get(namespace if self.resource.namespaced else "", {}).get(name)

    def items(self, namespace: str | None = None) -> list[Obj]:
        """Cached objects (of one namespace, or all) in (namespace, name) order."""
        if namespace is not None:
            return [obj for _, obj in sorted(self._cache.get(namespace, {}).items())]
        return [obj for ns in sorted(self._cache) for _, obj in sorted(self._cache[ns].items())]

    def keys(self) -> list[Key]:
        """Cached keys in order."""
        return [(ns, name) for ns in sorted(self._cache) for name in sorted(self._cache[ns])]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Obj]:
        return iter(self.items())

    # ---- listeners ----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(change)` after every cache change, in order, in the informer's task.
        It must be quick and not block; exceptions are logged and ignored. Returns a function
        that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    @contextlib.asynccontextmanager
    async def subscribe(self, *, replay: bool = True) -> AsyncIterator[AsyncIterator[Change]]:
        """`async with informer.subscribe() as changes: async for change in changes:` — every
        change from now on; with `replay`, first an ADDED for each object already cached."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        if replay:
            for obj in self.items():
                queue.put_nowait(Change("ADDED", obj, None, relisted=True))
        remove = self.add_listener(queue.put_nowait)

        async def changes() -> AsyncIterator[Change]:
            while True:
                yield await queue.get()

        try:
            yield changes()
        finally:
            remove()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first list; False on timeout."""
        return await self.wait_until(lambda: self._synced, timeout)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until `predicate()` is true, re-checking after every cache change (and version
        bookmark); False if `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            waiter = self._changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    def has_seen(self, rv: str) -> bool:
        """True if the cache reflects every change of this resource up to version `rv`
        (numeric versions only; see `version_number`)."""
        want, have = version_number(rv), version_number(self._rv)
        return want is not None and have is not None and have >= want

    def _wake(self) -> None:
        waiter, self._changed = self._changed, asyncio.Event()
        waiter.set()

    def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("informer %s: listener %r failed", self.resource.key, listener)

    # ---- cache updates (pure w.r.t. I/O) ------------------------------------------------------

    def _put(self, obj: Obj) -> Obj | None:
        ns, name = object_key(obj)
        bucket = self._cache.setdefault(ns, {})
        old = bucket.get(name)
        bucket[name] = obj
        if old is None:
            self._count += 1
        return old

    def _pop(self, key: Key) -> Obj | None:
        bucket = self._cache.get(key[0])
        if bucket is None:
            return None
        old = bucket.pop(key[1], None)
        if old is not None:
            self._count -= 1
            if not bucket:
                del self._cache[key[0]]
        return old

    def replace(self, items: list[Obj], rv: str) -> list[Change]:
        """Make the cache equal to a fresh list and return (and emit) the difference."""
        new = {object_key(obj): obj for obj in items}
        changes: list[Change] = []
        for key in sorted(set(new) | set(self.keys())):
            obj = new.get(key)
            old = self.get(key[1], key[0])
            if obj is None and old is not None:
                self._pop(key)
                changes.append(Change("DELETED", old, old, relisted=True))
            elif obj is not None and old is None:
                self._put(obj)
                changes.append(Change("ADDED", obj, None, relisted=True))
            elif obj is not None and old is not None:
                self._put(obj)
                rv_new, rv_old = resource_version(obj), resource_version(old)
                if (rv_new != rv_old) if rv_new and rv_old else obj != old:
                    changes.append(Change("MODIFIED", obj, old, relisted=True))
        self._rv = rv
        first = not self._synced
        self._synced = True
        self.stats.lists += 1
        if not first:
            self.stats.synthesised += len(changes)
        for change in changes:
            self._emit(change)
        self._wake()
        return changes

    def apply(self, ev: WatchEvent) -> Change | None:
        """Apply one watch event to the cache; return (and emit) the change, or None if it
        changes nothing (a duplicate, a bookmark)."""
        if ev.resource_version:
            self._rv = ev.resource_version
        if ev.type not in ("ADDED", "MODIFIED", "DELETED"):
            self._wake()
            return None
        obj = ev.object
        key = object_key(obj)
        cached = self.get(key[1], key[0])
        change: Change | None
        if ev.type == "DELETED":
            if cached is None:
                change = None
            else:
                self._pop(key)
                change = Change("DELETED", obj, cached)
        elif cached is not None and resource_version(cached) == resource_version(obj):
            change = None
        else:
            self._put(obj)
            change = Change("ADDED" if cached is None else "MODIFIED", obj, cached)
        if change is None:
            self.stats.duplicates += 1
        else:
            self.stats.events += 1
            self._emit(change)
        self._wake()
        return change

    # ---- the loop -----------------------------------------------------------------------------

    async def _list(self) -> None:
        page = await self.client.list_all(
            self.resource,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            page_size=self.config.page_size,
        )
        changes = self.replace(page.items, page.resource_version)
        event(
            log,
            logging.DEBUG,
            "kube.informer_listed",
            resource=self.resource.key,
            rv=page.resource_version,
            objects=len(page.items),
            changes=len(changes),
        )

    async def run(self) -> None:
        """List, then watch, forever (until cancelled); relist after Gone or an error."""
        backoff = Backoff(self.config.retry)
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    backoff.reset()
                watch = self.client.watch(
                    self.resource,
                    namespace=self.namespace,
                    label_selector=self.label_selector,
                    field_selector=self.field_selector,
                    resource_version=self._rv or None,
                )
                async with watch:
                    async for ev in watch:
                        self.apply(ev)
                        backoff.reset()
                need_list = True  # a watch only ends by itself when it cannot go on
            except Gone as exc:
                self.stats.expired += 1
                need_list = True
                event(
                    log,
                    logging.INFO,
                    "kube.informer_expired",
                    resource=self.resource.key,
                    rv=self._rv,
                    why=exc.message,
                )
            except (StoreError, KubeConnectionError, WatchProtocolError, ValueError) as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                need_list = True
                delay = backoff.next_delay()
                event(
                    log,
                    logging.WARNING,
                    "kube.informer_error",
                    resource=self.resource.key,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in=f"{delay:.3f}s",
                )
                await asyncio.sleep(delay)

    def start(self) -> None:
        """Run `run()` in a task (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.resource.key}")

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class SharedInformers:
    """One informer per resource, shared by every consumer (client-go's
    SharedInformerFactory): `informers.get(PODS)` creates it the first time."""

    def __init__(self, client: KubeClient, config: InformerConfig = InformerConfig()) -> None:
        self.client = client
        self.config = config
        self._by_key: dict[str, Informer] = collections.OrderedDict()

    def get(self, resource: ResourceInfo) -> Informer:
        """The informer of `resource` (all namespaces, no selectors)."""
        informer = self._by_key.get(resource.key)
        if informer is None:
            informer = Informer(self.client, resource, config=self.config)
            self._by_key[resource.key] = informer
        return informer

    def __iter__(self) -> Iterator[Informer]:
        return iter(list(self._by_key.values()))

    def start(self) -> None:
        """Start every informer not running yet."""
        for informer in self:
            informer.start()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until every informer has listed once; False on timeout."""
        results = await asyncio.gather(*(i.wait_synced(timeout) for i in self))
        return all(results)

    async def stop(self) -> None:
        """Stop every informer."""
        for informer in self:
            await informer.stop()


__all__ = [
    "Change",
    "Informer",
    "InformerConfig",
    "InformerStats",
    "Key",
    "SharedInformers",
    "object_key",
    "resource_version",
    "version_number",
]
