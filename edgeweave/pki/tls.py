"""TLS contexts (stdlib `ssl`) and the identity a verified client certificate carries.

Only the cluster CA is trusted, in both directions: contexts are built from scratch
(`ssl.SSLContext(...)`), never with `ssl.create_default_context`, which would also trust the
system's public CAs. The server asks for a client certificate but, by default, lets a client
without one finish the handshake, so bearer tokens still work (kube-apiserver's `--client-ca-file`
behaviour). A certificate that *is* sent must chain to the CA and allow clientAuth.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Mapping
from pathlib import Path

from edgeweave.pki.errors import PKIFileError
from edgeweave.pki.identity import Identity

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class ClientAuth(enum.Enum):
    """How a server treats client certificates."""

    NONE = "none"
    """Do not ask for one."""
    OPTIONAL = "optional"
    """Ask; verify one if sent; accept clients without (they may bring a bearer token)."""
    REQUIRED = "required"
    """Refuse the handshake without a valid client certificate."""


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    for path in (cert_file, key_file):
        if not path.exists():
            raise PKIFileError(path, "missing")
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise PKIFileError(key_file, f"unusable with {cert_file}: {exc.reason or exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise PKIFileError(ca_file, "missing") from None
    except ssl.SSLError as exc:
        raise PKIFileError(ca_file, f"not a PEM CA certificate: {exc.reason or exc}") from None


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    client_ca_file: Path | None = None,
    client_auth: ClientAuth | None = None,
) -> ssl.SSLContext:
    """A server context (TLS >= 1.2) presenting `cert_file`. Client certificates are verified
    against `client_ca_file` as `client_auth` says; by default OPTIONAL when `client_ca_file`
    is given, else NONE."""
    if client_auth is None:
        client_auth = ClientAuth.NONE if client_ca_file is None else ClientAuth.OPTIONAL
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    _load_chain(ctx, cert_file, key_file)
    if client_auth is ClientAuth.NONE:
        return ctx
    if client_ca_file is None:
        raise ValueError(f"client_auth={client_auth.value} needs client_ca_file")
    _load_ca(ctx, client_ca_file)
    required = client_auth is ClientAuth.REQUIRED
    ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: Path,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A client context (TLS >= 1.2) that verifies the server's chain and host name against
    `ca_file` only, and presents `cert_file`/`key_file` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = MIN_TLS_VERSION
    _load_ca(ctx, ca_file)
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both cert_file and key_file, or neither")
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file)
    return ctx


def peer_identity(peercert: Mapping[str, object] | None) -> Identity | None:
    """The identity in a peer certificate as `SSLSocket.getpeercert()` returns it.

    As kube-apiserver's x509 authenticator: user = CN, groups = every O in order; no CN (or
    an empty one) means not authenticated. A subject with several CNs is refused as ambiguous.
    `getpeercert()` fills the dict only for certificates the context verified, so an identity
    from it can be trusted; it is None or {} when the client sent no certificate.
    """
    subject = peercert.get("subject") if peercert else None
    if not isinstance(subject, tuple):
        return None
    common_names: list[str] = []
    groups: list[str] = []
    for rdn in subject:
        for attr in rdn if isinstance(rdn, tuple) else ():
            if not (isinstance(attr, tuple) and len(attr) == 2 and isinstance(attr[1], str)):
                continue
            if attr[0] == "commonName":
                common_names.append(attr[1])
            elif attr[0] == "organizationName":
                groups.append(attr[1])
    if len(common_names) != 1 or not common_names[0]:
        return None
    return Identity(common_names[0], tuple(groups))
