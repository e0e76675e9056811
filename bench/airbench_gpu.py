"""cnnlab's recipes against the original airbench scripts on one GPU, side by side: the same split of
the shared CIFAR-10 images, test accuracy against training seconds.

    python bench/airbench_gpu.py --original PATH/legacy/airbench94.py --original PATH/airbench94_muon.py \
        --runs 5 --recipes speedrun:8 --original-timeout 400   # airbench94_muon compiles for minutes

An original (github.com/KellerJordan/cifar10-airbench, not part of cnnlab; get it yourself) runs
unmodified in a folder of its own: it reads `cifar10/train.pt` and `cifar10/test.pt` there, which
this script writes from the split in the format the original would download (uint8 NHWC images,
labels, class names). An original trains run after run in one process; it is stopped once it has
reported --runs runs after its first, which holds cuDNN's autotuning (and, for airbench94_muon,
torch.compile's) and is reported apart as the warm-up. Each cnnlab run is its own process; its first
epoch holds the same warm-up (and the CUDA-graph capture), so its seconds are given both whole and
from the second epoch on.

Seconds are each tool's own count: an original's `total_time_seconds` (whitening, epochs and its
test-time-augmented pass, timed with CUDA events), cnnlab's `train_time_s` (its epochs).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import ROOT, cells, cnnlab_run, make_split, parse_recipe, summary  # noqa: E402
from cnnlab.folders import decode_images, scan_folder  # noqa: E402  (time_to_accuracy puts ROOT on the path)


def write_cifar_files(split: Path, folder: Path) -> None:
    """``folder``/train.pt and test.pt from ``split``/train and test, as airbench's loader saves
    torchvision's CIFAR-10: {'images': uint8 N x 32 x 32 x 3, 'labels': int64 N, 'classes': [...]}."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        classes, files = scan_folder(split / part)
        images, bad = decode_images([path for path, _ in files], 32)  # N x 3 x 32 x 32, in parallel
        if bad:
            raise SystemExit(f"{len(bad)} unreadable images in {split / part}, {files[bad[0]][0]} first")
        labels = torch.tensor([label for _, label in files])
        torch.save({"images": torch.from_numpy(images.transpose(0, 2, 3, 1).copy()), "labels": labels,
                    "classes": classes}, folder / f"{part}.pt")


def parse_row(line: str, header: list[str]) -> dict[str, str] | None:
    """One row of an airbench table as {column: cell}, or None for other lines."""
    row = cells(line)
    return dict(zip(header, row)) if len(row) == len(header) and line.startswith("|") else None


def original_runs(script: Path, runs: int, cwd: Path, timeout: float) -> tuple[list[tuple[float, float]], str]:
    """(seconds, test-time-augmented accuracy) of the ``runs`` runs after an original's first, and a
    line on its warm-up run; the process is stopped once they are in, or after ``timeout`` seconds."""
    port = subprocess.Popen([sys.executable, str(script)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(timeout, port.kill)  # also when it falls silent (compiling, hung)
    watchdog.start()
    header, results, tail = None, [], []
    for line in port.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if header is None and "epoch" in line and line.startswith("|"):
            header = cells(line)
            continue
        row = parse_row(line, header) if header else None
        if row and row.get("epoch") == "eval":
            seconds = float(row.get("total_time_seconds") or row["time_seconds"])
            results.append((seconds, float(row["tta_val_acc"])))
            print(f"  {script.name} run {len(results)}{' (warm-up)' if len(results) == 1 else ''}: "
                  f"{seconds:.2f} s, {results[-1][1]:.2%}", flush=True)
        if len(results) > runs:
            break
    watchdog.cancel()
    port.kill()
    port.wait()
    if not results:
        raise SystemExit(f"{script} reported no run:\n" + "\n".join(tail))
    warm = f"{script.name} warm-up run: {results[0][0]:.2f} s, {results[0][1]:.2%} (not in its mean)"
    return results[1:], warm


def warm_seconds(run_dir: Path) -> float:
    """A cnnlab run's training seconds from its second epoch on."""
    with open(run_dir / "history.csv") as f:
        return sum(float(r["seconds"]) for r in list(csv.DictReader(f))[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--original", action="append", default=[], type=Path,
                        help="an original airbench script (repeatable), run unmodified")
    parser.add_argument("--runs", type=int, default=5, help="runs of each original after its warm-up, and seeds "
                        "of each recipe")
    parser.add_argument("--recipes", default="speedrun:8", help="PRESET:EPOCHS[:PRECISION][ OPTIONS],...")
    parser.add_argument("--original-timeout", type=float, default=300, help="seconds an original may take in all")
    parser.add_argument("--per-class", type=int, help="use only this many images of each class (a smoke run)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    recipes = {r: parse_recipe(r) for r in args.recipes.split(",") if r}
    if any(recipe is None for recipe in recipes.values()):
        parser.error("--recipes: give PRESET:EPOCHS[:PRECISION][ OPTIONS], for example speedrun:8")
    missing = [str(s) for s in args.original if not s.is_file()]
    if missing:
        parser.error(f"--original {', '.join(missing)}: no such file")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (cnnlab runs on the CPU)"
    print(f"device: {gpu}; torch {torch.__version__}; data {args.data}", flush=True)
    table, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        split = make_split(Path(args.data), Path(tmp) / "data", args.per_class, args.split_seed)
        write_cifar_files(split, Path(tmp) / "original" / "cifar10")
        print(f"train {sum(1 for _ in (split / 'train').rglob('*.*'))} / test "
              f"{sum(1 for _ in (split / 'test').rglob('*.*'))} images", flush=True)
        for script in args.original:
            table[script.name], warm = original_runs(script.resolve(), args.runs, Path(tmp) / "original",
                                                     args.original_timeout)
            notes.append(warm)
        for number, (recipe, (preset, epochs, precision, options)) in enumerate(recipes.items()):
            table[recipe], table[recipe + " (epochs 2+)"] = [], []
            for seed in range(args.runs):
                out = Path(tmp) / "runs" / f"{number}-{seed}"  # one run in each
                seconds, accuracy = cnnlab_run(split, out, preset, epochs, precision, seed, args.threads,
                                               options=options)
                warm = warm_seconds(next(out.iterdir()))
                table[recipe].append((seconds, accuracy))
                table[recipe + " (epochs 2+)"].append((warm, accuracy))
                print(f"  {recipe} seed {seed}: {seconds:.2f} s ({warm:.2f} s from epoch 2), {accuracy:.2%}",
                      flush=True)
    for note in notes:
        print(note)
    for label, results in table.items():
        if results:
            print(summary(label, results), flush=True)
    print(json.dumps({k: [{"train_seconds": s, "test_accuracy": a} for s, a in v] for k, v in table.items()}))


if __name__ == "__main__":
    main()
