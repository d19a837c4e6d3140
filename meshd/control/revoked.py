"""The revocation list of `meshd server` (`control.revokedFile`): parser and file watcher.

File format, one entry per line; `#` starts a comment, blank lines are ignored:

    # decommissioned 2024-05-02
    edge-7                          every certificate of node edge-7
    serial:4f1a9c03e2               one certificate, by its serial number (hex)
    serial:4F:1A:9C:03:E2           the same (colons as `openssl x509 -text` prints them)

A node name must be a Kubernetes node name (what `system:node:NAME` carries); a serial is 1 to
40 hex digits (RFC 5280 §4.1.2.2: at most 20 octets), optionally `0x`-prefixed.
`parse_revoked` is pure: any input either parses or raises `RevokedFileError` naming the
file and line (`revoked.txt:3: ...`). `RevokedFile` reads the file and tells when it changed
(mtime, size, inode), for the adapter that re-reads it on SIGHUP and on a timer
(`meshd.control.service.RevocationWatcher`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeweave.log import event
from edgeweave.pki.identity import is_valid_node_name

log = logging.getLogger("meshd.control")

MAX_FILE_BYTES = 4 << 20
"""A longer file is refused (a revocation list is a few lines; this is a wrong path)."""
SERIAL_PREFIX = "serial:"
_HEX = re.compile(r"[0-9a-f]{1,40}")


class RevokedFileError(ValueError):
    """The revocation list does not parse (or cannot be read); `str()` names file and line."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        """The file (as configured)."""
        self.line = line
        """The line at fault (1-based), None for the file as a whole."""
        self.reason = reason
        """What is wrong."""


@dataclass(frozen=True)
class Revocations:
    """What the list revokes."""

    nodes: frozenset[str] = frozenset()
    """Node names: every certificate of these nodes is refused."""
    serials: frozenset[int] = frozenset()
    """Certificate serial numbers: those certificates are refused."""

    def __len__(self) -> int:
        """Entries in force."""
        return len(self.nodes) + len(self.serials)


def format_serial(serial: int) -> str:
    """A serial number as the list writes it (lowercase hex, no prefix)."""
    return f"{serial:x}"


def parse_revoked(data: bytes | str, source: str = "revoked") -> Revocations:
    """The entries of a revocation list (`source` names the file in errors). Raises
    `RevokedFileError` for anything else, never another exception."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")  # lone surrogates: "not UTF-8"
    if len(data) > MAX_FILE_BYTES:
        raise RevokedFileError(source, None, f"larger than {MAX_FILE_BYTES >> 20} MiB")
    nodes: set[str] = set()
    serials: set[int] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RevokedFileError(source, number, "not UTF-8") from None
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) > 1:
            raise RevokedFileError(source, number, f"one entry per line, got {entry!r}")
        if entry[:len(SERIAL_PREFIX)].lower() == SERIAL_PREFIX:
            serials.add(_serial(entry[len(SERIAL_PREFIX):], source, number))
        elif is_valid_node_name(entry):
            nodes.add(entry)
        else:
            raise RevokedFileError(source, number, f"{entry!r} is neither a node name "
                                   "(lowercase DNS subdomain) nor serial:HEX")
    return Revocations(frozenset(nodes), frozenset(serials))


def _serial(text: str, source: str, number: int) -> int:
    digits = text.lower().removeprefix("0x").replace(":", "")
    if not _HEX.fullmatch(digits):
        raise RevokedFileError(source, number, f"serial {text!r}: expected 1 to 40 hex "
                               "digits (colons allowed)")
    return int(digits, 16)


_Signature = tuple[int, int, int]  # mtime_ns, size, inode


class RevokedFile:
    """The list on disk: `load` at start, `reload` when it may have changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        """The file."""
        self.current = Revocations()
        """The list in force (the last one that parsed)."""
        self._seen: _Signature | None = None  # of the last read attempt; None = missing

    def load(self) -> Revocations:
        """Read and parse the file now and make it `current`. Raises `RevokedFileError` (a
        missing or unreadable file too); `current` stays as it was then."""
        source = str(self.path)
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._seen = None
            raise RevokedFileError(source, None,
                                   f"cannot read: {exc.strerror or exc}") from None
        self.current = parse_revoked(data, source)
        return self.current

    def changed(self) -> bool:
        """The file differs (mtime, size, inode, or appeared/vanished) from the last read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self._seen is not None
        return (st.st_mtime_ns, st.st_size, st.st_ino) != self._seen

    def reload(self, *, force: bool = False) -> Revocations | None:
        """Re-read when the file changed (or always, `force`): the new list, or None when
        nothing changed or the file is bad; a bad or missing file is logged at ERROR with
        the line at fault, and the previous list stays in force (nothing is lost)."""
        if not force and not self.changed():
            return None
        try:
            return self.load()
        except RevokedFileError as exc:
            event(log, logging.ERROR, "control.revoked_error", file=exc.source,
                  line=exc.line or "-", error=exc.reason, kept=len(self.current))
            return None
