"""The thin async side of a controller: informer changes in, work keys queued, actions applied.

Each `Controller` is pure: `keys_for(change)` says which work keys a cache change concerns and
`reconcile(key, view, now)` says what to write. A `ControllerRunner` is the client-go-style loop
around it:

- informer listeners put keys on a `WorkQueue` (a key is queued at most once; a key changed
  while being processed is processed again afterwards; never two workers on one key);
- workers start only once every informer has listed (a half-filled cache would make a
  Deployment look short of pods);
- before each reconcile a worker waits (at most `cache_wait_timeout_s`) until the informers
  reflect the writes the runner made earlier, so a decision is never made twice from a stale
  cache (client-go uses "expectations" for the same purpose);
- actions are applied through the client: Conflict and AlreadyExists mean the cache was stale
  (requeue, quietly), NotFound on a delete means done, other errors are logged and the key is
  retried with per-key exponential backoff (client-go's workqueue rate limiter);
- `Result.requeue_at` re-queues a key at a given time (minReadySeconds, progress deadlines).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cloudcore.controllers.actions import Action, Bind, Create, Delete, Patch, Result, Update
from cloudcore.controllers.view import InformerView, View
from edgeweave.kube.client import (
    DeletePreconditions,
    KubeClient,
    KubeConnectionError,
    MethodNotAllowed,
    RetryPolicy,
)
from edgeweave.kube.errors import AlreadyExists, Conflict, NotFound, StoreError
from edgeweave.kube.informer import Change, Informer, SharedInformers, resource_version
from edgeweave.kube.objects import rfc3339
from edgeweave.kube.patch import MERGE_PATCH, STRATEGIC_MERGE_PATCH
from edgeweave.kube.resources import PODS, ResourceInfo
from edgeweave.log import event

log = logging.getLogger(__name__)

Obj = dict[str, Any]
WorkKey = tuple[str, str]


class Controller(Protocol):
    """A pure controller: what to reconcile when something changes, and how."""

    name: str
    """Short name for logs and configuration (`deployment`)."""
    resources: tuple[ResourceInfo, ...]
    """The resources whose informers it reads (and whose changes wake it)."""

    def keys_for(self, resource: ResourceInfo, change: Change, view: View) -> Iterable[WorkKey]:
        """Work keys a change of `resource` concerns."""
        ...

    def initial_keys(self, view: View) -> Iterable[WorkKey]:
        """Every key to reconcile once the caches are filled."""
        ...

    def reconcile(self, key: WorkKey, view: View, now: float) -> Result:
        """What to write so that `key` reaches its desired state (pure)."""
        ...


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Tunables of a controller runner."""

    workers: int = 2
    """Keys reconciled concurrently (never the same key twice at once)."""
    retry: RetryPolicy = dataclasses.field(
        default_factory=lambda: RetryPolicy(initial_s=0.05, max_s=30.0, jitter=0.0)
    )
    """Per-key backoff after a failed reconcile (client-go's workqueue: 5 ms doubling)."""
    cache_wait_timeout_s: float = 5.0
    """Longest wait for the informers to show our own writes before reconciling again."""
    action_concurrency: int = 16
    """Writes of one reconcile in flight at once."""


class WorkQueue:
    """Keys to reconcile: de-duplicated, never handed to two workers at once, with delayed and
    rate-limited re-adds (client-go's `workqueue` semantics)."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry = retry
        self._queue: asyncio.Queue[WorkKey] = asyncio.Queue()
        self._queued: set[WorkKey] = set()
        self._processing: set[WorkKey] = set()
        self._dirty: set[WorkKey] = set()
        self._timers: dict[WorkKey, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: collections.Counter[WorkKey] = collections.Counter()

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: WorkKey) -> None:
        """Queue `key` (no-op if queued; re-queued after `done` if being processed)."""
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: WorkKey, delay: float) -> None:
        """Queue `key` in `delay` seconds (an earlier pending timer wins)."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = (when, loop.call_at(when, fire))

    def add_rate_limited(self, key: WorkKey) -> float:
        """Queue `key` after its backoff (doubling with each consecutive failure)."""
        failures = self._failures[key]
        self._failures[key] += 1
        delay = min(self.retry.max_s, self.retry.initial_s * self.retry.factor**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: WorkKey) -> None:
        """Reset `key`'s backoff (it succeeded)."""
        self._failures.pop(key, None)

    async def get(self) -> WorkKey:
        """The next key; the caller must call `done(key)` when finished."""
        key = await self._queue.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: WorkKey) -> None:
        """Finished with `key`; if it was added meanwhile, it is queued again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        """Cancel pending timers."""
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


@dataclasses.dataclass(frozen=True)
class _Expectation:
    informer: Informer
    satisfied: Callable[[], bool]
    deadline: float


class ControllerRunner:
    """Runs one `Controller` over shared informers, writing through `client`."""

    def __init__(
        self,
        controller: Controller,
        informers: SharedInformers,
        client: KubeClient,
        *,
        config: RunnerConfig = RunnerConfig(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.informers = informers
        self.client = client
        self.config = config
        self.clock = clock
        self.view = InformerView(informers)
        self.queue = WorkQueue(config.retry)
        self.reconciles = 0
        self.actions_applied = 0
        self._expectations: list[_Expectation] = []
        self._removers: list[Callable[[], None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._binding_supported: bool | None = None
        self._write_gate = asyncio.Semaphore(max(1, config.action_concurrency))

    # ---- wiring -------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register informers and listeners (before the informers start)."""
        for res in self.controller.resources:
            informer = self.informers.get(res)
            self._removers.append(informer.add_listener(self._listener(res)))

    def _listener(self, res: ResourceInfo) -> Callable[[Change], None]:
        def on_change(change: Change) -> None:
            try:
                keys = list(self.controller.keys_for(res, change, self.view))
            except Exception:
                log.exception("controller %s: keys_for failed", self.controller.name)
                return
            for key in keys:
                self.queue.add(key)

        return on_change

    def start(self) -> None:
        """Queue every key and start the workers (call once the informers have synced)."""
        for key in self.controller.initial_keys(self.view):
            self.queue.add(key)
        for i in range(max(1, self.config.workers)):
            name = f"controller-{self.controller.name}-{i}"
            self._workers.append(asyncio.create_task(self._worker(), name=name))

    async def stop(self) -> None:
        """Stop the workers (a reconcile in progress is cancelled) and detach."""
        for remove in self._removers:
            remove()
        self._removers.clear()
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.queue.close()

    # ---- the work loop ------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.process(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller %s: reconcile of %s failed", self.controller.name, key)
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)

    async def process(self, key: WorkKey) -> bool:
        """Reconcile one key and apply its actions; True if everything succeeded."""
        await self._wait_for_cache()
        now = self.clock()
        result = self.controller.reconcile(key, self.view, now)
        self.reconciles += 1
        ok = await self._apply_all(result.actions)
        if result.requeue_at is not None:
            self.queue.add_after(key, max(0.0, result.requeue_at - self.clock()))
        if ok:
            self.queue.forget(key)
        else:
            self.queue.add_rate_limited(key)
        return ok

    async def _wait_for_cache(self) -> None:
        """Wait until the informers show every write still expected (or its deadline passed).
        Expectations stay registered until met, so every worker waits for them, not only the
        first one to look."""
        if not self._expectations:
            return
        loop = asyncio.get_running_loop()
        for exp in list(self._expectations):
            remaining = exp.deadline - loop.time()
            if (
                remaining > 0
                and not exp.satisfied()
                and not await exp.informer.wait_until(exp.satisfied, remaining)
            ):
                event(
                    log,
                    logging.INFO,
                    "controller.cache_lagging",
                    controller=self.controller.name,
                    resource=exp.informer.resource.key,
                )
        now = loop.time()
        self._expectations = [
            e for e in self._expectations if e.deadline > now and not e.satisfied()
        ]

    def _expect(self, res: ResourceInfo, satisfied: Callable[[], bool]) -> None:
        informer = self.informers.get(res)
        deadline = asyncio.get_running_loop().time() + self.config.cache_wait_timeout_s
        self._expectations.append(_Expectation(informer, satisfied, deadline))

    def _expect_written(self, res: ResourceInfo, obj: Any) -> None:
        """After a write answered with `obj`: wait until the informer has seen its version."""
        rv = resource_version(obj) if isinstance(obj, dict) and obj.get("kind") != "Status" else ""
        if rv:
            informer = self.informers.get(res)
            self._expect(res, lambda: informer.has_seen(rv))

    # ---- applying actions ---------------------------------------------------------------------

    async def _apply_all(self, actions: tuple[Action, ...]) -> bool:
        if not actions:
            return True
        # Runs of the same action type go out concurrently; the order between runs is kept
        # (e.g. a Deployment's creates before its deletes, its status last).
        ok = True
        run: list[Action] = []
        for action in [*actions, None]:
            if run and (action is None or type(action) is not type(run[0])):
                results = await asyncio.gather(*(self._apply(a) for a in run))
                ok = ok and all(results)
                run = []
            if action is not None:
                run.append(action)
        return ok

    async def _apply(self, action: Action) -> bool:
        async with self._write_gate:
            try:
                await self._write(action)
            except NotFound as exc:
                if isinstance(action, Delete):
                    return True
                self._log_failure(action, exc, logging.DEBUG)
                return False
            except (Conflict, AlreadyExists) as exc:
                self._log_failure(action, exc, logging.DEBUG)
                return False
            except (StoreError, KubeConnectionError) as exc:
                self._log_failure(action, exc, logging.WARNING)
                return False
        self.actions_applied += 1
        event(
            log,
            logging.INFO,
            "controller.action",
            controller=self.controller.name,
            action=action.describe(),
            reason=action.reason,
        )
        return True

    def _log_failure(self, action: Action, exc: Exception, level: int) -> None:
        event(
            log,
            level,
            "controller.action_failed",
            controller=self.controller.name,
            action=action.describe(),
            error=f"{type(exc).__name__}: {exc}",
        )

    async def _write(self, action: Action) -> None:
        client = self.client
        if isinstance(action, Create):
            obj = await client.create(action.resource, action.body, namespace=action.namespace)
            self._expect_written(action.resource, obj)
        elif isinstance(action, Update):
            obj = await client.update(action.resource, action.body, subresource=action.subresource)
            self._expect_written(action.resource, obj)
        elif isinstance(action, Patch):
            obj = await client.patch(
                action.resource,
                action.name,
                action.body,
                namespace=action.namespace or None,
                content_type=action.content_type,
                subresource=action.subresource,
            )
            self._expect_written(action.resource, obj)
        elif isinstance(action, Delete):
            await self._delete(action)
        else:
            await self._bind(action)

    async def _delete(self, action: Delete) -> None:
        check = action.owner_check
        if check is not None:
            try:
                owner = await self.client.get(check.resource, check.name, namespace=check.namespace)
            except NotFound:
                owner = None
            if owner is not None and (owner.get("metadata") or {}).get("uid") == check.uid:
                return  # the owner exists after all: the cache was behind
        pre = DeletePreconditions(uid=action.uid) if action.uid else None
        obj = await self.client.delete(
            action.resource, action.name, namespace=action.namespace or None, preconditions=pre
        )
        if obj.get("kind") == "Status" or not resource_version(obj):
            informer = self.informers.get(action.resource)

            def gone() -> bool:
                cached = informer.get(action.name, action.namespace)
                if cached is None:
                    return True
                return bool((cached.get("metadata") or {}).get("deletionTimestamp"))

            self._expect(action.resource, gone)
        else:
            self._expect_written(action.resource, obj)

    async def _bind(self, action: Bind) -> None:
        if self._binding_supported is not False:
            try:
                answer = await self.client.bind(
                    action.namespace, action.name, action.node, uid=action.uid or None
                )
            except (NotFound, MethodNotAllowed) as exc:
                # A NotFound that names the pod means the pod is gone; one that names nothing
                # (or 405) means this server has no pods/binding: patch nodeName instead.
                if isinstance(exc, NotFound) and exc.name:
                    raise
                self._binding_supported = False
                event(log, logging.INFO, "controller.binding_unsupported", fallback="patch")
            else:
                self._binding_supported = True
                informer = self.informers.get(PODS)
                if resource_version(answer) and answer.get("kind") == "Pod":
                    self._expect_written(PODS, answer)
                else:
                    self._expect(PODS, lambda: _bound(informer, action))
                return
        patch = {
            "metadata": {"uid": action.uid, "resourceVersion": action.resource_version},
            "spec": {"nodeName": action.node},
        }
        obj = await self.client.patch(
            PODS, action.name, patch, namespace=action.namespace, content_type=MERGE_PATCH
        )
        self._expect_written(PODS, obj)
        # What the binding subresource also does: record PodScheduled=True.
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "True",
                        "lastProbeTime": None,
                        "lastTransitionTime": rfc3339(self.clock()),
                    }
                ]
            }
        }
        obj = await self.client.patch(
            PODS,
            action.name,
            status,
            namespace=action.namespace,
            content_type=STRATEGIC_MERGE_PATCH,
            subresource="status",
        )
        self._expect_written(PODS, obj)


def _bound(informer: Informer, action: Bind) -> bool:
    pod = informer.get(action.name, action.namespace)
    return pod is None or bool((pod.get("spec") or {}).get("nodeName"))
