"""cloudcore's configuration file (YAML, camelCase keys; reference: docs/reference/cloudcore.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CloudcoreConfig:
    """Where cloudcore keeps its state and which control plane it uses."""

    data_dir: Path = Path("/var/lib/edgeweave/cloudcore")  # CA, SQLite store, admin.kubeconfig
    kubeconfig: Path | None = None  # use this cluster instead of the embedded API
