"""The registry of benchmark suites (one module each)."""

from __future__ import annotations

from bench import kubeapi
from bench.harness import Suite

SUITES: dict[str, Suite] = {
    "kubeapi": Suite("kubeapi", "embedded Kubernetes API vs etcd: writes, lists, watch fan-out",
                     kubeapi.run),
}
