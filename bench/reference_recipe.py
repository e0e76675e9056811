"""Training images/s of `cnnlab train --model resnet18 --image-size 128` against torchvision's own
recipe (pytorch/vision references/classification/train.py, written here as the equivalent minimal
loop: nothing of it is copied), side by side on the same images, interleaved.

  reference  torchvision.datasets.ImageFolder + DataLoader (shuffled, --workers worker processes)
             decoding every JPEG every epoch, its training transforms (RandomResizedCrop(128),
             RandomHorizontalFlip, PILToTensor, ConvertImageDtype(float), Normalize with ImageNet's
             statistics), resnet18(num_classes) from scratch, SGD (lr 0.1, momentum 0.9, weight decay
             1e-4), cross-entropy, batch --batch; on a CPU in float32 as it ships (its --amp is CUDA's),
             and with --precisions bf16 also under torch.autocast("cpu", bfloat16) for a like-for-like figure
  cnnlab     `cnnlab train --model resnet18 --image-size 128 --augment crop --crop-scale 0.08` with the same
             optimizer, batch and precision: every image decoded once (at 128 x 128) into a uint8 tensor
             cached on disk, batches sliced from memory, crop and flip on the whole uint8 batch

Both run as their own process, in turns (reference then cnnlab, then the other way round), each with
--threads threads. A "first epoch" figure counts everything before the first step too: for cnnlab its
decoding of every image into the cache (a fresh cache each run, holding only the native kernels
compiled once before the rounds, as any run after a machine's first finds them) and the model's set-up, as its
"loaded in" line says; for the reference, its workers' start. "Steady" is the mean of the later
epochs. cnnlab trains on its training split (it holds out --test-split of the images, 5% here, but
decodes them all); images/s is per image trained on, so the two compare.

    python bench/reference_recipe.py --data ../shared/data/cats-vs-dogs --per-class 100 --epochs 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import linked_subset  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference(args) -> dict:
    """torchvision's recipe on ``args.images``; one (images, seconds) per epoch."""
    import torch
    import torchvision
    from torchvision import transforms

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    augment = transforms.Compose([transforms.RandomResizedCrop(args.size, antialias=True),
                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor(),
                                  transforms.ConvertImageDtype(torch.float), transforms.Normalize(MEAN, STD)])
    dataset = torchvision.datasets.ImageFolder(args.images, transform=augment)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    model = torchvision.models.resnet18(num_classes=len(dataset.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    epochs = []
    for _ in range(args.epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        epochs.append((seen, time.perf_counter() - start))
    return {"epochs": epochs, "before_first": 0.0}


def cnnlab(args, precision: str) -> dict:
    """`cnnlab train` on ``args.images`` with a fresh image cache (the native kernels in it already
    compiled, as on any machine after its first run); one (images, seconds) per epoch from
    its history.csv, and the seconds before its first epoch from its "loaded in" line."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "cnnlab", "train", "--model", "resnet18", "--image-size", str(args.size),
                   "--data", str(args.images), "--augment", "crop", "--crop-scale", "0.08", "--optimizer", "sgd",
                   "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4", "--batch-size", str(args.batch),
                   "--epochs", str(args.epochs), "--val-split", "0", "--test-split", "0.05", "--threads",
                   str(args.threads), "--device", "cpu", "--precision", precision, "--no-tensorboard",
                   "--out", tmp, "--name", "run"]
        env = {**os.environ, "CNNLAB_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(ROOT)}
        shutil.copytree(args.kernels, Path(tmp) / "cache" / "kernels")  # compiled once per machine, not per folder
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise SystemExit(f"cnnlab train failed: {done.stderr.strip()[-2000:]}")
        loaded = float(re.search(r"loaded in ([0-9.]+)s", done.stdout).group(1))
        with open(Path(tmp) / "run" / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [(float(r["images_per_s"]) * float(r["train_seconds"]), float(r["train_seconds"])) for r in rows]
    return {"epochs": epochs, "before_first": loaded}


def build_kernels(home: Path) -> Path:
    """cnnlab's native kernels compiled once into ``home`` (a cache folder); their folder."""
    subprocess.run([sys.executable, "-c", "from cnnlab import kernels; kernels.status()"], check=True, cwd=ROOT,
                   env={**os.environ, "CNNLAB_CACHE": str(home), "PYTHONPATH": str(ROOT)})
    (home / "kernels").mkdir(parents=True, exist_ok=True)  # none where no compiler: each run says so
    return home / "kernels"


def rates(result: dict) -> tuple[float, float]:
    """(first epoch's images/s counting what came before it, mean images/s of the later epochs)."""
    (images, seconds), later = result["epochs"][0], result["epochs"][1:]
    first = images / (seconds + result["before_first"])
    return first, statistics.mean(n / s for n, s in later) if later else float("nan")


def reference_process(args, precision: str) -> dict:
    command = [sys.executable, __file__, "--as-reference", "--images", str(args.images), "--precision", precision,
               *[f"--{k}={getattr(args, k)}" for k in ("size", "batch", "epochs", "threads", "workers")]]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the reference recipe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cats-vs-dogs",
                        help="a folder of class folders (default ../shared/data/cats-vs-dogs)")
    parser.add_argument("--per-class", type=int, default=100, help="images of each class, the first by name")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="the reference recipe's default")
    parser.add_argument("--epochs", type=int, default=2, help="the first, then the steady ones")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="the reference's DataLoader workers")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--as-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_reference:
        print(json.dumps(reference(args)))
        return
    import torch
    print(f"torch {torch.__version__}, {args.threads} threads, {args.workers} reference workers, batch {args.batch}, "
          f"{args.size} px, {args.per_class} images a class of {args.data}, {args.epochs} epochs, {args.rounds} rounds")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.images = linked_subset(args.data, args.per_class, Path(tmp) / "images")
        args.kernels = build_kernels(Path(tmp) / "kernels-home")
        for r in range(args.rounds):
            for precision in args.precisions.split(","):
                order = ("reference", "cnnlab") if r % 2 == 0 else ("cnnlab", "reference")
                for system in order:
                    result = reference_process(args, precision) if system == "reference" else cnnlab(args, precision)
                    first, steady = rates(result)
                    results.setdefault((system, precision), []).append((first, steady))
                    print(f"round {r + 1}  {system:<9} {precision}  first epoch {first:6.1f} images/s  "
                          f"steady {steady:6.1f} images/s", flush=True)
    print("\nmedian of the rounds (images/s)\n| precision | reference first | cnnlab first | ratio | reference steady "
          "| cnnlab steady | ratio |\n| --- | --- | --- | --- | --- | --- | --- |")
    for precision in args.precisions.split(","):
        ref, ours = (results[(s, precision)] for s in ("reference", "cnnlab"))
        rf, rs = (statistics.median(v[i] for v in ref) for i in (0, 1))
        of, os_ = (statistics.median(v[i] for v in ours) for i in (0, 1))
        print(f"| {precision} | {rf:.1f} | {of:.1f} | {of / rf:.2f}x | {rs:.1f} | {os_:.1f} | {os_ / rs:.2f}x |")


if __name__ == "__main__":
    main()
