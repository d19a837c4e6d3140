"""The cluster PKI: CA, certificates, TLS contexts, tokens and kubeconfig files.

cloudcore keeps under `--data-dir DIR`: `DIR/pki/ca.crt` + `DIR/pki/ca.key` (the CA, created on
first start) and `DIR/admin.kubeconfig`. See docs/reference/pki.md.

Modules: `ca` (CA lifecycle and issuing), `identity` (users and groups), `tls` (ssl contexts,
identity of a peer certificate), `tokens` (static token file, join token), `jwt` (HS256 codec),
`kubeconfig`, `files` (atomic writes), `errors`.
"""

from edgeweave.pki.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_VALIDITY,
    CertificateAuthority,
    IssuedCert,
    read_cert,
    read_key,
)
from edgeweave.pki.errors import (
    BadSignature,
    CAHashMismatch,
    CSRError,
    MalformedToken,
    PKIError,
    PKIFileError,
    TokenError,
    TokenExpired,
    TokenFileError,
)
from edgeweave.pki.identity import ADMIN, Identity, node_identity
from edgeweave.pki.kubeconfig import (
    ADMIN_KUBECONFIG,
    kubeconfig_document,
    write_admin_kubeconfig,
    write_kubeconfig,
)
from edgeweave.pki.tls import ClientAuth, client_context, peer_identity, server_context
from edgeweave.pki.tokens import (
    JoinToken,
    StaticTokens,
    bearer_token,
    make_join_token,
    parse_token_file,
    verify_join_jwt,
    verify_join_token,
)

PKI_SUBDIR = "pki"
"""cloudcore's CA lives in `DATA_DIR/pki` (kubeadm: /etc/kubernetes/pki)."""

__all__ = [
    "ADMIN",
    "ADMIN_KUBECONFIG",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_VALIDITY",
    "PKI_SUBDIR",
    "BadSignature",
    "CAHashMismatch",
    "CSRError",
    "CertificateAuthority",
    "ClientAuth",
    "Identity",
    "IssuedCert",
    "JoinToken",
    "MalformedToken",
    "PKIError",
    "PKIFileError",
    "StaticTokens",
    "TokenError",
    "TokenExpired",
    "TokenFileError",
    "bearer_token",
    "client_context",
    "kubeconfig_document",
    "make_join_token",
    "node_identity",
    "parse_token_file",
    "peer_identity",
    "read_cert",
    "read_key",
    "server_context",
    "verify_join_jwt",
    "verify_join_token",
    "write_admin_kubeconfig",
    "write_kubeconfig",
]
