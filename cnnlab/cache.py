"""cnnlab's own caches: decoded images, a frozen backbone's features, the compiled kernel library,
all in one folder (``default_cache_dir``).

A cache is only an optimisation, so nothing in one is trusted: every entry is written atomically and
then sealed with a manifest beside it (``NAME.json``: its size, its SHA-256 and what it holds), and it
is read back only when the file matches its manifest. A damaged entry (truncated, garbled, emptied,
or its manifest so) is rebuilt after one warning line, never fatal. Two processes that build the
same entry at once each write whole files by atomic rename, so both end with a good entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from .atomic import atomic_write_bytes
from .text import shown

CHUNK = 16 << 20  # hashing reads this much at a time, so a large entry never sits in memory twice


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
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
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
