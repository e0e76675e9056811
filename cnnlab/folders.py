"""Image files on disk, decoded once: a folder of class subfolders scanned into a list of (file,
class), and any such list (a folder's, or a labels file's) decoded in parallel into one uint8 array,
cached in ``$CNNLAB_CACHE`` keyed by the files (paths, sizes, modification times), their classes
and the image size. Unreadable files are skipped with one warning.

The array is written to its cache entry as the images are decoded and read back memory-mapped
(cache.open_array), so the pixels never sit in a process's own memory: training gathers each batch
from the page cache, and the ranks of one machine share one copy. Rows taken from it (a split) are
an entry of their own, written in pieces (``take_rows``). Without a usable cache folder the arrays
are held in memory instead."""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from . import cache, distributed
from .atomic import WriteError
from .cache import default_cache_dir
from .errors import CnnlabError
from .progress import Progress
from .text import shown

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_VERSION = 2  # 2: entries sealed with a manifest (cache.py)
DECODE_CHUNK = 64  # images a decoding process takes at a time: progress moves in steps this small
ROWS_BYTES = 16 << 20  # pixels held at a time while an entry is written


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def listed(names: list[str], most: int = 10) -> str:
    """Names for one line: escaped, and the first ``most`` of a long list."""
    return ", ".join(map(shown, names[:most])) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def check_folder(root: Path) -> None:
    """Raises a one-line error unless ``root`` is an existing directory."""
    if not root.exists():
        raise CnnlabError(f"data folder {shown(root)} does not exist; pass --data with a folder "
                          "holding one subfolder of images per class")
    if not root.is_dir():
        what = "a file" if root.is_file() else "not a folder (a pipe or a device)"
        raise CnnlabError(f"--data {shown(root)} is {what}; pass the folder holding one subfolder per class")


def scan_folder(root: Path, per_class: int | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names) and (path, label) for every image file (the first
    ``per_class`` of each class, in name order, when given)."""
    check_folder(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CnnlabError(f"{shown(root)} has no class subfolders; put each class's images in "
                          f"{shown(root)}/<class name>/ (or list them in a CSV file: --labels FILE)")
    files = []
    for label, name in enumerate(classes):
        found = sorted(str(p) for p in (root / name).rglob("*") if p.is_file() and is_image(p))
        if not found:
            raise CnnlabError(f"class folder {shown(root / name)} has no images "
                              f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder")
        files += [(f, label) for f in found[:per_class]]
    if len(classes) < 2:
        raise CnnlabError(f"{shown(root)} has only one class ({shown(classes[0])}); a classifier needs at least two "
                          "class subfolders")
    return classes, files


def decode_image(args: tuple[str, int]) -> bytes | None:
    """(path, size) -> RGB bytes (size x size x 3) of the image, any mode converted; None if unreadable."""
    path, size = args
    try:
        with Image.open(path) as im:
            im.load()
            im = _to_rgb(im)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).tobytes()
    except Exception:
        return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def decoded(paths: list[str], size: int, workers: int | None = None) -> Iterator[bytes | None]:
    """Each of ``paths`` decoded (``decode_image``), in order, as the results come: in a pool of
    processes for more than 2,000 files. Rank 0 shows the progress (progress.py: a bar on a
    terminal, a line every 10 s when piped, nothing for a folder decoded sooner)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(p, size) for p in paths]
    with Progress(len(jobs), "decoding", "images", enabled=distributed.is_main()) as progress:
        if workers > 1 and len(paths) > 2000:
            pool = ProcessPoolExecutor(workers)
            try:
                for result in pool.map(decode_image, jobs, chunksize=DECODE_CHUNK):
                    progress.update()
                    yield result
            finally:  # stopped early (an error, Ctrl-C): the images not yet decoded are not waited for
                pool.shutdown(cancel_futures=True)
        else:
            for job in jobs:
                result = decode_image(job)
                progress.update()
                yield result


def decode_images(paths: list[str], size: int, workers: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Decodes and resizes images to (N, 3, size, size) uint8 in memory; returns the array and the
    indices of files that could not be read."""
    results = list(decoded(paths, size, workers))
    bad = [i for i, d in enumerate(results) if d is None]
    good = [d for d in results if d is not None]
    array = np.frombuffer(b"".join(good), dtype=np.uint8).reshape(len(good), size, size, 3)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)), bad


def _decode_into(entry: cache.ArrayWriter, paths: list[str], size: int) -> list[int]:
    """Decodes ``paths`` into ``entry``, a few rows at a time; the indices of unreadable files."""
    bad, rows = [], []
    for i, result in enumerate(decoded(paths, size)):
        if result is None:
            bad.append(i)
        else:
            rows.append(np.frombuffer(result, dtype=np.uint8).reshape(size, size, 3))
        if len(rows) * size * size * 3 >= ROWS_BYTES or (i == len(paths) - 1 and rows):
            entry.append(np.stack(rows).transpose(0, 3, 1, 2))
            rows = []
    return bad


def _cache_key(files: list[tuple[str, int]], size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{size}".encode())
    for path, label in files:
        st = os.stat(path)
        # the name's bytes as on disk: a name that is not UTF-8 is a key like any other
        digest.update(b"|" + os.fsencode(path) + f"|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def load_files(files: list[tuple[str, int]], classes: list[str], size: int, root: Path,
               cache_dir: Path | None = None, labels_file: Path | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict, Path | None]:
    """``files`` ((path, index into ``classes``), every path existing) decoded at ``size`` x ``size``
    through the cache: (uint8 images (N, 3, size, size), their labels, the files read, info: file
    count, skipped files, cache hit; the cache entry the images are mapped from, or None where they
    are held in memory: no usable cache folder). ``root``: the data folder; ``labels_file``: the
    file that listed ``files`` (None: the class folders of ``root`` did), which the errors name."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    array_path = cache_dir / f"images-{_cache_key(files, size)}.npy"
    meta = cache.check(array_path)
    array = cache.open_array(array_path, (len(meta["labels"]), 3, size, size)) if meta is not None else None
    hit = array is not None
    entry: Path | None = array_path
    if not hit:
        array, meta, entry = _decode(files, classes, size, root, array_path)
    if not len(meta["labels"]):
        where = f"the files {shown(labels_file)} lists" if labels_file else shown(root)
        raise CnnlabError(f"no readable images in {where}; check the files are images")
    _every_class_read(root, classes, files, meta, labels_file)  # before the warning: an error is the one line
    if meta["skipped"]:
        skipped = ", ".join(map(shown, meta["skipped"][:5])) + (" ..." if len(meta["skipped"]) > 5 else "")
        warnings.warn(f"skipped {len(meta['skipped'])} unreadable image file(s): {skipped}")
    info = {"root": str(root), "files": len(files), "skipped": meta["skipped"], "cache_hit": hit}
    labels = torch.tensor(meta["labels"], dtype=torch.int64)
    return torch.from_numpy(array), labels, meta["files"], info, entry


def _meta(files: list[tuple[str, int]], bad: list[int], classes: list[str], size: int, root: Path) -> dict:
    bad_set = set(bad)
    kept = [item for i, item in enumerate(files) if i not in bad_set]
    return {"root": str(root), "size": size, "classes": classes, "labels": [label for _, label in kept],
            "files": [path for path, _ in kept], "skipped": [files[i][0] for i in bad]}


def _decode(files: list[tuple[str, int]], classes: list[str], size: int, root: Path, array_path: Path
            ) -> tuple[np.ndarray, dict, Path | None]:
    """``files`` decoded into the cache entry ``array_path`` as they come, and mapped from it: (the
    array, its meta, the entry); where the entry cannot be written, decoded in memory (entry None),
    with one warning."""
    paths = [f for f, _ in files]
    try:
        array_path.parent.mkdir(parents=True, exist_ok=True)
        with cache.array_entry(array_path, (3, size, size)) as entry:
            bad = _decode_into(entry, paths, size)
            entry.meta = meta = _meta(files, bad, classes, size, root)
        array = cache.open_array(array_path, (len(meta["labels"]), 3, size, size))
        if array is not None:
            return array, meta, array_path
    except (OSError, WriteError) as exc:
        warnings.warn(f"could not write the image cache in {shown(array_path.parent)} ({exc}); the images are "
                      "held in memory; set CNNLAB_CACHE to a writable folder to start faster next time")
    array, bad = decode_images(paths, size)
    return array, _meta(files, bad, classes, size, root), None


def _every_class_read(root: Path, classes: list[str], files: list[tuple[str, int]], meta: dict,
                      labels_file: Path | None) -> None:
    """A one-line error naming a class of ``files`` whose every file was unreadable: trained on, it
    would be a class of no images (never predicted, its scores undefined)."""
    counts = np.bincount(np.asarray(meta["labels"], dtype=np.int64), minlength=len(classes))
    listed_classes = sorted({label for _, label in files})
    empty = [classes[label] for label in listed_classes if counts[label] == 0]
    if not empty:
        return
    more = f"; so do {len(empty) - 1} other class(es)" if len(empty) > 1 else ""
    if labels_file is not None:
        raise CnnlabError(f"class {shown(empty[0])} of {shown(labels_file)} has no readable image (every file "
                          f"labelled so failed to decode{more}); replace the files with images or remove its rows")
    raise CnnlabError(f"class folder {shown(root / empty[0])} has no readable image (every file in it failed to "
                      f"decode{more}); replace the files with images or remove the folder")


def take_rows(images: torch.Tensor, index: torch.Tensor, entry: Path | None) -> tuple[torch.Tensor, Path | None]:
    """``images[index]`` and the cache entry it is mapped from: ``images`` itself when ``index`` takes
    every row in order; otherwise, when ``images`` is mapped from the entry ``entry``, the rows
    copied a few at a time into an entry of their own (``rows-...``, keyed by ``entry`` and
    ``index``; found there the next time), so that no split of a large set is ever held in memory
    whole; in memory where there is no entry, or it cannot be written (with one warning)."""
    if len(index) == len(images) and torch.equal(index, torch.arange(len(images))):
        return images, entry
    if entry is None or len(index) == 0:
        return images[index], None
    digest = hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    path = entry.with_name(f"rows-{entry.stem.split('-', 1)[1]}-{digest}.npy")
    shape = (len(index), *images.shape[1:])
    if cache.check(path) is not None and (array := cache.open_array(path, shape, images.numpy().dtype)) is not None:
        return torch.from_numpy(array), path
    step = max(1, ROWS_BYTES // max(1, images[0].numel() * images.element_size()))
    try:
        with cache.array_entry(path, tuple(images.shape[1:]), images.numpy().dtype) as out:
            for start in range(0, len(index), step):
                out.append(images[index[start:start + step]].numpy())
            out.meta = {"rows_of": entry.name, "rows": len(index)}
        array = cache.open_array(path, shape, images.numpy().dtype)
        if array is not None:
            return torch.from_numpy(array), path
    except (OSError, WriteError) as exc:
        warnings.warn(f"could not write the image cache in {shown(path.parent)} ({exc}); this split is held in "
                      "memory; set CNNLAB_CACHE to a writable folder")
    return images[index], None
