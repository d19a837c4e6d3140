"""Prometheus metrics of the API server, served at `/metrics` (text format 0.0.4).

| metric | type | meaning |
|---|---|---|
| `apiserver_request_total{verb,resource,code}` | counter | requests answered (¹) |
| `apiserver_request_duration_seconds` | summary | time to answer (watches: whole stream) |
| `apiserver_watchers` | gauge | open watch streams |
| `apiserver_watch_events_total` | counter | events queued to watchers |
| `apiserver_watchers_closed_slow_total` | counter | watchers closed for falling behind |

¹ `resource` is `group/resource` (`pods`, `apps/deployments`), or `/first-path-segment` for
non-resource requests (`/api`, `/openapi`, `/healthz`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters kept by the request path; `render` formats them with live gauges."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.duration_sum = 0.0
        self.duration_count = 0

    def observe(self, verb: str, resource: str, code: int, seconds: float) -> None:
        """Record one answered request."""
        self.requests[(verb, resource, code)] += 1
        self.duration_sum += seconds
        self.duration_count += 1

    def render(self, gauges: dict[str, Callable[[], float]]) -> str:
        """The exposition text."""
        lines = [
            "# HELP apiserver_request_total Requests answered.",
            "# TYPE apiserver_request_total counter",
        ]
        for (verb, resource, code), count in sorted(self.requests.items()):
            lines.append(
                f'apiserver_request_total{{verb="{_label(verb)}",resource="{_label(resource)}",'
                f'code="{code}"}} {count}'
            )
        lines += [
            "# HELP apiserver_request_duration_seconds Time to answer a request.",
            "# TYPE apiserver_request_duration_seconds summary",
            f"apiserver_request_duration_seconds_sum {self.duration_sum:.6f}",
            f"apiserver_request_duration_seconds_count {self.duration_count}",
        ]
        for name, read in sorted(gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE {name} {kind}", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
