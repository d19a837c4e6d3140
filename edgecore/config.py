"""edgecore's configuration file (YAML, camelCase keys; reference: docs/reference/edgecore.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class EdgecoreConfig:
    """The node's identity and where edgecore keeps its local state."""

    node_name: str = ""  # defaults to the host name
    data_dir: Path = Path("/var/lib/edgeweave/edgecore")  # SQLite metadata store, certificates
