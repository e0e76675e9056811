"""Top-k predictions for images, from a pretrained backbone (ImageNet classes) or a finished run."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import IMAGE_EXTENSIONS, decode_image
from .errors import CnnlabError
from .inference import predict_logits
from .metrics import probabilities
from .preprocessing import Preprocessing
from .runtime import pick_device


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted)."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            paths.append(path)
        else:
            raise CnnlabError(f"{path} does not exist; pass image files or folders of images")
    if not paths:
        raise CnnlabError(f"no images found in {', '.join(inputs)}")
    return paths


def load_images(paths: list[Path], size: int) -> tuple[torch.Tensor, list[Path], list[Path]]:
    """uint8 (N, 3, size, size) of the readable images (any mode converted to RGB), the paths
    they came from, and the paths that could not be read."""
    good, bad, arrays = [], [], []
    for path in paths:
        data = decode_image((str(path), size))
        if data is None:
            bad.append(path)
        else:
            good.append(path)
            arrays.append(np.frombuffer(data, np.uint8).reshape(size, size, 3).transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return images, good, bad


def torch_model(model: str, weights: str | None = None) -> tuple[nn.Module, Preprocessing, list[str]]:
    """(model in eval mode, its preprocessing, its class names) for a run directory or a backbone name."""
    if (Path(model) / "config.json").is_file():
        from .evaluate import load_model
        net, config, preprocessing = load_model(model)
        return net, preprocessing, config["class_names"]
    if Path(model).exists():
        raise CnnlabError(f"{model} is not a run directory (no config.json) nor an exported .onnx file; pass a run, "
                          "a .onnx file or a backbone name")
    from .backbones import get_backbone, pretrained
    built, weights_used, _ = pretrained(model, None, weights)
    net = built.net.to(pick_device(), memory_format=torch.channels_last).eval()
    return net, weights_used.preprocessing, get_backbone(model).class_names()


def _classifier(model: str, weights: str | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, list[str]]:
    """(uint8 images -> class probabilities, input size, class names) for a run directory, a file
    made by ``cnnlab export`` (run by onnxruntime) or a backbone name."""
    if model.endswith(".onnx") and Path(model).is_file():
        from .export import OnnxModel
        onnx = OnnxModel(model)
        return lambda images: torch.from_numpy(onnx.probabilities(images)), onnx.size, onnx.class_names
    net, preprocessing, classes = torch_model(model, weights)
    device = next(net.parameters()).device
    # float32: a few photos take no time, and the printed probabilities keep every digit
    return (lambda images: probabilities(predict_logits(net, images, preprocessing, device, batch_size=32,
                                                        precision="fp32")),
            preprocessing.size, classes)


def readable_images(inputs: list[str], size: int) -> tuple[torch.Tensor, list[Path]]:
    """The images among ``inputs`` (files and folders) that can be read, at ``size``, and their
    paths; one warning for the others, a one-line error when none can."""
    images, good, bad = load_images(image_paths(inputs), size)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {', '.join(map(str, bad[:5]))}"
                      + (" ..." if len(bad) > 5 else ""))
    if not good:
        raise CnnlabError("none of the given files could be read as an image")
    return images, good


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
