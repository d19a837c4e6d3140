"""`cloudcore certs meshd-server`: the serving certificate of meshd server's control channel."""

from __future__ import annotations

import ipaddress
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudcore.cli import main
from edgeweave.pki import PKI_SUBDIR, CertificateAuthority, server_context


@pytest.fixture
def data(tmp_path: Path) -> Path:
    CertificateAuthority.load_or_create(tmp_path / "cloud" / PKI_SUBDIR)
    return tmp_path / "cloud"


def test_issues_a_server_certificate_for_every_address(data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["--data-dir", str(data), "certs", "meshd-server", "--out", str(out),
                 "--address", "198.51.100.7", "--address", "Mesh.Example.NET",
                 "--address", "2001:db8::7"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out / "meshd-server.crt")
    cert = x509.load_pem_x509_certificate((out / "meshd-server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.subject == cert.issuer
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshd-server"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7")]
    assert san.get_values_for_type(x509.DNSName) == ["mesh.example.net"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE((out / "meshd-server.key").stat().st_mode) == 0o600
    ctx = server_context(out / "meshd-server.crt", out / "meshd-server.key")
    assert isinstance(ctx, ssl.SSLContext)


def test_custom_name(data: Path, tmp_path: Path) -> None:
    assert main(["--data-dir", str(data), "certs", "meshd-server", "--out", str(tmp_path),
                 "--address", "127.0.0.1", "--name", "control"]) == 0
    assert (tmp_path / "control.crt").exists() and (tmp_path / "control.key").exists()


@pytest.mark.parametrize(("args", "error"), [
    (["--address", "not a name!"], "neither an IP address nor a DNS name"),
    (["--address", "127.0.0.1"], "no CA yet"),
])
def test_errors_are_one_line(tmp_path: Path, data: Path, args: list[str], error: str) -> None:
    where = data if "no CA" not in error else tmp_path / "empty"
    result = subprocess.run(
        [sys.executable, "-m", "cloudcore", "--data-dir", str(where), "certs", "meshd-server",
         "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert error in result.stderr and result.stderr.count("\n") == 1


def test_address_is_required(data: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", str(data), "certs", "meshd-server", "--out", str(tmp_path)])
    assert info.value.code == 2
