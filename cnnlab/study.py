"""The seed study (SEED-STUDY.md, part 1): four CIFAR-10 variants, then one comparison table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .data import load_splits
from .runs import load_run, write_csv
from .train import resolve_config, train

SEED_PRESETS = ("conv", "pool-bn", "dropout", "early-stop")
TABLE_COLUMNS = ("preset", "params", "epochs run", "best epoch", "train time", "best val acc", "test acc",
                 "test loss")


def run_cifar10_study(data: str, out: str = "runs", epochs_scale: float = 1.0, seed: int = 0,
                      presets: tuple[str, ...] = SEED_PRESETS, log: Callable[[str], None] = print,
                      **overrides) -> list[Path]:
    """Trains each preset with the seed's settings (epochs scaled by ``epochs_scale``) on one
    shared split of ``data``; returns the run directories."""
    configs = []
    for preset in presets:
        base = resolve_config(preset, data=data, out=out, seed=seed, **overrides)
        epochs = max(1, math.ceil(base.epochs * epochs_scale))
        configs.append(resolve_config(preset, data=data, out=out, seed=seed, **{**overrides, "epochs": epochs}))
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
