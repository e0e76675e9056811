"""Grad-CAM for the user's images: for each image, the heat map of the top-1 class (or a class
named) over the last convolutional layer (gradcam.py), overlaid on the photo and titled with the
class and its probability; the same model loading and preprocessing as predict (saved_model.py)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write_bytes
from .errors import CnnlabError
from .gradcam import explainable, overlays
from .images import image_batches, image_paths
from .saved_model import torch_model
from .text import fit_name, shown


def write_overlay(picture: np.ndarray, title: str, path: Path) -> None:
    """One PNG: a uint8 (H, W, 3) picture, enlarged to about 400 pixels wide, under a one-line
    ``title``. Drawn with Pillow: loading matplotlib would take longer than the explanation."""
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
    their folder's name goes first. Control characters and undecodable bytes of a name are written
    escaped (text.shown), and a long name is cut to the file system's 255 bytes (text.fit_name)."""
    stems = [shown(p.stem) for p in paths]
    seen = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    names = [f"{shown(p.parent.name)}-{stem}" if seen[stem] > 1 else stem for p, stem in zip(paths, stems)]
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    names = [f"{n}-{i}" if counts[n] > 1 else n for i, n in enumerate(names)]
    return [out / fit_name(n, "-gradcam.png") for n in names]


def _make(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CnnlabError(f"cannot create {shown(out)} ({exc.strerror}); pass a writable --out") from None


def explain(inputs: list[str], model: str, weights: str | None = None, class_name: str | None = None,
            out: str | Path = "explanations") -> list[Path]:
    """One PNG per readable image in ``out``: the photo with its Grad-CAM overlay, titled."""
    if str(model).endswith(".onnx"):
        raise CnnlabError("explain needs the PyTorch model: pass the run directory or backbone name the .onnx "
                          "file was exported from")
    paths = image_paths(inputs)  # a missing path is an error before any model loads
    net, preprocessing, names = torch_model(str(model), weights)
    if class_name is not None and class_name not in names:
        close = [shown(n) for n in names if class_name.lower() in n.lower()][:5]
        raise CnnlabError(f"--class '{shown(class_name)}' is not one of this model's classes"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))
    out = Path(out)
    targets: dict[Path, list[Path]] = {}  # a path given twice has two targets, taken in order
    for path, target in zip(paths, _output_names(paths, out)):
        targets.setdefault(path, []).append(target)
    net = explainable(net)
    written = []
    # a few at a time, decoded as they come: gradients of 224x224 images take memory, and a folder may be large
    for batch, batch_paths in image_batches(paths, preprocessing.size, batch=8):
        chosen = None if class_name is None else [names.index(class_name)] * len(batch)
        pictures, classes, probs = overlays(net, batch, preprocessing, chosen)
        if not written:  # made once an image was read: a run whose images are all unreadable writes nothing
            _make(out)
        for path, picture, c, p in zip(batch_paths, pictures, classes, probs):
            target = targets[path].pop(0)
            write_overlay(picture, f"{shown(path.name)}: {shown(names[c])} {p:.1%}", target)
            written.append(target)
    return written
