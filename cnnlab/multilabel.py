"""Scores of several labels per image: each label a yes/no decision on its sigmoid probability
against a threshold. Per-label precision, recall, F1 and average precision, their macro and micro
means, mAP and subset accuracy, each counted as scikit-learn counts it (tests/test_multilabel.py);
and the per-label thresholds that maximise F1 on the validation split. Also what the rest of a
multi-label run needs of its targets (multi-hot rows, N x labels): each image's rarest label (for
splits and balanced sampling), the subset accuracy of a batch, a run's saved thresholds, and the
test images with the most confident wrong label."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.5


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy on each label's sigmoid, averaged over images and labels (Keras's and
    PyTorch's BCEWithLogitsLoss); ``label_smoothing`` moves each target toward 1/2 by that share."""
    target = targets.float() * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the step-wise precision-recall curve, as scikit-learn's average_precision_score:
    sum over distinct thresholds (highest first) of (R_n - R_{n-1}) * P_n; 0 with no positive."""
    positives = truth.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # each distinct score's last position
    tp = np.cumsum(truth)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def label_average_precisions(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each label's ``average_precision`` (a column of ``probabilities`` against one of 0/1 ``truth``);
    their mean is the mAP."""
    return np.array([average_precision(probabilities[:, j], truth[:, j]) for j in range(probabilities.shape[1])])


def _prf(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F1 from counts; 0 where undefined (scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(actual > 0, tp / np.maximum(actual, 1), 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / np.maximum(predicted + actual, 1), 0.0)
    return precision, recall, f1


def _array(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)


def multilabel_scores(probabilities, targets, label_names: list[str], thresholds=DEFAULT_THRESHOLD) -> dict:
    """Every score of ``probabilities`` (N, labels) against 0/1 ``targets``, a label predicted
    where its probability is at least its threshold (one for all, or one per label)."""
    probs, truth = _array(probabilities), _array(targets).astype(np.int64)
    cut = np.broadcast_to(np.asarray(thresholds, float), probs.shape[1:])
    predicted = (probs >= cut).astype(np.int64)
    tp, pred_n, actual_n = (predicted & truth).sum(0), predicted.sum(0), truth.sum(0)
    precision, recall, f1 = _prf(tp, pred_n, actual_n)
    micro = _prf(tp.sum(), pred_n.sum(), actual_n.sum())
    ap = label_average_precisions(probs, truth)
    per_label = {name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                        "average_precision": float(ap[j]), "support": int(actual_n[j]),
                        "threshold": float(cut[j])}
                 for j, name in enumerate(label_names)}
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
            "micro_precision": float(micro[0]), "micro_recall": float(micro[1]), "micro_f1": float(micro[2]),
            "map": float(ap.mean()), "micro_ap": average_precision(probs.ravel(), truth.ravel()),
            "subset_accuracy": float((predicted == truth).all(1).mean()) if len(truth) else 0.0,
            "per_label": per_label}


def best_thresholds(probabilities, targets) -> list[float]:
    """Per label, the threshold among its own probabilities that gives the highest F1 on these
    images (the highest such, so the fewest false positives); ``DEFAULT_THRESHOLD`` for a label
    with no positive image."""
    probs, truth = _array(probabilities), _array(targets).astype(np.int64)
    chosen = []
    for j in range(probs.shape[1]):
        positives = truth[:, j].sum()
        if positives == 0:
            chosen.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-probs[:, j], kind="mergesort")
        scores, hits = probs[order, j], truth[order, j]
        last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
        tp = np.cumsum(hits)[last]
        f1 = 2 * tp / (last + 1 + positives)  # predicted: everything at or above that score
        chosen.append(float(scores[last[int(np.argmax(f1))]]))  # argmax: the first, the highest threshold
    return chosen


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Each label's probability, (N, labels): the sigmoid of its logit (no softmax: labels are not exclusive)."""
    return torch.sigmoid(logits.float())


def subset_correct(logits: torch.Tensor, targets: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """How many images of the batch have every label decided right at ``threshold`` (a count on the
    logits' device, no sync): the numerator of the subset accuracy, scikit-learn's
    ``accuracy_score`` of multi-label indicators. Targets may be soft (MixUp): above 1/2 is a yes."""
    return ((probabilities(logits) >= threshold) == (targets > 0.5)).all(1).sum()


def rarest_label(targets: torch.Tensor) -> torch.Tensor:
    """For each image of multi-hot ``targets`` (N, labels), the index of its label that the fewest
    images have (ties: the first); what splits are stratified by and ``--sampler balanced`` draws by,
    so that a rare label gets its share of every split. 0 for an image with no label."""
    present = targets.cpu() > 0.5
    counts = present.sum(0).double()
    scored = torch.where(present, counts.expand_as(present), torch.full(present.shape, math.inf, dtype=torch.double))
    return scored.argmin(1) if len(present) else torch.zeros(0, dtype=torch.int64)


def strata(labels: torch.Tensor) -> torch.Tensor:
    """One class per image: its label, or for multi-hot rows its rarest label (``rarest_label``)."""
    return rarest_label(labels) if labels.dim() == 2 else labels


def label_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Images per class: of integer labels, or of each label of multi-hot rows."""
    if labels.dim() == 2:
        return (labels.cpu() > 0.5).sum(0).long()
    return torch.bincount(labels.cpu().long(), minlength=classes)


def thresholds_of(metrics: dict | None, config: dict) -> list[float]:
    """A multi-label run's thresholds, one per class in its config's order: those saved in its
    metrics.json (tuned on validation, or its --threshold for every label), else its --threshold."""
    names = config["class_names"]
    saved = (metrics or {}).get("thresholds")
    if isinstance(saved, dict) and all(isinstance(saved.get(n), (int, float)) for n in names):
        return [float(saved[n]) for n in names]
    return [float(config.get("threshold", DEFAULT_THRESHOLD))] * len(names)


def confident_mistakes(probs: torch.Tensor, targets: torch.Tensor, thresholds, count: int = 12) -> dict:
    """The ``count`` images whose worst wrong decision was made most confidently: for each image the
    label decided wrong (predicted without being there, or missed) whose probability lies farthest
    from the truth. Index, that label, its probability and each image's true and predicted labels."""
    probs, truth = probs.float().cpu(), targets.cpu() > 0.5
    cut = torch.as_tensor(thresholds, dtype=torch.float32).expand_as(probs)
    predicted = probs >= cut
    error = torch.where(predicted != truth, (probs - truth.float()).abs(), torch.full_like(probs, -1.0))
    worst, label = error.max(1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    wrong = torch.nonzero(worst >= 0).flatten()
    order = wrong[worst[wrong].argsort(descending=True)][:count]
    return {"index": order, "label": label[order].tolist(), "probability": probs[order, label[order]].tolist(),
            "true": [torch.nonzero(truth[i]).flatten().tolist() for i in order.tolist()],
            "predicted": [torch.nonzero(predicted[i]).flatten().tolist() for i in order.tolist()]}
