"""kubeconfig files (client-go's `clientcmd/api/v1` `Config`), as kubeadm writes `admin.conf`.

One cluster (server URL + `certificate-authority-data`), one user (embedded client certificate
and key, or a bearer token), one context joining them, and `current-context` set to it. Written
atomically with mode 0600: it holds a private key or a token.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from edgeweave.pki.ca import CertificateAuthority, IssuedCert
from edgeweave.pki.files import PRIVATE_MODE, write_atomic
from edgeweave.pki.identity import ADMIN

ADMIN_KUBECONFIG = "admin.kubeconfig"
DEFAULT_CLUSTER = "edgeweave"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def kubeconfig_document(
    *,
    server: str,
    ca_cert_pem: bytes,
    user: str,
    client: IssuedCert | None = None,
    token: str | None = None,
    cluster: str = DEFAULT_CLUSTER,
) -> dict[str, Any]:
    """The kubeconfig as a dict; the user authenticates with `client` or with `token`."""
    if (client is None) == (token is None):
        raise ValueError("give exactly one of client (certificate) or token")
    credentials: dict[str, str]
    if client is not None:
        credentials = {
            "client-certificate-data": _b64(client.cert_pem()),
            "client-key-data": _b64(client.key_pem()),
        }
    else:
        credentials = {"token": str(token)}
    context = f"{user}@{cluster}"  # kubeadm's naming: kubernetes-admin@kubernetes
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert_pem)},
            },
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }


def write_kubeconfig(path: Path, document: dict[str, Any]) -> None:
    """Write `document` as YAML to `path`, atomically, mode 0600."""
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    write_atomic(path, text.encode("utf-8"), mode=PRIVATE_MODE)


def write_admin_kubeconfig(
    path: Path, ca: CertificateAuthority, server: str, *, now: dt.datetime | None = None
) -> IssuedCert:
    """Issue a fresh admin client certificate (`admin` / `system:masters`) and write a
    kubeconfig for it at `path` (cloudcore: `DATA_DIR/admin.kubeconfig`)."""
    client = ca.issue_client_cert(ADMIN, now=now)
    document = kubeconfig_document(
        server=server, ca_cert_pem=ca.cert_pem(), user=ADMIN.user, client=client
    )
    write_kubeconfig(path, document)
    return client
