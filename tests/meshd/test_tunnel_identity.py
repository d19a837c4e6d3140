"""meshd.tunnel.identity: tunnel static keys bound to node certificates from the cluster CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeweave.pki import ADMIN, CertificateAuthority, IssuedCert, node_identity
from meshd.tunnel.identity import (
    ATTESTATION_CONTEXT,
    BadAttestation,
    CAPeerVerifier,
    CertificateExpired,
    IdentityClaim,
    LocalIdentity,
    NotANodeCertificate,
    OverlayNotAllowed,
    Peer,
    PeerRejected,
    PeerVerifier,
    UntrustedCertificate,
    attestation_message,
    certificate_node,
)
from meshd.tunnel.noise import public_bytes
from meshd.tunnel.wire import OverlayAddress

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
T0 = NOW.timestamp()
OVERLAY: dict[str, OverlayAddress] = {
    "edge-1": ipaddress.IPv4Address("100.64.0.1"),
    "edge-2": ipaddress.IPv4Address("100.64.0.2"),
    "edge-6": ipaddress.IPv6Address("fd00::6"),
}


def registry(node: str) -> Iterable[OverlayAddress]:
    return [OVERLAY[node]] if node in OVERLAY else []


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(now=NOW)


@pytest.fixture(scope="module")
def verifier(ca: CertificateAuthority) -> CAPeerVerifier:
    return CAPeerVerifier(ca.cert, registry)


def node_cert(ca: CertificateAuthority, node: str, **kwargs: Any) -> IssuedCert:
    return ca.issue_client_cert(node_identity(node), now=kwargs.pop("now", NOW), **kwargs)


def identity(issued: IssuedCert, overlay: OverlayAddress) -> LocalIdentity:
    return LocalIdentity.create(X25519PrivateKey.generate(), issued.cert, issued.key, overlay)


def claim(local: LocalIdentity, **changes: Any) -> IdentityClaim:
    fields = {
        "certificate": local.certificate,
        "signature": local.signature,
        "static_public": local.static_public,
        "overlay": local.overlay,
        **changes,
    }
    return IdentityClaim(**fields)


def test_a_node_certificate_with_its_attestation_is_accepted(
    ca: CertificateAuthority, verifier: CAPeerVerifier
) -> None:
    local = identity(node_cert(ca, "edge-1"), OVERLAY["edge-1"])
    assert local.node == "edge-1"
    assert local.static_public == public_bytes(local.static_key)
    assert verifier(claim(local), T0) == "edge-1"
    assert attestation_message(local.static_public, local.overlay) == (
        ATTESTATION_CONTEXT + local.static_public + bytes([100, 64, 0, 1])
    )


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_certificates_from_edge_csrs_work_with_every_key_type(
    ca: CertificateAuthority, verifier: CAPeerVerifier, kind: str
) -> None:
    key: Any = {
        "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
        "rsa": lambda: rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }[kind]()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")]))
        .sign(key, None if kind == "ed25519" else hashes.SHA256())
    )
    cert = ca.sign_node_csr(csr.public_bytes(serialization.Encoding.DER), "edge-6", now=NOW)
    local = LocalIdentity.create(X25519PrivateKey.generate(), cert, key, OVERLAY["edge-6"])
    assert verifier(claim(local), T0) == "edge-6"


def test_a_certificate_from_another_ca_is_refused(verifier: CAPeerVerifier) -> None:
    rogue = CertificateAuthority.generate(now=NOW)  # same subject name "edgeweave-ca"
    local = identity(node_cert(rogue, "edge-1"), OVERLAY["edge-1"])
    with pytest.raises(UntrustedCertificate):
        verifier(claim(local), T0)


def test_garbage_certificates_are_refused(
    verifier: CAPeerVerifier, ca: CertificateAuthority
) -> None:
    local = identity(node_cert(ca, "edge-1"), OVERLAY["edge-1"])
    for garbage in (b"\x00", b"\x30\x03\x02\x01\x01", local.certificate[:-1], ca.cert_der()):
        with pytest.raises(PeerRejected):
            verifier(claim(local, certificate=garbage), T0)


def test_expired_and_not_yet_valid_certificates_are_refused(
    ca: CertificateAuthority, verifier: CAPeerVerifier
) -> None:
    short = node_cert(ca, "edge-1", validity=dt.timedelta(hours=1))
    local = identity(short, OVERLAY["edge-1"])
    assert verifier(claim(local), T0 + 1800) == "edge-1"
    with pytest.raises(CertificateExpired, match=r"valid .* to"):
        verifier(claim(local), T0 + 7200)
    with pytest.raises(CertificateExpired):  # NotBefore is backdated 5 minutes, no more
        verifier(claim(local), T0 - 600)


def test_certificates_that_are_no_node_s_are_refused(
    ca: CertificateAuthority, verifier: CAPeerVerifier
) -> None:
    admin = ca.issue_client_cert(ADMIN, now=NOW)
    with pytest.raises(ValueError, match="not a node certificate"):
        LocalIdentity.create(X25519PrivateKey.generate(), admin.cert, admin.key, OVERLAY["edge-1"])
    # A node-named certificate without clientAuth (a serving certificate) is no node either.
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
        x509.NameAttribute(NameOID.COMMON_NAME, "system:node:edge-1"),
    ])
    server_only = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    local = LocalIdentity.create(X25519PrivateKey.generate(), server_only, key, OVERLAY["edge-1"])
    with pytest.raises(NotANodeCertificate):
        verifier(claim(local), T0)
    assert certificate_node(admin.cert) is None
    assert certificate_node(server_only) == "edge-1"


def test_an_attestation_for_another_static_key_or_address_is_refused(
    ca: CertificateAuthority, verifier: CAPeerVerifier
) -> None:
    local = identity(node_cert(ca, "edge-1"), OVERLAY["edge-1"])
    thief_key = public_bytes(X25519PrivateKey.generate())
    with pytest.raises(BadAttestation):  # edge-1's certificate and signature, someone's key
        verifier(claim(local, static_public=thief_key), T0)
    with pytest.raises(BadAttestation):  # edge-1's signature, another address
        verifier(claim(local, overlay=OVERLAY["edge-2"]), T0)
    with pytest.raises(BadAttestation):
        verifier(claim(local, signature=b"\x30\x06\x02\x01\x01\x02\x01\x01"), T0)


def test_claiming_another_node_s_overlay_address_is_refused(
    ca: CertificateAuthority, verifier: CAPeerVerifier
) -> None:
    # edge-2 signs a claim to edge-1's address with its own, valid certificate.
    impostor = identity(node_cert(ca, "edge-2"), OVERLAY["edge-1"])
    with pytest.raises(OverlayNotAllowed, match=r"edge-2 may not use overlay address 100\.64\."):
        verifier(claim(impostor), T0)
    unknown = identity(node_cert(ca, "edge-9"), OVERLAY["edge-1"])
    with pytest.raises(OverlayNotAllowed):
        verifier(claim(unknown), T0)


def test_local_identity_checks_its_inputs(ca: CertificateAuthority) -> None:
    one, two = node_cert(ca, "edge-1"), node_cert(ca, "edge-2")
    with pytest.raises(ValueError, match="does not belong"):
        LocalIdentity.create(X25519PrivateKey.generate(), one.cert, two.key, OVERLAY["edge-1"])
    with pytest.raises(ValueError):
        attestation_message(b"short", OVERLAY["edge-1"])


def test_peer_static_keys_must_be_usable() -> None:
    assert Peer("edge-1", public_bytes(X25519PrivateKey.generate())).node == "edge-1"
    with pytest.raises(ValueError):
        Peer("edge-1", b"\x01" * 31)
    with pytest.raises(ValueError, match="not a usable"):
        Peer("edge-1", bytes(32))  # a small-order point


def test_verifier_protocol_accepts_plain_functions() -> None:
    calls: list[tuple[IdentityClaim, float]] = []

    def accept_all(claim: IdentityClaim, now: float) -> str:
        calls.append((claim, now))
        return "edge-1"

    check: PeerVerifier = accept_all
    c = IdentityClaim(b"c", b"s", bytes(32), OVERLAY["edge-1"])
    assert check(c, 1.0) == "edge-1" and calls == [(c, 1.0)]
