"""Scores a finished run on a labelled image folder."""
from __future__ import annotations

from pathlib import Path

from .data import check_folder, load_folder
from .inference import score
from .saved_model import load_model
from .text import shown


def evaluate_run(run_dir: str | Path, data: str | Path) -> dict:
    """Test loss, accuracy, macro and per-class precision/recall/F1 and the confusion matrix of
    a run on every image in ``data`` (its ``test/`` subfolder when there is one). The folder is decoded
    into one uint8 tensor through the image cache, as training's is (data.load_folder): its memory is
    the folder's pixels at the run's size, not its float copies (inference runs in batches)."""
    root = Path(data)
    check_folder(root)
    if (root / "test").is_dir():
        root = root / "test"
    model, config, preprocessing = load_model(run_dir)
    images, _, info = load_folder(root, preprocessing.size, class_names=config["class_names"],
                                  cache_dir=Path(config["cache_dir"]) if config.get("cache_dir") else None)
    device = next(model.parameters()).device
    result = score(model, images, config["class_names"], preprocessing, device, tta=config.get("tta", False),
                   precision=config.get("precision", "auto"))
    return {"run": str(run_dir), "data": str(root), "images": len(images), "skipped": info["skipped"], **result}


PRINTED_MATRIX = 20  # classes up to which the text report prints the confusion matrix (--json: always)


def format_report(result: dict, class_names: list[str]) -> str:
    """The human-readable form of ``evaluate_run``'s result: names escaped (text.shown), one line
    per class, and the confusion matrix up to ``PRINTED_MATRIX`` classes (past that, in --json)."""
    names = [shown(n) for n in class_names]
    lines = [f"{shown(result['run'])} on {shown(result['data'])} ({result['images']} images)",
             f"test loss {result['loss']:.4f}   test accuracy {result['accuracy']:.4f}   "
             f"balanced accuracy {result['balanced_accuracy']:.4f}",
             f"macro precision {result['precision']:.4f}  recall {result['recall']:.4f}  f1 {result['f1']:.4f}", "",
             f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, shown_name in zip(class_names, names):
        row = result["per_class"][name]
        lines.append(f"{shown_name:<14}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
                     f"{row['support']:>9}")
    if len(names) > PRINTED_MATRIX:
        return "\n".join(lines + ["", f"confusion matrix: {len(names)} classes, too many to print; --json has it"])
    width = max(6, max(len(n) for n in names) if names else 6)
    lines += ["", "confusion matrix (rows true, columns predicted):",
              " " * (width + 1) + " ".join(f"{n[:6]:>6}" for n in names)]
    for name, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{name:<{width}} " + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
