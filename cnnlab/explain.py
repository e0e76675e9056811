"""Grad-CAM: where a network looked. For each image, the heat map of the top-1 class (or a class
named) over the last convolutional layer, by the grad-cam package, overlaid on the photo and
titled with the class and its probability; the same model loading and preprocessing as predict."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

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


def write_overlay(picture: np.ndarray, title: str, path: Path) -> None:
    """One PNG: a uint8 (H, W, 3) picture, enlarged to about 400 pixels wide, under a one-line
    ``title``. Drawn with Pillow: loading matplotlib would take longer than the explanation."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    from .atomic import atomic_write_bytes

    photo = Image.fromarray(picture)
    scale = max(1, round(400 / photo.width))
    photo = photo.resize((photo.width * scale, photo.height * scale),
                         Image.NEAREST if photo.width < 100 else Image.BILINEAR)  # tiny images: pixels stay sharp
    font = ImageFont.load_default(size=15)
    while len(title) > 4 and font.getlength(title) > photo.width - 12:
        title = title[:-4] + "..."
    page = Image.new("RGB", (photo.width, photo.height + 30), "white")
    page.paste(photo, (0, 30))
    ImageDraw.Draw(page).text((photo.width / 2, 15), title, fill="black", font=font, anchor="mm")
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _output_names(paths: list[Path], out: Path) -> list[Path]:
    """``out/STEM-gradcam.png`` per image; where two images share a stem (cat/0.jpg, dog/0.jpg),
    their folder's name goes first."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}-{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    names = [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [out / f"{n}-gradcam.png" for n in names]


def explain(inputs: list[str], model: str, weights: str | None = None, class_name: str | None = None,
            out: str | Path = "explanations") -> list[Path]:
    """One PNG per readable image in ``out``: the photo with its Grad-CAM overlay, titled."""
    from .predict import image_paths, readable_images, torch_model

    if str(model).endswith(".onnx"):
        raise CnnlabError("explain needs the PyTorch model: pass the run directory or backbone name the .onnx "
                          "file was exported from")
    image_paths(inputs)  # a missing path is an error before any model loads
    net, preprocessing, names = torch_model(str(model), weights)
    if class_name is not None and class_name not in names:
        close = [n for n in names if class_name.lower() in n.lower()][:5]
        raise CnnlabError(f"--class '{class_name}' is not one of this model's classes"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))
    images, paths = readable_images(inputs, preprocessing.size)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"cannot create {out} ({exc.strerror}); pass a writable --out") from None
    chosen = None if class_name is None else [names.index(class_name)] * len(images)
    targets = _output_names(paths, out)
    net = explainable(net)
    written = []
    for start in range(0, len(images), 8):  # a few at a time: gradients of 224x224 images take memory
        batch = images[start:start + 8]
        pictures, classes, probs = overlays(net, batch, preprocessing, chosen and chosen[:len(batch)])
        for path, target, picture, c, p in zip(paths[start:start + 8], targets[start:start + 8], pictures, classes,
                                               probs):
            write_overlay(picture, f"{path.name}: {names[c]} {p:.1%}", target)
            written.append(target)
    return written
