"""Scores a finished run on a labelled image folder, or on the images a labels file lists."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import ImageSet, load_folder, load_labelled
from .folders import check_folder
from .errors import CnnlabError
from .inference import predict_logits, score, score_logits
from .multilabel import thresholds_of
from .runs import load_run
from .saved_model import load_model
from .text import shown


def evaluate_run(run_dir: str | Path, data: str | Path, labels: str | Path | None = None, multi_label: bool = False,
                 threshold: float | None = None) -> dict:
    """Test loss, accuracy, balanced accuracy, macro and per-class precision/recall/F1 and the
    confusion matrix of a run on every image in ``data`` (its ``test/`` subfolder when there is
    one), or on the images the ``labels`` file lists (its test rows when its split column has some),
    each labelled one of the run's classes. The images are decoded into one uint8 tensor through
    the image cache, as training's are (data.load_folder): its memory is the images' pixels at the
    run's size, not their float copies (inference runs in batches). A run of several labels per image
    (``--multi-label``: ``multi_label`` says it must be one) is scored on a labels file, each label at
    the run's saved threshold (``threshold``: every label at that one instead), as multilabel.py scores."""
    root = Path(data)
    check_folder(root)
    model, config, preprocessing = load_model(run_dir)
    multi = _multi_label(run_dir, config, labels, multi_label, threshold)
    cache_dir = Path(config["cache_dir"]) if config.get("cache_dir") else None
    if labels is not None:
        sets, _, info = load_labelled(labels, root, preprocessing.size, cache_dir, class_names=config["class_names"],
                                      multi_label=multi)
        images = sets.get("test") or _joined(list(sets.values()))
        root = f"{labels} ({'its test rows' if 'test' in sets else 'every row'}; images in {root})"
    else:
        root = root / "test" if (root / "test").is_dir() else root
        images, _, info = load_folder(root, preprocessing.size, class_names=config["class_names"], cache_dir=cache_dir)
    device = next(model.parameters()).device
    if multi:
        thresholds = [threshold] * len(config["class_names"]) if threshold is not None else \
            thresholds_of(load_run(run_dir)[1], config)
        logits = predict_logits(model, images.images, preprocessing, device, tta=config.get("tta", False),
                                precision=config.get("precision", "auto"), progress="scoring")
        result = score_logits(logits, images.labels, config["class_names"], thresholds)
    else:
        result = score(model, images, config["class_names"], preprocessing, device, tta=config.get("tta", False),
                       precision=config.get("precision", "auto"), progress="scoring")
    return {"run": str(run_dir), "data": str(root), "images": len(images), "skipped": info["skipped"], **result}


def _multi_label(run_dir, config: dict, labels, asked: bool, threshold: float | None) -> bool:
    """Whether the run has several labels per image; a one-line error where the options given do
    not fit it (--multi-label or --threshold for a run of one class per image; a multi-label run
    without a labels file)."""
    multi = bool(config.get("multi_label"))
    if not multi and (asked or threshold is not None):
        raise CnnlabError(f"{shown(run_dir)} has one class per image (it was not trained with --multi-label); leave "
                          f"{'--multi-label' if asked else '--threshold'} out")
    if multi and labels is None:
        raise CnnlabError(f"{shown(run_dir)} has several labels per image: pass --labels FILE, its label column "
                          "holding each image's classes separated by ';' (class folders give an image one class)")
    return multi


def _joined(parts: list[ImageSet]) -> ImageSet:
    """The images of ``parts`` as one set."""
    if len(parts) == 1:
        return parts[0]
    return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                    [f for p in parts for f in p.files])


PRINTED_MATRIX = 20  # classes up to which the text report prints the confusion matrix (--json: always)


def format_report(result: dict, class_names: list[str]) -> str:
    """The human-readable form of ``evaluate_run``'s result: names escaped (text.shown), one line
    per class, and the confusion matrix up to ``PRINTED_MATRIX`` classes (past that, in --json)."""
    names = [shown(n) for n in class_names]
    if "per_label" in result:
        return _format_multilabel(result, class_names)
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


def _format_multilabel(result: dict, class_names: list[str]) -> str:
    """``format_report`` of a run of several labels per image: mAP, macro and micro scores, subset
    accuracy, and one line per label with its threshold and average precision."""
    lines = [f"{shown(result['run'])} on {shown(result['data'])} ({result['images']} images, several labels each)",
             f"test loss {result['loss']:.4f}   mAP {result['map']:.4f}   "
             f"subset accuracy {result['subset_accuracy']:.4f}",
             f"macro precision {result['precision']:.4f}  recall {result['recall']:.4f}  f1 {result['f1']:.4f}",
             f"micro precision {result['micro_precision']:.4f}  recall {result['micro_recall']:.4f}  "
             f"f1 {result['micro_f1']:.4f}", "",
             f"{'label':<14}{'threshold':>10}{'precision':>10}{'recall':>10}{'f1':>10}{'AP':>10}{'support':>9}"]
    for name in class_names:
        row = result["per_label"][name]
        lines.append(f"{shown(name):<14}{row['threshold']:>10.4f}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                     f"{row['f1']:>10.4f}{row['average_precision']:>10.4f}{row['support']:>9}")
    return "\n".join(lines)
