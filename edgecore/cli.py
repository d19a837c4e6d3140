"""`edgecore`: the edge side of edgeweave."""

from __future__ import annotations

from collections.abc import Sequence

from edgecore.config import EdgecoreConfig
from edgeweave.daemon import daemon_main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgecore` command."""
    return daemon_main("edgecore", "The edge side of edgeweave: EdgeHub, MetaManager, MetaServer, "
                       "Edged and DeviceTwin.", EdgecoreConfig,
                       "EdgeHub, MetaManager and Edged are being built", argv)
