"""JSON Web Tokens with HS256 only: the codec KubeEdge's join token uses (golang-jwt, HS256).

Compact serialisation (RFC 7515 §7.1, RFC 7519)::

    BASE64URL(header) "." BASE64URL(claims) "." BASE64URL(HMAC-SHA256(key, ASCII(first two parts)))

    header = {"alg":"HS256","typ":"JWT"}      claims = {"exp": <NumericDate>, ...}

Decoding is strict: exactly three parts, unpadded canonical base64url, JSON objects without
duplicate members, `alg` exactly HS256 (so `none` and algorithm-confusion tricks fail), no `crit`.
Every problem is a `TokenError` subclass; nothing else escapes for any input string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from edgeweave.pki.errors import BadSignature, MalformedToken, TokenExpired

MAX_TOKEN_LENGTH = 8192
_HEADER = {"alg": "HS256", "typ": "JWT"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url_encode`; refuses padding, foreign characters and non-canonical forms."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedToken("invalid base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise MalformedToken("invalid base64url") from None
    if b64url_encode(data) != text:  # stray bits in the last character
        raise MalformedToken("non-canonical base64url")
    return data


def _sign(signing_input: str, key: bytes) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_hs256(claims: Mapping[str, Any], key: bytes) -> str:
    """Sign `claims` (JSON-serialisable) with HMAC-SHA256 under `key`."""
    signing_input = f"{b64url_encode(_json_bytes(_HEADER))}.{b64url_encode(_json_bytes(claims))}"
    return f"{signing_input}.{b64url_encode(_sign(signing_input, key))}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise MalformedToken(f"duplicate JSON member {name!r}")
        result[name] = value
    return result


def _json_object(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MalformedToken(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken(f"{what} is not a JSON object")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedToken(f"claim {name!r} is not a NumericDate")
    return float(value)


def decode_hs256(
    token: str, key: bytes, *, now: float, leeway: float = 0.0, require_exp: bool = True
) -> dict[str, Any]:
    """Verify `token` under `key` at unix time `now` and return its claims.

    Raises `MalformedToken`, `BadSignature`, or `TokenExpired` (past `exp`, or before `nbf`).
    """
    if len(token) > MAX_TOKEN_LENGTH:
        raise MalformedToken(f"token longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken(f"expected 3 dot-separated parts, found {len(parts)}")
    header = _json_object(parts[0], "header")
    if header.get("alg") != "HS256":
        raise MalformedToken(f"unsupported alg {header.get('alg')!r}: only HS256")
    if "crit" in header:
        raise MalformedToken("unsupported critical header parameters")
    signature = b64url_decode(parts[2])
    if not hmac.compare_digest(signature, _sign(f"{parts[0]}.{parts[1]}", key)):
        raise BadSignature("token signature does not verify")
    claims = _json_object(parts[1], "claims")
    _check_times(claims, now, leeway, require_exp)
    return claims


def _check_times(claims: Mapping[str, Any], now: float, leeway: float, require_exp: bool) -> None:
    """RFC 7519 §4.1.4/§4.1.5: valid strictly before `exp`, and not before `nbf`."""
    exp, nbf = _numeric_date(claims, "exp"), _numeric_date(claims, "nbf")
    if exp is None and require_exp:
        raise MalformedToken("token has no 'exp' claim")
    if exp is not None and now >= exp + leeway:
        raise TokenExpired(f"token expired at {exp:.0f} (now {now:.0f})")
    if nbf is not None and now + leeway < nbf:
        raise TokenExpired(f"token not valid before {nbf:.0f} (now {now:.0f})")
