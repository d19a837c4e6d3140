"""edgeweave.pki: the CA, issuing, TLS over loopback, tokens, and kubeconfig checked by kubectl."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.pki import (
    ADMIN,
    BadSignature,
    CAHashMismatch,
    CertificateAuthority,
    ClientAuth,
    CSRError,
    Identity,
    IssuedCert,
    JoinToken,
    MalformedToken,
    PKIFileError,
    StaticTokens,
    TokenError,
    TokenExpired,
    TokenFileError,
    bearer_token,
    client_context,
    kubeconfig_document,
    make_join_token,
    node_identity,
    parse_token_file,
    peer_identity,
    server_context,
    verify_join_jwt,
    verify_join_token,
    write_admin_kubeconfig,
    write_kubeconfig,
)
from edgeweave.pki.files import create_exclusive
from edgeweave.pki.jwt import b64url_decode, b64url_encode, decode_hs256, encode_hs256

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
T0 = NOW.timestamp()
LOOPBACK = "127.0.0.1"


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def names(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def make_csr(common_name: str, key: Any = None, **subject: str) -> tuple[bytes, Any]:
    """A PEM CSR asking for `common_name` (and O=`org` if given), with a DNS SAN request."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if "org" in subject:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject["org"]))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key


# -- the CA ------------------------------------------------------------------------------------


def test_ca_is_created_on_first_start_and_loaded_afterwards(tmp_path: Path) -> None:
    pki = tmp_path / "data" / "pki"
    ca = CertificateAuthority.load_or_create(pki, now=NOW)
    crt, key = pki / "ca.crt", pki / "ca.key"
    assert crt.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = ca.cert
    assert names(cert, NameOID.COMMON_NAME) == ["edgeweave-ca"]
    assert cert.issuer == cert.subject
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=3650)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    cert.verify_directly_issued_by(cert)

    again = CertificateAuthority.load_or_create(pki, now=NOW + dt.timedelta(days=1))
    assert again.cert_der() == ca.cert_der()
    assert again.key_pem() == ca.key_pem()
    assert CertificateAuthority.load(pki).ca_hash() == ca.ca_hash()


def test_concurrent_first_starts_agree_on_one_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    barrier = threading.Barrier(8)

    def start() -> bytes:
        barrier.wait()
        return CertificateAuthority.load_or_create(pki).cert_der()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ders = list(pool.map(lambda _: start(), range(8)))
    assert len(set(ders)) == 1
    assert sorted(p.name for p in pki.iterdir()) == [".ca.lock", "ca.crt", "ca.key"]


def test_concurrent_first_starts_in_separate_processes(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from edgeweave.pki import CertificateAuthority;"
        "print(CertificateAuthority.load_or_create(Path(sys.argv[1])).ca_hash())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "pki")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    hashes_seen = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(hashes_seen) == 1


def test_exclusive_create_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert create_exclusive(path, b"first")
    assert not create_exclusive(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary left behind


@pytest.mark.parametrize(
    ("damage", "at_fault", "message"),
    [
        ("corrupt-cert", "ca.crt", "not a PEM certificate"),
        ("corrupt-key", "ca.key", "not an unencrypted PEM private key"),
        ("other-key", "ca.key", "does not match the CA certificate"),
        ("no-key", "ca.key", "missing"),
        ("no-cert", "ca.crt", "interrupted first start"),
        ("leaf-cert", "ca.crt", "not a CA certificate"),
    ],
)
def test_a_damaged_ca_names_the_file(
    tmp_path: Path, damage: str, at_fault: str, message: str
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, now=NOW)
    crt, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    other = CertificateAuthority.generate(now=NOW)
    if damage == "corrupt-cert":
        crt.write_bytes(crt.read_bytes()[:200])
    elif damage == "corrupt-key":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif damage == "other-key":
        key.write_bytes(other.key_pem())
    elif damage == "no-key":
        key.unlink()
    elif damage == "no-cert":
        crt.unlink()
    elif damage == "leaf-cert":
        leaf = ca.issue_client_cert(ADMIN, now=NOW)
        crt.write_bytes(leaf.cert_pem())
        key.write_bytes(leaf.key_pem())
    with pytest.raises(PKIFileError) as info:
        CertificateAuthority.load_or_create(tmp_path)
    assert info.value.path == tmp_path / at_fault
    assert message in str(info.value) and str(tmp_path / at_fault) in str(info.value)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CertificateAuthority.generate(now=dt.datetime(2026, 1, 1))


# -- issuing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.generate(common_name="someone-else")


def test_server_certificate_has_the_sans_and_server_auth(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_cert(
        "cloudcore",
        ips=["127.0.0.1", ipaddress.ip_address("::1")],
        dns_names=["localhost", "cloudcore.example"],
        now=NOW,
    )
    cert = issued.cert
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "cloudcore.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=365)  # default: 1 year
    assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=5)  # backdated for skew
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    with pytest.raises(ValueError, match="at least one IP or DNS name"):
        ca.issue_server_cert("nothing")


def test_serials_are_random_positive_128_bit(ca: CertificateAuthority) -> None:
    serials = {ca.issue_client_cert(ADMIN, now=NOW).cert.serial_number for _ in range(20)}
    assert len(serials) == 20
    assert all(0 < s < 2**128 for s in serials)
    assert max(serials) > 2**100  # drawn from the whole range, not a counter


@pytest.mark.parametrize(
    ("identity", "cn", "orgs"),
    [
        (ADMIN, "admin", ["system:masters"]),
        (node_identity("edge-1"), "system:node:edge-1", ["system:nodes"]),
        (Identity("alice", ("dev", "ops")), "alice", ["dev", "ops"]),
    ],
)
def test_client_certificate_carries_kubernetes_identity(
    ca: CertificateAuthority, identity: Identity, cn: str, orgs: list[str]
) -> None:
    cert = ca.issue_client_cert(identity, validity=dt.timedelta(hours=1), now=NOW).cert
    assert names(cert, NameOID.COMMON_NAME) == [cn]
    assert names(cert, NameOID.ORGANIZATION_NAME) == orgs
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=1)


def test_certificates_never_outlive_the_ca(ca: CertificateAuthority) -> None:
    cert = ca.issue_client_cert(ADMIN, validity=dt.timedelta(days=365 * 50)).cert
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_node_identity_rules() -> None:
    assert node_identity("edge-1").node_name == "edge-1"
    assert ADMIN.node_name is None
    assert Identity("system:node:x", ()).node_name is None  # the group is needed too
    with pytest.raises(ValueError, match="invalid node name"):
        node_identity("Edge_1")


def test_node_csr_gets_the_authenticated_node_identity(ca: CertificateAuthority) -> None:
    csr, key = make_csr("admin", org="system:masters")  # asks for more than it may have
    cert = ca.sign_node_csr(csr, "edge-1", now=NOW)
    cert.verify_directly_issued_by(ca.cert)
    assert names(cert, NameOID.COMMON_NAME) == ["system:node:edge-1"]
    assert names(cert, NameOID.ORGANIZATION_NAME) == ["system:nodes"]
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):  # the requested SAN is not copied
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=365)


def test_node_csr_in_der_with_server_auth_and_custom_validity(ca: CertificateAuthority) -> None:
    pem, _ = make_csr("system:node:edge-2")
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    cert = ca.sign_node_csr(der, "edge-2", server_auth=True, validity=dt.timedelta(days=30))
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30, minutes=5)


def test_csr_with_a_bad_signature_is_refused(ca: CertificateAuthority) -> None:
    pem, _ = make_csr("system:node:edge-1")
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"edge-1", b"edge-9")  # same length: still parses
    with pytest.raises(CSRError, match="signature does not verify"):
        ca.sign_node_csr(tampered, "edge-1")


@pytest.mark.parametrize(
    ("csr", "node", "message"),
    [
        (b"garbage", "edge-1", "not a PEM or DER"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n",
            "edge-1",
            "not a PEM or DER",
        ),
        (b"x" * 70_000, "edge-1", "larger than"),
        (None, "Edge/1", "invalid node name"),
        ("rsa1024", "edge-1", "need EC"),
    ],
)
def test_unacceptable_csrs_are_refused(
    ca: CertificateAuthority, csr: bytes | str | None, node: str, message: str
) -> None:
    if csr is None:
        csr, _ = make_csr("x")
    elif csr == "rsa1024":
        csr, _ = make_csr("x", key=rsa.generate_private_key(65537, 1024))
    assert isinstance(csr, bytes)
    with pytest.raises(CSRError, match=message):
        ca.sign_node_csr(csr, node)


def test_issued_pair_round_trips_through_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue_server_cert("x", dns_names=["x"])
    issued.write(tmp_path / "x.crt", tmp_path / "x.key")
    assert stat.S_IMODE((tmp_path / "x.key").stat().st_mode) == 0o600
    loaded = IssuedCert.load(tmp_path / "x.crt", tmp_path / "x.key")
    assert loaded.cert == issued.cert
    (tmp_path / "y.key").write_bytes(ca.issue_server_cert("y", dns_names=["y"]).key_pem())
    with pytest.raises(PKIFileError, match=r"y\.key: does not match"):
        IssuedCert.load(tmp_path / "x.crt", tmp_path / "y.key")


# -- TLS over loopback -------------------------------------------------------------------------


@dataclasses.dataclass
class ServerSide:
    """What the one-shot server saw."""

    identity: Identity | None = None
    error: Exception | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


@contextlib.contextmanager
def one_shot_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, ServerSide]]:
    """Accept one TLS connection on 127.0.0.1, record the peer identity, answer b"ok"."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(5)
    seen = ServerSide()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.identity = peer_identity(tls.getpeercert())
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            seen.error = exc
        finally:
            seen.done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        thread.join(5)
        listener.close()


def exchange(port: int, ctx: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        return tls.recv(2)


@pytest.fixture(scope="module")
def pki_files(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """CA files plus server, admin, node and foreign certificates as files, as ssl needs them."""
    d = tmp_path_factory.mktemp("pki")
    (d / "ca.crt").write_bytes(ca.cert_pem())
    (d / "other-ca.crt").write_bytes(other_ca.cert_pem())
    pairs = {
        "server": ca.issue_server_cert("cloudcore", ips=[LOOPBACK], dns_names=["localhost"]),
        "admin": ca.issue_client_cert(ADMIN),
        "foreign-admin": other_ca.issue_client_cert(ADMIN),
        "foreign-server": other_ca.issue_server_cert("impostor", ips=[LOOPBACK]),
    }
    csr, key = make_csr("whatever")
    pairs["node"] = IssuedCert(ca.sign_node_csr(csr, "edge-1"), key)
    files = {"ca": d / "ca.crt", "other-ca": d / "other-ca.crt"}
    for name, issued in pairs.items():
        issued.write(d / f"{name}.crt", d / f"{name}.key")
        files[f"{name}.crt"], files[f"{name}.key"] = d / f"{name}.crt", d / f"{name}.key"
    return files


def serve_ctx(f: dict[str, Path], auth: ClientAuth = ClientAuth.OPTIONAL) -> ssl.SSLContext:
    return server_context(
        f["server.crt"], f["server.key"], client_ca_file=f["ca"], client_auth=auth
    )


def client_ctx(f: dict[str, Path], who: str | None, ca: str = "ca") -> ssl.SSLContext:
    if who is None:
        return client_context(f[ca])
    return client_context(f[ca], cert_file=f[f"{who}.crt"], key_file=f[f"{who}.key"])


@pytest.mark.parametrize(
    ("who", "identity"),
    [
        ("admin", Identity("admin", ("system:masters",))),
        ("node", Identity("system:node:edge-1", ("system:nodes",))),
        (None, None),  # no certificate: allowed, the request may carry a bearer token
    ],
)
def test_handshake_and_client_identity(
    pki_files: dict[str, Path], who: str | None, identity: Identity | None
) -> None:
    with one_shot_server(serve_ctx(pki_files)) as (port, seen):
        assert exchange(port, client_ctx(pki_files, who)) == b"ok"
    assert seen.error is None
    assert seen.identity == identity
    assert seen.identity is None or seen.identity.node_name in (None, "edge-1")


def refused(port: int, ctx: ssl.SSLContext, seen: ServerSide) -> None:
    """The handshake fails. With TLS 1.3 the client may finish first and see the server's alert
    (or EOF) only on its first read."""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
        assert exchange(port, ctx) == b""
    assert seen.done.wait(5)
    assert seen.identity is None


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("foreign-admin", "unable to get local issuer certificate"),  # signed by another CA
        ("server", "unsuitable certificate purpose"),  # ours, but serverAuth only
    ],
)
def test_server_refuses_client_certificates_it_should_not_trust(
    pki_files: dict[str, Path], who: str, reason: str
) -> None:
    with one_shot_server(serve_ctx(pki_files)) as (port, seen):
        refused(port, client_ctx(pki_files, who), seen)
    assert isinstance(seen.error, ssl.SSLCertVerificationError)
    assert reason in str(seen.error)


def test_required_client_auth_refuses_anonymous(pki_files: dict[str, Path]) -> None:
    with one_shot_server(serve_ctx(pki_files, ClientAuth.REQUIRED)) as (port, seen):
        refused(port, client_ctx(pki_files, None), seen)
    assert isinstance(seen.error, ssl.SSLError)


def test_client_refuses_a_server_from_another_ca(pki_files: dict[str, Path]) -> None:
    ctx = server_context(pki_files["foreign-server.crt"], pki_files["foreign-server.key"])
    with one_shot_server(ctx) as (port, seen), pytest.raises(ssl.SSLCertVerificationError):
        exchange(port, client_ctx(pki_files, "admin"))
    assert seen.done.wait(5) and seen.identity is None


def test_contexts_name_bad_files(pki_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PKIFileError, match="missing"):
        client_context(tmp_path / "nope.crt")
    bad = tmp_path / "bad.crt"
    bad.write_text("not a cert\n")
    with pytest.raises(PKIFileError, match=r"bad\.crt"):
        client_context(bad)
    with pytest.raises(PKIFileError, match=r"admin\.key: unusable"):
        server_context(pki_files["server.crt"], pki_files["admin.key"])
    with pytest.raises(ValueError, match="needs client_ca_file"):
        server_context(
            pki_files["server.crt"], pki_files["server.key"], client_auth=ClientAuth.OPTIONAL
        )
    ctx = server_context(pki_files["server.crt"], pki_files["server.key"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("peercert", "identity"),
    [
        (None, None),
        ({}, None),
        ({"subject": ((("organizationName", "g"),),)}, None),  # no CN
        ({"subject": ((("commonName", ""),),)}, None),
        ({"subject": ((("commonName", "a"),), (("commonName", "b"),))}, None),  # ambiguous
        ({"subject": "garbage"}, None),
        (
            {
                "subject": (
                    (("organizationName", "g1"), ("organizationName", "g2")),
                    (("countryName", "DE"),),
                    (("commonName", "bob"),),
                )
            },
            Identity("bob", ("g1", "g2")),
        ),  # a multi-valued RDN, as Go writes several O values
    ],
)
def test_peer_identity_from_getpeercert_dicts(
    peercert: dict[str, Any] | None, identity: Identity | None
) -> None:
    assert peer_identity(peercert) == identity


# -- static token file -------------------------------------------------------------------------

TOKENS = """\
s3cret,admin,uid-1,"system:masters,ops"
node-token,system:node:edge-1,uid-2,system:nodes

plain,viewer,uid-3
extra,carol,uid-4,"a,,b",ignored-column
"""


def test_token_file_authenticates(tmp_path: Path) -> None:
    path = tmp_path / "tokens.csv"
    path.write_text(TOKENS)
    tokens = StaticTokens.load(path)
    assert len(tokens) == 4
    assert tokens.authenticate("s3cret") == Identity("admin", ("system:masters", "ops"), "uid-1")
    node = tokens.authenticate("node-token")
    assert node is not None and node.node_name == "edge-1"
    assert tokens.authenticate("plain") == Identity("viewer", (), "uid-3")
    assert tokens.authenticate("extra") == Identity("carol", ("a", "b"), "uid-4")
    for wrong in ("", "s3cre", "s3cret ", "S3CRET", "admin"):
        assert tokens.authenticate(wrong) is None


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a,b,c\nd,e\n", 2, "expected at least 3 columns (token, user name, user uid), found 2"),
        ("a,b,c\n\n,u,1\n", 3, "empty token"),
        ("a,,c\n", 1, "empty user name"),
        ("a,b,c\nx,y,z\na,d,e\n", 3, "duplicate token (also on line 1)"),
        ('a,b,c\nx,"y\n', 2, "bad CSV"),  # the unclosed quote's record starts on line 2
    ],
)
def test_token_file_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(TokenFileError) as info:
        parse_token_file(text, Path("/etc/tokens.csv"))
    assert str(info.value).startswith(f"/etc/tokens.csv:{line}: ")
    assert message in str(info.value)
    assert info.value.line == line


def test_token_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"nope\.csv: cannot read"):
        StaticTokens.load(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe,a,b\n")
    with pytest.raises(TokenFileError, match=r"bin\.csv: not UTF-8"):
        StaticTokens.load(tmp_path / "bin.csv")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("  bearer abc  ", "abc"),
        ("BEARER abc extra", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer  abc", None),  # empty second word, as Kubernetes
        ("", None),
        (None, None),
    ],
)
def test_bearer_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# -- JWT and the join token --------------------------------------------------------------------

# RFC 7515 appendix A.1: an HS256 JWS whose payload is a JWT with exp = 1300819380.
RFC7515_A1 = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
RFC7515_A1_KEY = b64url_decode(
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
)


def test_jwt_rfc7515_vector() -> None:
    claims = decode_hs256(RFC7515_A1, RFC7515_A1_KEY, now=1300819379)
    assert claims == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
    with pytest.raises(TokenExpired):
        decode_hs256(RFC7515_A1, RFC7515_A1_KEY, now=1300819380)
    with pytest.raises(BadSignature):
        decode_hs256(RFC7515_A1, b"another key", now=0)


def test_jwt_round_trip_and_header() -> None:
    token = encode_hs256({"exp": 100, "sub": "x"}, b"k")
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": "HS256", "typ": "JWT"}  # what golang-jwt writes
    assert decode_hs256(token, b"k", now=99) == {"exp": 100, "sub": "x"}
    assert decode_hs256(token, b"k", now=100, leeway=5) == {"exp": 100, "sub": "x"}


HS256 = b64url_encode(b'{"alg":"HS256"}')


def forge(header: dict[str, Any], claims: dict[str, Any] | str, key: bytes = b"k") -> str:
    """A token with an arbitrary header, correctly signed with HS256 under `key`."""
    import hashlib
    import hmac

    body = claims if isinstance(claims, str) else json.dumps(claims)
    head = f"{b64url_encode(json.dumps(header).encode())}.{b64url_encode(body.encode())}"
    sig = hmac.new(key, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64url_encode(sig)}"


@pytest.mark.parametrize(
    ("token", "error", "message"),
    [
        (forge({"alg": "none"}, {"exp": 9}), MalformedToken, "unsupported alg"),
        (forge({"alg": "HS512"}, {"exp": 9}), MalformedToken, "unsupported alg"),
        (forge({"alg": "HS256", "crit": ["x"]}, {"exp": 9}), MalformedToken, "critical"),
        (forge({"alg": "HS256"}, {"sub": "x"}), MalformedToken, "no 'exp'"),
        (forge({"alg": "HS256"}, {"exp": "9"}), MalformedToken, "NumericDate"),
        (forge({"alg": "HS256"}, {"exp": True}), MalformedToken, "NumericDate"),
        (forge({"alg": "HS256"}, '{"exp":9,"exp":99}'), MalformedToken, "duplicate"),
        (forge({"alg": "HS256"}, "[1]"), MalformedToken, "not a JSON object"),
        (forge({"alg": "HS256"}, {"exp": 9, "nbf": 5}), TokenExpired, "not valid before"),
        (forge({"alg": "HS256"}, {"exp": 9}, key=b"x"), BadSignature, "does not verify"),
        (forge({"alg": "HS256"}, {"exp": 3}), TokenExpired, "expired"),
        ("a.b", MalformedToken, "3 dot-separated parts"),
        (f"{HS256}.e30.AB=", MalformedToken, "base64url"),
        (f"{HS256}.e30.AB+/", MalformedToken, "base64url"),
        (f"{HS256}.e30.AB", MalformedToken, "non-canonical"),
        (f"{HS256}.e30.A", MalformedToken, "base64url"),
        ("e30.e30.", MalformedToken, "unsupported alg None"),
        ("x" * 9000, MalformedToken, "longer than"),
    ],
)
def test_jwt_refusals(token: str, error: type[TokenError], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_hs256(token, b"k", now=4)


@settings(max_examples=300, derandomize=True)
@given(st.text(alphabet="eyJ0.-_abcAB=+/", max_size=80) | st.text(max_size=40))
def test_jwt_garbage_only_raises_token_errors(text: str) -> None:
    with contextlib.suppress(TokenError):
        decode_hs256(text, b"k", now=0)
    with contextlib.suppress(TokenError):
        JoinToken.parse(text)


def test_join_token_round_trip(ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    key = ca.join_token_key()
    token = make_join_token(ca.cert_der(), key, now=T0, ttl_s=3600)
    text = str(token)
    assert text.startswith(ca.ca_hash() + ".") and text.count(".") == 3
    assert JoinToken.parse(text) == token
    claims = verify_join_token(text, ca_cert_der=ca.cert_der(), key=key, now=T0 + 3599)
    assert claims == {"exp": int(T0) + 3600}
    assert verify_join_jwt(token.jwt, key, now=T0) == claims  # the cloud sees only the JWT
    with pytest.raises(TokenExpired):
        verify_join_token(text, ca_cert_der=ca.cert_der(), key=key, now=T0 + 3600)
    with pytest.raises(CAHashMismatch, match="does not match"):
        verify_join_token(text, ca_cert_der=other_ca.cert_der(), key=key, now=T0)
    with pytest.raises(BadSignature):
        verify_join_jwt(token.jwt, other_ca.join_token_key(), now=T0)


def test_join_token_key_survives_a_restart(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    again = CertificateAuthority.load_or_create(tmp_path)
    assert first.join_token_key() == again.join_token_key()
    assert len(first.join_token_key()) == 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc.def.ghi.jkl", "CA hash"),
        ("f" * 64, "CA hash"),
        ("g" * 64 + ".a.b.c", "CA hash"),
        ("f" * 64 + ".a.b", "not a JWT"),
    ],
)
def test_join_token_shape(text: str, message: str) -> None:
    with pytest.raises(MalformedToken, match=message):
        JoinToken.parse(text)


# -- kubeconfig --------------------------------------------------------------------------------


def test_kubeconfig_document_and_atomic_write(ca: CertificateAuthority, tmp_path: Path) -> None:
    path = tmp_path / "admin.kubeconfig"
    path.write_text("old")
    path.chmod(0o644)
    write_kubeconfig(
        path, kubeconfig_document(server="https://h:6443", ca_cert_pem=b"CA", user="u", token="t")
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc["users"] == [{"name": "u", "user": {"token": "t"}}]
    assert doc["current-context"] == "u@edgeweave"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.kubeconfig"]
    with pytest.raises(ValueError, match="exactly one"):
        kubeconfig_document(server="s", ca_cert_pem=b"", user="u")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl missing: apt-get install -y kubernetes-client (dev/setup)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_kubectl(kubeconfig: Path, home: Path, *args: str) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    done = subprocess.run(
        [kubectl(), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kubectl_reads_the_admin_kubeconfig(ca: CertificateAuthority, tmp_path: Path) -> None:
    path = tmp_path / "admin.kubeconfig"
    client = write_admin_kubeconfig(path, ca, "https://127.0.0.1:6443")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def view(jsonpath: str) -> str:
        return run_kubectl(path, tmp_path, "config", "view", "--raw", "-o", f"jsonpath={jsonpath}")

    assert view("{.current-context}") == "admin@edgeweave"
    assert view("{.contexts[0].context.cluster}/{.contexts[0].context.user}") == "edgeweave/admin"
    assert view("{.clusters[0].cluster.server}") == "https://127.0.0.1:6443"
    ca_data = view("{.clusters[0].cluster.certificate-authority-data}")
    assert base64.b64decode(ca_data) == ca.cert_pem()
    cert_data = base64.b64decode(view("{.users[0].user.client-certificate-data}"))
    assert x509.load_pem_x509_certificate(cert_data) == client.cert
    assert base64.b64decode(view("{.users[0].user.client-key-data}")) == client.key_pem()
    assert view("{.users[0].name}") == "admin"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 'ok' and records the client certificate's identity."""

    seen: list[Identity | None]

    def do_GET(self) -> None:
        assert isinstance(self.connection, ssl.SSLSocket)
        self.seen.append(peer_identity(self.connection.getpeercert()))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def https_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, list[Identity | None]]]:
    seen: list[Identity | None] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_kubectl_talks_tls_to_us_with_the_admin_certificate(
    ca: CertificateAuthority, pki_files: dict[str, Path], tmp_path: Path
) -> None:
    """Go's TLS stack (kubectl) accepts our CA and server certificate and presents the admin
    certificate, which the server maps to admin / system:masters."""
    with https_server(serve_ctx(pki_files)) as (port, seen):
        path = tmp_path / "admin.kubeconfig"
        write_admin_kubeconfig(path, ca, f"https://{LOOPBACK}:{port}")
        assert run_kubectl(path, tmp_path, "get", "--raw", "/healthz") == "ok"
    assert seen and seen[-1] == ADMIN


def test_python_ssl_with_the_kubeconfig_credentials(
    ca: CertificateAuthority, pki_files: dict[str, Path], tmp_path: Path
) -> None:
    """The files decoded from admin.kubeconfig complete a handshake; the server reads admin."""
    path = tmp_path / "admin.kubeconfig"
    write_admin_kubeconfig(path, ca, "https://127.0.0.1:6443")
    doc = yaml.safe_load(path.read_text())
    for name, data in [
        ("ca.crt", doc["clusters"][0]["cluster"]["certificate-authority-data"]),
        ("admin.crt", doc["users"][0]["user"]["client-certificate-data"]),
        ("admin.key", doc["users"][0]["user"]["client-key-data"]),
    ]:
        (tmp_path / name).write_bytes(base64.b64decode(data))
    ctx = client_context(
        tmp_path / "ca.crt", cert_file=tmp_path / "admin.crt", key_file=tmp_path / "admin.key"
    )
    with one_shot_server(serve_ctx(pki_files)) as (port, seen):
        assert exchange(port, ctx) == b"ok"
    assert seen.identity == ADMIN
