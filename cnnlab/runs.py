"""The run directory: the only record of a run. config.json when it starts, samples.png,
history.csv and checkpoint.pt as it trains, and at the end model.pt, the metrics, the confusion
matrix and the plots, with metrics.json last: its presence marks the run finished. Every file is
written atomically (atomic.py)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import sys
from pathlib import Path

import torch

from .atomic import atomic_write_bytes
from .config import name_problem
from .errors import CnnlabError
from .text import shown


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _regular(path: Path) -> Path:
    """``path``, or a one-line error when it exists but is not a regular file (a named pipe would
    block the read forever, a device would never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Path(path)  # missing: the reader says so
    if not stat.S_ISREG(mode):
        raise CnnlabError(f"{shown(path)} is not a regular file; restore the run's file from a copy, or train the "
                          "run again")
    return Path(path)


def read_json(path: Path):
    """A JSON file cnnlab wrote, or a one-line error when it is damaged."""
    _regular(path)
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CnnlabError(f"{path} is damaged ({type(exc).__name__}); restore it from a copy, or train the "
                          "run again") from None


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
    _regular(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"{path} does not exist; is this a finished run directory?") from None
    except Exception as exc:
        raise CnnlabError(f"{path} is not a readable weights file ({type(exc).__name__}); "
                          "retrain the run or point at another file") from None


def create_run_dir(out: str | Path, name: str) -> Path:
    """Makes ``out/name``; if taken, ``out/name-2``, ``-3``... (never reuses a folder). ``name`` is one
    folder name: nothing is ever written outside ``out``."""
    problem = name_problem(name)
    if problem:
        raise CnnlabError(problem)
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


def claim_run_dir(path: Path) -> Path:
    """``path`` as a run directory, made if missing (``--resume-if-exists`` starting the run it names)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"cannot create run directory {path} ({exc.strerror}); pass a writable --out") from None
    return Path(path)


def existing_run(out: str | Path, name: str) -> tuple[Path, bool]:
    """``--resume-if-exists``: (out/name, whether a run is there, finished or not); a one-line error
    for a folder there that holds something else. An empty folder is no run yet."""
    problem = name_problem(name)
    if problem:
        raise CnnlabError(problem)
    path = Path(out) / name
    if (path / "config.json").is_file():
        return path, True
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CnnlabError(f"--resume-if-exists: {path} exists but holds no run (no config.json); move it away, or "
                          "pass another --name")
    return path, False


SPLITS = ("train", "val", "test")


def split_digests(splits) -> dict:
    """Per split: its image count, a digest of its files (relative to the data's root) with their
    labels, which is the split drawn, and one of its decoded pixels with the labels (which also
    covers data without files, such as torchvision's CIFAR-10)."""
    root = splits.info.get("root")
    digests = {}
    for name in SPLITS:
        part = getattr(splits, name)
        labels = part.labels.cpu().to(torch.int64)
        files = hashlib.sha256()
        for path, label in zip(part.files, labels.tolist()):
            files.update(os.fsencode(os.path.relpath(path, root) if root else path) + f"\0{label}\n".encode())
        pixels = hashlib.sha256(f"{tuple(part.images.shape)}".encode() + labels.numpy().tobytes())
        pixels.update(part.images.cpu().contiguous().reshape(-1).numpy())  # uint8 bytes, hashed in place
        digests[name] = {"images": len(part), "files": files.hexdigest() if part.files else None,
                         "pixels": pixels.hexdigest()}
    return digests


def check_same_data(run_dir: Path, record: dict, splits, log) -> None:
    """A one-line error unless ``splits`` are the data ``record`` (a run's config.json) was started on:
    its classes, input shape, and each split's images, files and labels. A continued run must train
    and test on exactly the split it started with; new or removed images would redraw it."""
    fix = (f"restore the data at {record.get('data')} as it was when the run started, or train a new run on it "
           "(another --name)")
    if splits.class_names != record.get("class_names"):
        raise CnnlabError(f"the data no longer has {run_dir}'s classes ({', '.join(record.get('class_names') or [])}"
                          f"; now {', '.join(splits.class_names)}); {fix}")
    shape = list(splits.train.images.shape[1:])
    if record.get("input_shape") not in (None, shape):
        raise CnnlabError(f"the images are now {'x'.join(map(str, shape))}, {run_dir}'s were "
                          f"{'x'.join(map(str, record['input_shape']))}; {fix}")
    recorded = record.get("split_digests")
    if not isinstance(recorded, dict):
        log(f"notice: {run_dir} recorded no digest of its splits (an older cnnlab started it): that they are "
            "the same is not checked")
        return
    now, changed = split_digests(splits), []
    for name in SPLITS:
        was, is_ = recorded.get(name) or {}, now[name]
        if was.get("images") != is_["images"]:
            changed.append(f"its {name} split had {was.get('images')} images and would now have {is_['images']}")
        elif was.get("files") != is_["files"]:
            changed.append(f"its {name} split's files or their classes differ")
        elif was.get("pixels") != is_["pixels"]:
            changed.append(f"its {name} split's images differ")
    if changed:
        raise CnnlabError(f"the data changed since {run_dir} started ({'; '.join(changed)}): going on would mix "
                          f"images of one split into another; {fix}")


def run_record(kind: str, settings: dict, splits, parameters: int, environment: dict, **extra) -> dict:
    """What a run's config.json holds: its settings, what it is, the data it saw (with a digest of
    each split, which resume checks), where it ran and the command that started it."""
    return {**settings, "kind": kind, **extra, "class_names": splits.class_names,
            "input_shape": list(splits.train.images.shape[1:]), "split_digests": split_digests(splits),
            "parameters": parameters, "data_info": splits.info, "environment": environment,
            "command": " ".join(sys.argv)}


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch, columns in the order first seen."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    write_csv(path, [[row.get(k, "") for k in columns] for row in history], columns)


def read_history(path: Path) -> list[dict]:
    """history.csv's rows, numbers as numbers; a one-line error when the file is damaged."""
    _regular(path)
    try:
        with open(path, newline="") as f:
            return [{k: _number(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(f)]
    except (csv.Error, UnicodeDecodeError, OSError) as exc:
        raise CnnlabError(f"{path} is damaged ({type(exc).__name__}); restore it from a copy, or train the run "
                          "again") from None


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
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    for path, record in ((run_dir / "config.json", config), (metrics_path, metrics)):
        if record is not None and not isinstance(record, dict):
            raise CnnlabError(f"{path} is damaged (not a JSON object); restore it from a copy, or train the run again")
    return config, metrics


def unfinished_config(run_dir: Path, log) -> dict | None:
    """The config of a run that has yet to finish; None, saying so, for a finished one."""
    config, metrics = load_run(run_dir)
    if metrics is not None:
        log(f"{run_dir} is finished (test accuracy {metrics['test_accuracy']:.4f}); nothing to resume")
        return None
    return config


def write_samples(run_dir: Path, train, class_names: list[str], seed: int) -> None:
    """samples.png: 18 training images picked by ``seed``, once per run."""
    from .plots import image_grid  # matplotlib loads only when a run is written

    if not (run_dir / "samples.png").exists():
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:18]
        labels = train.labels[pick]
        captions = ([";".join(class_names[j] for j in torch.nonzero(row > 0.5).flatten().tolist()) for row in labels]
                    if labels.dim() == 2 else None)  # several labels per image: each image's, joined by ';'
        image_grid(train.images[pick], labels, class_names, run_dir / "samples.png", columns=6,
                   title="random training images", captions=captions)


def write_mistakes(run_dir: Path, mistakes: dict, images: torch.Tensor, class_names: list[str],
                   title: str = "most confident mistakes (test)") -> None:
    """mistakes.png: the ``mistakes`` (``inference.confident_mistakes``) as ``images`` show them,
    each captioned with its true and predicted class and the probability given."""
    from .plots import image_grid  # matplotlib loads only when a run is written

    image_grid(images, mistakes["predicted"], class_names, run_dir / "mistakes.png", title=title,
               captions=[f"{class_names[t]} → {class_names[p]} {q:.0%}" for t, p, q in
                         zip(mistakes["true"], mistakes["predicted"], mistakes["probability"])])


def write_finished(run_dir: Path, weights: dict, history: list[dict], test: dict, class_names: list[str],
                   metrics: dict, boundary: int | None = None) -> None:
    """The rest of a finished run's files: model.pt (``weights``), confusion_matrix.csv, the curves
    of ``history`` (``boundary``: where fine-tuning began) and the heatmap of ``test`` (when it has a
    confusion matrix: one class per image), then
    metrics.json (``metrics``), whose presence marks the run finished; the checkpoint and interrupt
    marker go."""
    from .plots import plot_run

    save_torch(run_dir / "model.pt", weights)
    if "confusion_matrix" in test:  # none with several labels per image: metrics.json's per_label scores instead
        write_csv(run_dir / "confusion_matrix.csv",
                  [[name] + row for name, row in zip(class_names, test["confusion_matrix"])],
                  ["true\\predicted"] + class_names)
    plot_run(run_dir, history, metrics["best_epoch"], test.get("confusion_matrix"), class_names, boundary)
    write_json(run_dir / "metrics.json", metrics)  # last: its presence marks the run finished
    for leftover in ("checkpoint.pt", "interrupted.json"):
        (run_dir / leftover).unlink(missing_ok=True)
