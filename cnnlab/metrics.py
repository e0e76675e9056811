"""What logits mean and how good they are: the loss, predicted classes and probabilities (for
softmax heads and single-sigmoid heads alike), the confusion matrix, and accuracy, balanced
accuracy and per-class precision, recall and F1: each equal to scikit-learn's (tests/test_metrics.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# 2: F1 counted as 2 tp / (predicted + actual); version 1 (no "metrics_version" in metrics.json) gave
# 2PR wherever a class's precision + recall < 1
METRICS_VERSION = 2


def loss_fn(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over classes; with a single output unit, binary cross-entropy on its sigmoid.
    With ``class_weights`` (one per class), each image's loss is weighted by its class's before the
    mean over the batch, as Keras's ``class_weight`` and scikit-learn's sample weights weigh it."""
    if class_weights is not None:
        if logits.shape[1] == 1:
            target = y.float() * (1 - label_smoothing) + label_smoothing / 2
            each = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none")
        else:
            each = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
        # soft targets (MixUp, CutMix: rows of class shares) weigh each image by its classes' shares
        return (each * (class_weights[y] if y.dim() == 1 else y.float() @ class_weights)).mean()
    if logits.shape[1] == 1:
        target = y.float() * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """The class each row of ``logits`` predicts."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities, (N, classes), for softmax and single-sigmoid heads alike."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.float())
        return torch.cat([1 - p, p], dim=1)
    return logits.float().softmax(1)


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class i, predicted class j) at row i, column j."""
    index = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b``, and 0 where ``b`` is 0 (scikit-learn's ``zero_division=0``)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def precision_recall_f1(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support; 0 where a ratio is undefined (no predictions
    or no examples of the class), as scikit-learn's ``zero_division=0``. F1 is counted as
    scikit-learn counts it, ``2 tp / (predicted + actual)``: the harmonic mean of precision and
    recall wherever both are defined."""
    cm = cm.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    return {"precision": _ratio(tp, predicted), "recall": _ratio(tp, actual), "f1": _ratio(2 * tp, predicted + actual),
            "support": actual}


def balanced_accuracy(cm: torch.Tensor) -> float:
    """The mean recall over the classes that have examples (scikit-learn's
    ``balanced_accuracy_score``); 0 for an empty matrix."""
    cm = cm.double()
    actual = cm.sum(1)
    present = actual > 0
    return float((cm.diag()[present] / actual[present]).mean()) if bool(present.any()) else 0.0


def summarize(cm: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro precision/recall/F1 (every class counted, absent ones
    as 0) and a per-class table from a confusion matrix."""
    prf = precision_recall_f1(cm)
    total = int(cm.sum())
    return {
        "accuracy": float(cm.diag().sum()) / total if total else 0.0,
        "balanced_accuracy": balanced_accuracy(cm),
        "precision": float(prf["precision"].mean()),
        "recall": float(prf["recall"].mean()),
        "f1": float(prf["f1"].mean()),
        "per_class": {name: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                             "f1": float(prf["f1"][i]), "support": int(prf["support"][i])}
                      for i, name in enumerate(class_names)},
        "confusion_matrix": cm.tolist(),
    }
