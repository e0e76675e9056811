"""The seed study (SEED-STUDY.md, part 1): four CIFAR-10 variants, then one comparison table."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

from .data import default_cache_dir, load_splits
from .errors import CnnlabError
from .runs import load_run, write_csv
from .train import resolve_config, train

SEED_PRESETS = ("conv", "pool-bn", "dropout", "early-stop")
TABLE_COLUMNS = ("preset", "params", "epochs run", "best epoch", "train time", "best val acc", "test acc",
                 "test loss")


def scaled_config(preset: str, epochs_scale: float, **settings):
    """``resolve_config`` with the preset's epochs multiplied by ``epochs_scale`` (at least 1)."""
    base = resolve_config(preset, **settings)
    return resolve_config(preset, **{**settings, "epochs": max(1, math.ceil(base.epochs * epochs_scale))})


def run_cifar10_study(data: str, out: str = "runs", epochs_scale: float = 1.0, seed: int = 0,
                      presets: tuple[str, ...] = SEED_PRESETS, log: Callable[[str], None] = print,
                      **overrides) -> list[Path]:
    """Trains each preset with the seed's settings (epochs scaled by ``epochs_scale``) on one
    shared split of ``data``; returns the run directories."""
    configs = [scaled_config(preset, epochs_scale, data=data, out=out, seed=seed, **overrides) for preset in presets]
    first = configs[0]
    splits = load_splits(data, first.image_size, first.val_split, first.test_split, seed)
    runs = []
    for cfg in configs:
        log(f"\n=== {cfg.preset} ({cfg.epochs} epochs) ===")
        runs.append(train(cfg, log=log, splits=splits))
    return runs


def comparison_rows(runs: list[Path]) -> list[list[str]]:
    """One row per run, the columns of ``TABLE_COLUMNS``."""
    rows = []
    for run in runs:
        config, m = load_run(run)
        rows.append([config["preset"], f"{m['parameters']:,}", str(m["epochs_run"]), str(m["best_epoch"]),
                     f"{m['train_time_s']:.1f}s", f"{m['best_val_accuracy']:.2%}", f"{m['test_accuracy']:.2%}",
                     f"{m['test_loss']:.4f}"])
    return rows


def format_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_study_table(runs: list[Path], out: str | Path) -> tuple[str, Path]:
    """The comparison table as text, and the path of its CSV copy in ``out``."""
    rows = comparison_rows(runs)
    path = Path(out) / "study-cifar10.csv"
    write_csv(path, [r + [str(run)] for r, run in zip(rows, runs)], list(TABLE_COLUMNS) + ["run"])
    return format_table(TABLE_COLUMNS, rows), path


# ---------------------------------------------------------------- the whole study

QUICK = {"cifar_per_class": 300, "epochs_scale": 0.15, "pets_per_class": 100, "transfer_epochs": 2,
         "fine_tune_epochs": 1}
FULL = {"cifar_per_class": None, "epochs_scale": 1.0, "pets_per_class": None, "transfer_epochs": 4,
        "fine_tune_epochs": 2}
NO_DATA = ("pass --data-root DIR holding cifar10/ and cats-vs-dogs/ (or set CNNLAB_DATA), or run where "
           "CIFAR-10 and the Oxford-IIIT Pet photos can be downloaded")


def find_data(data_root: str | None, cache_dir: Path | None = None) -> tuple[str, str, str]:
    """(CIFAR-10 source, cats-vs-dogs folder, where they came from): ``data_root``, else
    ``$CNNLAB_DATA``, else downloads (CIFAR-10 and Oxford-IIIT Pet's cat/dog labels)."""
    root = data_root or os.environ.get("CNNLAB_DATA")
    if root:
        base = Path(root)
        if not base.is_dir():
            raise CnnlabError(f"data root {base} does not exist; {NO_DATA}")
        missing = [n for n in ("cifar10", "cats-vs-dogs") if not (base / n).is_dir()]
        if missing:
            raise CnnlabError(f"{base} has no {' or '.join(m + '/' for m in missing)}; {NO_DATA}")
        return str(base / "cifar10"), str(base / "cats-vs-dogs"), str(base)
    cache = cache_dir or default_cache_dir()
    try:
        import torchvision
        torchvision.datasets.CIFAR10(cache / "cifar10", train=True, download=True)
        pets = _pets_folder(cache)
    except Exception as exc:
        raise CnnlabError(f"no data found and downloading failed ({type(exc).__name__}); {NO_DATA}") from None
    return "cifar10", str(pets), f"downloaded into {cache}"


def _pets_folder(cache: Path) -> Path:
    """Oxford-IIIT Pet downloaded by torchvision, laid out as cat/ and dog/ folders of links."""
    import torchvision
    folder = cache / "oxford-pets-binary"
    if (folder / "cat").is_dir() and (folder / "dog").is_dir():
        return folder
    for split in ("trainval", "test"):
        ds = torchvision.datasets.OxfordIIITPet(cache / "oxford-pets", split=split,
                                                target_types="binary-category", download=True)
        for image, label in zip(ds._images, ds._bin_labels):
            target = folder / ("cat" if label == 0 else "dog") / Path(image).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(Path(image).resolve(), target)
    return folder


def reproduce(data_root: str | None = None, out: str = "runs/reproduce", quick: bool = False,
              backbone: str = "vgg19", weights: str | None = None, seed: int = 0,
              log: Callable[[str], None] = print, precision: str = "auto") -> tuple[Path, list[str]]:
    """Runs SEED-STUDY.md end to end: the four CIFAR-10 runs, the transfer run, then the report
    (every run in ``precision``). A failing run is recorded and the others go on; returns the
    report's path and the failures."""
    from .report import build_report
    from .train import RunInterrupted
    from .transfer import TransferConfig, transfer

    settings = QUICK if quick else FULL
    cifar, pets, origin = find_data(data_root)
    log(f"data: {cifar} and {pets} ({origin}); {'quick' if quick else 'full'} study into {out}")
    runs: list[Path] = []
    failures: list[str] = []
    report_path = Path(out) / "report.html"

    def attempt(label: str, job: Callable[[], Path]) -> None:
        try:
            runs.append(job())
        except RunInterrupted:
            if runs:
                build_report(runs, report_path, failures=failures + [f"{label}: interrupted"])
            raise
        except Exception as exc:  # one failed run must not lose the others
            message = str(exc) if isinstance(exc, CnnlabError) else f"{type(exc).__name__}: {exc}"
            failures.append(f"{label} failed: {message}")
            log(f"{label} failed: {message}")

    try:
        splits = load_splits(cifar, 32, 0.1, 0.1, seed, per_class=settings["cifar_per_class"])
    except CnnlabError as exc:
        splits = None
        failures.append(f"CIFAR-10 could not be loaded: {exc}")
    for preset in SEED_PRESETS if splits is not None else ():
        cfg = scaled_config(preset, settings["epochs_scale"], data=cifar, out=out, seed=seed, precision=precision)
        log(f"\n=== {preset} ({cfg.epochs} epochs) ===")
        attempt(preset, lambda cfg=cfg: train(cfg, log=log, splits=splits))
    tcfg = TransferConfig(data=pets, backbone=backbone, weights=weights, head="flatten",
                          epochs=settings["transfer_epochs"], fine_tune_epochs=settings["fine_tune_epochs"],
                          seed=seed, out=out, name=f"transfer-{backbone}", precision=precision)
    log(f"\n=== transfer: {backbone} on {pets} ===")
    if settings["pets_per_class"]:
        tsplits = lambda: load_splits(pets, 224, 0.1, 0.1, seed, per_class=settings["pets_per_class"])  # noqa: E731
        attempt(f"transfer ({backbone})", lambda: transfer(tcfg, log=log, splits=tsplits()))
    else:
        attempt(f"transfer ({backbone})", lambda: transfer(tcfg, log=log))
    if not runs:
        raise CnnlabError("; ".join(failures) or "nothing ran")
    build_report(runs, report_path, title="cnnlab: the seed study reproduced" + (" (quick)" if quick else ""),
                 failures=failures)
    return report_path, failures
