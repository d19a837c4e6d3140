"""cloudcore's configuration file (YAML, camelCase keys; reference: docs/reference/cloudcore.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """The embedded Kubernetes-compatible API (used when no kubeconfig is given)."""

    bind: str = "0.0.0.0"  # listen address
    port: int = 6443  # HTTPS port, as kube-apiserver's
    service_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network("10.96.0.0/16")  # ClusterIPs
    advertise: list[str] = dataclasses.field(default_factory=list)  # extra serving-cert SANs
    token_file: Path | None = None  # static bearer tokens (kube-apiserver --token-auth-file)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("api.port: must be within 0..65535")


@dataclasses.dataclass(frozen=True)
class CloudcoreConfig:
    """Where cloudcore keeps its state and which control plane it uses."""

    data_dir: Path = Path("/var/lib/edgeweave/cloudcore")  # CA, SQLite store, admin.kubeconfig
    kubeconfig: Path | None = None  # use this cluster instead of the embedded API
    api: ApiConfig = ApiConfig()
    controllers: bool = True  # run scheduler, deployment, endpoints and node-group controllers
