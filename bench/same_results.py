"""Trains every preset (and transfer runs) with two versions of cnnlab side by side, same seeds,
single process on the CPU, and says whether their histories, weights and test metrics are bit for
bit the same: the check for a change that must not change behaviour (a restructure, a new option
that is off by default).

    python bench/same_results.py --ref 3a7ce31              # HEAD's working tree against 3a7ce31
    python bench/same_results.py --ref main --per-class 100 --only pool-bn,transfer

The reference is checked out with `git worktree` into a temporary folder; both versions run with
the same Python (this repo's .venv), each with its own cache folder, on one subset of CIFAR-10
images (``--data``, default ../shared/data/cifar10/train).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import linked_subset  # noqa: E402
from cnnlab.runs import read_history  # noqa: E402

TIMING = {"seconds", "train_seconds", "images_per_s", "train_time_s", "feature_extraction_s"}
FAST = ["--epochs", "2"]
# name -> arguments after `cnnlab`; each exercises another path through the loop
RUNS = {
    "conv": ["train", "--preset", "conv", *FAST],
    "pool-bn": ["train", "--preset", "pool-bn", *FAST],
    "pool-bn-fp32-sgd": ["train", "--preset", "pool-bn", "--precision", "fp32", "--optimizer", "sgd",
                         "--schedule", "onecycle", "--augment", "--tta", "--lr", "0.05", *FAST],
    "dropout": ["train", "--preset", "dropout", *FAST],
    "early-stop": ["train", "--preset", "early-stop", "--epochs", "12", "--patience", "1"],
    "fast": ["train", "--preset", "fast", *FAST],
    "transfer": ["transfer", "--backbone", "efficientnet_lite0", "--head", "gap", "--epochs", "2",
                 "--fine-tune-epochs", "1"],
    "transfer-augment": ["transfer", "--backbone", "efficientnet_lite0", "--epochs", "1", "--augment"],
}
TRANSFER_SIZE = 12  # images per class for the transfer runs (224x224: slow on a CPU)


def run(tree: Path, args: list[str], data: Path, out: Path, name: str, cache: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(tree), "CNNLAB_CACHE": str(cache)}
    command = [sys.executable, "-m", "cnnlab.cli", *args, "--data", str(data), "--device", "cpu",
               "--threads", "2", "--out", str(out), "--name", name]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {tree}:\n{done.stderr}")
    return out / name


def compare(a: Path, b: Path) -> dict[str, bool]:
    """history (less timing), model.pt and metrics.json (less timing) equal, each."""
    ha, hb = ([{k: v for k, v in row.items() if k not in TIMING} for row in read_history(r / "history.csv")]
              for r in (a, b))
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    ma, mb = ({k: v for k, v in json.loads((r / "metrics.json").read_text()).items() if k not in TIMING}
              for r in (a, b))
    return {"history": ha == hb, "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
            "metrics": ma == mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the git revision to compare with")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train"))
    parser.add_argument("--per-class", type=int, default=200, help="CIFAR-10 images per class (default 200)")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(RUNS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_tree = tmp / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(ref_tree), args.ref],
                       check=True)
        try:
            cifar = linked_subset(Path(args.data), args.per_class, tmp / "cifar")
            pets = linked_subset(Path(args.data), TRANSFER_SIZE, tmp / "pets")
            failed = 0
            print(f"{'run':<18} {'history':>8} {'weights':>8} {'metrics':>8}")
            for name in names:
                data = pets if RUNS[name][0] == "transfer" else cifar
                a = run(ref_tree, RUNS[name], data, tmp / "out-ref", name, tmp / "cache-ref")
                b = run(ROOT, RUNS[name], data, tmp / "out-new", name, tmp / "cache-new")
                same = compare(a, b)
                failed += not all(same.values())
                print(f"{name:<18} " + " ".join(f"{'same' if v else 'DIFFER':>8}" for v in same.values()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)], check=False)
    print(f"{len(names) - failed} of {len(names)} runs bit-identical to {args.ref}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
