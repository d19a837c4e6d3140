"""Who is at the other end of a tunnel: Noise static keys bound to node certificates.

Every node has a long-lived X25519 static key for the tunnel and a node certificate from the
cluster CA (CN `system:node:{node}`, O `system:nodes`, see `edgeweave.pki`). Inside each Noise
handshake message a node sends its certificate and an *attestation*: a signature by the
certificate's key over

    "edgeweave tunnel attestation v1\\0" | Noise static public key (32) | overlay address (4|16)

Noise proves the sender holds the static key; the signature proves the certificate's owner
vouches for that static key and for the overlay address it claims; the verifier checks the
certificate against the CA and the claimed address against the mesh registry. A node therefore
cannot borrow another node's static key (no signature from that node's certificate key), nor
claim another node's overlay address (the registry does not list it for that node).

`PeerVerifier` is the seam; `CAPeerVerifier` is the real thing. Refusals are `PeerRejected`
subclasses (remote errors: the handshake is dropped, never the daemon).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeweave.pki.identity import Identity, is_valid_node_name
from meshd.tunnel.noise import DHLEN, NoiseError, dh, public_bytes
from meshd.tunnel.wire import MAX_SIGNATURE, OverlayAddress

ATTESTATION_CONTEXT = b"edgeweave tunnel attestation v1\x00"
"""Domain separation: this signature can never be mistaken for any other signed message."""

CertificateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""Private keys a node certificate may have (cloudcore issues ECDSA P-256)."""


class PeerRejected(Exception):
    """The peer's identity is not acceptable; the handshake is refused (a remote error)."""


class UntrustedCertificate(PeerRejected):
    """The certificate does not parse or was not issued by the cluster CA."""


class CertificateExpired(PeerRejected):
    """The certificate is outside its validity period."""


class NotANodeCertificate(PeerRejected):
    """The certificate is valid but is no node's (`system:node:{name}` in `system:nodes`,
    with clientAuth, is required)."""


class BadAttestation(PeerRejected):
    """The signature over the static key and overlay address does not verify."""


class OverlayNotAllowed(PeerRejected):
    """The node claims an overlay address the registry does not give it."""


def attestation_message(static_public: bytes, overlay: OverlayAddress) -> bytes:
    """The bytes a node signs with its certificate key to vouch for its tunnel static key."""
    if len(static_public) != DHLEN:
        raise ValueError("static_public must be 32 bytes")
    return ATTESTATION_CONTEXT + static_public + overlay.packed


def certificate_node(cert: x509.Certificate) -> str | None:
    """The node a certificate names, by the Kubernetes rule (`edgeweave.pki.Identity`):
    exactly one CN `system:node:{name}`, group `system:nodes` among its O values."""
    common_names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    groups = tuple(
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    )
    if len(common_names) != 1:
        return None
    node = Identity(common_names[0], groups).node_name
    return node if node is not None and is_valid_node_name(node) else None


def _sign(key: CertificateKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(message)


def _verify(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise BadAttestation(f"unsupported certificate key type {type(key).__name__}")
    except InvalidSignature:
        raise BadAttestation("attestation signature does not verify") from None


@dataclass(frozen=True)
class LocalIdentity:
    """This node's tunnel identity. Build it with `create`."""

    node: str
    """Node name, from the certificate."""
    static_key: X25519PrivateKey
    """The long-lived Noise static key."""
    static_public: bytes
    """Its public half (what the mesh registry publishes)."""
    overlay: OverlayAddress
    """This node's overlay address."""
    certificate: bytes
    """The node certificate, DER."""
    signature: bytes
    """Attestation signature over `static_public` and `overlay`, by the certificate's key."""

    @classmethod
    def create(
        cls,
        static_key: X25519PrivateKey,
        certificate: x509.Certificate,
        certificate_key: CertificateKey,
        overlay: OverlayAddress,
    ) -> LocalIdentity:
        """Sign the attestation once; raises ValueError if the certificate is no node's or the
        key does not belong to it (local misuse)."""
        node = certificate_node(certificate)
        if node is None:
            raise ValueError("not a node certificate (CN system:node:NAME, O system:nodes)")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if certificate.public_key().public_bytes(der, spki) != (
            certificate_key.public_key().public_bytes(der, spki)
        ):
            raise ValueError("certificate_key does not belong to the certificate")
        static_public = public_bytes(static_key)
        signature = _sign(certificate_key, attestation_message(static_public, overlay))
        if len(signature) > MAX_SIGNATURE:
            raise ValueError("certificate key makes signatures too long for the handshake")
        return cls(
            node,
            static_key,
            static_public,
            overlay,
            certificate.public_bytes(serialization.Encoding.DER),
            signature,
        )


@dataclass(frozen=True)
class Peer:
    """A node we may tunnel to, as the mesh registry describes it."""

    node: str
    """Node name."""
    static_public: bytes
    """Its Noise static public key (32 bytes)."""

    def __post_init__(self) -> None:
        if len(self.static_public) != DHLEN:
            raise ValueError("static_public must be a 32-byte X25519 public key")
        try:  # a small-order point would make every DH all zeros: refuse it now
            dh(X25519PrivateKey.generate(), self.static_public)
        except NoiseError:
            raise ValueError("static_public is not a usable X25519 public key") from None


@dataclass(frozen=True)
class IdentityClaim:
    """What a handshake message says about its sender, before anyone believed it."""

    certificate: bytes
    """The node certificate, DER."""
    signature: bytes
    """The attestation signature by the certificate's key."""
    static_public: bytes
    """The sender's Noise static key (Noise has proven the sender holds it)."""
    overlay: OverlayAddress
    """The overlay address the sender claims."""


class PeerVerifier(Protocol):
    """Decides whether a handshake's identity claim holds at wall-clock time `now` (Unix
    seconds); returns the verified node name or raises `PeerRejected`."""

    def __call__(self, claim: IdentityClaim, now: float) -> str: ...


OverlayRegistry = Callable[[str], Iterable[OverlayAddress]]
"""node name -> the overlay addresses the mesh registry assigns to it (empty if unknown)."""


class CAPeerVerifier:
    """Accepts node certificates issued directly by the cluster CA, valid at `now`, whose
    attestation verifies and whose claimed overlay address the registry assigns to that node."""

    def __init__(
        self, ca_certificate: x509.Certificate, overlay_addresses: OverlayRegistry
    ) -> None:
        self.ca_certificate = ca_certificate
        """The cluster CA certificate (`CertificateAuthority.cert`, or `ca.crt` read)."""
        self.overlay_addresses = overlay_addresses
        """The registry's overlay addresses per node."""

    def __call__(self, claim: IdentityClaim, now: float) -> str:
        try:
            cert = x509.load_der_x509_certificate(claim.certificate)
            cert.verify_directly_issued_by(self.ca_certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise UntrustedCertificate("certificate is not one the cluster CA issued") from None
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise CertificateExpired(
                f"certificate valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, now is {when:%Y-%m-%dT%H:%M:%SZ}"
            )
        node = certificate_node(cert)
        if node is None or not _allows_client_auth(cert):
            raise NotANodeCertificate(f"{cert.subject.rfc4514_string()!r} is not a node")
        _verify(cert, claim.signature, attestation_message(claim.static_public, claim.overlay))
        if claim.overlay not in set(self.overlay_addresses(node)):
            raise OverlayNotAllowed(f"node {node} may not use overlay address {claim.overlay}")
        return node


def _allows_client_auth(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # a malformed extension
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage
