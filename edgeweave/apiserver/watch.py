"""Watch fan-out: one hub per store reads each change once and hands it to every watcher.

    store commit --subscribe--> call_soon_threadsafe --> hub wakes
        hub: events_since(hub.revision) once (one SQL query, in a worker thread)
             for each event, for each watcher of that resource: namespace, selectors (in
             memory), per-watcher ADDED/MODIFIED/DELETED, encode, append to its queue
        each HTTP watch stream: drain its queue, write; BOOKMARK when idle; end at timeout

Watchers are registered under the hub's lock, which the hub also holds while it reads and
distributes: a new watcher reads its starting point (initial state, or the history since its
resourceVersion) with nothing distributed meanwhile, and starts at that revision, so no event
is lost or sent twice. A watcher whose queue passes `queue_limit` is closed (Kubernetes closes
unresponsive watchers too); its client re-watches from the last resourceVersion it saw.

Selectors follow Kubernetes' cacher (and `Store.events_since`): an object that starts matching
arrives as ADDED, one that stops matching as DELETED carrying its previous state with the new
resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from edgeweave.kube.errors import Gone, StoreError
from edgeweave.kube.objects import Obj, dumps
from edgeweave.kube.resources import ResourceInfo
from edgeweave.kube.selectors import FieldSelector, LabelSelector
from edgeweave.kube.store import Commit, Store, WatchEvent
from edgeweave.log import event as log_event

log = logging.getLogger(__name__)
T = TypeVar("T")
Runner = Callable[[Callable[[], T]], Awaitable[T]]
Encoder = Callable[[str, str, Callable[[], Obj]], bytes]
"""(type, object JSON text, lazily decoded object) -> one line of the stream."""
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def _decode(raw: str) -> Obj:
    obj: Obj = json.loads(raw)
    return obj


def json_line(type_: str, raw: str) -> bytes:
    """`{"type":"ADDED","object":{...}}\\n`."""
    return f'{{"type":"{type_}","object":{raw}}}\n'.encode()


def status_line(status: dict[str, Any]) -> bytes:
    """An ERROR event carrying a Status."""
    return json_line("ERROR", json.dumps(status, separators=(",", ":")))


@dataclasses.dataclass(frozen=True)
class WatchFilter:
    """What one watch selects."""

    res: ResourceInfo
    """The resource."""
    namespace: str | None = None
    """Only this namespace (None: all)."""
    labels: LabelSelector | None = None
    """Label selector (None: all)."""
    fields: FieldSelector | None = None
    """Field selector (None: all)."""

    @property
    def selective(self) -> bool:
        """True if selectors apply."""
        return self.labels is not None or self.fields is not None

    def matches(self, obj: Obj) -> bool:
        """Whether an object passes the selectors."""
        if self.labels is not None and not self.labels.matches_object(obj):
            return False
        return self.fields is None or self.fields.matches(obj)


class Watcher:
    """One watch: a bounded queue of encoded lines and where it stands."""

    def __init__(self, flt: WatchFilter, encode: Encoder | None, position: int, limit: int) -> None:
        self.filter = flt
        self.encode = encode
        """None: plain JSON events (encoded once per event for all such watchers)."""
        self.position = position
        """Every change up to this revision has been considered (BOOKMARK value)."""
        self.closed: str | None = None
        """Why the watch ended (None while open)."""
        self._limit = limit
        self._lines: list[bytes] = []
        self._wake = asyncio.Event()

    def push(self, line: bytes) -> None:
        """Queue a line; closes the watcher if it is too far behind."""
        if self.closed is not None:
            return
        if len(self._lines) >= self._limit:
            self._lines.clear()
            self.close("too slow")
            return
        self._lines.append(line)
        self._wake.set()

    def close(self, reason: str, last: bytes | None = None) -> None:
        """End the watch after the queued lines (and `last`, e.g. an ERROR event)."""
        if self.closed is None:
            if last is not None:
                self._lines.append(last)
            self.closed = reason
            self._wake.set()

    async def next(self, timeout: float) -> list[bytes] | None:
        """Queued lines; [] after `timeout` seconds without any; None once closed and drained."""
        if not self._lines and self.closed is None:
            try:
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                    await self._wake.wait()
            except TimeoutError:
                return []
        self._wake.clear()
        lines, self._lines = self._lines, []
        if not lines and self.closed is not None:
            return None
        return lines


def _events_for(
    flt: WatchFilter, ev: WatchEvent, new: Callable[[], Obj], old: Callable[[], Obj | None]
) -> tuple[str, str | None]:
    """(type, replacement raw or None) of `ev` as watcher `flt` sees it; type '' = skip."""
    if flt.namespace and ev.namespace != flt.namespace:
        return "", None
    if not flt.selective:
        return ev.type, None
    new_ok = flt.matches(new())
    if ev.type != "MODIFIED":
        return (ev.type, None) if new_ok else ("", None)
    prev = old()
    old_ok = prev is not None and flt.matches(prev)
    if old_ok and new_ok:
        return "MODIFIED", None
    if new_ok:
        return "ADDED", None
    if old_ok and prev is not None:
        gone = dict(prev)
        gone["metadata"] = {**(prev.get("metadata") or {}), "resourceVersion": str(ev.revision)}
        return "DELETED", dumps(gone)
    return "", None


class WatchHub:
    """Reads the store's changes once and fans them out; see the module docstring."""

    def __init__(self, store: Store, run: Runner[Any], *, queue_limit: int) -> None:
        self.store = store
        self._run = run
        self._queue_limit = queue_limit
        self._by_resource: dict[str, set[Watcher]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.revision = 0
        self._notified = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.events_sent = 0
        """Events queued to watchers so far (a metric)."""
        self.closed_slow = 0
        """Watchers closed for falling behind (a metric)."""

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the store and start distributing."""
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.store.subscribe(self._on_commit_threadsafe)
        self.revision = self._notified = await self._run(lambda: self.store.revision)
        self._task = asyncio.create_task(self._pump(), name="watch-hub")

    async def close(self) -> None:
        """Stop, and end every watch."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for watchers in self._by_resource.values():
            for w in watchers:
                w.close("server shutting down")
        self._by_resource.clear()

    def watcher_count(self) -> int:
        """Open watchers (for metrics and tests)."""
        return sum(len(w) for w in self._by_resource.values())

    # ---- store notifications ------------------------------------------------------------------

    def _on_commit_threadsafe(self, commit: Commit) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._on_commit, commit.revision)

    def _on_commit(self, revision: int) -> None:
        self._notified = max(self._notified, revision)
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._lock:
                try:
                    await self._catch_up()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("watch hub failed to read events")

    async def _catch_up(self) -> None:
        if not self._by_resource:
            self.revision = max(self.revision, self._notified)
            return  # nobody to tell; a new watcher reads its own starting point
        only: ResourceInfo | None = None
        if len(self._by_resource) == 1:
            (watchers,) = self._by_resource.values()
            only = next(iter(watchers)).filter.res
        while True:
            start = self.revision
            try:
                batch = await self._run(partial(self.store.events_since, start, only))
            except Gone as exc:
                self._expire_all(exc)
                self.revision = max(self._notified, await self._run(lambda: self.store.revision))
                return
            self._distribute(batch.events)
            self.revision = max(self.revision, batch.revision)
            for watchers in self._by_resource.values():
                for w in watchers:
                    w.position = max(w.position, self.revision)
            if batch.revision <= start or self.revision >= self._notified:
                return

    def _expire_all(self, exc: StoreError) -> None:
        line = status_line(exc.to_status())
        for watchers in list(self._by_resource.values()):
            for w in list(watchers):
                w.close("expired", line)
        self._by_resource.clear()

    def _distribute(self, events: list[WatchEvent]) -> None:
        for ev in events:
            watchers = self._by_resource.get(ev.resource)
            if not watchers:
                continue
            cache: dict[str, Any] = {}

            def new(ev: WatchEvent = ev, cache: dict[str, Any] = cache) -> Obj:
                if "new" not in cache:
                    cache["new"] = ev.object()
                obj: Obj = cache["new"]
                return obj

            def old(ev: WatchEvent = ev, cache: dict[str, Any] = cache) -> Obj | None:
                if "old" not in cache:
                    cache["old"] = json.loads(ev.old) if ev.old else None
                prev: Obj | None = cache["old"]
                return prev

            lines: dict[str, bytes] = {}
            for w in list(watchers):
                if ev.revision <= w.position:
                    continue
                type_, raw = _events_for(w.filter, ev, new, old)
                if not type_:
                    continue
                if raw is not None:
                    w.push(self._encode(w, type_, raw, partial(_decode, raw)))
                elif w.encode is None:
                    if type_ not in lines:
                        lines[type_] = json_line(type_, ev.raw)
                    w.push(lines[type_])
                else:
                    w.push(w.encode(type_, ev.raw, new))
                self.events_sent += 1
                if w.closed is not None:
                    if w.closed == "too slow":
                        self.closed_slow += 1
                    watchers.discard(w)
            if not watchers:
                del self._by_resource[ev.resource]

    @staticmethod
    def _encode(w: Watcher, type_: str, raw: str, obj: Callable[[], Obj]) -> bytes:
        return json_line(type_, raw) if w.encode is None else w.encode(type_, raw, obj)

    # ---- registration -------------------------------------------------------------------------

    def _initial_state(self, flt: WatchFilter) -> tuple[list[WatchEvent], int]:
        cursor = self.store.watch(
            flt.res,
            resource_version=None,
            namespace=flt.namespace,
            label_selector=flt.labels,
            field_selector=flt.fields,
        )
        return cursor.poll(), cursor.revision

    def _history(self, flt: WatchFilter, revision: int) -> tuple[list[WatchEvent], int]:
        target, position, out = self.store.revision, revision, []
        while True:
            batch = self.store.events_since(
                position,
                flt.res,
                namespace=flt.namespace,
                label_selector=flt.labels,
                field_selector=flt.fields,
            )
            out.extend(batch.events)
            if batch.revision <= position or batch.revision >= target:
                return out, max(position, batch.revision)
            position = batch.revision

    async def watch(
        self, flt: WatchFilter, resource_version: int | None, encode: Encoder | None
    ) -> tuple[Watcher, list[bytes]]:
        """Register a watcher: from the current state (`resource_version` None: every current
        object as ADDED first) or after `resource_version`. Returns it and its first lines.
        Raises Gone if that history was compacted away."""
        async with self._lock:
            if resource_version is None:
                events, position = await self._run(lambda: self._initial_state(flt))
            else:
                rv = resource_version
                events, position = await self._run(lambda: self._history(flt, rv))
            w = Watcher(flt, encode, position, self._queue_limit)
            self._by_resource.setdefault(flt.res.key, set()).add(w)
        first = [self._encode(w, e.type, e.raw, e.object) for e in events]
        log_event(log, logging.DEBUG, "watch.start", resource=flt.res.key, rv=position)
        return w, first

    def remove(self, w: Watcher) -> None:
        """Unregister a watcher (its stream ended)."""
        w.close("done")
        watchers = self._by_resource.get(w.filter.res.key)
        if watchers is not None:
            watchers.discard(w)
            if not watchers:
                del self._by_resource[w.filter.res.key]
