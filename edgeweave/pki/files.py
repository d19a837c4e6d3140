"""Writing secrets and certificates so that no reader ever sees half a file.

Every file is written in full to a temporary name in the same directory, flushed to disk, then
published in one step: `rename(2)` to replace, or `link(2)` to create only if absent (it fails
with EEXIST, the O_EXCL of publishing). Keys get mode 0600 from creation on, never after.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh temporary file in `directory` with `mode`, synced to disk."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")  # mode 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _sync_dir(directory: Path) -> None:
    """Make the new directory entry durable (needed after rename/link on ext4 and friends)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    """Create or replace `path` with `data`: readers see the old content or the new, whole."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def create_exclusive(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> bool:
    """Create `path` with `data` unless it already exists; return whether we created it."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)
    return True


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock(2)` on `lock_path` (created if needed) for the block.

    Separate opens conflict, so this serialises threads of one process as well as processes.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
