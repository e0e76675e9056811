"""The finished runs a report shows, read from their folders and checked: a run folder may come
from someone else, so a non-number where a number belongs is a one-line "damaged" error and no file
is read through a link leading out; an older metrics.json is rescored from its confusion matrix; each
run is matched with the original study's experiment it reproduces, if any (``SEED_FIGURES``)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CnnlabError
from .metrics import METRICS_VERSION, summarize
from .runs import load_run, read_history

# The original study's figures (SEED-STUDY.md), shown beside a run that reproduces one (``_seed_key``).
SEED_FIGURES = {
    "conv": {"epochs": "20", "time": "803.6 s (~40 s/epoch)", "val": "~66% (peak, epoch 5)", "test": "57.19%",
             "notes": "train acc 98%: heavy overfitting"},
    "pool-bn": {"epochs": "20", "time": "~12 s/epoch", "val": "~76% (epoch 13)", "test": "n/a", "notes": ""},
    "dropout": {"epochs": "60", "time": "383.2 s (~6 s/epoch)", "val": "~69%", "test": "59.42%",
                "notes": "test images scaled unlike training images"},
    "early-stop": {"epochs": "stopped at 12", "time": "~3 s/epoch", "val": "~68%", "test": "n/a",
                   "notes": "restored epoch 7"},
    "transfer": {"epochs": "3-4", "time": "n/a", "val": "n/a", "test": "97.29%",
                 "notes": "VGG19, frozen conv base, 1 sigmoid unit"},
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

METRICS_READ = ("best_epoch", "parameters", "epochs_run", "train_time_s", "images_per_s", "test_accuracy",
                "test_loss", "confusion_matrix", "per_class")
METRICS_NUMBERS = ("train_time_s", "images_per_s", "test_accuracy", "test_loss")  # below: a number, absent or None
METRICS_OPTIONAL = ("best_val_accuracy", "run_time_s", "feature_extraction_s", "train_accuracy_eval",
                    "train_accuracy_at_best", "test_balanced_accuracy", "metrics_version", "best_val_map")
# a run of several labels per image (--multi-label): per-label scores and mAP, no confusion matrix
MULTI_LABEL_NUMBERS = ("test_map", "test_f1", "test_micro_f1")
MULTI_LABEL_READ = tuple(k for k in METRICS_READ if k not in ("confusion_matrix", "per_class")) + \
    MULTI_LABEL_NUMBERS + ("per_label",)
LABEL_SCORES = ("precision", "recall", "f1", "average_precision", "threshold")
HISTORY_READ = ("epoch", "loss", "accuracy")
VALIDATION_READ = ("val_loss", "val_accuracy")  # absent from a run trained with --val-split 0


def is_number(v, count: bool = False) -> bool:  # a JSON number (a count: an integer, 0 or more), not a bool
    return not isinstance(v, bool) and (isinstance(v, int) and v >= 0 if count else isinstance(v, (int, float)))


def damaged(run_dir: Path, what: str) -> CnnlabError:
    return CnnlabError(f"{run_dir} is damaged ({what}); restore the file from a copy, or leave the run out of the report")


def inside(path: Path, root: Path) -> bool:  # links followed, ``path`` (if any) stays inside the folder ``root``
    try:
        return not (path.is_symlink() or path.exists()) or path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a loop of links
        return False


def read_run(run_dir: Path) -> dict | None:
    for name in ("config.json", "metrics.json", "history.csv"):  # never read through a link leading out
        if not inside(run_dir / name, run_dir.resolve()):
            raise damaged(run_dir, f"{name} is a link leading out of the run")
    config, metrics = load_run(run_dir)
    if metrics is None:
        return None
    history = read_history(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
    data_info = config.get("data_info")
    validated = not (isinstance(data_info, dict) and data_info.get("val_size") == 0)  # not with --val-split 0
    multi = metrics.get("multi_label") is True
    missing = [f"metrics.json: {k}" for k in (MULTI_LABEL_READ if multi else METRICS_READ) if k not in metrics] + [
        f"history.csv row {i + 1}: {k}" for i, row in enumerate(history)
        for k in HISTORY_READ + (VALIDATION_READ if validated else ()) if not is_number(row.get(k))]
    names = config.get("class_names")
    if not missing and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        missing = ["config.json: class_names"]
    problem = f"{missing[0]} missing or not a number" if missing else _problem(config, metrics, len(names), len(history))
    if problem:
        raise damaged(run_dir, problem)
    rescored = not multi and _rescore(metrics, names)
    per_class, scores = (metrics["per_label"], LABEL_SCORES) if multi else (metrics["per_class"], LABEL_SCORES[:3])
    if not isinstance(per_class, dict) or not all(
            isinstance(s, dict) and all(is_number(s.get(k)) for k in scores)
            and is_number(s.get("support"), True) for s in per_class.values()):
        raise damaged(run_dir, f"metrics.json: {'per_label' if multi else 'per_class'} holds a score or support that "
                               "is not a number")
    kind = config.get("kind", "train")
    model = config.get("backbone") if kind == "transfer" else config.get("preset")
    return {"dir": run_dir, "name": run_dir.name, "config": config, "metrics": metrics, "history": history,
            "kind": kind, "model": "?" if model is None else str(model), "gap": _gap(metrics, history, validated, kind),
            "seed": SEED_FIGURES.get(_seed_key(config, kind)), "rescored": rescored, "validated": validated,
            "multi_label": multi}


def _problem(config: dict, metrics: dict, classes: int, epochs: int) -> str | None:
    """What makes the record unfit to show (a non-number where a number belongs), or None."""
    multi = metrics.get("multi_label") is True
    numbers = [k for k in METRICS_NUMBERS + (MULTI_LABEL_NUMBERS if multi else ()) if not is_number(metrics[k])]
    numbers += [k for k in METRICS_OPTIONAL if metrics.get(k) is not None and not is_number(metrics[k])]
    counts = [k for k in ("best_epoch", "parameters", "epochs_run") if not is_number(metrics[k], True)]
    cm = [[0] * classes] * classes if multi else metrics["confusion_matrix"]  # several labels: no confusion matrix
    if numbers or counts:
        return f"metrics.json: {(numbers or counts)[0]} is not a {'number' if numbers else 'count'}"
    if epochs and not 1 <= metrics["best_epoch"] <= epochs:
        return f"metrics.json: best_epoch {metrics['best_epoch']} is not one of history.csv's {epochs} epochs"
    if not (isinstance(cm, list) and len(cm) == classes and all(
            isinstance(r, list) and len(r) == classes and all(is_number(v, True) for v in r) for r in cm)):
        return f"metrics.json: confusion_matrix is not {classes} x {classes} counts"
    if config.get("kind", "train") not in ("train", "transfer"):
        return "config.json: kind is neither train nor transfer"
    return None


def _rescore(metrics: dict, class_names: list[str]) -> bool:
    """Rescores a metrics.json from before ``METRICS_VERSION`` (F1 2PR where P + R < 1) from its confusion matrix."""
    if (metrics.get("metrics_version") or 1) >= METRICS_VERSION:
        return False
    scores = summarize(torch.tensor(metrics["confusion_matrix"]), class_names)
    metrics.update({"per_class": scores["per_class"], "test_precision": scores["precision"],
                    "test_recall": scores["recall"], "test_f1": scores["f1"],
                    "test_balanced_accuracy": scores["balanced_accuracy"]})
    return True


def _seed_key(config: dict, kind: str) -> str | None:
    """The original study's experiment the run reproduces, else None: a seed preset on CIFAR-10 (its ten classes
    at 32x32, or a ``reproduce``'s cifar10/ folder, maybe a subset), or a transfer run on cats vs dogs."""
    names, preset, command = config["class_names"], config.get("preset"), config.get("command")
    if kind == "transfer":
        return "transfer" if sorted(names) == ["cat", "dog"] else None
    if preset not in ("conv", "pool-bn", "dropout", "early-stop") or config.get("input_shape") != [3, 32, 32]:
        return None
    reproduced = (isinstance(command, str) and "reproduce" in command.split()
                  and Path(str(config.get("data", ""))).name == "cifar10")
    return preset if names == CIFAR10_CLASSES or reproduced else None


def _gap(metrics: dict, history: list[dict], validated: bool, kind: str) -> tuple[float | None, str]:
    """(training minus validation accuracy of the weights kept, what the training accuracy is)."""
    if not validated or not history:
        return None, ""
    best = metrics["best_epoch"]
    if metrics.get("train_accuracy_eval") is not None:  # the training split in eval mode, the kept weights
        kept = best if metrics.get("weights", "best") == "best" else len(history)
        where = "" if kept == best else f", epoch {kept}'s weights (kept)"
        return metrics["train_accuracy_eval"] - history[kept - 1]["val_accuracy"], f"eval mode{where}"
    gap = history[best - 1]["accuracy"] - history[best - 1]["val_accuracy"]
    if kind == "transfer":  # the base's batch norms run in eval mode and the head has no dropout
        return gap, "from the epochs (base in eval mode)"
    return gap, "train mode, dropout on (an older run)"
