"""The run directory: the only record of a run, written atomically.

Every file is written to a temporary name in the same folder, flushed to disk and
renamed over the old one, so a crash leaves either the old or the new version.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import CnnlabError


class WriteError(CnnlabError):
    """A file could not be written (disk full, no permission); the previous version is intact."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file, fsync and rename: a crash or a full
    disk leaves the previous version of ``path`` whole."""
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


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_csv(path: Path, rows: list[list], header: list[str] | None = None) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def save_torch(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path):
    """Loads tensors with ``weights_only=True``: a crafted file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"{path} does not exist; is this a finished run directory?") from None
    except Exception as exc:
        raise CnnlabError(f"{path} is not a readable weights file ({type(exc).__name__}); "
                          "retrain the run or point at another file") from None


def create_run_dir(out: str | Path, name: str) -> Path:
    """Makes ``out/name``; if taken, ``out/name-2``, ``-3``... (never reuses a folder)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"cannot create output folder {out} ({exc.strerror}); pass a writable --out") from None
    if not os.access(out, os.W_OK):
        raise CnnlabError(f"output folder {out} is not writable; pass a writable --out")
    for i in range(1, 10_000):
        path = out / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise CnnlabError(f"too many runs named {name} in {out}; pass another --name")


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch, columns in the order first seen."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    write_csv(path, [[row.get(k, "") for k in columns] for row in history], columns)


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def load_run(run_dir: str | Path) -> tuple[dict, dict | None]:
    """(config, metrics or None) of a run directory, or a one-line error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CnnlabError(f"{run_dir} is not a run directory (no config.json); "
                          "pass a folder made by `cnnlab train`")
    config = read_json(run_dir / "config.json")
    metrics_path = run_dir / "metrics.json"
    return config, (read_json(metrics_path) if metrics_path.is_file() else None)
