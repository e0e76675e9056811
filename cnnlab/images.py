"""The image files a user names (files, and folders searched recursively), listed and read at a
model's input size: what predict and explain take in."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, decode_image
from .errors import CnnlabError


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
