"""`cloudcore`: the cloud side of edgeweave."""

from __future__ import annotations

from collections.abc import Sequence

from cloudcore.config import CloudcoreConfig
from edgeweave.daemon import daemon_main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cloudcore` command."""
    return daemon_main("cloudcore", "The cloud side of edgeweave: CloudHub, controllers and the "
                       "embedded Kubernetes-compatible API.", CloudcoreConfig,
                       "the embedded API and CloudHub are being built", argv)
