"""Structured logs: one line per event, `key=value` pairs naming the node/peer/session concerned."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


class KeyValueFormatter(logging.Formatter):
    """`2026-11-22T16:00:00.123Z INFO meshd.stun event=binding peer=1.2.3.4:5 ...`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name} "
                f"{record.getMessage()}")
        fields: dict[str, Any] = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event `name` with its fields, e.g. `event(log, INFO, "stun.listen", addr=a)`."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


def setup(level: str = "info") -> None:
    """Send logs to stderr in the key=value format; stdout stays for command output."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
