"""Top-k predictions for images, from a pretrained backbone (ImageNet classes) or a finished run."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import CnnlabError
from .images import image_paths, readable_images
from .inference import predict_logits
from .metrics import probabilities
from .saved_model import OnnxModel, torch_model


def _classifier(model: str, weights: str | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, list[str]]:
    """(uint8 images -> class probabilities, input size, class names) for a run directory, a file
    made by ``cnnlab export`` (run by onnxruntime) or a backbone name."""
    if model.endswith(".onnx") and Path(model).is_file():
        onnx = OnnxModel(model)
        return lambda images: torch.from_numpy(onnx.probabilities(images)), onnx.size, onnx.class_names
    net, preprocessing, classes = torch_model(model, weights)
    device = next(net.parameters()).device
    # float32: a few photos take no time, and the printed probabilities keep every digit
    return (lambda images: probabilities(predict_logits(net, images, preprocessing, device, batch_size=32,
                                                        precision="fp32")),
            preprocessing.size, classes)


def predict(inputs: list[str], model: str, weights: str | None = None, top: int = 3) -> list[dict]:
    """For each readable image: its path and the top-``top`` (class, probability) pairs."""
    if top < 1:
        raise CnnlabError(f"--top must be at least 1 (got {top})")
    image_paths(inputs)  # a missing path is an error before any model loads
    classify, size, classes = _classifier(str(model), weights)
    images, good = readable_images(inputs, size)
    probs = classify(images)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [{"image": str(p), "top": [{"class": classes[int(i)], "probability": float(v)}
                                      for v, i in zip(vs, ix)]}
            for p, vs, ix in zip(good, values, indices)]


def format_predictions(results: list[dict]) -> str:
    """The seed's style: ``photo.jpg: bald eagle 99.81%  kite 0.16%  vulture 0.02%``."""
    return "\n".join(f"{r['image']}: " + "  ".join(f"{t['class']} {t['probability']:.2%}" for t in r["top"])
                     for r in results)
