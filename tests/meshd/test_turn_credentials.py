"""meshd.turn.credentials: the TURN REST credential scheme coturn calls use-auth-secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.turn.credentials import (
    TurnCredentials,
    candidate_passwords,
    mint_credentials,
    parse_username,
    read_secrets,
    rest_password,
)


def test_password_vector() -> None:
    # printf '%s' 1700000000:node1 | openssl dgst -sha1 -hmac topsecret -binary | base64
    assert rest_password(b"topsecret", "1700000000:node1") == "QM0MjHUhWhGYuvk993bDLxKH5Hc="


def test_mint_and_parse() -> None:
    creds = mint_credentials(b"topsecret", "node1", 1_699_999_000.5, 1000)
    assert creds == TurnCredentials("1700000000:node1", "QM0MjHUhWhGYuvk993bDLxKH5Hc=")
    assert (creds.expires, creds.node) == (1_700_000_000, "node1")
    assert parse_username("17:edge-01.example") == (17, "edge-01.example")


@pytest.mark.parametrize("username", ["node1", "1700000000", "1700000000:", ":node", "x1:node",
                                      "١٢:node"])
def test_not_rest_usernames(username: str) -> None:
    with pytest.raises(ValueError):
        parse_username(username)


@pytest.mark.parametrize(("node", "ttl"), [("", 10), ("a:b", 10), ("ok", 0)])
def test_mint_misuse(node: str, ttl: float) -> None:
    with pytest.raises(ValueError):
        mint_credentials(b"s", node, 0, ttl)


def test_secrets_file_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"  new-secret \n\nold-secret\n")
    secrets = read_secrets(path)
    assert secrets == (b"new-secret", b"old-secret")
    username = "1700000000:node1"
    assert candidate_passwords(secrets, username) == [rest_password(b"new-secret", username),
                                                      rest_password(b"old-secret", username)]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="no secret"):
        read_secrets(path)
    with pytest.raises(OSError):
        read_secrets(tmp_path / "missing")
