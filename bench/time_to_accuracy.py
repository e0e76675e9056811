"""Test accuracy against training seconds: cnnlab's presets and the airbench94 CPU port
(`../shared/anchors/airbench94_cpu.py`) side by side in one run, on the same split of the shared
CIFAR-10 images, each over several seeds (mean and spread).

    python bench/time_to_accuracy.py --seeds 3 --recipes fast:6,fast:8,speedrun:8 --airbench
    python bench/time_to_accuracy.py --per-class 300 --seeds 2 --recipes fast:2 --airbench   # a smoke run
    python bench/time_to_accuracy.py --seeds 1 --recipes speedrun:1,speedrun:2,speedrun:4,speedrun:8 --airbench
                                                  # speedrun at each time budget the port reaches
    python bench/time_to_accuracy.py --seeds 3 --recipes "" --airbench --airbench-precision fp32   # the port in float32
    python bench/time_to_accuracy.py --seeds 1 --recipes speedrun:8,speedrun:8:fp32 --airbench --airbench-precision both
                                                  # what bfloat16 costs each recipe, side by side
    python bench/time_to_accuracy.py --seeds 1 --recipes fast:8 --native both --airbench
                                                  # each recipe with cnnlab's native kernels and without
    python bench/time_to_accuracy.py --tune --seeds 2 --recipes "fast:8,fast:8 --batch-size 1000 --lr 0.17"
                                                  # choosing settings: scored on a part of train/, not test/

The shared folder has no test set: a stratified tenth of it (fixed by --split-seed) becomes test/, the
rest train/; cnnlab trains on all of train/ (`--val-split 0`) and scores test/ once, as the port does.
A recipe may carry `cnnlab train` options after its name (`fast:8 --batch-size 1000`). `--tune` scores
on a stratified ninth of train/ instead (and trains on the rest), so settings are chosen without
touching test/. Runs go round-robin, seed by seed (the port once, then each recipe), so that the
machine's drift over the hour falls on every recipe alike.
Seconds are each tool's own count: cnnlab's `train_time_s` (its epochs), the port's
`total_time_seconds` (its epochs and its final test-time-augmented pass); loading is in neither.
With the port, a last table takes each time budget it reaches (after each of its epochs, the
accuracy it printed then, without test-time augmentation: what a user who stops it there has; then
its end) and sets beside it the most accurate cnnlab recipe whose mean training time fits in it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model  # noqa: E402
from cnnlab.config import PRECISIONS  # noqa: E402
ANCHOR = ROOT.parent / "shared" / "anchors" / "airbench94_cpu.py"


RECIPE = re.compile(r"([\w-]+):(\d+)(?::(" + "|".join(PRECISIONS) + r"))?((?: +\S+)*)")


def parse_recipe(text: str) -> tuple[str, int, str, tuple[str, ...]] | None:
    """PRESET:EPOCHS[:PRECISION][ OPTIONS] as (preset, epochs, precision, "auto" when not given, the
    `cnnlab train` options); None when the text is not of that form."""
    parsed = RECIPE.fullmatch(text.strip())
    if parsed is None:
        return None
    preset, epochs, precision, options = parsed.groups()
    return preset, int(epochs), precision or "auto", tuple(options.split())


def make_split(source: Path, work: Path, per_class: int | None, seed: int, tune: bool = False) -> Path:
    """work/train/<class>/ and work/test/<class>/ of links, a stratified tenth as the test set; with
    ``tune``, that tenth is left out and a ninth of the rest is scored instead."""
    import torch

    from cnnlab.data import stratified_split
    from cnnlab.folders import scan_folder
    classes, files = scan_folder(source, per_class)
    labels = torch.tensor([label for _, label in files])
    train, _, test = stratified_split(labels, 0.0, 0.1, seed)
    if tune:  # a ninth of the rest is as many images as the test tenth
        kept, _, held = stratified_split(labels[train], 0.0, 1 / 9, seed)
        train, test = train[kept], train[held]
    for part, index in (("train", train), ("test", test)):
        for i in index.tolist():
            path, label = files[i]
            target = work / part / classes[label] / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return work


def cnnlab_run(data: Path, out: Path, preset: str, epochs: int, precision: str, seed: int,
               threads: int, native: bool = True, options: tuple[str, ...] = ()) -> tuple[float, float]:
    """(training seconds, test accuracy) of one `cnnlab train` run on all of train/, with ``options``
    added to its command line; ``native`` False runs it with the native kernels switched off
    (CNNLAB_NATIVE=0)."""
    name = "-".join([preset, str(epochs), precision, str(seed), *(o.strip("-") for o in options)]) \
        + ("" if native else "-stock")
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--preset", preset, "--data", str(data),
                           "--val-split", "0", "--epochs", str(epochs), "--precision", precision, "--seed", str(seed),
                           "--threads", str(threads), "--no-tensorboard", "--out", str(out), "--name", name,
                           *options],
                          capture_output=True, text=True, env={**os.environ, "CNNLAB_NATIVE": "1" if native else "0"})
    if done.returncode:
        raise SystemExit(f"cnnlab {name} failed: {done.stderr.strip()[-2000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    return metrics["train_time_s"], metrics["test_accuracy"]


def forget_port_cache() -> None:
    """Delete the port's decoded images: it caches them by name alone, not by folder."""
    for stale in Path("/tmp").glob("ab94-*.pt"):
        stale.unlink()


# The port as shipped trains in bfloat16 autocast, emulated (and many times slower) on a CPU without
# AVX512-BF16 or AMX. In float32 it runs with that autocast switched off and nothing else changed:
# the fair baseline there, and on a bfloat16 CPU a measure of what bfloat16 costs the recipe.
FLOAT32_PORT = """import runpy, sys, torch
class _Float32(torch.autocast):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "enabled": False})
torch.autocast = _Float32
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def cells(line: str) -> list[str]:
    """The cells of one `|  a  |  b  |` line of an airbench table (the port's, or the original scripts')."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def airbench_runs(data: Path, runs: int, threads: int, precision: str = "bf16") -> list[dict]:
    """Each port run, in its bfloat16 autocast as shipped (``precision`` "bf16") or with it off
    ("fp32"): its training seconds and test accuracy with its test-time augmentation, and its
    ``curve``, the (seconds, test accuracy without test-time augmentation) it printed after each epoch."""
    env = {**os.environ, "AB_TRAIN": str(data / "train"), "AB_TEST": str(data / "test"), "THREADS": str(threads),
           "RUNS": str(runs), "PYTHONUNBUFFERED": "1"}  # each run reported as it ends
    results, curve = [], []
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile("w+") as err:  # the port writes logs/ in cwd
        command = [sys.executable, str(ANCHOR)] if precision == "bf16" else [sys.executable, "-c", FLOAT32_PORT, str(ANCHOR)]
        port = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env, cwd=cwd)
        for line in port.stdout:  # |  run  |  epoch  |  loss | acc | val_acc | tta_val_acc | seconds |
            row = cells(line)
            if len(row) == 7 and row[1].isdigit():
                curve.append((float(row[6]), float(row[4])))
            elif len(row) == 7 and row[1] == "eval":
                run = {"seconds": float(row[6]), "accuracy": float(row[5]), "curve": curve}
                results.append(run)
                curve = []
                print(f"  airbench94 port ({precision}) run {len(results)}: {run['seconds']:.1f} s, "
                      f"{run['accuracy']:.2%}; after each epoch: "
                      + ", ".join(f"{a:.2%} ({s:.0f} s)" for s, a in run["curve"]), flush=True)
        if port.wait():
            err.seek(0)
            raise SystemExit(f"airbench94 port failed: {err.read().strip()[-2000:]}")
    return results


def port_budgets(runs: list[dict]) -> list[tuple[str, float, float]]:
    """The time budgets the port reaches, as (when, mean seconds, mean test accuracy): after each epoch
    (its schedule stopped there: what a user who stops it then has, scored without test-time
    augmentation), then at its end with its test-time augmentation."""
    epochs = min(len(run["curve"]) for run in runs)
    points = [(f"epoch {e + 1}", statistics.mean(run["curve"][e][0] for run in runs),
               statistics.mean(run["curve"][e][1] for run in runs)) for e in range(epochs)]
    return points + [("end, with TTA", statistics.mean(run["seconds"] for run in runs),
                      statistics.mean(run["accuracy"] for run in runs))]


def budget_table(port: list[tuple[str, float, float]], recipes: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """For each budget the port reaches, the most accurate cnnlab recipe whose mean training time
    fits in it (None when none does), by mean test accuracy."""
    means = {r: (statistics.mean(s for s, _ in v), statistics.mean(a for _, a in v)) for r, v in recipes.items() if v}
    rows = []
    for when, seconds, accuracy in port:
        fitting = [(acc, s, r) for r, (s, acc) in means.items() if s <= seconds]
        best = max(fitting) if fitting else None
        rows.append({"port": when, "seconds": seconds, "port_accuracy": accuracy,
                     "cnnlab": best and best[2], "cnnlab_seconds": best and best[1], "cnnlab_accuracy": best and best[0]})
    return rows


def print_budgets(label: str, rows: list[dict]) -> None:
    print(f"time budgets {label} reaches (its epochs on its own schedule, no TTA; then its end) against the most "
          "accurate cnnlab recipe that fits in each:", flush=True)
    for row in rows:
        ours = (f"{row['cnnlab']:<24} {row['cnnlab_seconds']:8.1f} s {row['cnnlab_accuracy']:7.2%}  "
                f"{(row['cnnlab_accuracy'] - row['port_accuracy']) * 100:+6.2f} points" if row["cnnlab"]
                else "(no recipe fits)")
        print(f"  {row['port']:<14} {row['seconds']:8.1f} s {row['port_accuracy']:7.2%}   {ours}", flush=True)


def summary(label: str, results: list[tuple[float, float]]) -> str:
    seconds, accs = zip(*results)
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return (f"{label:<18} {statistics.mean(seconds):8.1f} s ± {spread(seconds):5.1f}   "
            f"{statistics.mean(accs):7.2%} ± {spread(accs):.2%}   (n={len(results)}: "
            + ", ".join(f"{a:.2%}" for a in accs) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--recipes", default="fast:8",
                        help="PRESET:EPOCHS[:PRECISION][ OPTIONS],... (default fast:8; PRECISION "
                             f"{', '.join(PRECISIONS)}, default auto; OPTIONS: `cnnlab train` options)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="cnnlab's seeds are FIRST-SEED and on (the port's "
                        "runs are unseeded)")
    parser.add_argument("--airbench", action="store_true", help="also run the airbench94 CPU port, --seeds times")
    parser.add_argument("--airbench-precision", choices=("bf16", "fp32", "both"), default="bf16",
                        help="the port's precision: bf16 (its autocast, as shipped), fp32 (autocast off) or both, "
                             "round-robin")
    parser.add_argument("--native", choices=("on", "both"), default="on",
                        help="both: each recipe also with cnnlab's native kernels switched off, as 'RECIPE (stock)'")
    parser.add_argument("--per-class", type=int, help="use only this many images of each class (a smoke run)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true", help="score on a stratified ninth of train/, not on test/ "
                        "(for choosing settings; the port, with --airbench, scores on it too)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    parsed = {r: parse_recipe(r) for r in args.recipes.split(",") if r}  # "" runs the port alone
    bad = [r for r, recipe in parsed.items() if recipe is None]
    if bad:
        parser.error(f"--recipes {','.join(bad)}: give PRESET:EPOCHS[:PRECISION][ OPTIONS], for example fast:8, "
                     "fast:8:fp32 or 'fast:8 --batch-size 1000'")
    natives = (True, False) if args.native == "both" else (True,)
    recipes = {r + ("" if native else " (stock)"): (*recipe, native) for r, recipe in parsed.items() for native in natives}
    port_precisions = ("bf16", "fp32") if args.airbench_precision == "both" else (args.airbench_precision,)
    ports = {precision: "airbench94 port" + (" (fp32)" if precision == "fp32" else "")
             for precision in port_precisions if args.airbench}
    cpu = cpu_model()
    print(f"cpu: {cpu}, {args.threads} threads; data {args.data}" + (f", {args.per_class} per class" if
                                                                       args.per_class else ""), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_split(Path(args.data), Path(tmp) / "data", args.per_class, args.split_seed, args.tune)
        print(f"train {sum(1 for _ in (data / 'train').rglob('*.*'))} / test "
              f"{sum(1 for _ in (data / 'test').rglob('*.*'))} images", flush=True)
        port_runs = {label: [] for label in ports.values()}
        ours = {r: [] for r in recipes}
        forget_port_cache()
        # Round-robin (port, then each recipe, seed by seed): the machine's speed drifts over an hour,
        # and running all of one recipe first would hand it a different machine than the next.
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for precision, label in ports.items():
                port_runs[label] += airbench_runs(data, 1, args.threads, precision)
            for recipe, (preset, epochs, precision, options, native) in recipes.items():
                ours[recipe].append(cnnlab_run(data, Path(tmp) / "runs", preset, epochs, precision, seed,
                                             args.threads, native, options))
                print(f"  {recipe} seed {seed}: {ours[recipe][-1][0]:.1f} s, {ours[recipe][-1][1]:.2%}", flush=True)
        budgets = {label: budget_table(port_budgets(runs), ours) for label, runs in port_runs.items()}
        table = {**{label: [(run["seconds"], run["accuracy"]) for run in runs] for label, runs in port_runs.items()},
                 **ours}
        for label, results in table.items():
            print(summary(label, results), flush=True)
        for label, rows in budgets.items():
            print_budgets(label, rows)
    print(json.dumps({"runs": {k: [{"train_seconds": s, "test_accuracy": a} for s, a in v] for k, v in table.items()},
                      "port_curves": {k: [run["curve"] for run in v] for k, v in port_runs.items()},
                      "budgets": budgets}))


if __name__ == "__main__":
    main()
