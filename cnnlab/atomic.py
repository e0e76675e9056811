"""Atomic file writing: every file cnnlab writes (run files, caches, reports) goes to a temporary
name in the same folder, is flushed to disk and renamed over the old one, so a crash or a full
disk leaves either the old or the new version, never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CnnlabError


class WriteError(CnnlabError):
    """A file could not be written (disk full, no permission); the previous version is intact."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    try:
        _atomic_write(path, data)
    except OSError as exc:
        raise WriteError(f"could not write {path} ({exc.strerror or exc}); free some disk space or pass "
                         "a writable --out (a stopped run continues with `cnnlab resume`)") from None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
