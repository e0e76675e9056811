"""One process with T threads against torchrun with T ranks of one thread each, side by side
(alternating rounds, so drift on a noisy machine hits both alike): training images/s and the
validation loss after the last epoch, with the same global batch, seed and data.

    python bench/distributed_throughput.py --preset pool-bn --epochs 3 --rounds 2
    python bench/distributed_throughput.py --device cuda --ranks 1   # a lent GPU: one rank vs a plain process

Also prints, per preset, the gradient volume each step all-reduces (what DDP adds per step on
N GPUs; BENCHMARKS.md: "Scaling out").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model  # noqa: E402


def run(args, out: Path, name: str, ranks: int, threads: int) -> dict:
    """One training run; its history (epochs after the first) and final validation loss."""
    command = ["train", "--preset", args.preset, "--data", args.data, "--epochs", str(args.epochs),
               "--no-tensorboard", "--out", str(out), "--name", name, "--device", args.device]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if name.startswith("torchrun"):
        env["OMP_NUM_THREADS"] = str(threads)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                  "-m", "cnnlab", *command]
    else:
        launch = [sys.executable, "-m", "cnnlab", *command, "--threads", str(threads)]
    done = subprocess.run(launch, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    from cnnlab.runs import read_history
    history = read_history(out / name / "history.csv")
    return {"images_per_s": statistics.mean(r["images_per_s"] for r in history[1:]) if len(history) > 1
            else history[0]["images_per_s"], "val_loss": history[-1]["val_loss"],
            "val_accuracy": history[-1]["val_accuracy"]}


def allreduce_volumes() -> list[str]:
    """The float32 gradient bytes a step all-reduces, per preset."""
    from cnnlab.presets import PRESETS, build_model, count_parameters
    lines = []
    for name, preset in PRESETS.items():
        params = count_parameters(build_model(preset.layers, 10))
        lines.append(f"  {name:<11} {params:>10,} parameters  {params * 4 / 1e6:6.1f} MB of gradients a step")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pool-bn")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = 1  # per rank: the ranks share the cores
    plain_threads = (os.cpu_count() or 2) if args.device == "cpu" else 1
    print(f"cpu: {cpu_model()}; {os.cpu_count()} cores; device {args.device}")
    results = {"plain": [], "torchrun": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            results["plain"].append(run(args, Path(tmp), f"plain-{r}", 1, plain_threads))
            results["torchrun"].append(run(args, Path(tmp), f"torchrun-{r}", args.ranks, threads))
            print(f"round {r + 1}: " + "; ".join(f"{k} {v[-1]['images_per_s']:.0f} img/s, val_loss "
                                                 f"{v[-1]['val_loss']:.4f}" for k, v in results.items()), flush=True)
    plain, ranked = ({k: statistics.mean(x[k] for x in v) for k in v[0]} for v in results.values())
    print(f"\n{args.preset}, {args.epochs} epochs, global batch as the preset's, {args.rounds} rounds:")
    print(f"  1 process x {plain_threads} thread(s): {plain['images_per_s']:8.0f} img/s  val_loss "
          f"{plain['val_loss']:.4f}  val_acc {plain['val_accuracy']:.4f}")
    print(f"  {args.ranks} rank(s) x {threads} thread: {ranked['images_per_s']:8.0f} img/s  val_loss "
          f"{ranked['val_loss']:.4f}  val_acc {ranked['val_accuracy']:.4f}")
    print(f"  ratio torchrun / plain: {ranked['images_per_s'] / plain['images_per_s']:.2f}; val_loss differs by "
          f"{abs(ranked['val_loss'] / plain['val_loss'] - 1):.1%}")
    print("\nall-reduce volume per step (DDP, float32 gradients):")
    print("\n".join(allreduce_volumes()))
    print(json.dumps({"plain": plain, "torchrun": ranked}))


if __name__ == "__main__":
    main()
