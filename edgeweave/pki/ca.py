"""The cluster CA: created by cloudcore on first start, loaded afterwards; issues certificates.

Layout and profiles follow kubeadm's `/etc/kubernetes/pki` (a self-signed CA valid 10 years,
`ca.crt` + `ca.key`; leaf certificates valid 1 year) and the Kubernetes certificate signer
(`pkg/controller/certificates/authority`: random serial below 2^128, NotBefore backdated 5 minutes,
NotAfter capped at the CA's). Node certificates follow KubeEdge's `GET /edge.crt`: the edge sends a
CSR, the cloud signs it for `system:node:{node}` with client authentication.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeweave.log import event
from edgeweave.pki.csr import csr_public_key, parse_csr
from edgeweave.pki.errors import CSRError, PKIFileError
from edgeweave.pki.files import PRIVATE_MODE, create_exclusive, locked, write_atomic
from edgeweave.pki.identity import Identity, is_valid_node_name, node_identity

log = logging.getLogger("edgeweave.pki")

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CA_COMMON_NAME = "edgeweave-ca"
CA_VALIDITY = dt.timedelta(days=3650)  # kubeadm: 10 years for the CA
CERT_VALIDITY = dt.timedelta(days=365)  # kubeadm leaf certs; KubeEdge edgeCertSigningDuration
BACKDATE = dt.timedelta(minutes=5)  # the Kubernetes signer backdates NotBefore for clock skew

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""Key types a CA or an issued certificate may have."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (what kubeadm and KubeEdge generate by default)."""
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A random serial in [1, 2^128): the Kubernetes signer's range, kept positive (RFC 5280)."""
    return secrets.randbelow(2**128 - 1) + 1


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIFileError(path, "missing") from None
    except OSError as exc:
        raise PKIFileError(path, f"cannot read: {exc.strerror or exc}") from None


def read_cert(path: Path) -> x509.Certificate:
    """Load the first PEM certificate in `path`; errors name the file."""
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise PKIFileError(path, "not a PEM certificate (corrupt?)") from None


def read_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key (EC or RSA) from `path`; errors name the file."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        raise PKIFileError(path, "not an unencrypted PEM private key (corrupt?)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIFileError(path, f"unsupported key type {type(key).__name__}: need EC or RSA")
    return key


@dataclasses.dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key."""

    cert: x509.Certificate
    """The signed certificate."""
    key: PrivateKey
    """Its private key."""

    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files atomically; the key is mode 0600 from its creation."""
        write_atomic(key_path, self.key_pem(), mode=PRIVATE_MODE)
        write_atomic(cert_path, self.cert_pem())

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> IssuedCert:
        """Read a pair written by `write`; a key that does not match names `key_path`."""
        cert, key = read_cert(cert_path), read_key(key_path)
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise PKIFileError(key_path, f"does not match the certificate in {cert_path}")
        return cls(cert, key)


@dataclasses.dataclass(frozen=True)
class CertificateAuthority:
    """The cluster CA; cloudcore keeps it as `ca.crt` + `ca.key` under `DATA_DIR/pki`."""

    cert: x509.Certificate
    """The self-signed CA certificate."""
    key: PrivateKey
    """Its private key."""

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        *,
        now: dt.datetime | None = None,
        common_name: str = CA_COMMON_NAME,
        validity: dt.timedelta = CA_VALIDITY,
    ) -> CertificateAuthority:
        """A new self-signed CA in memory (ECDSA P-256, CA:TRUE, keyCertSign + cRLSign)."""
        key, start = new_key(), _now(now) - BACKDATE
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        usage = _key_usage(key_cert_sign=True, crl_sign=True)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(random_serial())
            .not_valid_before(start)
            .not_valid_after(start + BACKDATE + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load `directory/ca.crt` + `directory/ca.key`; any problem names the file at fault."""
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if not cert_path.exists() and key_path.exists():
            raise PKIFileError(
                cert_path,
                f"missing while {CA_KEY_FILE} exists (an interrupted first start "
                f"leaves this): remove {key_path} to create a new CA",
            )
        cert, key = read_cert(cert_path), read_key(key_path)
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise PKIFileError(cert_path, "not a CA certificate (basicConstraints CA:TRUE needed)")
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise PKIFileError(key_path, f"does not match the CA certificate {cert_path}")
        return cls(cert, key)

    @classmethod
    def load_or_create(
        cls, directory: Path, *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        """Load the CA under `directory`, creating it first if neither file exists.

        Concurrent first starts agree on one CA: creators serialise on `directory/.ca.lock`,
        and each file is published with link(2), which never replaces an existing file.
        `ca.key` is published before `ca.crt`, so a visible `ca.crt` always has its key.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        with locked(directory / ".ca.lock"):
            if not cert_path.exists() and not key_path.exists():
                ca = cls.generate(now=now)
                if create_exclusive(key_path, ca.key_pem(), mode=PRIVATE_MODE):
                    create_exclusive(cert_path, ca.cert_pem())
                    event(
                        log,
                        logging.INFO,
                        "pki.ca_created",
                        dir=directory,
                        serial=f"{ca.cert.serial_number:x}",
                    )
            return cls.load(directory)

    # -- what the CA tells others ---------------------------------------------------------------

    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def cert_der(self) -> bytes:
        """What KubeEdge's `GET /ca.crt` returns, and what the join token's hash covers."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def ca_hash(self) -> str:
        """sha256 of the CA certificate DER, lower-case hex (KubeEdge's `getCaHash`)."""
        return hashlib.sha256(self.cert_der()).hexdigest()

    def join_token_key(self) -> bytes:
        """The HS256 key for join tokens. KubeEdge signs them with the CA key bytes; we use a
        value derived from the CA key (so tokens survive restarts) and bound to this purpose."""
        der = self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hmac.new(der, b"edgeweave join token v1", hashlib.sha256).digest()

    # -- issuing --------------------------------------------------------------------------------

    def issue_server_cert(
        self,
        common_name: str,
        *,
        ips: Iterable[str | IPAddress] = (),
        dns_names: Iterable[str] = (),
        validity: dt.timedelta = CERT_VALIDITY,
        now: dt.datetime | None = None,
    ) -> IssuedCert:
        """A serving certificate (serverAuth) for the given IP and DNS subjectAltNames."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        if not names:
            raise ValueError("a server certificate needs at least one IP or DNS name")
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        extra = [x509.SubjectAlternativeName(names)]
        cert = self._sign(
            subject, key.public_key(), [ExtendedKeyUsageOID.SERVER_AUTH], extra, validity, now
        )
        return IssuedCert(cert, key)

    def issue_client_cert(
        self,
        identity: Identity,
        *,
        validity: dt.timedelta = CERT_VALIDITY,
        now: dt.datetime | None = None,
    ) -> IssuedCert:
        """A client certificate (clientAuth) that authenticates as `identity`: CN = user,
        one O per group, as kube-apiserver reads them."""
        key = new_key()
        cert = self._sign(
            _subject(identity),
            key.public_key(),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            [],
            validity,
            now,
        )
        return IssuedCert(cert, key)

    def sign_node_csr(
        self,
        csr: bytes,
        node_name: str,
        *,
        server_auth: bool = False,
        validity: dt.timedelta = CERT_VALIDITY,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign an edge's CSR (PEM, or DER as KubeEdge's edgecore sends it) for `node_name`.

        `node_name` must be the *authenticated* name. The requested subject and extensions are
        ignored: the certificate always says `system:node:{node_name}` / `system:nodes`, so a
        node can never obtain another node's (or an admin's) identity. Usage is clientAuth,
        plus serverAuth when asked (KubeEdge's optional `ExtKeyUsages` header).
        """
        request = parse_csr(csr)
        if not is_valid_node_name(node_name):
            raise CSRError(f"invalid node name {node_name!r}: expected a DNS subdomain")
        public_key = csr_public_key(request)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server_auth:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        subject = _subject(node_identity(node_name))
        return self._sign(subject, public_key, usages, [], validity, now)

    def _sign(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        usages: list[x509.ObjectIdentifier],
        extra: Sequence[x509.ExtensionType],
        validity: dt.timedelta,
        now: dt.datetime | None,
    ) -> x509.Certificate:
        start = _now(now) - BACKDATE
        # Never outlive the CA (the Kubernetes signer caps NotAfter the same way).
        end = min(start + BACKDATE + validity, self.cert.not_valid_after_utc)
        # keyEncipherment only for RSA key transport; ECDSA keys just sign.
        usage = _key_usage(
            digital_signature=True, key_encipherment=isinstance(public_key, rsa.RSAPublicKey)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:  # a CA made elsewhere without SKI
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _subject(identity: Identity) -> x509.Name:
    """O = each group, then CN = user (the order Go's pkix.Name writes them)."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in identity.groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, identity.user))
    return x509.Name(attrs)
