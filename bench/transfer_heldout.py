"""Transfer learning scored on photos it never saw, the way a user's photos come: every fifth file id
of each class is held out of the folder that `cnnlab transfer` trains on, then re-encoded at other
sizes and JPEG qualities (a seeded draw per photo); each recipe trains on the rest with
`cnnlab transfer` and is scored with `cnnlab evaluate` on the held-out photos. Prints wall time,
the run's own test split and the held-out accuracy, side by side in one run: all of them, then
those shrunk (thumbnails: 0.4x and 0.6x) and those enlarged (1.5x-4x, as photos come from a camera)
apart.

    python bench/transfer_heldout.py --backbones efficientnet_lite0,efficientnet_lite1 \\
        --recipes "defaults=;gap=--head gap;gap+ft=--head gap --fine-tune-epochs 2"
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CNNLAB = [sys.executable, "-m", "cnnlab"]


SIZES = ("smaller", "larger")


def split_by_id(source: Path, work: Path, every: int, seed: int) -> tuple[Path, Path, int]:
    """(training folder of links, held-out folder of re-encoded photos in smaller/ and larger/,
    held-out count)."""
    train, held = work / "train", work / "heldout"
    rng = random.Random(seed)
    count = 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (train / folder.name).mkdir(parents=True)
        for size in SIZES:
            (held / size / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir()):
            if not photo.stem.isdigit() or int(photo.stem) % every:
                (train / folder.name / photo.name).symlink_to(photo.resolve())
                continue
            with Image.open(photo) as im:
                im = im.convert("RGB")
                scale = rng.choice([0.4, 0.6, 1.5, 2.5, 4.0])  # thumbnails, phone photos, crops
                im = im.resize((max(16, round(im.width * scale)), max(16, round(im.height * scale))), Image.BICUBIC)
                size = SIZES[scale > 1]
                im.save(held / size / folder.name / f"{photo.stem}.jpg", quality=rng.choice([25, 40, 60, 80, 95]))
            count += 1
    return train, held, count


def held_out_accuracy(run: Path, held: Path, env: dict) -> dict[str, float]:
    """Accuracy of the run on all held-out photos, and on the smaller and the larger ones apart."""
    scores = {}
    for size in SIZES:
        done = subprocess.run([*CNNLAB, "evaluate", str(run), "--data", str(held / size), "--json"],
                              capture_output=True, text=True, env=env, check=True)
        scores[size] = json.loads(done.stdout)
    right = sum(s["accuracy"] * s["images"] for s in scores.values())
    return {"all": right / sum(s["images"] for s in scores.values()), **{k: v["accuracy"] for k, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cats-vs-dogs"))
    parser.add_argument("--backbones", default="efficientnet_lite0")
    parser.add_argument("--recipes", default="defaults=", help="NAME=ARGS;... (ARGS added to cnnlab transfer)")
    parser.add_argument("--every", type=int, default=5, help="hold out file ids divisible by this (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recipes = [r.split("=", 1) for r in args.recipes.split(";") if r]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, held, count = split_by_id(Path(args.data), work, args.every, args.seed)
        print(f"held out {count} photos (file id % {args.every} == 0), re-encoded at 0.4-4x size, JPEG quality "
              f"25-95; training folder: the other {sum(1 for _ in train.rglob('*.jpg'))}", flush=True)
        print(f"{'backbone':<20} {'recipe':<14} {'wall s':>7} {'own test':>9} {'held out':>9} {'smaller':>8} "
              f"{'larger':>8}", flush=True)
        for backbone in args.backbones.split(","):
            for name, extra in recipes:
                run_name = f"{backbone}-{name}".replace("+", "-")
                start = time.perf_counter()
                done = subprocess.run([*CNNLAB, "transfer", "--data", str(train), "--backbone", backbone,
                                       *extra.split(), "--out", str(work / "runs"), "--name", run_name,
                                       "--no-tensorboard"], capture_output=True, text=True, env=env)
                wall = time.perf_counter() - start
                if done.returncode:
                    print(f"{backbone:<20} {name:<14} failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                    continue
                run = work / "runs" / run_name
                own = json.loads((run / "metrics.json").read_text())["test_accuracy"]
                held_out = held_out_accuracy(run, held, env)
                print(f"{backbone:<20} {name:<14} {wall:7.0f} {own:9.2%} {held_out['all']:9.2%} "
                      f"{held_out['smaller']:8.2%} {held_out['larger']:8.2%}", flush=True)


if __name__ == "__main__":
    main()
