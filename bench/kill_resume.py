"""SIGKILL a tiny training run at N random moments, resume it each time, and compare the
final weights and history with an uninterrupted run of the same seed.

    python bench/kill_resume.py --kills 20
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cnnlab.runs import read_history  # noqa: E402
from conftest import make_folder  # noqa: E402

TIMING = {"seconds", "train_seconds", "images_per_s"}


def command(*args):
    return [sys.executable, "-m", "cnnlab.cli", *map(str, args)]


def identical(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    ha, hb = ([{k: v for k, v in row.items() if k not in TIMING} for row in read_history(r / "history.csv")]
              for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and ha == hb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_folder(tmp / "data", per_class=40)
        train = ["train", "--preset", "dropout", "--data", data, "--epochs", 6, "--batch-size", 8, "--augment",
                 "--threads", 1, "--out", tmp]
        subprocess.run(command(*train, "--name", "reference"), check=True, capture_output=True)
        start = time.time()
        subprocess.run(command(*train, "--name", "probe"), check=True, capture_output=True)
        duration = time.time() - start
        ok = 0
        for trial in range(args.kills):
            name = f"trial{trial}"
            proc = subprocess.Popen(command(*train, "--name", name), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            moment = rng.uniform(0.5, duration)  # anywhere from start-up to the last epoch
            time.sleep(moment)
            proc.kill()
            proc.wait()
            run = tmp / name
            if not (run / "config.json").exists():  # killed before the run directory existed
                subprocess.run(command(*train, "--name", name), check=True, capture_output=True)
            else:
                subprocess.run(command("resume", run), check=True, capture_output=True)
            same = identical(tmp / "reference", run)
            ok += same
            print(f"trial {trial + 1:>2}: killed {moment:.1f}s after start ... "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
        print(f"{ok}/{args.kills} runs resumed after SIGKILL ended with weights and history identical "
              f"to the uninterrupted run")


if __name__ == "__main__":
    main()
