"""The PKI's exceptions.

Local problems (a damaged file under the data directory, a bad token file) name the file, and the
line where there is one, so an operator can fix them. Remote problems (a CSR or a token a peer
sent) are `CSRError` and the `TokenError` family: the caller answers 400/401 and carries on.
"""

from __future__ import annotations

from pathlib import Path


class PKIError(Exception):
    """Base of every error raised by `edgeweave.pki`."""


class PKIFileError(PKIError):
    """A certificate, key or kubeconfig file is missing, unreadable or inconsistent."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        """The file at fault."""
        self.problem = problem
        """What is wrong with it, without the file name."""


class TokenFileError(PKIError):
    """A static token file (kube-apiserver's `--token-auth-file` format) is invalid."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        """The token file."""
        self.line = line
        """1-based line number of the bad record, or None for whole-file problems."""


class CSRError(PKIError):
    """A certificate signing request is refused (unparsable, bad signature, weak key...)."""


class TokenError(PKIError):
    """A bearer or join token presented by a peer is not acceptable."""


class MalformedToken(TokenError):
    """The token does not have the expected shape (parts, base64url, JSON, claims)."""


class BadSignature(TokenError):
    """The token's HMAC does not verify under our key."""


class TokenExpired(TokenError):
    """The token's `exp` claim is in the past (or `nbf` in the future)."""


class CAHashMismatch(TokenError):
    """The CA certificate fetched from the cloud does not hash to the token's CA hash."""
