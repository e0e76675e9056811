"""The image files a user names (files, and folders searched recursively), listed and read at a
model's input size, a batch at a time: what predict and explain take in. Memory stays the same
however many images a folder holds."""
from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .folders import IMAGE_EXTENSIONS, decode_image
from .errors import CnnlabError
from .text import shown

BATCH = 32  # images decoded (and classified) at a time


def _kind(mode: int) -> str:
    """What a file that is not a regular file or a folder is, in words."""
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "not a regular file"


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted). A path that does
    not exist, or is neither a regular file nor a folder (a named pipe, a device: reading one may
    never end), is a one-line error."""
    paths = []
    for item in inputs:
        path = Path(item)
        try:
            mode = path.stat().st_mode
        except OSError:
            raise CnnlabError(f"{shown(path)} does not exist; pass image files or folders of images") from None
        if stat.S_ISDIR(mode):
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif stat.S_ISREG(mode):
            paths.append(path)
        else:
            raise CnnlabError(f"{shown(path)} is {_kind(mode)}, not an image file; pass image files or folders "
                              "of images")
    if not paths:
        raise CnnlabError(f"no images found in {', '.join(map(shown, inputs))}")
    return paths


def load_images(paths: list[Path], size: int) -> tuple[torch.Tensor, list[Path], list[Path]]:
    """uint8 (N, 3, size, size) of the readable images (any mode converted to RGB), the paths
    they came from, and the paths that could not be read."""
    good, bad, arrays = [], [], []
    for path in paths:
        data = decode_image((str(path), size)) if _regular(path) else None
        if data is None:
            bad.append(path)
        else:
            good.append(path)
            arrays.append(np.frombuffer(data, np.uint8).reshape(size, size, 3).transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return images, good, bad


def _regular(path: Path) -> bool:
    """Whether ``path`` is (still) a regular file: one swapped for a pipe since it was listed is skipped."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def image_batches(paths: list[Path], size: int, batch: int = BATCH) -> Iterator[tuple[torch.Tensor, list[Path]]]:
    """The images among ``paths`` (from ``image_paths``) that can be read, at ``size``, ``batch``
    at a time, with their paths; at the end one warning for the others, and a one-line error when
    none could be read."""
    bad, read = [], 0
    for start in range(0, len(paths), batch):
        images, good, unreadable = load_images(paths[start:start + batch], size)
        bad += unreadable
        read += len(good)
        if good:
            yield images, good
    if not read:  # the error alone, the one line
        raise CnnlabError(f"none of the given files could be read as an image ({shown(bad[0])}"
                          f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); pass image files")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {', '.join(map(shown, bad[:5]))}"
                      + (" ..." if len(bad) > 5 else ""))


def readable_images(inputs: list[str], size: int) -> tuple[torch.Tensor, list[Path]]:
    """All of ``image_batches`` at once (for a few images: memory grows with their number)."""
    batches = list(image_batches(image_paths(inputs), size))
    return torch.cat([images for images, _ in batches]), [p for _, good in batches for p in good]
