"""The scores of a run and its end, for train and transfer runs alike: each epoch's validation
columns and its line, and ``finish_run``: the one test on the held-out split, metrics.json assembled
and the results written. A run of several labels per image (``--multi-label``) is scored per label
(multilabel.py): its thresholds are tuned on the validation split here, saved in metrics.json with
per-label precision, recall, F1 and average precision, and its mistakes are the test images with
the most confident wrong label."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from . import distributed
from .callbacks import CallbackList
from .data import Splits
from .errors import CnnlabError
from .inference import confident_mistakes, predict_logits, score_logits
from .metrics import METRICS_VERSION
from .multilabel import DEFAULT_THRESHOLD, best_thresholds, label_counts
from .multilabel import confident_mistakes as multilabel_mistakes
from .multilabel import probabilities as sigmoid_probabilities
from .presets import count_parameters
from .run_state import Outcome, RunContext
from .runs import write_csv, write_finished, write_mistakes

MISTAKES_TITLE = "most confident mistakes (test)"


def validation_columns(model: nn.Module, splits: Splits, cfg, device: torch.device) -> dict:
    """The validation split's columns of an epoch's history row (``cfg``: the TrainConfig of the
    phase; at most the mirror image each epoch, level 2's six views are for the one test at the
    end): loss, accuracy, macro precision, recall and F1, and the balanced accuracy; with several
    labels per image, the subset accuracy as accuracy, scores at ``cfg.threshold``, micro F1 and mAP."""
    logits = predict_logits(model, splits.val.images, cfg.preprocessing, device, tta=min(int(cfg.tta), 1),
                            precision=cfg.precision)
    val = score_logits(logits, splits.val.labels, splits.class_names, cfg.threshold)
    row = {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_precision": val["precision"],
           "val_recall": val["recall"], "val_f1": val["f1"]}
    if "map" in val:
        row.update({"val_micro_f1": val["micro_f1"], "val_map": val["map"]})
    else:
        row["val_balanced_accuracy"] = val["balanced_accuracy"]
    return row


def epoch_line(row: dict, epochs: int, best_epoch: int | None) -> str:
    """An epoch's line: losses, accuracies (with several labels per image, the validation mAP
    instead of the balanced accuracy), its time and speed, and ``*`` on the best epoch so far."""
    mark = " *" if best_epoch == row["epoch"] else ""
    third = f"val_map {row['val_map']:.4f}" if "val_map" in row else \
        f"val_bal_acc {row.get('val_balanced_accuracy', float('nan')):.4f}"
    val = f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  {third}  " if "val_loss" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  {val}"
            f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s{mark}")


def train_accuracy(model: nn.Module, splits: Splits, ctx: RunContext) -> float:
    """The training split's accuracy with the final weights in evaluation mode (dropout off, batch
    norm's running statistics): what the gap to validation accuracy should be measured with (the
    subset accuracy at the run's --threshold, with several labels per image)."""
    logits = predict_logits(model, splits.train.images, ctx.preprocessing, ctx.device, precision=ctx.precision,
                            progress="scoring the training split")
    return score_logits(logits, splits.train.labels, splits.class_names, _threshold(ctx))["accuracy"]


def _threshold(ctx: RunContext) -> float:
    return float(ctx.settings.get("threshold", DEFAULT_THRESHOLD))


def tuned_thresholds(ctx: RunContext, model: nn.Module, splits: Splits,
                     logits: torch.Tensor | None = None) -> tuple[list[float], bool]:
    """(each label's threshold, whether tuned): the probability that maximises the label's F1 on the
    validation split (multilabel.best_thresholds; its ``logits`` when given, else the model's, with
    test-time augmentation as the test's), or the run's --threshold for every label with
    --no-tune-thresholds, without validation images, and for a label no validation image has."""
    threshold, labels = _threshold(ctx), len(splits.class_names)
    if not ctx.settings.get("tune_thresholds", True) or not len(splits.val):
        return [threshold] * labels, False
    if logits is None:
        logits = predict_logits(model, splits.val.images, ctx.preprocessing, ctx.device, tta=ctx.tta,
                                precision=ctx.precision, progress="tuning thresholds on the validation split")
    best = best_thresholds(sigmoid_probabilities(logits), splits.val.labels)
    present = label_counts(splits.val.labels, labels) > 0
    return [float(t) if bool(p) else threshold for t, p in zip(best, present)], True


def finish_run(ctx: RunContext, model: nn.Module, splits: Splits, outcome: Outcome,
               logits: torch.Tensor | None = None) -> None:
    """Tests once on the held-out split and writes the run's results (runs.write_mistakes and write_finished, and
    to ``ctx.board`` the plots and the settings with the test scores); ``outcome.boundary`` marks
    where fine-tuning began on the curves, ``outcome.extra`` joins the metrics; the most confident
    mistakes are shown as ``ctx.mistake_pictures`` draws them; ``logits``, the test split's already
    computed (from cached features), saves the pass through ``model``."""
    if logits is None:
        logits = predict_logits(model, splits.test.images, ctx.preprocessing, ctx.device, tta=ctx.tta,
                                precision=ctx.precision, progress="testing")
    multi = splits.test.labels.dim() == 2  # several labels per image
    thresholds, tuned = tuned_thresholds(ctx, model, splits, outcome.val_logits) if multi else (None, False)
    test = score_logits(logits, splits.test.labels, splits.class_names, *([thresholds] if multi else []))
    metrics = _metrics(ctx, model, splits, outcome, test)
    if multi:
        metrics.update(_multilabel_metrics(ctx, logits, splits, test, thresholds, tuned))
    if not distributed.is_main():  # the test was scored by every rank together; rank 0 writes it
        return
    _write_mistakes(ctx, model, splits, logits, thresholds)
    if multi:
        write_predictions(ctx.run_dir / "test_predictions.csv", splits, sigmoid_probabilities(logits), thresholds)
    write_finished(ctx.run_dir, {k: v.cpu() for k, v in model.state_dict().items()}, outcome.history, test,
                   splits.class_names, metrics, outcome.boundary)
    if ctx.board is not None:
        ctx.board.finish(ctx.run_dir, ctx.board.last_step, ctx.settings, metrics)
    CallbackList(ctx.callbacks).on_run_end(ctx.run_dir, metrics)
    done = f"({len(outcome.history)} epochs, best {metrics['best_epoch']}, {metrics['train_time_s']:.1f}s training)"
    if multi:
        ctx.log(f"test mAP {test['map']:.4f}  macro F1 {test['f1']:.4f}  micro F1 {test['micro_f1']:.4f}  subset "
                f"accuracy {test['subset_accuracy']:.4f}  test loss {test['loss']:.4f}  {done}")
    else:
        ctx.log(f"test accuracy {test['accuracy']:.4f}  balanced accuracy {test['balanced_accuracy']:.4f}  test loss "
                f"{test['loss']:.4f}  {done}")


def _write_mistakes(ctx: RunContext, model: nn.Module, splits: Splits, logits: torch.Tensor,
                    thresholds: list[float] | None) -> None:
    """mistakes.png: the test images wrong with the highest probability (one class per image), or
    whose worst wrong label was decided most confidently (several labels per image)."""
    names = splits.class_names
    if thresholds is None:
        mistakes = confident_mistakes(logits, splits.test.labels)
        chosen = mistakes["predicted"]
    else:
        mistakes = multilabel_mistakes(sigmoid_probabilities(logits), splits.test.labels, thresholds)
        chosen = mistakes["label"]  # Grad-CAM of the label decided wrong
    shown, title = splits.test.images[mistakes["index"]], MISTAKES_TITLE
    if ctx.mistake_pictures is not None and len(shown):
        try:
            shown, how = ctx.mistake_pictures(model, shown, ctx.preprocessing, chosen)
            title = f"{title}, {how}" if thresholds is None else f"{title}, Grad-CAM of the label decided wrong"
        except CnnlabError as exc:  # no grad-cam package: the photos as they are
            ctx.log(f"note: {exc}")
    if thresholds is None:
        write_mistakes(ctx.run_dir, mistakes, shown, names, title)
        return
    from .plots import image_grid  # matplotlib loads only when a run is written

    def listed(indices: list[int]) -> str:
        return ";".join(names[i] for i in indices) or "none"
    captions = [f"{listed(t)} → {listed(p)}: {names[j]} {q:.0%}" for t, p, j, q in
                zip(mistakes["true"], mistakes["predicted"], mistakes["label"], mistakes["probability"])]
    image_grid(shown, [0] * len(shown), names, ctx.run_dir / "mistakes.png",
               title=f"{title}: true → predicted, the label most wrong", captions=captions)


def write_predictions(path, splits: Splits, probs: torch.Tensor, thresholds: list[float]) -> None:
    """test_predictions.csv of a run of several labels per image: each test image (its path relative
    to the data folder), its labels, the labels predicted at ``thresholds`` and every label's
    probability, written exactly (a float32 as the float64 it is), so that any score can be
    recomputed from the very predictions metrics.json was computed from."""
    names, root = splits.class_names, splits.info.get("root")
    rows = []
    for i, (row, truth) in enumerate(zip(probs.float().cpu().tolist(), splits.test.labels.cpu().tolist())):
        image = splits.test.files[i] if splits.test.files else str(i)
        image = os.path.relpath(image, root) if root and splits.test.files else image
        rows.append([image, ";".join(n for n, t in zip(names, truth) if t > 0.5),
                     ";".join(n for n, p, t in zip(names, row, thresholds) if p >= t), *map(repr, row)])
    write_csv(path, rows, ["image", "labels", "predicted", *names])


def _metrics(ctx: RunContext, model: nn.Module, splits: Splits, outcome: Outcome, test: dict) -> dict:
    """metrics.json: the test scores, how training went (``run_time_s``: this attempt's wall time,
    loading to results; ``train_time_s``: the epochs'), and ``outcome.extra``."""
    history, stopping = outcome.history, outcome.early_stopping
    best = stopping.best_epoch or len(history)
    single = "confusion_matrix" in test
    return {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_precision": test["precision"],
        "test_recall": test["recall"], "test_f1": test["f1"],
        **({"test_balanced_accuracy": test["balanced_accuracy"]} if single else {}),
        "metrics_version": METRICS_VERSION,
        "train_time_s": sum(r["seconds"] for r in history), "run_time_s": time.perf_counter() - ctx.started,
        "epochs_run": len(history), "best_epoch": best,
        "stopped_early": stopping.stopped_epoch is not None, "monitor": stopping.monitor, "best_value": stopping.best,
        "best_val_accuracy": history[best - 1].get("val_accuracy"),  # None: no validation images
        **({} if single else {"best_val_map": history[best - 1].get("val_map")}),
        "train_accuracy_at_best": history[best - 1]["accuracy"],
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "parameters": count_parameters(model), "weights": "best" if stopping.best_weights is not None else "last",
        "test_size": len(splits.test),
        **({"per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"]} if single else {}),
        **outcome.extra,
    }


def _multilabel_metrics(ctx: RunContext, logits: torch.Tensor, splits: Splits, test: dict, thresholds: list[float],
                        tuned: bool) -> dict:
    """metrics.json's keys of a run of several labels per image: the ``test`` scores' micro scores,
    mAP and subset accuracy (``test_accuracy`` is the subset accuracy too), per-label scores at the
    saved ``thresholds``, and the macro and micro scores at the single --threshold for comparison."""
    names, threshold = splits.class_names, _threshold(ctx)
    plain = score_logits(logits, splits.test.labels, names, threshold)
    return {"multi_label": True, "test_subset_accuracy": test["subset_accuracy"],
            "test_micro_precision": test["micro_precision"], "test_micro_recall": test["micro_recall"],
            "test_micro_f1": test["micro_f1"], "test_map": test["map"], "test_micro_ap": test["micro_ap"],
            "threshold": threshold, "thresholds_tuned": tuned, "thresholds": dict(zip(names, thresholds)),
            "test_at_threshold": {k: plain[k] for k in ("precision", "recall", "f1", "micro_f1", "subset_accuracy")},
            "per_label": test["per_label"]}
