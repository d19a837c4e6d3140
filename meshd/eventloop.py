"""The event loop every meshd process runs on: uvloop when asked for and installed.

uvloop makes the proxy's readiness-driven relay and the DNS server's datagram path faster
(docs/reference/meshd-proxy.md, "Performance"); without it the processes run on asyncio's loop
and say so once.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from edgeweave.log import event


def runner(kind: str, log: logging.Logger) -> asyncio.Runner:
    """An `asyncio.Runner` on uvloop when `kind` is "uvloop" and uvloop imports, else asyncio's
    (logged on `log` as `<logger>.no_uvloop`)."""
    if kind == "uvloop":
        try:
            uvloop: Any = importlib.import_module("uvloop")
        except ImportError:
            event(log, logging.WARNING, f"{log.name.rsplit('.', 1)[-1]}.no_uvloop",
                  using="asyncio")
        else:
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()
