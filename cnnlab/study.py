"""The seed study (SEED-STUDY.md): four CIFAR-10 variants with one comparison table, then
``reproduce``, the whole two-part study with the transfer run and the report (which holds the
original's figures to put beside ours)."""
from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Callable

from . import distributed
from .backbones import choose_weights, get_backbone
from .cache import default_cache_dir
from .config import ReproduceConfig, TrainConfig, TransferConfig
from .data import SPLIT_NAMES, Splits, load_splits
from .folders import scan_folder
from .errors import CnnlabError, RunInterrupted
from .presets import resolve_config
from .report import build_report
from .runs import load_run, read_history, write_csv
from .runtime import setup
from .train import train
from .transfer import transfer

SEED_PRESETS = ("conv", "pool-bn", "dropout", "early-stop")
TABLE_COLUMNS = ("preset", "params", "epochs run", "best epoch", "train time", "best val acc", "test acc",
                 "test bal acc", "test loss")


def scaled_config(preset: str, epochs_scale: float, **settings):
    """``resolve_config`` with the preset's epochs multiplied by ``epochs_scale`` (at least 1)."""
    base = resolve_config(preset, **settings)
    return resolve_config(preset, **{**settings, "epochs": max(1, math.ceil(base.epochs * epochs_scale))})


def run_cifar10_study(data: str, out: str = "runs", epochs_scale: float = 1.0, seed: int = 0,
                      presets: tuple[str, ...] = SEED_PRESETS, log: Callable[[str], None] = print,
                      **overrides) -> list[Path]:
    """Trains each preset with the seed's settings (epochs scaled by ``epochs_scale``) on one
    shared split of ``data``; returns the run directories."""
    configs = study_configs(data, out, epochs_scale, seed, presets, **overrides)
    first = configs[0]
    setup(first.device, first.threads)  # under torchrun: the ranks meet before loading the data together
    splits = distributed.main_first(lambda: load_splits(data, first.preprocessing.size, first.val_split,
                                                        first.test_split, seed, labels=first.labels))
    return train_each(configs, splits, log)


def study_configs(data: str, out: str, epochs_scale: float, seed: int, presets: tuple[str, ...],
                  **overrides) -> list[TrainConfig]:
    """Each preset's settings for the study: the seed's, epochs scaled by ``epochs_scale``."""
    unknown = [p for p in presets if p not in SEED_PRESETS]
    if unknown:
        raise CnnlabError(f"--presets: '{unknown[0]}' is not in the seed study; choose from {','.join(SEED_PRESETS)}")
    return [scaled_config(preset, epochs_scale, data=data, out=out, seed=seed, **overrides) for preset in presets]


def train_each(configs: list[TrainConfig], splits: Splits, log: Callable[[str], None],
               attempt: Callable | None = None) -> list[Path]:
    """Trains each of ``configs`` on ``splits``; returns the run directories. With
    ``attempt(label, job)``, each run goes through it (``reproduce`` records a failed run and
    goes on)."""
    runs = []
    for cfg in configs:
        log(f"\n=== {cfg.preset} ({cfg.epochs} epochs) ===")
        job = partial(train, cfg, log=log, splits=splits)
        run = attempt(cfg.preset, job) if attempt else job()
        if run is not None:
            runs.append(run)
    return runs


def comparison_rows(runs: list[Path]) -> list[list[str]]:
    """One row per run, the columns of ``TABLE_COLUMNS``."""
    rows = []
    for run in runs:
        config, m = load_run(run)
        rows.append([config["preset"], f"{m['parameters']:,}", str(m["epochs_run"]), str(m["best_epoch"]),
                     f"{m['train_time_s']:.1f}s", f"{m['best_val_accuracy']:.2%}" if m.get("best_val_accuracy") is not None else "-", f"{m['test_accuracy']:.2%}",
                     f"{m['test_balanced_accuracy']:.2%}" if m.get("test_balanced_accuracy") is not None else "-",
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


def full_time_estimate(runs: list[Path], cifar_images: int, pet_images: int) -> tuple[float, list[str]]:
    """Seconds the full study would take here, and one "name ~N min" per part, from the quick
    runs' own measured speeds (train and validation seconds per image, feature extraction per
    image) scaled to the full data and epochs. Decoding the images the first time is not in it."""
    total, parts = 0.0, []
    for run in runs:
        config, metrics = load_run(run)
        history = read_history(run / "history.csv")
        if config.get("kind") == "transfer":
            quick_images = sum(config["data_info"][f"{n}_size"] for n in ("train", "val", "test"))
            seconds = metrics.get("feature_extraction_s", 0.0) / quick_images * pet_images
            for phase, epochs in (("frozen", FULL["transfer_epochs"]), ("fine-tune", FULL["fine_tune_epochs"])):
                rows = [r for r in history if r.get("phase") == phase]
                if rows:
                    seconds += epochs * _epoch_seconds(rows, config, pet_images)
            name = f"{run.name} ~{_duration(seconds)}"
        else:
            epochs = resolve_config(config["preset"]).epochs
            seconds = epochs * _epoch_seconds(history, config, cifar_images)
            capped = " at most (it stops itself)" if resolve_config(config["preset"]).patience is not None else ""
            name = f"{config['preset']} ~{_duration(seconds)}{capped}"
        total += seconds
        parts.append(name)
    return total, parts


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _epoch_seconds(rows: list[dict], config: dict, images: int) -> float:
    """An epoch's seconds over ``images`` images split as ``config``'s run split its own."""
    info = config["data_info"]
    quick = {n: info[f"{n}_size"] for n in ("train", "val", "test")}
    share = {n: quick[n] / sum(quick.values()) for n in quick}
    steady = rows[1:] or rows  # the first epoch also warms up
    train_per_image = sum(r["train_seconds"] for r in steady) / (len(steady) * quick["train"])
    val_per_image = sum(r["seconds"] - r["train_seconds"] for r in steady) / (len(steady) * max(quick["val"], 1))
    return images * (share["train"] * train_per_image + share["val"] * val_per_image)


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
    """Oxford-IIIT Pet downloaded by torchvision, laid out as cat/ and dog/ folders of links. The
    species of each photo comes from the data set's own annotation files (``annotations/SPLIT.txt``:
    image, breed, species 1 for cats and 2 for dogs, breed index)."""
    import torchvision
    folder = cache / "oxford-pets-binary"
    if (folder / "cat").is_dir() and (folder / "dog").is_dir():
        return folder
    for split in ("trainval", "test"):
        torchvision.datasets.OxfordIIITPet(cache / "oxford-pets", split=split, download=True)
        base = cache / "oxford-pets" / "oxford-iiit-pet"
        for line in (base / "annotations" / f"{split}.txt").read_text().splitlines():
            image_id, _, species, _ = line.split()
            target = folder / ("cat" if species == "1" else "dog") / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink((base / "images" / f"{image_id}.jpg").resolve(), target)
    return folder


def reproduce_study(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> tuple[Path, list[str]]:
    """Runs SEED-STUDY.md end to end: the four CIFAR-10 runs, the transfer run, then the report
    (every run in ``cfg.precision``, on ``cfg.threads`` CPU threads). A failing run is recorded and
    the others go on; returns the report's path and the failures."""
    get_backbone(cfg.backbone)  # an unknown name fails here, before any work
    settings = QUICK if cfg.quick else FULL
    setup("auto", cfg.threads)  # under torchrun: the ranks meet before loading the data together
    cifar, pets, origin = distributed.main_first(lambda: find_data(cfg.data_root))
    writes = distributed.is_main()
    log(f"data: {cifar} and {pets} ({origin}); {'quick' if cfg.quick else 'full'} study into {cfg.out}")
    runs: list[Path] = []
    failures: list[str] = []
    report_path = Path(cfg.out) / "report.html"

    def attempt(label: str, job: Callable[[], Path]) -> Path | None:
        try:
            runs.append(job())
            return runs[-1]
        except RunInterrupted:
            if runs and writes:
                build_report(runs, report_path, failures=failures + [f"{label}: interrupted"], log=log)
            raise
        except Exception as exc:  # one failed run must not lose the others
            message = str(exc) if isinstance(exc, CnnlabError) else f"{type(exc).__name__}: {exc}"
            failures.append(f"{label} failed: {message}")
            log(f"{label} failed: {message}")
            return None

    try:
        splits = distributed.main_first(lambda: load_splits(cifar, 32, 0.1, 0.1, cfg.seed,
                                                            per_class=settings["cifar_per_class"]))
    except CnnlabError as exc:
        splits = None
        failures.append(f"CIFAR-10 could not be loaded: {exc}")
    if splits is not None:
        configs = study_configs(cifar, cfg.out, settings["epochs_scale"], cfg.seed, SEED_PRESETS,
                                precision=cfg.precision, threads=cfg.threads)
        train_each(configs, splits, log, attempt)
    # the settings as the study was written up (batch 32, lr 1e-3, fine-tuning at lr / 10 through the whole base,
    # none in the default recipe): later defaults leave the study's runs as they were
    size = choose_weights(cfg.backbone, None, cfg.weights_file).preprocessing.size  # the weights' own, as then
    common = dict(data=pets, backbone=cfg.backbone, weights_file=cfg.weights_file, image_size=size,
                  epochs=settings["transfer_epochs"], seed=cfg.seed, out=cfg.out, precision=cfg.precision,
                  threads=cfg.threads, batch_size=32, lr=1e-3, fine_tune_lr=None, fine_tune_cached=False)
    # the seed's recipe (flatten head, fine-tuning, no test-time augmentation), then cnnlab's default beside it
    recipes = [("the seed's recipe", TransferConfig(**common, head="flatten", tta=0, name=f"transfer-{cfg.backbone}",
                                                    fine_tune_epochs=settings["fine_tune_epochs"])),
               ("cnnlab's default recipe", TransferConfig(**common, name=f"transfer-{cfg.backbone}-default",
                                                          fine_tune_epochs=0))]
    tsplits = None  # both recipes train on one split

    def transfer_run(tcfg: TransferConfig) -> Path:
        nonlocal tsplits
        if settings["pets_per_class"] and tsplits is None:
            tsplits = distributed.main_first(lambda: load_splits(pets, size, 0.1, 0.1, cfg.seed,
                                                                 per_class=settings["pets_per_class"]))
        return transfer(tcfg, log=log, splits=tsplits)
    for label, tcfg in recipes:
        log(f"\n=== transfer: {cfg.backbone} on {pets}, {label} ===")
        attempt(f"transfer ({cfg.backbone}, {label})", partial(transfer_run, tcfg))
    if not runs:
        raise CnnlabError("; ".join(failures) or "nothing ran")
    if writes:
        build_report(runs, report_path, title="cnnlab: the seed study reproduced" + (" (quick)" if cfg.quick else ""),
                     failures=failures, log=log)
    if cfg.quick and not failures:
        _say_full_time(runs, cifar, pets, log)
    return report_path, failures


def _say_full_time(runs: list[Path], cifar: str, pets: str, log: Callable[[str], None]) -> None:
    cifar_images = 50_000 if cifar == "cifar10" else _image_count(Path(cifar))
    seconds, parts = full_time_estimate(runs, cifar_images, _image_count(Path(pets)))
    log(f"\nthe full study (reproduce without --quick) would take about {_duration(seconds)} on this machine: "
        f"{', '.join(parts)}; estimated from this run's own speeds, plus decoding the images the first time")


def _image_count(folder: Path) -> int:
    """The images the full study would load from ``folder`` (its train/, val/, test/ when it has them)."""
    parts = [folder / s for s in SPLIT_NAMES if (folder / s).is_dir()] or [folder]
    return sum(len(scan_folder(part)[1]) for part in parts)
