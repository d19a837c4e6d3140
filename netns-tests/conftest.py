"""Shared fixtures of the privileged tests: root check and labs that always clean up."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Lab, Topology

TOPOLOGIES = Path(__file__).parent / "topologies"
NEEDED = ["ip", "nft", "conntrack", "ping"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in netns-tests needs root unless it says otherwise."""
    for item in items:
        if "netns-tests" in str(item.path) and "nonroot" not in item.keywords:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _need_root(request: pytest.FixtureRequest) -> None:
    if "nonroot" in request.keywords:
        return
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    problem = "needs root" if os.geteuid() != 0 else ""
    if missing:
        problem = f"missing tools: {', '.join(missing)} (run dev/setup)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"netns test {problem}")  # CI must never skip the kernel tests
        pytest.skip(problem)


@pytest.fixture
def make_lab() -> Iterator[Callable[[Any], Lab]]:
    """Build labs from a dict or a topology file; all are torn down, whatever happens."""
    labs: list[Lab] = []

    def make(spec: Any) -> Lab:
        if isinstance(spec, Path):
            topo = Topology.load(spec)
        elif isinstance(spec, Topology):
            topo = spec
        else:
            topo = Topology.from_dict(spec)
        lab = Lab(topo)
        labs.append(lab)
        lab.build()
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.teardown()
