"""cloudcore's controllers: scheduler, Deployments, Endpoints/EndpointSlices, NodeGroups, GC.

Each controller module holds pure `reconcile` functions (cached objects and `now` in, a
`Result` of actions out) and a small `Controller` class that maps cache changes to work keys;
`runner` is the async loop that feeds them from informers and applies their actions through
`edgeweave.kube.client.KubeClient`; `manager.ControllerManager` runs them all on one client.
See docs/reference/controllers.md.
"""

from cloudcore.controllers.actions import Action, Bind, Create, Delete, Patch, Result, Update
from cloudcore.controllers.manager import (
    ALL_CONTROLLERS,
    CLUSTER_CONTROLLERS,
    ControllerManager,
    ManagerConfig,
)
from cloudcore.controllers.runner import ControllerRunner, RunnerConfig

__all__ = [
    "ALL_CONTROLLERS",
    "CLUSTER_CONTROLLERS",
    "Action",
    "Bind",
    "ControllerManager",
    "ControllerRunner",
    "Create",
    "Delete",
    "ManagerConfig",
    "Patch",
    "Result",
    "RunnerConfig",
    "Update",
]
