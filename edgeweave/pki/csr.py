"""Certificate signing requests from edges (KubeEdge's `GET /edge.crt` body).

A CSR is accepted only if it parses (PEM, or DER as KubeEdge's edgecore sends it), its
self-signature verifies (proof the requester holds the key) and its key is one we sign for.
Its subject and extensions are never used: the CA decides the identity (see `ca.sign_node_csr`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from edgeweave.pki.errors import CSRError

MAX_CSR_BYTES = 64 * 1024
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS = 2048


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse and check one CSR; raise `CSRError` for anything we would not sign."""
    if len(data) > MAX_CSR_BYTES:
        raise CSRError(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            request = x509.load_pem_x509_csr(data)
        else:
            request = x509.load_der_x509_csr(data)
    except ValueError:
        raise CSRError("not a PEM or DER certificate signing request") from None
    try:
        valid = request.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        raise CSRError("the CSR's signature algorithm is not supported") from None
    if not valid:
        raise CSRError("the CSR's signature does not verify (not signed by its own key)")
    return request


def csr_public_key(request: x509.CertificateSigningRequest) -> CertificatePublicKeyTypes:
    """The CSR's key if it is one we sign for: EC P-256/384/521, RSA >= 2048 bits, Ed25519."""
    try:
        key = request.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CSRError("the CSR's public key cannot be read") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CSRError(
        f"refusing a {type(key).__name__} key: need EC P-256/384/521, RSA >= 2048 or Ed25519"
    )
