"""Grad-CAM, where a network looked: for each image the heat map of a class (the top-1, or one
named) over the model's last convolutional layer, by the grad-cam package, blended into the photo.
``explain`` draws these for the user's images, and a finished run draws its most confident
mistakes with them (the hook the training loop is given)."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from .errors import CnnlabError
from .metrics import probabilities
from .preprocessing import Preprocessing


class _ClassScore:
    """The score Grad-CAM differentiates for class ``index``: its logit, or for a single-sigmoid
    head the logit (class 1) or its negative (class 0)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.shape[-1] == 1:
            return output[..., 0] if self.index == 1 else -output[..., 0]
        return output[..., self.index]


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The model's last convolution (Grad-CAM's usual layer: the finest map that still sees the class)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise CnnlabError("this model has no convolution for Grad-CAM to explain; pass a convolutional model")
    return convs[-1]


def explainable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that Grad-CAM can differentiate (float32, eval mode, every parameter
    asking for gradients, no in-place ReLU); ``model`` itself is left as it is. Make it once and
    pass it to ``overlays`` for every batch."""
    net = copy.deepcopy(model).float().eval()
    for m in net.modules():  # an in-place ReLU would overwrite the activations whose gradients Grad-CAM reads
        if isinstance(m, nn.ReLU):
            m.inplace = False
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def overlays(net: nn.Module, images: torch.Tensor, preprocessing: Preprocessing,
             classes: list[int] | None = None) -> tuple[np.ndarray, list[int], list[float]]:
    """uint8 (N, H, W, 3) photos with their Grad-CAM heat maps blended in, the class each explains
    (``classes``, else the top-1), and that class's probability; ``net`` from ``explainable``."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
    except ImportError:
        raise CnnlabError("explanations need the grad-cam package: pip install grad-cam") from None
    device = next(net.parameters()).device
    x = preprocessing(images, device)
    with torch.no_grad():
        probs = probabilities(net(x)).cpu()
    chosen = classes if classes is not None else probs.argmax(1).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grad-cam's own notes on hooks; the maps are what is asked for
        with GradCAM(model=net, target_layers=[last_conv(net)]) as cam:
            maps = cam(input_tensor=x, targets=[_ClassScore(c) for c in chosen])
    photos = images.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    blended = np.stack([show_cam_on_image(photo, m, use_rgb=True) for photo, m in zip(photos, maps)])
    return blended, chosen, [float(probs[i, c]) for i, c in enumerate(chosen)]
