"""Bearer tokens: kube-apiserver's static token file, and KubeEdge's join token.

Static token file (`--token-auth-file`), CSV, one user per line::

    token,user,uid[,"group1,group2"]

Join token: `sha256hex(CA certificate DER) + "." + JWT`, the JWT HS256 with an `exp` claim. The
edge checks the hash against the CA it fetched from `GET /ca.crt`, then sends the JWT as
`Authorization: Bearer <jwt>` to `GET /edge.crt`; the cloud checks signature and expiry.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgeweave.pki.errors import CAHashMismatch, MalformedToken, TokenFileError
from edgeweave.pki.identity import Identity
from edgeweave.pki.jwt import decode_hs256, encode_hs256

JOIN_TOKEN_TTL_S = 24 * 3600.0  # KubeEdge: the first token lives 24 h (refreshed every 12 h)
_CA_HASH = re.compile(r"[0-9a-f]{64}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class StaticTokens:
    """A fixed set of bearer tokens, each standing for one identity."""

    def __init__(self, entries: Iterable[tuple[str, Identity]]) -> None:
        # Only digests are kept, and all are compared on every lookup (see `authenticate`).
        self._entries = [(_digest(token), identity) for token, identity in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> StaticTokens:
        """Read a token file; errors name the file and line."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(path, None, f"cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise TokenFileError(path, None, "not UTF-8 text") from None
        return parse_token_file(text, path)

    def authenticate(self, token: str) -> Identity | None:
        """The identity of `token`, or None. Every entry is compared with `hmac.compare_digest`
        on a SHA-256 of the token, so the time taken says nothing about which bytes matched."""
        presented, found = _digest(token), None
        for digest, identity in self._entries:
            if hmac.compare_digest(digest, presented):
                found = identity
        return found


def parse_token_file(text: str, source: Path | str = "<token file>") -> StaticTokens:
    """Parse the `--token-auth-file` CSV. As Kubernetes: at least 3 columns, extra columns after
    the fourth ignored, groups split on ','. Stricter: empty lines are skipped, but an empty
    token or user name and a repeated token are errors (Kubernetes warns and goes on)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    entries: list[tuple[str, Identity]] = []
    first_seen: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not record:
                continue
            token, identity = _parse_record(record, source, line)
            if token in first_seen:
                raise TokenFileError(
                    source, line, f"duplicate token (also on line {first_seen[token]})"
                )
            first_seen[token] = line
            entries.append((token, identity))
    except csv.Error as exc:
        raise TokenFileError(source, reader.line_num, f"bad CSV: {exc}") from None
    return StaticTokens(entries)


def _parse_record(record: list[str], source: Path | str, line: int) -> tuple[str, Identity]:
    if len(record) < 3:
        raise TokenFileError(
            source,
            line,
            f"expected at least 3 columns (token, user name, user uid), found {len(record)}",
        )
    token, user, uid = record[0], record[1], record[2]
    if not token:
        raise TokenFileError(source, line, "empty token")
    if not user:
        raise TokenFileError(source, line, "empty user name")
    groups = tuple(g for g in record[3].split(",") if g) if len(record) > 3 else ()
    return token, Identity(user, groups, uid)


def bearer_token(authorization: str | None) -> str | None:
    """The token in an `Authorization: Bearer <token>` header value, or None.

    As Kubernetes' bearertoken authenticator: surrounding space trimmed, scheme
    case-insensitive, the token is the second space-separated word and must not be empty.
    """
    parts = (authorization or "").strip().split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


# -- join token --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JoinToken:
    """A KubeEdge join token, split into its two halves."""

    ca_hash: str
    """sha256 of the CA certificate DER, 64 lower-case hex digits."""
    jwt: str
    """The HS256 JWT the edge sends as its bearer token."""

    def __str__(self) -> str:
        return f"{self.ca_hash}.{self.jwt}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Split `text` at its first '.'; raise `MalformedToken` if it is not hash + JWT."""
        ca_hash, dot, jwt = text.strip().partition(".")
        ca_hash = ca_hash.lower()
        if not dot or not _CA_HASH.fullmatch(ca_hash):
            raise MalformedToken("join token must start with the 64-hex-digit CA hash and '.'")
        if jwt.count(".") != 2:
            raise MalformedToken("join token's second half is not a JWT")
        return cls(ca_hash, jwt)

    def check_ca(self, ca_cert_der: bytes) -> None:
        """Edge side: raise `CAHashMismatch` unless `ca_cert_der` (from `GET /ca.crt`) is the
        CA the token was made for. This pins the CA fetched over a not-yet-trusted channel."""
        actual = hashlib.sha256(ca_cert_der).hexdigest()
        if not hmac.compare_digest(actual, self.ca_hash):
            raise CAHashMismatch(
                f"CA certificate hash {actual} does not match the token's {self.ca_hash}"
            )


def make_join_token(
    ca_cert_der: bytes, key: bytes, *, now: float, ttl_s: float = JOIN_TOKEN_TTL_S
) -> JoinToken:
    """A join token for the CA `ca_cert_der`, its JWT signed with `key`
    (`CertificateAuthority.join_token_key()`), valid for `ttl_s` seconds from `now`."""
    jwt = encode_hs256({"exp": int(now + ttl_s)}, key)
    return JoinToken(hashlib.sha256(ca_cert_der).hexdigest(), jwt)


def verify_join_jwt(jwt: str, key: bytes, *, now: float) -> dict[str, Any]:
    """Cloud side: the claims of a join JWT presented as a bearer token; raises `MalformedToken`,
    `BadSignature` or `TokenExpired`."""
    return decode_hs256(jwt, key, now=now, require_exp=True)


def verify_join_token(text: str, *, ca_cert_der: bytes, key: bytes, now: float) -> dict[str, Any]:
    """Both checks on a whole join token: CA hash, then signature and expiry."""
    token = JoinToken.parse(text)
    token.check_ca(ca_cert_der)
    return verify_join_jwt(token.jwt, key, now=now)
