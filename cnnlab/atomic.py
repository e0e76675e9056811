"""Atomic file writing: every file cnnlab writes (run files, caches, reports, exports) goes to a
temporary name in the same folder, is flushed to disk and renamed over the old one, so a crash or a
full disk leaves either the old or the new version, never a torn one.

The temporary file is removed on an exception, on Ctrl-C and on SIGTERM (the process then still
ends by that signal). SIGKILL cannot be caught: it may leave one behind, named
``.NAME.PID.XXXXXXXX.tmp``, hidden and never ending in a result's suffix, so nothing takes it for
a result; the next write of NAME in that folder removes those of processes no longer running."""
from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CnnlabError
from .text import fit_name, shown

SUFFIX = ".tmp"


class WriteError(CnnlabError):
    """A file could not be written (disk full, no permission); the previous version is intact."""


class _Terminated(BaseException):
    """SIGTERM arrived while a temporary file existed: raised to remove it, then the signal is
    delivered again with its default action."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise WriteError(f"could not write {shown(path)} ({exc.strerror or exc}); free some disk space or pass "
                         "a writable --out (a stopped run continues with `cnnlab resume`)") from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (empty, with the permissions a new file gets) for the block
    to fill, renamed over ``path`` when the block ends; removed instead when it raises, on Ctrl-C or
    on SIGTERM."""
    path = Path(path)
    prefix = _prefix(path)
    _sweep(path.parent, prefix)
    with _terminate_raises():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{os.getpid()}.", suffix=SUFFIX)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _prefix(path: Path) -> str:
    """``.NAME.``, NAME cut so that the temporary name stays within the 255-byte limit."""
    return "." + fit_name(path.name, ".", 255 - 40)


def _sweep(folder: Path, prefix: str) -> None:
    """Removes the temporary files of ``prefix`` left by processes that no longer run (a SIGKILL)."""
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(SUFFIX)]
    except OSError:
        return
    for leftover in leftovers:
        mine = re.fullmatch(r"(\d+)\.\w+" + re.escape(SUFFIX), leftover.name[len(prefix):])
        if mine and int(mine[1]) != os.getpid() and not _running(int(mine[1])):
            leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or no such number): leave its file
        return True
    return True


@contextmanager
def _terminate_raises() -> Iterator[None]:
    """While the block runs, SIGTERM (where nothing else handles it) raises, so that the block's
    cleanup runs; afterwards the signal takes its default action, ending the process as it would
    have. (Ctrl-C raises KeyboardInterrupt already.)"""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handle(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
