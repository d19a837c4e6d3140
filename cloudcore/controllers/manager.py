"""ControllerManager: every controller on one client and one set of shared informers.

    client = KubeClient.from_kubeconfig(data_dir / "admin.kubeconfig")
    manager = ControllerManager(client)                 # all controllers (embedded API)
    await manager.start()                               # lists everything, then reconciles
    ...
    await manager.stop()
    await client.close()

Against a real cluster (`cloudcore --kubeconfig`) kube-controller-manager and kube-scheduler
already do scheduling, Deployments, Endpoints and garbage collection; only the KubeEdge
controllers should run there: `ManagerConfig(controllers=CLUSTER_CONTROLLERS)`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from cloudcore.controllers.deployment import DeploymentController
from cloudcore.controllers.endpoints import EndpointsConfig, EndpointsController
from cloudcore.controllers.gc import GarbageCollector
from cloudcore.controllers.nodegroup import NodeGroupController
from cloudcore.controllers.runner import Controller, ControllerRunner, RunnerConfig
from cloudcore.controllers.scheduler import Scheduler, SchedulerConfig
from edgeweave.kube.client import ClientConfig, KubeClient
from edgeweave.kube.informer import InformerConfig, SharedInformers
from edgeweave.log import event

log = logging.getLogger(__name__)

ALL_CONTROLLERS: tuple[str, ...] = ("scheduler", "deployment", "endpoints", "nodegroup", "gc")
"""Every controller: what cloudcore runs against its embedded API."""
CLUSTER_CONTROLLERS: tuple[str, ...] = ("nodegroup",)
"""What to run against a real cluster, whose own controllers do the rest."""


@dataclasses.dataclass(frozen=True)
class ManagerConfig:
    """Which controllers run, and their tunables."""

    controllers: tuple[str, ...] = ALL_CONTROLLERS
    """Names of the controllers to run (see `ALL_CONTROLLERS`)."""
    informer: InformerConfig = dataclasses.field(default_factory=InformerConfig)
    """List/watch paging and backoff."""
    runner: RunnerConfig = dataclasses.field(default_factory=RunnerConfig)
    """Workers, per-key backoff, cache wait."""
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    """Scheduler name and reporting."""
    endpoints: EndpointsConfig = dataclasses.field(default_factory=EndpointsConfig)
    """Endpoints / EndpointSlice options."""
    sync_timeout_s: float = 60.0
    """How long `start()` waits for the first lists before giving up."""
    clock: Callable[[], float] = time.time
    """Wall clock handed to reconcile as `now` (timestamps in objects are wall-clock)."""


def build_controller(name: str, config: ManagerConfig) -> Controller:
    """The controller called `name`; ValueError for an unknown name."""
    if name == "scheduler":
        return Scheduler(config.scheduler)
    if name == "deployment":
        return DeploymentController()
    if name == "endpoints":
        return EndpointsController(config.endpoints)
    if name == "nodegroup":
        return NodeGroupController()
    if name == "gc":
        return GarbageCollector()
    raise ValueError(f"unknown controller {name!r} (known: {', '.join(ALL_CONTROLLERS)})")


class ControllerManager:
    """Starts and stops a set of controllers sharing informers over one client."""

    def __init__(self, client: KubeClient, config: ManagerConfig = ManagerConfig()) -> None:
        self.client = client
        self.config = config
        self.informers = SharedInformers(client, config.informer)
        self.runners: dict[str, ControllerRunner] = {}
        for name in dict.fromkeys(config.controllers):
            controller = build_controller(name, config)
            self.runners[name] = ControllerRunner(
                controller, self.informers, client, config=config.runner, clock=config.clock
            )
        self._started = False
        self._owns_client = False

    @classmethod
    async def from_kubeconfig(
        cls,
        path: Path,
        *,
        context: str | None = None,
        config: ManagerConfig = ManagerConfig(),
        client_config: ClientConfig | None = None,
    ) -> ControllerManager:
        """A manager with its own client for a kubeconfig (`KubeconfigError` if unusable);
        `stop()` also closes that client."""
        client = KubeClient.from_kubeconfig(
            path, context=context, config=client_config or ClientConfig()
        )
        manager = cls(client, config)
        manager._owns_client = True
        return manager

    async def start(self) -> None:
        """Start the informers, wait until each has listed once, then start the controllers.
        Raises TimeoutError (after stopping again) if the lists do not complete within
        `sync_timeout_s`."""
        if self._started:
            return
        for runner in self.runners.values():
            runner.attach()
        self.informers.start()
        self._started = True
        if not await self.informers.wait_synced(self.config.sync_timeout_s):
            missing = [
                f"{i.resource.key} ({i.stats.last_error or 'no answer yet'})"
                for i in self.informers
                if not i.synced
            ]
            await self.stop()
            raise TimeoutError(
                f"controller manager: no complete list within {self.config.sync_timeout_s:g}s "
                f"from {self.client.server}: {'; '.join(missing)}"
            )
        for runner in self.runners.values():
            runner.start()
        event(
            log,
            logging.INFO,
            "controllers.started",
            controllers=",".join(self.runners),
            server=self.client.server,
        )

    async def stop(self) -> None:
        """Stop the controllers, then the informers. A client passed in stays open (it is
        yours); one made by `from_kubeconfig` is closed."""
        for runner in self.runners.values():
            await runner.stop()
        await self.informers.stop()
        self._started = False
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> ControllerManager:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
