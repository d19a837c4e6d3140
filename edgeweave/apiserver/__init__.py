"""The embedded Kubernetes-compatible API server (aiohttp over `edgeweave.kube.Store`).

cloudcore serves it with TLS on `:6443`; edgecore's MetaServer will serve the same code over its
local store on 127.0.0.1 without TLS (`TrustLocal` + `AllowAll`). See
docs/reference/apiserver.md.

| module | holds |
|---|---|
| `server` | `start_api_server`, `RunningServer` |
| `config` | `ApiServerConfig` |
| `app` | dispatch: authentication, authorization, discovery, OpenAPI, resources |
| `handlers` | resource requests over HTTP, watch streams |
| `rest` | the verbs over the store (sync): transactions, dry run, patches |
| `requestinfo`, `params`, `codec` | URL, query parameters, bodies and media types (pure) |
| `k8sproto`, `protobuf` | Kubernetes protobuf bodies (kubectl >= 1.32 typed clients); wire codec |
| `validation` | `fieldValidation` (unknown/duplicate fields) |
| `admission`, `serviceip` | Service defaults and ClusterIPs, Secrets, NodeRestriction |
| `watch` | `WatchHub`: one reader per store, fan-out to every watcher |
| `tables` | meta.k8s.io Tables for `kubectl get` |
| `auth` | `Authenticator`/`Authorizer` protocols and implementations |
| `discovery`, `openapi` | discovery and OpenAPI documents |
| `metrics` | Prometheus counters at `/metrics` |
| `testing` | `ApiHarness`: a live server in a thread, for tests of anything that uses the API |
"""

from edgeweave.apiserver.auth import (
    AllowAll,
    Attributes,
    Authenticator,
    Authorizer,
    CertOrToken,
    ClusterAuthorizer,
    Credentials,
    Decision,
    TrustLocal,
)
from edgeweave.apiserver.config import ApiServerConfig
from edgeweave.apiserver.server import RunningServer, start_api_server

__all__ = [
    "AllowAll",
    "ApiServerConfig",
    "Attributes",
    "Authenticator",
    "Authorizer",
    "CertOrToken",
    "ClusterAuthorizer",
    "Credentials",
    "Decision",
    "RunningServer",
    "TrustLocal",
    "start_api_server",
]
