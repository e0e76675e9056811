"""cnnlab's own caches: decoded images, a frozen backbone's features, the compiled kernel library,
all in one folder (``default_cache_dir``).

A cache is only an optimisation, so nothing in one is trusted: every entry is written atomically and
then sealed with a manifest beside it (``NAME.json``: its size, its SHA-256 and what it holds), and it
is read back only when the file matches its manifest. A damaged entry (truncated, garbled, emptied,
or its manifest so) is rebuilt after one warning line, never fatal. Two processes that build the
same entry at once each write whole files by atomic rename, so both end with a good entry.

An entry that holds an array (decoded images) is written row by row as they come (``array_entry``)
and read back memory-mapped (``open_array``), never whole into a process's own memory: its pages
live in the page cache, one copy for every process that maps it. Checking a manifest hashes the
file in fixed-size pieces. Entries are never changed in place, only replaced by rename, so a file a
process has mapped stays as it was checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import atomic_path, atomic_write_bytes
from .text import shown

CHUNK = 4 << 20  # hashing reads this much at a time into one buffer: memory stays flat however large the entry
NPY_HEADER = 128  # bytes of an array entry's .npy header: fixed, so the row count can be set once rows are written


def default_cache_dir() -> Path:
    """Where cnnlab keeps its caches (decoded images, features, compiled kernels):
    ``$CNNLAB_CACHE``, else ``~/.cache/cnnlab``."""
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    buffer = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
            size += n
    return size, digest.hexdigest()


def seal(path: Path, meta: dict | None = None, sha256: str | None = None, size: int | None = None) -> None:
    """Writes ``path``'s manifest (its size and checksum, computed unless given, and ``meta``)."""
    if sha256 is None or size is None:
        size, sha256 = _file_sha256(path)
    record = {"file": path.name, "bytes": size, "sha256": sha256, "meta": meta or {}}
    atomic_write_bytes(manifest_path(path), json.dumps({**record, "manifest_sha256": _digest(record)}).encode())


def store(path: Path, data: bytes, meta: dict | None = None) -> None:
    """Writes ``data`` to ``path`` atomically, then seals it."""
    atomic_write_bytes(path, data)
    seal(path, meta, hashlib.sha256(data).hexdigest(), len(data))


def check(path: Path) -> dict | None:
    """The meta recorded for ``path`` when the entry is whole; None when there is none (or only half
    of one: a crash, or another process still writing it), or, with one warning, when the file or
    its manifest is damaged."""
    manifest = manifest_path(path)
    if not path.is_file() or not manifest.is_file():
        return None
    problem = _problem(path, manifest)
    if problem is None:
        return json.loads(manifest.read_text())["meta"]
    warn_damaged(path, problem)
    return None


def _problem(path: Path, manifest: Path) -> str | None:
    """Why the entry at ``path`` cannot be trusted, or None."""
    try:
        record = json.loads(manifest.read_bytes())
        claimed = record.pop("manifest_sha256")
        if claimed != _digest(record) or record["file"] != path.name:
            return "its manifest is garbled"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return "its manifest is unreadable"
    size, sha256 = _file_sha256(path)
    if size != record["bytes"]:
        return f"{size:,} bytes where {record['bytes']:,} were written"
    if sha256 != record["sha256"]:
        return "its checksum does not match"
    return None


def warn_damaged(path: Path, problem: str) -> None:
    """The one line a damaged entry gets before it is rebuilt."""
    warnings.warn(f"cache entry {shown(path)} is damaged ({problem}); rebuilding it")


# ---------------------------------------------------------------- arrays, memory-mapped

def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    """A .npy (version 1.0) header of exactly ``NPY_HEADER`` bytes (the rows after it stay aligned)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(n) for n in shape)})
    length = NPY_HEADER - 10
    return np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + struct.pack("<H", length) + \
        text.ljust(length - 1).encode("latin1") + b"\n"


class ArrayWriter:
    """Rows appended in order to an open .npy file; ``meta`` is sealed with the entry."""

    def __init__(self, file, row_shape: tuple, dtype: np.dtype):
        self.file, self.row_shape, self.dtype = file, tuple(row_shape), np.dtype(dtype)
        self.rows, self.meta = 0, {}

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]}, not {self.row_shape}")
        self.file.write(memoryview(rows).cast("B"))
        self.rows += len(rows)


@contextmanager
def array_entry(path: Path, row_shape: tuple, dtype=np.uint8) -> Iterator[ArrayWriter]:
    """An array entry written row by row (``ArrayWriter.append``) to a temporary file, which, when
    the block ends, gets its row count in its header, is flushed, renamed into place and sealed with
    the writer's ``meta``; removed instead when the block raises. Memory stays flat however many
    rows come."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = ArrayWriter(f, row_shape, dtype)
            f.write(_npy_header((0, *row_shape), dtype))
            yield writer
            f.seek(0)
            f.write(_npy_header((writer.rows, *row_shape), dtype))
            f.flush()
            os.fsync(f.fileno())
    seal(path, writer.meta)


def open_array(path: Path, shape: tuple, dtype=np.uint8) -> np.ndarray | None:
    """The array of an entry (checked first: ``check``) memory-mapped copy-on-write: nothing is read
    until used, pages read come from the page cache (shared by every process mapping the file), and a
    write would change this process's copy only, never the file (so the array is writable, as
    ``torch.from_numpy`` wants). None, with the one warning, when it is not of ``shape`` and ``dtype``."""
    try:
        array = np.load(path, mmap_mode="c")
        if array.dtype == np.dtype(dtype) and array.shape == tuple(shape):
            return array
        problem = f"an array of {array.dtype} {array.shape}"
    except (ValueError, OSError, KeyError, TypeError, EOFError) as exc:
        problem = type(exc).__name__
    warn_damaged(path, problem)
    return None
