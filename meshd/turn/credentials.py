"""Short-lived TURN credentials derived from a shared secret ("TURN REST API").

The scheme coturn implements as `use-auth-secret` / `static-auth-secret`
(draft-uberti-behave-turn-rest): whoever knows the secret mints

    username = "<expiry as Unix seconds>:<node>"
    password = base64(HMAC-SHA1(secret, username))

and the server recomputes the password from the username, so it needs no user database and a
credential stops working at its expiry. The long-term credential key of RFC 5389 §15.4 is then
MD5(username ":" realm ":" password) as usual (`meshd.stun.codec.long_term_key`). Agents can use
the same credentials with `meshd server` and with coturn configured with the same secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = ":"  # coturn's default `rest-api-separator`


@dataclass(frozen=True)
class TurnCredentials:
    """A username/password pair for TURN's long-term credential mechanism."""

    username: str
    """`<expiry>:<node>`."""
    password: str
    """base64(HMAC-SHA1(secret, username))."""

    @property
    def expires(self) -> int:
        """Unix time after which servers refuse the credential."""
        return parse_username(self.username)[0]

    @property
    def node(self) -> str:
        """The node the credential was minted for (the quota and ownership key)."""
        return parse_username(self.username)[1]


def rest_password(secret: bytes, username: str) -> str:
    """The password for `username` under `secret`."""
    mac = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


def mint_credentials(secret: bytes, node: str, now: float, ttl_s: float) -> TurnCredentials:
    """Credentials for `node` valid until `now + ttl_s` (Unix seconds)."""
    if not node or SEPARATOR in node:
        raise ValueError(f"node name must be non-empty and free of {SEPARATOR!r}: {node!r}")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    username = f"{int(now + ttl_s)}{SEPARATOR}{node}"
    return TurnCredentials(username, rest_password(secret, username))


def parse_username(username: str) -> tuple[int, str]:
    """(expiry, node) of a REST-style username; `ValueError` when it is not one."""
    expiry, sep, node = username.partition(SEPARATOR)
    if not sep or not node or not expiry.isascii() or not expiry.isdigit():
        raise ValueError(f"not an '<expiry>:<node>' username: {username!r}")
    return int(expiry), node


def candidate_passwords(secrets: tuple[bytes, ...], username: str) -> list[str]:
    """The password `username` has under each secret (several during a secret rotation)."""
    return [rest_password(secret, username) for secret in secrets]


def read_secrets(path: Path) -> tuple[bytes, ...]:
    """Secrets from a file, one per non-empty line (surrounding blanks stripped); the first is
    current, later ones are still accepted (rotation). `ValueError` when there is none,
    `OSError` when the file cannot be read."""
    lines = path.read_bytes().splitlines()
    secrets = tuple(line.strip() for line in lines if line.strip())
    if not secrets:
        raise ValueError(f"{path}: no secret in the file")
    return secrets
