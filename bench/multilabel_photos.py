"""A multi-label set built from real photos, trained on with ``--multi-label``, and its scores checked
against scikit-learn's on the same predictions.

The set: 2x1 mosaics of the cats-vs-dogs photos (../shared/data/cats-vs-dogs), each half a photo's
central vertical strip (half as wide as tall) so the mosaic is square and nothing is squashed: a cat
and a dog (labels "cat;dog", either side), two cats ("cat") or two dogs ("dog"), a third each, no
photo used twice; JPEG, quality 90, written with labels.csv under --out (default /tmp, never the
repository). Then ``cnnlab transfer`` (efficientnet_lite0, its defaults) and ``cnnlab train``
(pool-bn at 64 px) run on it with --multi-label, each as its own process, timed.

The check, per run: the test split's probabilities the run saved (test_predictions.csv, the very
numbers metrics.json was computed from) scored by scikit-learn (precision_recall_fscore_support at
the run's saved thresholds, average_precision_score, macro and micro) and by cnnlab.multilabel, side
by side with metrics.json; the largest difference is printed, and a difference above 1e-12 fails.
With --recompute the run's model (saved_model.load_model) also scores the test split again, drawn
anew from the labels file, and the largest probability difference to the saved ones is printed (a
transfer run without fine-tuning tested from its float16 feature cache differs by that rounding).

    .venv/bin/python bench/multilabel_photos.py [--mosaics 600] [--runs transfer,train] [--threads 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "cats-vs-dogs"
RUNS = {"transfer": ["transfer", "--model", "efficientnet_lite0"],
        "train": ["train", "--model", "pool-bn", "--image-size", "64", "--epochs", "20", "--batch-size", "32",
                  "--augment", "--monitor", "val_map", "--patience", "5"]}


def strip(path: Path, size: int):
    """The photo's central vertical strip, half as wide as tall, resized to (size / 2) x size."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        width, height = min(w, h // 2), min(h, 2 * w)
        left, top = (w - width) // 2, (h - height) // 2
        return im.crop((left, top, left + width, top + height)).resize((size // 2, size), Image.BILINEAR)


def build(source: Path, out: Path, mosaics: int, size: int, seed: int) -> Path:
    """``out/images/mosaic_i.jpg`` and ``out/labels.csv`` (image,label); returns the labels file."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    photos = {kind: [source / kind / name for name in rng.permutation(sorted(os.listdir(source / kind)))]
              for kind in ("cat", "dog")}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [["image", "label"]]
    for i in range(mosaics):
        kinds = [("cat", "dog"), ("cat", "cat"), ("dog", "dog")][i % 3]
        if rng.random() < 0.5:
            kinds = kinds[::-1]
        canvas = Image.new("RGB", (size, size))
        for side, kind in enumerate(kinds):
            canvas.paste(strip(photos[kind].pop(), size), (side * size // 2, 0))
        name = f"images/mosaic_{i:04d}.jpg"
        canvas.save(out / name, quality=90)
        rows.append([name, ";".join(sorted(set(kinds)))])
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out / "labels.csv"


def sklearn_scores(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> dict:
    """scikit-learn's per-label and averaged scores at ``thresholds``."""
    from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support
    predicted = (probs >= thresholds).astype(int)
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    micro = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "ap": average_precision_score(truth, probs, average=None),
            "map": average_precision_score(truth, probs, average="macro"), "macro_f1": f.mean(),
            "micro_f1": micro[2], "subset_accuracy": accuracy_score(truth, predicted)}


def check(run_dir: Path, recompute: bool) -> dict:
    """metrics.json and cnnlab.multilabel against scikit-learn on the run's saved test predictions."""
    sys.path.insert(0, str(ROOT))
    from cnnlab.multilabel import multilabel_scores
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = json.loads((run_dir / "config.json").read_text())["class_names"]
    with open(run_dir / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[n]) for n in names] for r in rows])
    truth = np.array([[int(n in r["labels"].split(";")) for n in names] for r in rows])
    thresholds = np.array([metrics["thresholds"][n] for n in names])
    theirs = sklearn_scores(probs, truth, thresholds)
    ours = multilabel_scores(probs, truth, names, thresholds)
    table, diffs = [], []
    for j, name in enumerate(names):
        saved, again = metrics["per_label"][name], ours["per_label"][name]
        for key, sk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1"), ("average_precision", "ap")):
            diffs += [abs(saved[key] - theirs[sk][j]), abs(again[key] - theirs[sk][j])]
        table.append({"label": name, "threshold": saved["threshold"], "support": saved["support"],
                      "f1": saved["f1"], "f1_sklearn": float(theirs["f1"][j]),
                      "ap": saved["average_precision"], "ap_sklearn": float(theirs["ap"][j])})
    for key, sk, mine in (("test_map", "map", "map"), ("test_f1", "macro_f1", "f1"), ("test_micro_f1", "micro_f1",
                          "micro_f1"), ("test_subset_accuracy", "subset_accuracy", "subset_accuracy")):
        diffs += [abs(metrics[key] - theirs[sk]), abs(ours[mine] - theirs[sk])]
    result = {"run": str(run_dir), "test_images": len(rows), "labels": table, "map": metrics["test_map"],
              "map_sklearn": float(theirs["map"]), "macro_f1": metrics["test_f1"],
              "macro_f1_sklearn": float(theirs["macro_f1"]), "micro_f1": metrics["test_micro_f1"],
              "micro_f1_sklearn": float(theirs["micro_f1"]), "subset_accuracy": metrics["test_subset_accuracy"],
              "largest_difference": max(diffs), "thresholds_tuned": metrics["thresholds_tuned"]}
    if recompute:
        result["recomputed_largest_probability_difference"] = _recompute(run_dir, names, probs)
    return result


def _recompute(run_dir: Path, names: list[str], saved: np.ndarray) -> float:
    """The run's model over its test split drawn again: the largest difference to the saved probabilities."""
    import torch

    from cnnlab.data import load_multilabel_splits
    from cnnlab.inference import predict_logits
    from cnnlab.saved_model import load_model
    model, config, preprocessing = load_model(run_dir, torch.device("cpu"))
    test = load_multilabel_splits(config["data"], config["labels"], preprocessing.size, config["val_split"],
                                  config["test_split"], config["seed"]).test
    logits = predict_logits(model, test.images, preprocessing, next(model.parameters()).device,
                            tta=config.get("tta", 0), precision=config.get("precision", "auto"))
    return float(np.abs(torch.sigmoid(logits).numpy() - saved).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="a folder with cat/ and dog/ photos")
    parser.add_argument("--out", type=Path, default=Path("/tmp/multilabel-photos"), help="where the set and runs go")
    parser.add_argument("--mosaics", type=int, default=600)
    parser.add_argument("--size", type=int, default=224, help="pixels a side of a mosaic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="transfer,train", help="comma-separated: transfer, train (or none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--recompute", action="store_true", help="also score the test split again with the model")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if not (args.source / "cat").is_dir() or not (args.source / "dog").is_dir():
        sys.exit(f"{args.source} has no cat/ and dog/ folders; pass --source")
    if args.out.resolve().is_relative_to(ROOT):
        sys.exit(f"--out {args.out} is inside the repository; write the set elsewhere (default /tmp)")
    start = time.perf_counter()
    labels = args.out / "labels.csv"
    if not labels.is_file():
        labels = build(args.source, args.out, args.mosaics, args.size, args.seed)
        print(f"built {args.mosaics} mosaics in {args.out} ({time.perf_counter() - start:.1f}s)")
    results = []
    env = {**os.environ, "CNNLAB_CACHE": str(args.out / "cache")}
    for name in [r for r in args.runs.split(",") if r and r != "none"]:
        run_dir = args.out / "runs" / name
        if not (run_dir / "metrics.json").is_file():
            command = [sys.executable, "-m", "cnnlab", *RUNS[name], "--data", str(args.out), "--labels", str(labels),
                       "--multi-label", "--threads", str(args.threads), "--out", str(args.out / "runs"), "--name",
                       name, "--resume-if-exists"]
            began = time.perf_counter()
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            print(f"{name}: {time.perf_counter() - began:.0f}s wall")
        result = check(run_dir, args.recompute)
        results.append(result)
        print(f"\n{name} ({result['test_images']} test mosaics; thresholds tuned: {result['thresholds_tuned']})")
        print(f"{'label':<8}{'threshold':>10}{'F1':>9}{'F1 sklearn':>12}{'AP':>9}{'AP sklearn':>12}{'support':>9}")
        for row in result["labels"]:
            print(f"{row['label']:<8}{row['threshold']:>10.4f}{row['f1']:>9.4f}{row['f1_sklearn']:>12.4f}"
                  f"{row['ap']:>9.4f}{row['ap_sklearn']:>12.4f}{row['support']:>9}")
        print(f"mAP {result['map']:.4f} (scikit-learn {result['map_sklearn']:.4f}), macro F1 {result['macro_f1']:.4f} "
              f"({result['macro_f1_sklearn']:.4f}), micro F1 {result['micro_f1']:.4f} "
              f"({result['micro_f1_sklearn']:.4f}), subset accuracy {result['subset_accuracy']:.4f}; "
              f"largest difference {result['largest_difference']:.1e}")
        if "recomputed_largest_probability_difference" in result:
            print(f"the model run again on the redrawn test split: largest probability difference "
                  f"{result['recomputed_largest_probability_difference']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["largest_difference"] > 1e-12 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
