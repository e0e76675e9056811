"""The learning-rate finder against the presets, side by side in one run: for each preset, the
sweep ``cnnlab lr-find`` runs (sized to the preset's run), its suggestion and its ratio to the rate
the preset trains at, the sweep's seconds (best of ``--repeats``), and the preset's training seconds
(one epoch of the real training loop, the faster of a two-epoch run's, its training time alone
without validation, times the preset's epochs), so the sweep's cost as a share of the run; and the
same share counted in optimizer steps, which a shared machine's load does not change. ``--seeds`` sweeps again at other seeds (suggestions
only), ``--backbone`` adds a transfer head (its sweep on the frozen base's features).

    python bench/lr_find.py --data ../shared/data/cifar10/train
    python bench/lr_find.py --data ../shared/data/cifar10/train --presets fast --seeds 0,1,2
    python bench/lr_find.py --data ../shared/data/cifar10/train --presets conv \\
        --backbone efficientnet_lite0 --backbone-data ../shared/data/cats-vs-dogs
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnnlab  # noqa: E402
from cnnlab.config import TrainConfig, TransferConfig  # noqa: E402
from cnnlab.data import load_splits  # noqa: E402
from cnnlab.presets import resolve_config  # noqa: E402
from cnnlab.train import train  # noqa: E402
from common import cpu_model  # noqa: E402

QUIET = lambda m: None  # noqa: E731
SEED_PRESETS = ("conv", "pool-bn", "dropout", "early-stop")


def epoch_seconds(preset: str, data: str, threads: int, out: Path) -> float:
    """The training time of one epoch of ``preset`` (the faster of two), as ``train`` runs it."""
    cfg = resolve_config(preset, data=data, epochs=2, threads=threads, tensorboard=False, out=str(out), name=preset)
    run = train(cfg, log=QUIET)
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return min(float(row["train_seconds"]) for row in rows)


def preset_row(preset: str, args, out: Path) -> str:
    cfg = resolve_config(preset, data=args.data)
    found = [cnnlab.lr_find(preset, args.data, out / f"lr_find-{preset}-{seed}.png", log=QUIET, threads=args.threads,
                            seed=seed) for seed in args.seeds]
    first, suggestions = found[0], [f.suggestion for f in found]
    seconds = min([first.seconds] + [cnnlab.lr_find(preset, args.data, None, log=QUIET, threads=args.threads,
                                                    seed=args.seeds[0]).seconds for _ in range(args.repeats - 1)])
    epoch = epoch_seconds(preset, args.data, args.threads, out)
    training = epoch * cfg.epochs
    run_batches = cfg.epochs * math.ceil(args.train_images / cfg.batch_size)
    steps = len(first.lrs) * first.plan.batches
    others = ", ".join(f"{v:.2g}" for v in first.others.values())
    plan = f"{first.plan.steps}x{first.plan.batches}"
    seeds = " / ".join(f"{s:.2g}" for s in suggestions)
    return (f"| `{preset}` ({cfg.optimizer} {cfg.lr:g}) | {first.suggestion:.2g} | {ratio(first.suggestion, cfg.lr)} | "
            f"{seeds} | {others} | {plan}, {len(first.lrs)} taken, {seconds:.1f} s | {epoch:.1f} s x "
            f"{cfg.epochs} = {training:.0f} s | **{100 * seconds / training:.1f}%** | {steps} / {run_batches} = "
            f"{100 * steps / run_batches:.1f}% |")


def ratio(found: float, lr: float) -> str:
    return f"{lr / found:.1f}x lower" if found < lr else f"{found / lr:.1f}x higher"


def backbone_row(args) -> str:
    started = time.perf_counter()
    found = cnnlab.lr_find(args.backbone, args.backbone_data, None, log=QUIET, threads=args.threads)
    total = time.perf_counter() - started
    others = ", ".join(f"{v:.2g}" for v in found.others.values())
    return (f"| `{args.backbone}` head (adam {TransferConfig.lr:g}) | {found.suggestion:.2g} | "
            f"{ratio(found.suggestion, TransferConfig.lr)} | | {others} | {found.plan.steps}x{found.plan.batches}, "
            f"{len(found.lrs)} taken, {found.seconds:.2f} s (with the features: {total:.0f} s) | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10's training images (a folder of class folders)")
    p.add_argument("--presets", default=",".join(SEED_PRESETS), help="comma-separated presets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds to sweep at (the first is timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="sweeps timed at the first seed (the fastest counts)")
    p.add_argument("--backbone", help="a backbone whose transfer head to sweep too")
    p.add_argument("--backbone-data", help="its photos")
    p.add_argument("--out", help="folder for the plots and the timing runs (default: a temporary one)")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.train_images = len(load_splits(args.data, 32, TrainConfig.val_split, TrainConfig.test_split,
                                        TrainConfig.seed).train)
    print(f"CPU: {cpu_model()}, {args.threads} threads; {args.train_images} training images")
    print("| preset (its lr) | suggested (seed {}) | against the preset's lr | seeds {} | fastai's valley, "
          "minimum, steep | sweep: steps x batches | training: epoch x epochs | sweep / training | in optimizer "
          "steps |".format(args.seeds[0], ", ".join(map(str, args.seeds))))
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        for preset in args.presets.split(","):
            print(preset_row(preset, args, out), flush=True)
        if args.backbone:
            print(backbone_row(args), flush=True)


if __name__ == "__main__":
    main()
