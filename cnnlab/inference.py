"""Running a trained model over images: logits in batches (with test-time augmentation), scores
on a labelled set, and the most confident mistakes. evaluate, predict and the end of every run
use this; none of them needs the training loop."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import ImageSet
from .metrics import confusion_matrix, loss_fn, predicted_class, probabilities, summarize
from .multilabel import DEFAULT_THRESHOLD, multilabel_loss, multilabel_scores
from .multilabel import probabilities as sigmoid_probabilities
from .preprocessing import Preprocessing, model_input
from .progress import Progress
from .runtime import autocast, compute_dtype


def inference_batch(images: torch.Tensor) -> int:
    """Images per inference batch: about 620,000 input values (4 images at 224x224, 200 at 32x32).
    On a CPU, small batches keep activations in cache: EfficientNet-Lite0 and VGG19 run faster in
    batches of 4 than of 64 (bench/transfer.py)."""
    values = images[0].numel() if len(images) else 1
    return max(1, min(500, 620_000 // values))


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, preprocessing: Preprocessing, device: torch.device,
                   batch_size: int | None = None, tta: int = 0, precision: str = "auto",
                   progress: str | None = None) -> torch.Tensor:
    """Logits for uint8 images (or cached features), in eval mode, with test-time augmentation
    ``tta`` (see ``augmented_logits``); ``precision`` as in ``runtime.compute_dtype``. Under
    torchrun each rank computes its part of ``images`` and every rank gets all the logits.
    ``progress`` names the work for a bar or progress lines (progress.py; None: none)."""
    model.eval()
    if hasattr(model, "for_inference"):  # a transfer model: its base folded for the pass (transfer.py)
        model = model.for_inference()
    dtype = compute_dtype(precision, device)
    batch_size = batch_size or inference_batch(images)
    prepare = preprocessing.on(device)
    first, stop = distributed.shard_range(len(images))
    out = []
    shown = progress is not None and distributed.is_main()
    with Progress(stop - first, progress or "", "images", enabled=shown) as shown:
        for start in range(first, stop, batch_size):
            x = model_input(images[start:min(start + batch_size, stop)], prepare)
            with autocast(device, dtype):
                logits = augmented_logits(model, x, tta)
            out.append(logits.cpu())
            shown.update(len(x))
    if distributed.active():
        part = torch.cat(out) if out else torch.zeros(0, _output_width(model, images[:1], prepare, device, dtype))
        return distributed.gather_rows(part, len(images))
    return torch.cat(out) if out else torch.zeros(0)


def tta_views(tta: int) -> list[tuple[float, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(weight, name, view) of each view that test-time augmentation level ``tta`` averages the
    logits of, for prepared image batches: level 0 the image alone; 1 the image and its mirror
    image, half each; 2 (airbench's) half that, half the same for the image shifted one pixel
    up-left and one down-right (reflect-padded), each with its mirror image: 6 views."""
    def image(x):
        return x

    def mirror(x):
        return x.flip(3)

    def shifted(top: int, mirrored: bool):
        def view(x):
            h, w = x.shape[2:]
            y = F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, top:top + h, top:top + w]
            return y.flip(3) if mirrored else y
        return view

    if not tta:
        return [(1.0, "image", image)]
    pair = [(0.5, "image", image), (0.5, "mirror", mirror)]
    if tta == 1:
        return pair
    shifts = [(0.125, f"{name}{' mirror' if m else ''}", shifted(top, m))
              for top, name in ((0, "up-left"), (2, "down-right")) for m in (False, True)]
    return [(w / 2, name, view) for w, name, view in pair] + shifts


def augmented_logits(model: nn.Module, x: torch.Tensor, tta: int) -> torch.Tensor:
    """float32 logits for the batch ``x``: the weighted sum of the model's logits over the views of
    ``tta_views(tta)``."""
    if not tta or x.dim() != 4:  # cached features have no pixels to mirror or shift
        return model(x).float()
    return sum(weight * model(view(x)).float() for weight, _, view in tta_views(tta))


def _output_width(model: nn.Module, probe: torch.Tensor, prepare, device, dtype) -> int:
    """The number of logits per image (for a rank whose part of the images is empty)."""
    with autocast(device, dtype):
        return model(model_input(probe, prepare)).shape[1]


def score(model: nn.Module, data: ImageSet, class_names: list[str], preprocessing: Preprocessing,
          device: torch.device, tta: int = 0, precision: str = "auto", progress: str | None = None) -> dict:
    """Loss (plain cross-entropy), accuracy, macro and per-class precision/recall/F1 and
    the confusion matrix of ``model`` on ``data``; ``progress`` as ``predict_logits``'s."""
    logits = predict_logits(model, data.images, preprocessing, device, tta=tta, precision=precision,
                            progress=progress)
    return score_logits(logits, data.labels, class_names)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 thresholds: float | list[float] = DEFAULT_THRESHOLD) -> dict:
    """``score`` from logits already computed. Multi-hot ``labels`` (N, classes: several labels per
    image) are scored as multilabel.multilabel_scores scores them, each label predicted at its
    ``thresholds``, with their binary cross-entropy as the loss and the subset accuracy as ``accuracy``."""
    if labels.dim() == 2:
        loss = float(multilabel_loss(logits, labels)) if len(logits) else float("nan")
        scores = multilabel_scores(sigmoid_probabilities(logits), labels, class_names, thresholds)
        return {"loss": loss, "accuracy": scores["subset_accuracy"], **scores}
    loss = float(loss_fn(logits, labels)) if len(logits) else float("nan")
    cm = confusion_matrix(labels, predicted_class(logits), len(class_names))
    return {"loss": loss, **summarize(cm, class_names)}


def confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, count: int = 12) -> dict:
    """The ``count`` wrong predictions made with the highest probability."""
    probs = probabilities(logits)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    return {"index": order, "true": labels[order].tolist(), "predicted": predicted[order].tolist(),
            "probability": confidence[order].tolist()}
