"""Top-k predictions for images, from a pretrained backbone (ImageNet classes) or a finished run.
Images are decoded and classified a batch at a time, so memory stays flat however large the folder."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import CnnlabError
from .images import image_batches, image_paths
from .inference import predict_logits
from .metrics import probabilities
from .multilabel import probabilities as sigmoid_probabilities
from .saved_model import OnnxModel, multilabel_thresholds, torch_model
from .text import shown


def _classifier(model: str, weights: str | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, list[str],
                                                         list[float] | None]:
    """(uint8 images -> class probabilities, input size, class names, each label's threshold for a
    model of several labels per image, else None) for a run directory, a file made by ``cnnlab
    export`` (run by onnxruntime) or a backbone name."""
    if model.endswith(".onnx") and Path(model).is_file():
        onnx = OnnxModel(model)
        return lambda images: torch.from_numpy(onnx.probabilities(images)), onnx.size, onnx.class_names, onnx.thresholds
    net, preprocessing, classes = torch_model(model, weights)
    thresholds = multilabel_thresholds(model)  # several labels per image: each label's own sigmoid
    outputs = probabilities if thresholds is None else sigmoid_probabilities
    device = next(net.parameters()).device
    # float32: a few photos take no time, and the printed probabilities keep every digit
    return (lambda images: outputs(predict_logits(net, images, preprocessing, device, batch_size=32,
                                                  precision="fp32")),
            preprocessing.size, classes, thresholds)


def iter_predictions(inputs: list[str], model: str, weights: str | None = None, top: int = 3) -> Iterator[dict]:
    """For each readable image, as soon as its batch is classified: its path and the top-``top``
    (class, probability) pairs; for a model of several labels per image also ``labels``, every
    label at or above its threshold, most probable first."""
    if top < 1:
        raise CnnlabError(f"--top must be at least 1 (got {top})")
    paths = image_paths(inputs)  # a missing path is an error before any model loads
    classify, size, classes, thresholds = _classifier(str(model), weights)
    for images, good in image_batches(paths, size):
        probs = classify(images)
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        for p, vs, ix, row in zip(good, values, indices, probs):
            result = {"image": str(p), "top": [{"class": classes[int(i)], "probability": float(v)}
                                               for v, i in zip(vs, ix)]}
            if thresholds is not None:
                result["labels"] = [{"class": classes[j], "probability": float(row[j])}
                                    for j in row.argsort(descending=True).tolist() if row[j] >= thresholds[j]]
            yield result


def predict(inputs: list[str], model: str, weights: str | None = None, top: int = 3) -> list[dict]:
    """``iter_predictions`` as one list (a few hundred bytes an image; the images themselves are
    never all in memory)."""
    return list(iter_predictions(inputs, model, weights, top))


def format_prediction(result: dict) -> str:
    """The seed's style: ``photo.jpg: bald eagle 99.81%  kite 0.16%  vulture 0.02%``; a path or class
    name with control characters or undecodable bytes shown escaped, on its one line. Several
    labels per image: every label above its threshold, ``photo.jpg: cat 97.10%  dog 88.02%``."""
    if "labels" in result:
        best = result["top"][0]
        found = "  ".join(f"{shown(t['class'])} {t['probability']:.2%}" for t in result["labels"]) or \
            f"no label above its threshold (highest: {shown(best['class'])} {best['probability']:.2%})"
        return f"{shown(result['image'])}: {found}"
    return f"{shown(result['image'])}: " + "  ".join(f"{shown(t['class'])} {t['probability']:.2%}"
                                                    for t in result["top"])


def format_predictions(results: list[dict]) -> str:
    """``format_prediction`` of each result, one line each."""
    return "\n".join(map(format_prediction, results))
