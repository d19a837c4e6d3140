"""A Kubernetes-style object store on SQLite: one global revision, list/watch, compaction.

Like kine (k3s's etcd shim) the store keeps one global, monotonically increasing revision;
every change of one object takes the next revision and that number is the object's
`metadata.resourceVersion`. Four tables:

    meta     (key, value)                      'revision', 'compacted', 'schema'
    objects  (id, resource, namespace, name,   current state; unique (resource, namespace, name);
              rev, labels, fields, data)       labels/fields are small JSON side columns for
                                               selectors, data is the object's JSON text
    history  (rev, type, resource, namespace,  one row per revision: ADDED / MODIFIED / DELETED,
              name, data, old)                 the object after (data) and before (old)
    compacted (resource, rev)                  per resource, the newest history row compaction
                                               dropped

Watches read `history` (`events_since`, `WatchCursor`), so a watcher resumes from any revision
after a restart of the process. `compact(n)` drops history up to n; asking for an older
revision raises `Gone` ("too old resource version: R (C)", 410 Expired), as Kubernetes does,
and the client relists. Like Kubernetes' per-resource watch cache, that is judged per resource:
a watch on nodegroups from revision R stays valid as long as no nodegroup change after R was
compacted away, however many pod changes were. A list at an older revision (the continue token
of a paginated list pins the first page's revision) is served from `objects` plus `history`:
for an object changed after revision R, the `old` column of its first later history row is
its state at R.

Durability. The database runs in WAL mode and every write is one transaction (`BEGIN
IMMEDIATE` ... `COMMIT`); a write method returns only after `COMMIT` returned. With
`synchronous=NORMAL` (the default) a commit appends the transaction to the WAL file with
write(2) before returning, but does not fsync it. A process killed with SIGKILL loses nothing
that reached the kernel: the page cache belongs to the kernel, which writes it out later, and
the next open replays the WAL. So every acknowledged write survives kill -9 of the process
(the tests do exactly that). What NORMAL does not cover is the machine losing power or the
kernel crashing before writeback: the last transactions can then be lost (never corrupted).
`StoreConfig(synchronous="FULL")` fsyncs the WAL at every commit and covers that too, at a
cost in writes/s that depends on the disk; etcd, which we benchmark against, fsyncs every write.

Batching. `with store.transaction():` groups many writes into one commit (one fsync under FULL);
each write inside still gets its own revision and history row. A failed write inside a
transaction is rolled back alone (a savepoint); an exception leaving the block rolls back all.

Threads and I/O. Methods are synchronous and thread-safe (one connection behind a lock). The
store does no asyncio: an async server subscribes a callback (`subscribe`) that the store calls
after every commit with the new revision and the resources it touched, e.g. to set an
`asyncio.Event` through `loop.call_soon_threadsafe`; watchers then `poll()` their cursors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from edgeweave.kube.errors import (
    OPTIMISTIC_LOCK_MESSAGE,
    BadRequest,
    Cause,
    Forbidden,
    Gone,
    InternalError,
    Invalid,
    NotFound,
    StoreError,
    TooLargeResourceVersion,
    already_exists,
    conflict,
    not_found,
)
from edgeweave.kube.objects import (
    NAMESPACE_FINALIZER,
    Obj,
    Subresource,
    check_preconditions,
    deletion_ready,
    dumps,
    grace_period,
    mark_deleted,
    patch_object,
    prepare_create,
    prepare_update,
    resolve_namespace,
    selectable_values,
)
from edgeweave.kube.patch import apply_patch, copy_json
from edgeweave.kube.resources import DEFAULT_REGISTRY, Registry, ResourceInfo, scale_of
from edgeweave.kube.selectors import FieldSelector, LabelSelector
from edgeweave.kube.sqlfilter import (
    INT_FUNCTION,
    compile_for_json,
    compile_for_rows,
    int64_or_none,
)

log = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    rev INTEGER NOT NULL,
    labels TEXT,
    fields TEXT,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS objects_key ON objects (resource, namespace, name);
CREATE TABLE IF NOT EXISTS history (
    rev INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    resource TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    old TEXT
);
CREATE TABLE IF NOT EXISTS compacted (resource TEXT PRIMARY KEY, rev INTEGER NOT NULL)
    WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 1), ('revision', 0), ('compacted', 0);
"""
# group_concat keeps the order of an ordered subquery; 3.44+ can also say so explicitly.
_JOIN_DATA = (
    "group_concat(data, ',' ORDER BY namespace, name)"
    if sqlite3.sqlite_version_info >= (3, 44, 0)
    else "group_concat(data, ',')"
)
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses for generateName
_CONTINUE_TOO_OLD = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter."
)


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Tunables of the store."""

    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    """SQLite synchronous level: NORMAL survives a killed process, FULL also a power loss."""
    history_keep: int = 10_000
    """Revisions of history kept for watch resume; older ones are compacted. 0 keeps all."""
    compact_interval: int = 1_000
    """Auto-compaction runs when history exceeds history_keep by this many revisions."""
    bootstrap_namespaces: tuple[str, ...] = (
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
    )
    """Namespaces created when the store is opened, if missing."""
    check_namespaces: bool = True
    """Creating in a missing namespace is NotFound, in a terminating one Forbidden."""
    graceful_deletion: bool = True
    """Deleting a scheduled pod marks it (deletionTimestamp) until its node deletes it with
    grace 0, as Kubernetes does. False deletes pods at once."""
    watch_batch: int = 1_000
    """Most history rows one `events_since` call returns."""
    busy_timeout_s: float = 10.0
    """How long to wait for another connection's write lock."""
    cache_mib: int = 64
    """SQLite page cache size."""


@dataclasses.dataclass(frozen=True)
class Preconditions:
    """Delete preconditions (DeleteOptions.preconditions): fail with Conflict on mismatch."""

    uid: str | None = None
    """The object must have this uid."""
    resource_version: str | None = None
    """The object must be at this resourceVersion."""


@dataclasses.dataclass(frozen=True)
class Commit:
    """What a committed transaction changed; passed to `subscribe` callbacks."""

    revision: int
    """The store's revision after the commit."""
    resources: frozenset[str]
    """Keys (`pods`, `deployments.apps`) of the resources that changed."""


@dataclasses.dataclass(frozen=True)
class Deleted:
    """Result of a delete."""

    object: Obj
    """The final state: the deleted object (resourceVersion = the deletion's revision), or
    the object now marked with a deletionTimestamp."""
    gone: bool
    """True if the object was removed; False if it waits for finalizers or a grace period."""


@dataclasses.dataclass(frozen=True)
class ListResult:
    """One page of a list, kept as JSON text so a server can send it without re-encoding."""

    raw_items: str
    """The objects' JSON texts joined by ',' in (namespace, name) order: the inside of the
    `items` array."""
    count: int
    """How many objects `raw_items` holds."""
    resource_version: int
    """The revision this list shows (the list's `metadata.resourceVersion`)."""
    continue_token: str | None
    """Token for the next page, or None if this is the last one."""

    def objects(self) -> list[Obj]:
        """The items decoded."""
        result: list[Obj] = json.loads("[" + self.raw_items + "]")
        return result

    def to_json(self, res: ResourceInfo) -> str:
        """The whole `{Kind}List` document, built without decoding the items."""
        meta: dict[str, str] = {"resourceVersion": str(self.resource_version)}
        if self.continue_token:
            meta["continue"] = self.continue_token
        head = json.dumps(
            {"kind": res.list_kind, "apiVersion": res.api_version, "metadata": meta},
            separators=(",", ":"),
        )
        return head[:-1] + ',"items":[' + self.raw_items + "]}"


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One change, as a watch delivers it."""

    type: EventType
    """ADDED, MODIFIED or DELETED (as seen through the watch's filter)."""
    revision: int
    """The revision of the change."""
    resource: str
    """Resource key, e.g. `pods`."""
    namespace: str
    """Namespace ('' for cluster-scoped objects)."""
    name: str
    """Object name."""
    raw: str
    """The object as JSON text (for DELETED: its last state, at the deletion's revision)."""
    old: str | None = None
    """The object before this change as JSON text (None for a creation or an initial ADDED):
    lets a server that reads events once and filters them in memory tell, per watcher, whether
    the object matched its selectors before (see `events_since`)."""

    def object(self) -> Obj:
        """The object decoded."""
        result: Obj = json.loads(self.raw)
        return result

    def to_json(self) -> str:
        """`{"type": ..., "object": ...}`, one line of a watch stream."""
        return f'{{"type":"{self.type}","object":{self.raw}}}'


@dataclasses.dataclass(frozen=True)
class WatchBatch:
    """Result of `events_since`."""

    events: list[WatchEvent]
    """Matching events, in revision order."""
    revision: int
    """Every change up to this revision has been considered: resume from here (bookmarks)."""


@dataclasses.dataclass
class _Row:
    id: int
    data: str


def _as_labels(selector: str | LabelSelector | None) -> LabelSelector | None:
    if selector is None or isinstance(selector, LabelSelector):
        return selector if selector is None or not selector.empty else None
    parsed = LabelSelector.parse(selector)
    return None if parsed.empty else parsed


def _as_fields(selector: str | FieldSelector | None) -> FieldSelector | None:
    if selector is None or isinstance(selector, FieldSelector):
        return selector if selector is None or not selector.empty else None
    parsed = FieldSelector.parse(selector)
    return None if parsed.empty else parsed


def _name_suffix() -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))


def encode_continue(revision: int, namespace: str, name: str) -> str:
    """The continue token: the list's revision and the last key returned."""
    doc = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": [namespace, name]})
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str, str]:
    """(revision, namespace, name) of a continue token; BadRequest if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        rev, (ns, name) = doc["rv"], doc["start"]
        if doc.get("v") != "meta.k8s.io/v1" or not isinstance(rev, int) or rev < 0:
            raise ValueError("wrong version or revision")
        if not isinstance(ns, str) or not isinstance(name, str):
            raise ValueError("bad start key")
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"continue key is not valid: {exc}") from None
    return rev, ns, name


class Store:
    """The object store. See the module docstring for the model and the guarantees."""

    def __init__(
        self,
        path: str | Path,
        *,
        registry: Registry = DEFAULT_REGISTRY,
        config: StoreConfig = StoreConfig(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.registry = registry
        self.config = config
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        self._rev = 0
        self._start_rev = 0
        self._compacted = 0
        self._touched: set[str] = set()
        self._subscribers: list[Callable[[Commit], None]] = []
        try:
            db = sqlite3.connect(
                str(self.path),
                isolation_level=None,
                check_same_thread=False,
                timeout=config.busy_timeout_s,
                cached_statements=512,
            )
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise InternalError(f"{self.path}: cannot switch SQLite to WAL mode (got {mode})")
            db.execute(f"PRAGMA synchronous={config.synchronous}")
            db.execute(f"PRAGMA cache_size=-{int(config.cache_mib) * 1024}")
            db.execute("PRAGMA temp_store=MEMORY")
            db.create_function(INT_FUNCTION, 1, int64_or_none, deterministic=True)
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise InternalError(f"{self.path}: cannot open the store: {exc}") from exc
        self._db = db
        self._rev, self._compacted = self._read_meta()
        self._namespaces = self._resource_or_none("namespaces")
        if config.bootstrap_namespaces and self._namespaces is not None:
            self._bootstrap(self._namespaces, config.bootstrap_namespaces)

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resource_or_none(self, key: str) -> ResourceInfo | None:
        try:
            return self.registry.by_key(key)
        except KeyError:
            return None

    def _is_namespaces(self, res: ResourceInfo) -> bool:
        return self._namespaces is not None and res.key == self._namespaces.key

    def _bootstrap(self, namespaces: ResourceInfo, names: tuple[str, ...]) -> None:
        with self.transaction():
            for name in names:
                if self._fetch(namespaces.key, "", name) is None:
                    self.create(namespaces, {"metadata": {"name": name}})

    # ---- revisions and notification -----------------------------------------------------------

    def _read_meta(self) -> tuple[int, int]:
        values = dict(
            self._db.execute(
                "SELECT key, value FROM meta WHERE key IN ('revision', 'compacted')"
            ).fetchall()
        )
        return int(values["revision"]), int(values["compacted"])

    @property
    def revision(self) -> int:
        """The current (last committed) revision."""
        with self._lock:
            if self._depth:
                return self._rev
            return self._read_meta()[0]

    @property
    def compacted_revision(self) -> int:
        """History at or below this revision is gone (for some resources less: see the module
        docstring); watching from it still works."""
        with self._lock:
            if self._depth:
                return self._compacted
            return self._read_meta()[1]

    def subscribe(self, callback: Callable[[Commit], None]) -> Callable[[], None]:
        """Call `callback(commit)` after every commit that changed something; returns an
        unsubscribe function. Callbacks run in the writer's thread, after the lock is released;
        they must be quick and must not raise (exceptions are logged and ignored)."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self, commit: Commit) -> None:
        for callback in list(self._subscribers):
            try:
                callback(commit)
            except Exception:
                log.exception("store subscriber %r failed", callback)

    # ---- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit (see the module docstring)."""
        with self._write():
            yield

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        commit: Commit | None = None
        with self._lock:
            if self._depth == 0:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._rev, self._compacted = self._read_meta()
                except sqlite3.Error as exc:
                    raise InternalError(f"store: cannot start a write: {exc}") from exc
                self._start_rev = self._rev
                self._touched = set()
                self._depth = 1
                try:
                    yield
                    commit = self._commit()
                except BaseException as exc:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    self._rev = self._start_rev
                    if isinstance(exc, sqlite3.Error):
                        raise InternalError(f"store: write failed: {exc}") from exc
                    raise
                finally:
                    self._depth = 0
            else:
                saved = (self._rev, set(self._touched))
                self._db.execute("SAVEPOINT op")
                self._depth += 1
                try:
                    yield
                except BaseException:
                    self._db.execute("ROLLBACK TO op")
                    self._db.execute("RELEASE op")
                    self._rev, self._touched = saved
                    raise
                else:
                    self._db.execute("RELEASE op")
                finally:
                    self._depth -= 1
        if commit is not None:
            self._notify(commit)

    def _commit(self) -> Commit | None:
        changed = self._rev != self._start_rev
        if changed:
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (self._rev,))
            keep = self.config.history_keep
            if keep > 0 and self._rev - self._compacted >= keep + self.config.compact_interval:
                self._compact_locked(self._rev - keep)
        self._db.execute("COMMIT")
        return Commit(self._rev, frozenset(self._touched)) if changed else None

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[int, int]]:
        """A consistent read: yields (current revision, compacted revision)."""
        with self._lock:
            if self._depth:
                yield self._rev, self._compacted
                return
            self._db.execute("BEGIN")
            try:
                yield self._read_meta()
            finally:
                self._db.execute("COMMIT")

    def _check_history(self, revision: int, compacted: int, resource: str | None) -> None:
        """Gone unless every change of `resource` (None: of anything) after `revision` is
        still in the history."""
        if revision >= compacted:
            return
        floor = compacted
        if resource is not None:
            row = self._db.execute(
                "SELECT rev FROM compacted WHERE resource = ?", (resource,)
            ).fetchone()
            floor = int(row[0]) if row else 0
        if revision < floor:
            raise Gone(f"too old resource version: {revision} ({floor})")

    # ---- low-level row access -----------------------------------------------------------------

    def _fetch(self, resource: str, namespace: str, name: str) -> _Row | None:
        row = self._db.execute(
            "SELECT id, data FROM objects WHERE resource = ? AND namespace = ? AND name = ?",
            (resource, namespace, name),
        ).fetchone()
        return _Row(row[0], row[1]) if row else None

    def _record(
        self,
        rev: int,
        type_: EventType,
        res: ResourceInfo,
        ns: str,
        name: str,
        data: str,
        old: str | None,
    ) -> None:
        self._db.execute(
            "INSERT INTO history (rev, type, resource, namespace, name, data, old) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rev, type_, res.key, ns, name, data, old),
        )
        self._rev = rev
        self._touched.add(res.key)

    @staticmethod
    def _side_columns(res: ResourceInfo, obj: Obj) -> tuple[str | None, str | None]:
        labels = obj["metadata"].get("labels")
        return (dumps(labels) if labels else None), selectable_values(res, obj)

    def _ns(self, res: ResourceInfo, namespace: str | None) -> str:
        if not res.namespaced:
            return ""
        if not namespace:
            raise BadRequest(f"a namespace is required for {res.key}")
        return namespace

    def _check_namespace_open(self, res: ResourceInfo, namespace: str) -> None:
        ns_res = self._namespaces
        if ns_res is None or not self.config.check_namespaces:
            return
        row = self._db.execute(
            "SELECT fields FROM objects WHERE resource = ? AND namespace = '' AND name = ?",
            (ns_res.key, namespace),
        ).fetchone()
        if row is None:
            raise not_found(ns_res.key, namespace)
        phase = json.loads(row[0]).get("status.phase") if row[0] else ""
        if phase == "Terminating":
            raise Forbidden(
                f"{res.key} is forbidden: unable to create new content in namespace {namespace} "
                "because it is being terminated",
                kind=res.plural,
                group=res.group,
            )

    # ---- create / get -------------------------------------------------------------------------

    def create(self, res: ResourceInfo, obj: Any, *, namespace: str | None = None) -> Obj:
        """Create an object; returns it as stored (uid, creationTimestamp, generation,
        resourceVersion set). The result may share nested values with `obj`, which is not
        modified. Raises AlreadyExists, Invalid, BadRequest, NotFound/Forbidden (namespace)."""
        generated = isinstance(obj, Mapping) and not (obj.get("metadata") or {}).get("name")
        for attempt in range(8):
            prepared = prepare_create(
                res,
                obj,
                namespace=namespace,
                now=self._clock(),
                uid=str(uuid.uuid4()),
                suffix=_name_suffix,
            )
            try:
                with self._write():
                    return self._insert(res, prepared)
            except StoreError as exc:
                if not (generated and exc.reason == "AlreadyExists" and attempt < 7):
                    raise
        raise AssertionError("unreachable")

    def _insert(self, res: ResourceInfo, prepared: Obj) -> Obj:
        meta = prepared["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        if res.namespaced:
            self._check_namespace_open(res, ns)
        rev = self._rev + 1
        meta["resourceVersion"] = str(rev)
        text = dumps(prepared)
        labels, fields = self._side_columns(res, prepared)
        try:
            self._db.execute(
                "INSERT INTO objects (resource, namespace, name, rev, labels, fields, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (res.key, ns, name, rev, labels, fields, text),
            )
        except sqlite3.IntegrityError:
            raise already_exists(res.key, name, res.group) from None
        self._record(rev, "ADDED", res, ns, name, text, None)
        return prepared

    def get_raw(self, res: ResourceInfo, name: str, *, namespace: str | None = None) -> str:
        """The object's JSON text; NotFound if absent."""
        ns = self._ns(res, namespace)
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM objects WHERE resource = ? AND namespace = ? AND name = ?",
                (res.key, ns, name),
            ).fetchone()
        if row is None:
            raise not_found(res.key, name, res.group)
        text: str = row[0]
        return text

    def get(self, res: ResourceInfo, name: str, *, namespace: str | None = None) -> Obj:
        """The object; NotFound if absent."""
        result: Obj = json.loads(self.get_raw(res, name, namespace=namespace))
        return result

    def get_scale(self, res: ResourceInfo, name: str, *, namespace: str | None = None) -> Obj:
        """The autoscaling/v1 Scale of an object with a scale subresource."""
        self._require_scale(res)
        return scale_of(res, self.get(res, name, namespace=namespace))

    # ---- update / patch -----------------------------------------------------------------------

    def _require_scale(self, res: ResourceInfo) -> None:
        if not res.has_scale:
            raise NotFound(f"the server could not find the requested resource ({res.key}/scale)")

    def _require_status(self, res: ResourceInfo, subresource: Subresource) -> None:
        if subresource == "status" and not res.has_status:
            raise NotFound(f"the server could not find the requested resource ({res.key}/status)")
        if subresource == "scale":
            self._require_scale(res)

    def update(
        self,
        res: ResourceInfo,
        obj: Any,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: Subresource = None,
    ) -> Obj:
        """Replace an object (PUT). A `metadata.resourceVersion` in `obj` must be current
        (else Conflict); without one the update is unconditional. `name`, if given (the URL's),
        must match the object's. `subresource="status"` changes only status;
        `subresource="scale"` takes and returns an autoscaling/v1 Scale."""
        if not isinstance(obj, Mapping):
            raise BadRequest(f"the body of a {res.kind} must be a JSON object")
        meta_in = obj.get("metadata") or {}
        if not isinstance(meta_in, Mapping):
            raise BadRequest("metadata must be an object")
        obj_name = meta_in.get("name")
        if name is not None and obj_name not in (None, "", name):
            raise BadRequest(
                f"the name of the object ({obj_name}) does not match the name on the URL ({name})"
            )
        target = name or obj_name
        if not isinstance(target, str) or not target:
            raise BadRequest("name is required for an update")
        self._require_status(res, subresource)
        if subresource == "scale":
            ns = self._ns(res, namespace if namespace is not None else meta_in.get("namespace"))
            return self._update_scale(res, target, ns, obj)
        ns = resolve_namespace(res, meta_in, namespace)
        with self._write():
            row = self._fetch(res.key, ns, target)
            if row is None:
                if (
                    subresource is None
                    and res.allow_create_on_update
                    and not meta_in.get("resourceVersion")
                ):
                    body = dict(obj)
                    body["metadata"] = {**meta_in, "name": target}
                    return self.create(res, body, namespace=ns)
                raise not_found(res.key, target, res.group)
            current: Obj = json.loads(row.data)
            new = prepare_update(res, current, obj, subresource=subresource)
            return self._store_update(res, row, current, new)

    def update_status(self, res: ResourceInfo, obj: Any, *, namespace: str | None = None) -> Obj:
        """`update(..., subresource="status")`."""
        return self.update(res, obj, namespace=namespace, subresource="status")

    def _update_scale(self, res: ResourceInfo, name: str, ns: str, scale: Mapping[str, Any]) -> Obj:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise Invalid(
                f'Scale "{name}" is invalid: spec.replicas: Invalid value: {replicas!r}: must be '
                "a non-negative integer",
                name=name,
                kind="Scale",
                group="autoscaling",
                causes=[Cause("spec.replicas", "must be a non-negative integer")],
            )
        with self._write():
            row = self._fetch(res.key, ns, name)
            if row is None:
                raise not_found(res.key, name, res.group)
            current: Obj = json.loads(row.data)
            rv = (scale.get("metadata") or {}).get("resourceVersion")
            if rv not in (None, "") and str(rv) != current["metadata"].get("resourceVersion"):
                raise conflict(res.key, name, OPTIMISTIC_LOCK_MESSAGE, res.group)
            desired = dict(current)
            desired["spec"] = {**(current.get("spec") or {}), "replicas": replicas}
            new = prepare_update(res, current, desired)
            return scale_of(res, self._store_update(res, row, current, new))

    def patch(
        self,
        res: ResourceInfo,
        name: str,
        content_type: str,
        body: Any,
        *,
        namespace: str | None = None,
        subresource: Subresource = None,
    ) -> Obj:
        """Apply a JSON patch, JSON merge patch or strategic merge patch (by `content_type`;
        `body` is the raw request body or parsed JSON) atomically: no conflict is possible
        unless the patch itself carries a stale resourceVersion."""
        self._require_status(res, subresource)
        ns = self._ns(res, namespace)
        with self._write():
            row = self._fetch(res.key, ns, name)
            if row is None:
                raise not_found(res.key, name, res.group)
            current: Obj = json.loads(row.data)
            if subresource == "scale":
                patched_scale = apply_patch(
                    content_type, scale_of(res, current), body, kind="Scale"
                )
                return self._update_scale(res, name, ns, patched_scale)
            patched = patch_object(res, current, content_type, body, name)
            new = prepare_update(res, current, patched, subresource=subresource)
            return self._store_update(res, row, current, new)

    def guaranteed_update(
        self,
        res: ResourceInfo,
        name: str,
        mutate: Callable[[Obj], Obj],
        *,
        namespace: str | None = None,
        subresource: Subresource = None,
    ) -> Obj:
        """Read-modify-write without conflicts: `mutate` gets a private copy of the current
        object and returns the desired one, inside the write transaction (for controllers)."""
        self._require_status(res, subresource)
        if subresource == "scale":
            raise BadRequest("guaranteed_update works on objects, not on scale")
        ns = self._ns(res, namespace)
        with self._write():
            row = self._fetch(res.key, ns, name)
            if row is None:
                raise not_found(res.key, name, res.group)
            current: Obj = json.loads(row.data)
            desired = mutate(copy_json(current))
            new = prepare_update(res, current, desired, subresource=subresource)
            return self._store_update(res, row, current, new)

    def _store_update(
        self, res: ResourceInfo, row: _Row, current: Obj, new: Obj, *, allow_delete: bool = True
    ) -> Obj:
        if new == current:
            return current  # nothing changed: no new revision, no event (as Kubernetes)
        rev = self._rev + 1
        new = dict(new)
        new["metadata"] = dict(new["metadata"], resourceVersion=str(rev))
        meta = new["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        text = dumps(new)
        if allow_delete and deletion_ready(new):
            self._db.execute("DELETE FROM objects WHERE id = ?", (row.id,))
            self._record(rev, "DELETED", res, ns, name, text, row.data)
            return new
        labels, fields = self._side_columns(res, new)
        self._db.execute(
            "UPDATE objects SET rev = ?, labels = ?, fields = ?, data = ? WHERE id = ?",
            (rev, labels, fields, text, row.id),
        )
        self._record(rev, "MODIFIED", res, ns, name, text, row.data)
        return new

    # ---- delete -------------------------------------------------------------------------------

    def delete(
        self,
        res: ResourceInfo,
        name: str,
        *,
        namespace: str | None = None,
        preconditions: Preconditions | None = None,
        grace_period_seconds: int | None = None,
    ) -> Deleted:
        """Delete an object. With finalizers, or for a scheduled pod with a grace period, the
        object is only marked (deletionTimestamp) and `gone` is False. Deleting a namespace
        deletes everything in it (see `delete_namespace`)."""
        ns = self._ns(res, namespace)
        with self._write():
            row = self._fetch(res.key, ns, name)
            if row is None:
                raise not_found(res.key, name, res.group)
            current: Obj = json.loads(row.data)
            if preconditions is not None:
                check_preconditions(
                    res,
                    current,
                    uid=preconditions.uid,
                    resource_version=preconditions.resource_version,
                )
            if self._is_namespaces(res):
                return self._delete_namespace(res, row, current)
            return self._delete_row(res, row, current, grace_period_seconds)

    def _delete_row(
        self, res: ResourceInfo, row: _Row, current: Obj, requested_grace: int | None
    ) -> Deleted:
        grace = grace_period(res, current, requested_grace) if self.config.graceful_deletion else 0
        if grace > 0 or current["metadata"].get("finalizers"):
            marked = mark_deleted(current, now=self._clock(), grace=grace)
            if marked is None:
                return Deleted(current, gone=False)
            stored = self._store_update(res, row, current, marked)
            return Deleted(stored, gone=False)
        rev = self._rev + 1
        final = dict(current)
        final["metadata"] = dict(current["metadata"], resourceVersion=str(rev))
        meta = final["metadata"]
        self._db.execute("DELETE FROM objects WHERE id = ?", (row.id,))
        self._record(
            rev, "DELETED", res, meta.get("namespace", ""), meta["name"], dumps(final), row.data
        )
        return Deleted(final, gone=True)

    def delete_collection(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | LabelSelector | None = None,
        field_selector: str | FieldSelector | None = None,
        grace_period_seconds: int | None = None,
    ) -> list[Deleted]:
        """Delete every matching object, in one transaction."""
        flt = compile_for_rows(res, _as_labels(label_selector), _as_fields(field_selector))
        out: list[Deleted] = []
        with self._write():
            sql = f"SELECT id, data FROM objects WHERE resource = ? AND {flt.sql}"
            params: tuple[object, ...] = (res.key, *flt.params)
            if res.namespaced and namespace:
                sql += " AND namespace = ?"
                params += (namespace,)
            for row_id, data in self._db.execute(
                sql + " ORDER BY namespace, name", params
            ).fetchall():
                row, current = _Row(row_id, data), json.loads(data)
                if self._is_namespaces(res):
                    out.append(self._delete_namespace(res, row, current))
                else:
                    out.append(self._delete_row(res, row, current, grace_period_seconds))
        return out

    def delete_namespace(self, name: str) -> Deleted:
        """Delete a namespace and, in the same transaction, everything in it.

        The namespace is marked Terminating (new objects in it are Forbidden), every namespaced
        object in it is deleted (finalizers and pod grace periods are respected), and once it is
        empty its `kubernetes` finalizer is dropped and it is gone. If something remains, it
        stays Terminating; `finalize_namespaces()` finishes the job later."""
        if self._namespaces is None:
            raise NotFound("namespaces are not served by this store")
        return self.delete(self._namespaces, name)

    def _delete_namespace(self, res: ResourceInfo, row: _Row, current: Obj) -> Deleted:
        marked = mark_deleted(current, now=self._clock(), grace=0)
        if marked is not None:
            current = self._store_update(res, row, current, marked, allow_delete=False)
        return self._finalize_namespace(res, current["metadata"]["name"])

    def _finalize_namespace(self, res: ResourceInfo, name: str) -> Deleted:
        remaining = 0
        for other in self.registry:
            if not other.namespaced:
                continue
            rows = self._db.execute(
                "SELECT id, data FROM objects WHERE resource = ? AND namespace = ?",
                (other.key, name),
            ).fetchall()
            for row_id, data in rows:
                result = self._delete_row(other, _Row(row_id, data), json.loads(data), None)
                remaining += not result.gone
        row = self._fetch(res.key, "", name)
        if row is None:
            raise not_found(res.key, name)
        current: Obj = json.loads(row.data)
        if remaining:
            return Deleted(current, gone=False)
        spec = dict(current.get("spec") or {})
        spec["finalizers"] = [f for f in spec.get("finalizers") or [] if f != NAMESPACE_FINALIZER]
        if not spec["finalizers"]:
            del spec["finalizers"]
        new = dict(current, spec=spec)
        stored = self._store_update(res, row, current, new)
        return Deleted(stored, gone=deletion_ready(stored))

    def finalize_namespaces(self) -> list[str]:
        """Retry the cleanup of Terminating namespaces; returns the names that are now gone."""
        if self._namespaces is None:
            return []
        res = self._namespaces
        gone: list[str] = []
        with self._write():
            names = [
                r[0]
                for r in self._db.execute(
                    "SELECT name FROM objects WHERE resource = ? AND "
                    "json_extract(fields, '$.\"status.phase\"') = 'Terminating'",
                    (res.key,),
                ).fetchall()
            ]
            for name in names:
                if self._finalize_namespace(res, name).gone:
                    gone.append(name)
        return gone

    # ---- list ---------------------------------------------------------------------------------

    def list_objects(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | LabelSelector | None = None,
        field_selector: str | FieldSelector | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: int | None = None,
    ) -> ListResult:
        """List objects in (namespace, name) order.

        `namespace=None` lists all namespaces. `limit` pages the result; pass the returned
        `continue_token` to get the next page, which shows the same revision as the first
        (Gone once that revision is compacted). `resource_version` asks for the state at exactly
        that revision (resourceVersionMatch=Exact); by default the current state is listed.
        BadRequest for a bad selector or token, TooLargeResourceVersion for a future revision."""
        labels, fields = _as_labels(label_selector), _as_fields(field_selector)
        if limit is not None and limit <= 0:
            limit = None
        start: tuple[str, str] | None = None
        target = resource_version
        if continue_token:
            if resource_version is not None:
                raise BadRequest("specifying resource version is not allowed when using continue")
            target, ns0, name0 = decode_continue(continue_token)
            start = (ns0, name0)
        query = _ListQuery(res, namespace if res.namespaced and namespace else None, labels, fields)
        with self._read() as (current, compacted):
            target = self._list_revision(res, target, current, compacted, bool(continue_token))
            sql, params = query.sql(target, current, start)
            if limit is None:
                count, joined = self._db.execute(
                    f"SELECT count(*), coalesce({_JOIN_DATA}, '') FROM ({sql})", params
                ).fetchone()
                return ListResult(joined, count, target, None)
            rows = self._db.execute(f"{sql} LIMIT {int(limit) + 1}", params).fetchall()
        token = None
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_continue(target, rows[-1][0], rows[-1][1])
        return ListResult(",".join(r[2] for r in rows), len(rows), target, token)

    def _list_revision(
        self, res: ResourceInfo, target: int | None, current: int, compacted: int, cont: bool
    ) -> int:
        if target is None:
            return current
        if target > current:
            raise TooLargeResourceVersion(
                f"Too large resource version: {target}, current: {current}",
                causes=[Cause("", "Too large resource version", "ResourceVersionTooLarge")],
                retry_after_seconds=1,
            )
        if target < current:
            try:
                self._check_history(target, compacted, res.key)
            except Gone:
                if cont:
                    raise Gone(_CONTINUE_TOO_OLD) from None
                raise
        return target

    def _list_rows(
        self,
        res: ResourceInfo,
        namespace: str | None,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> tuple[list[tuple[str, str, str, int]], int]:
        """(namespace, name, data, rev) of every current match, and the revision."""
        query = _ListQuery(res, namespace if res.namespaced and namespace else None, labels, fields)
        with self._read() as (current, _):
            sql, params = query.sql(current, current, None)
            return self._db.execute(sql, params).fetchall(), current

    # ---- watch --------------------------------------------------------------------------------

    def events_since(
        self,
        revision: int,
        res: ResourceInfo | None = None,
        *,
        namespace: str | None = None,
        label_selector: str | LabelSelector | None = None,
        field_selector: str | FieldSelector | None = None,
        limit: int | None = None,
    ) -> WatchBatch:
        """Changes after `revision`, in order, as a watch with these filters sees them.

        With selectors, an object that starts to match arrives as ADDED and one that stops
        matching as DELETED (its previous state at the new revision), as in Kubernetes.
        Raises Gone if changes of `res` after `revision` were compacted away."""
        query = _WatchQuery.build(
            res, namespace, _as_labels(label_selector), _as_fields(field_selector)
        )
        return self._events(query, revision, limit)

    def _events(self, query: _WatchQuery, revision: int, limit: int | None) -> WatchBatch:
        batch = limit or self.config.watch_batch
        with self._read() as (current, compacted):
            self._check_history(revision, compacted, query.resource)
            if revision >= current:
                return WatchBatch([], revision)
            rows = self._db.execute(
                query.sql, (*query.select_params, revision, current, *query.where_params, batch)
            ).fetchall()
        upto = rows[-1][0] if len(rows) >= batch else current
        return WatchBatch(query.events(rows), upto)

    def watch(
        self,
        res: ResourceInfo | None,
        *,
        resource_version: int | None = None,
        namespace: str | None = None,
        label_selector: str | LabelSelector | None = None,
        field_selector: str | FieldSelector | None = None,
    ) -> WatchCursor:
        """A watch cursor. `resource_version=None` starts with ADDED events for every current
        object (Kubernetes' "get state and start at most recent"); a number resumes after it
        (Gone at once if compacted)."""
        return WatchCursor(
            self,
            res,
            resource_version=resource_version,
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        )

    # ---- compaction ---------------------------------------------------------------------------

    def compact(self, revision: int) -> int:
        """Drop history at and below `revision` (at most the current one); returns the number
        of history rows removed. Watches and continue tokens older than it get Gone."""
        with self._write():
            return self._compact_locked(min(revision, self._rev))

    def compact_keep(self, keep: int | None = None) -> int:
        """Compact all but the last `keep` revisions (default: `config.history_keep`)."""
        keep = self.config.history_keep if keep is None else keep
        with self._write():
            return self._compact_locked(self._rev - max(0, keep))

    def _compact_locked(self, revision: int) -> int:
        if revision <= self._compacted:
            return 0
        self._db.execute(
            "INSERT INTO compacted (resource, rev) SELECT resource, MAX(rev) FROM history "
            "WHERE rev <= ? GROUP BY resource "
            "ON CONFLICT (resource) DO UPDATE SET rev = max(rev, excluded.rev)",
            (revision,),
        )
        removed = self._db.execute("DELETE FROM history WHERE rev <= ?", (revision,)).rowcount
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (revision,))
        self._compacted = revision
        return int(removed)


class _ListQuery:
    """The SQL of a list: current state, or the state at an older revision."""

    def __init__(
        self,
        res: ResourceInfo,
        namespace: str | None,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> None:
        self.res = res
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.rows_filter = compile_for_rows(res, labels, fields)

    def sql(
        self, target: int, current: int, start: tuple[str, str] | None
    ) -> tuple[str, tuple[object, ...]]:
        """A query for (namespace, name, data, rev) rows in key order, after `start`."""
        where = ["resource = ?"]
        params: list[object] = [self.res.key]
        if self.namespace is not None:
            where.append("namespace = ?")
            params.append(self.namespace)
        if start is not None:
            where.append("(namespace, name) > (?, ?)")
            params.extend(start)
        flt = self.rows_filter
        if target == current:
            sql = (
                f"SELECT namespace, name, data, rev FROM objects WHERE {' AND '.join(where)} "
                f"AND {flt.sql} ORDER BY namespace, name"
            )
            return sql, (*params, *flt.params)
        # The state at `target`: objects unchanged since, plus the pre-image of the first later
        # change of every object changed since (unless that change created it).
        old_flt = compile_for_json("old", self.labels, self.fields)
        sub_where = ["rev > ?", "resource = ?"]
        sub_params: list[object] = [target, self.res.key]
        if self.namespace is not None:
            sub_where.append("namespace = ?")
            sub_params.append(self.namespace)
        outer = ["type != 'ADDED'"]
        outer_params: list[object] = []
        if start is not None:
            outer.append("(namespace, name) > (?, ?)")
            outer_params.extend(start)
        sql = (
            f"SELECT namespace, name, data, rev FROM objects WHERE {' AND '.join(where)} "
            f"AND rev <= ? AND {flt.sql} "
            "UNION ALL "
            "SELECT namespace, name, old AS data, 0 AS rev FROM (SELECT namespace, name, type, "
            f"old, MIN(rev) FROM history WHERE {' AND '.join(sub_where)} "
            f"GROUP BY namespace, name) WHERE {' AND '.join(outer)} AND {old_flt.sql} "
            "ORDER BY 1, 2"
        )
        all_params = (
            *params, target, *flt.params, *sub_params, *outer_params, *old_flt.params,
        )  # fmt: skip
        return sql, all_params


@dataclasses.dataclass(frozen=True)
class _WatchQuery:
    """A compiled history query for one watch filter."""

    sql: str
    select_params: tuple[object, ...]
    where_params: tuple[object, ...]
    filtered: bool
    resource: str | None

    @classmethod
    def build(
        cls,
        res: ResourceInfo | None,
        namespace: str | None,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> _WatchQuery:
        where = ["rev > ?", "rev <= ?"]
        where_params: list[object] = []
        if res is not None:
            where.append("resource = ?")
            where_params.append(res.key)
            if not res.namespaced:
                namespace = None
        if namespace:
            where.append("namespace = ?")
            where_params.append(namespace)
        filtered = labels is not None or fields is not None
        select = "rev, type, resource, namespace, name, data, old"
        select_params: tuple[object, ...] = ()
        if filtered:
            new_f = compile_for_json("data", labels, fields)
            old_f = compile_for_json("old", labels, fields)
            select += f", {new_f.sql}, CASE WHEN old IS NULL THEN 0 ELSE {old_f.sql} END"
            select_params = (*new_f.params, *old_f.params)
            where.append(f"({new_f.sql} OR (old IS NOT NULL AND {old_f.sql}))")
            where_params.extend((*new_f.params, *old_f.params))
        sql = f"SELECT {select} FROM history WHERE {' AND '.join(where)} ORDER BY rev LIMIT ?"
        return cls(sql, select_params, tuple(where_params), filtered, res.key if res else None)

    def events(self, rows: list[Any]) -> list[WatchEvent]:
        out: list[WatchEvent] = []
        for row in rows:
            rev, type_, resource, ns, name, data, old = row[:7]
            if self.filtered:
                new_ok, old_ok = bool(row[7]), bool(row[8])
                if type_ == "MODIFIED":
                    if not old_ok:
                        type_ = "ADDED"
                    elif not new_ok:
                        type_ = "DELETED"
                        prev = json.loads(old)
                        prev["metadata"]["resourceVersion"] = str(rev)
                        data = dumps(prev)
                elif not new_ok:
                    continue
            out.append(WatchEvent(type_, rev, resource, ns, name, data, old))
        return out


class WatchCursor:
    """A sans-I/O watch: call `poll()` when the store reports a commit (see `Store.subscribe`);
    it returns the new events for this watch and advances. `revision` is where it stands (send
    it in bookmarks; a new cursor from it resumes exactly there)."""

    def __init__(
        self,
        store: Store,
        res: ResourceInfo | None,
        *,
        resource_version: int | None,
        namespace: str | None = None,
        label_selector: str | LabelSelector | None = None,
        field_selector: str | FieldSelector | None = None,
    ) -> None:
        labels, fields = _as_labels(label_selector), _as_fields(field_selector)
        self.store = store
        self.resource = res
        self._query = _WatchQuery.build(res, namespace, labels, fields)
        self._initial: list[WatchEvent] = []
        if resource_version is None:
            if res is None:
                raise BadRequest("a watch across resources needs a resourceVersion")
            rows, self.revision = store._list_rows(res, namespace, labels, fields)
            self._initial = [
                WatchEvent("ADDED", rev, res.key, ns, name, raw) for ns, name, raw, rev in rows
            ]
        else:
            with store._read() as (_, compacted):
                store._check_history(resource_version, compacted, self._query.resource)
            self.revision = resource_version

    def poll(self, limit: int | None = None) -> list[WatchEvent]:
        """Events since the last poll (at most `limit` history rows are read); Gone if the
        store compacted past this cursor (the client must relist)."""
        if self._initial:
            events, self._initial = self._initial, []
            return events
        batch = self.store._events(self._query, self.revision, limit)
        self.revision = batch.revision
        return batch.events
