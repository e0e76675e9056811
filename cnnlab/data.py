"""Images in, uint8 tensors out: folders and CIFAR-10 decoded once, cached, split, batched.

Training never touches a JPEG: every image is decoded once into a uint8 tensor that is
cached on disk (keyed by the file list and image size), batches are sliced from memory,
and augmentation runs on whole batches.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import cache
from .atomic import WriteError
from .cache import default_cache_dir
from .errors import CnnlabError
from .runtime import to_device
from .text import shown

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_VERSION = 2  # 2: entries sealed with a manifest (cache.py)
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ImageSet:
    """Images as one uint8 tensor (N, 3, H, W) with integer labels."""
    images: torch.Tensor
    labels: torch.Tensor
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        files = [self.files[i] for i in index.tolist()] if self.files else []
        return ImageSet(self.images[index], self.labels[index], files)

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same images and labels on ``device`` (a training loop slices its batches there)."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.files)


@dataclass
class Splits:
    """Train/val/test sets sharing one list of class names, and where they came from."""
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    info: dict = field(default_factory=dict)

    def require_batch(self, batch_size: int) -> None:
        """A one-line error when ``batch_size`` is larger than the training set."""
        if batch_size > len(self.train):
            raise CnnlabError(f"--batch-size {batch_size} is larger than the training set "
                              f"({len(self.train)} images); use a smaller batch")


# ---------------------------------------------------------------- folders

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


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
                          f"{shown(root)}/<class name>/")
    files = []
    for label, name in enumerate(classes):
        found = sorted(str(p) for p in (root / name).rglob("*") if p.is_file() and _is_image(p))
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


def decode_images(paths: list[str], size: int, workers: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Decodes and resizes images to (N, 3, size, size) uint8; returns the array and the
    indices of files that could not be read."""
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(p, size) for p in paths]
    if workers > 1 and len(paths) > 2000:
        with ProcessPoolExecutor(workers) as pool:
            decoded = list(pool.map(decode_image, jobs, chunksize=512))
    else:
        decoded = [decode_image(j) for j in jobs]
    bad = [i for i, d in enumerate(decoded) if d is None]
    good = [d for d in decoded if d is not None]
    array = np.frombuffer(b"".join(good), dtype=np.uint8).reshape(len(good), size, size, 3)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)), bad


def _cache_key(files: list[tuple[str, int]], size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{size}".encode())
    for path, label in files:
        st = os.stat(path)
        # the name's bytes as on disk: a name that is not UTF-8 is a key like any other
        digest.update(b"|" + os.fsencode(path) + f"|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def load_folder(root: str | Path, size: int, cache_dir: Path | None = None,
                class_names: list[str] | None = None, per_class: int | None = None) -> tuple[ImageSet, list[str], dict]:
    """All images under ``root`` (one subfolder per class) as an ``ImageSet``, through the cache.

    Returns the set, the class names and info (file count, skipped files, cache hit).
    """
    root = Path(root).resolve()
    classes, files = scan_folder(root, per_class)
    if class_names is not None and classes != class_names:
        raise CnnlabError(f"class folders in {shown(root)} ({_names(classes)}) differ from the expected "
                          f"classes ({_names(class_names)}); use a folder with the same class names")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(files, size)
    array_path = cache_dir / f"images-{key}.npy"
    meta = cache.check(array_path)
    array = _cached_array(array_path, meta, size) if meta is not None else None
    hit = array is not None
    if not hit:
        array, bad = decode_images([f for f, _ in files], size)
        kept = [item for i, item in enumerate(files) if i not in set(bad)]
        meta = {"root": str(root), "size": size, "classes": classes,
                "labels": [label for _, label in kept], "files": [path for path, _ in kept],
                "skipped": [files[i][0] for i in bad]}
        _write_cache(cache_dir, array_path, array, meta)
    if not len(meta["labels"]):
        raise CnnlabError(f"no readable images in {shown(root)}; check the files are images")
    _every_class_read(root, classes, meta)  # before the warning: an error is the one line
    if meta["skipped"]:
        listed = ", ".join(map(shown, meta["skipped"][:5])) + (" ..." if len(meta["skipped"]) > 5 else "")
        warnings.warn(f"skipped {len(meta['skipped'])} unreadable image file(s): {listed}")
    images = ImageSet(torch.from_numpy(array), torch.tensor(meta["labels"], dtype=torch.int64), meta["files"])
    info = {"root": str(root), "files": len(files), "skipped": meta["skipped"], "cache_hit": hit}
    return images, classes, info


def _names(names: list[str], most: int = 10) -> str:
    """Class names for one line: escaped, and the first ``most`` of a long list."""
    return ", ".join(map(shown, names[:most])) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _every_class_read(root: Path, classes: list[str], meta: dict) -> None:
    """A one-line error naming a class whose every file was unreadable: trained on, it would be a
    class of no images (never predicted, its scores undefined)."""
    counts = np.bincount(np.asarray(meta["labels"], dtype=np.int64), minlength=len(classes))
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise CnnlabError(f"class folder {shown(root / empty[0])} has no readable image (every file in it failed to "
                          f"decode{f'; so do {len(empty) - 1} other class(es)' if len(empty) > 1 else ''}); replace "
                          "the files with images or remove the folder")


def _cached_array(path: Path, meta: dict, size: int) -> np.ndarray | None:
    """The images of a sealed cache entry, or None (with the one warning) when the array in it is
    not the one its manifest describes."""
    try:
        array = np.load(path)
        if array.dtype == np.uint8 and array.shape == (len(meta["labels"]), 3, size, size):
            return array
        problem = f"an array of {array.dtype} {array.shape}"
    except (ValueError, OSError, KeyError, TypeError, EOFError) as exc:
        problem = type(exc).__name__
    cache.warn_damaged(path, problem)
    return None


def _write_cache(cache_dir: Path, array_path: Path, array: np.ndarray, meta: dict) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.store(array_path, _npy_bytes(array), meta)
    except (OSError, WriteError) as exc:
        warnings.warn(f"could not write the image cache in {cache_dir} ({exc}); "
                      "set CNNLAB_CACHE to a writable folder to start faster next time")


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# ---------------------------------------------------------------- splits

def stratified_split(labels: torch.Tensor, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of train, val and test, each class split in the same proportions, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in torch.unique(labels).tolist():
        index = torch.nonzero(labels == label).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_test = round(len(index) * test_fraction)
        n_val = round(len(index) * val_fraction)
        parts[2].append(index[:n_test])
        parts[1].append(index[n_test:n_test + n_val])
        parts[0].append(index[n_test + n_val:])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)


def load_splits(data: str, size: int = 32, val_split: float = 0.1, test_split: float = 0.1,
                seed: int = 0, cache_dir: Path | None = None, per_class: int | None = None) -> Splits:
    """Train/val/test from ``data``: ``cifar10`` (torchvision's format, downloaded when
    missing), a folder with ``train/`` (and optionally ``val/``, ``test/``) subfolders, or a
    folder of class subfolders. Splits that are not given are carved from train, stratified."""
    if data == "cifar10":
        return _cifar10_splits(size, val_split, test_split, seed, cache_dir, per_class)
    root = Path(data)
    check_folder(root)
    given = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if "train" not in given:
        images, classes, info = load_folder(root, size, cache_dir, per_class=per_class)
        return _fill_missing({"train": images}, classes, info, val_split, test_split, seed)
    train, classes, info = load_folder(given["train"], size, cache_dir, per_class=per_class)
    sets = {"train": train}
    for name in ("val", "test"):
        if name in given:
            sets[name], _, extra = load_folder(given[name], size, cache_dir, class_names=classes, per_class=per_class)
            info["skipped"] += extra["skipped"]
    return _fill_missing(sets, classes, info, val_split, test_split, seed)


def _fill_missing(sets: dict, classes, info, val_split, test_split, seed) -> Splits:
    given = sorted(sets)
    train = sets["train"]
    want_val = 0.0 if "val" in sets else val_split
    want_test = 0.0 if "test" in sets else test_split
    tr, va, te = stratified_split(train.labels, want_val, want_test, seed)
    sets.setdefault("val", train.subset(va))
    sets.setdefault("test", train.subset(te))
    sets["train"] = train.subset(tr)
    info["given_splits"] = given
    return _checked(Splits(sets["train"], sets["val"], sets["test"], classes, info), no_val=want_val == 0 and
                    "val" not in given)


def _checked(splits: Splits, no_val: bool = False) -> Splits:
    """The splits, or a one-line error for an empty one (the validation split may be empty when
    ``no_val``: --val-split 0 trains on every training image)."""
    for name in SPLIT_NAMES:
        if len(getattr(splits, name)) == 0 and not (name == "val" and no_val):
            raise CnnlabError(f"the {name} split is empty; use more images or a larger "
                              f"--{'val' if name == 'val' else 'test'}-split" if name != "train" else
                              "the train split is empty; lower --val-split and --test-split")
    counts = torch.bincount(splits.train.labels, minlength=len(splits.class_names))
    if (counts == 0).any():
        name = splits.class_names[int(torch.nonzero(counts == 0)[0])]
        raise CnnlabError(f"class {shown(name)} has no training images once the validation and test images are "
                          "held out; add images to it, or lower --val-split and --test-split")
    splits.info.update({f"{n}_size": len(getattr(splits, n)) for n in SPLIT_NAMES})
    return splits


def _cifar10_splits(size, val_split, test_split, seed, cache_dir, per_class) -> Splits:
    env = os.environ.get("CNNLAB_DATA")
    if env and (Path(env) / "cifar10").is_dir():
        return load_splits(str(Path(env) / "cifar10"), size, val_split, test_split, seed, cache_dir, per_class)
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "cifar10"
    try:
        import torchvision
        train = torchvision.datasets.CIFAR10(root, train=True, download=True)
        test = torchvision.datasets.CIFAR10(root, train=False, download=True)
    except Exception as exc:
        raise CnnlabError(f"CIFAR-10 is not in {root} and could not be downloaded "
                          f"({type(exc).__name__}); pass --data FOLDER with the images, or set "
                          "CNNLAB_DATA to a folder holding cifar10/") from None

    def as_set(ds) -> ImageSet:
        targets = torch.tensor(ds.targets, dtype=torch.int64)
        keep = torch.cat([torch.nonzero(targets == c).flatten()[:per_class] for c in range(len(ds.classes))]).sort().values
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)[keep].contiguous()
        if size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                                   antialias=True).round().clamp(0, 255).to(torch.uint8)
        return ImageSet(images, targets[keep])

    sets = {"train": as_set(train), "test": as_set(test)}
    info = {"root": str(root), "source": "torchvision CIFAR10", "skipped": []}
    return _fill_missing(sets, list(train.classes), info, val_split, test_split, seed)


# ---------------------------------------------------------------- batches

def augment_draws(n: int, generator: torch.Generator, pad: int = 4, flip: bool = True) -> tuple:
    """The random choices of a random horizontal flip and a random crop after reflect-padding by
    ``pad`` (``apply_augment``) for ``n`` images, drawn on the CPU from ``generator``: (flip mask
    or None, row shift or None, column shift or None)."""
    mask = torch.rand(n, generator=generator) < 0.5 if flip else None
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else None
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else None
    return mask, dy, dx


def alternate_flips(base: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flips: each training image's orientation is drawn once (``base``,
    one bool per image) and every image is mirrored in every other epoch, so that each one is seen
    both ways round in any two epochs in a row rather than by chance; the flip mask of the batch
    ``index`` in ``epoch`` (from 1)."""
    return base[index] ^ (epoch % 2 == 0)


def apply_augment(x: torch.Tensor, draws: tuple, pad: int = 4) -> torch.Tensor:
    """Flips and crops a float batch as ``draws`` (from ``augment_draws``) say; the draws may
    live on the CPU or already on ``x``'s device (a CUDA graph's fixed inputs)."""
    n, c, h, w = x.shape
    mask, dy, dx = (None if t is None else to_device(t, x.device) for t in draws)
    if mask is not None:
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    if dy is not None:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch, chan, rows, cols]
    return x.contiguous(memory_format=torch.channels_last)


def photo_variants(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One altered copy of each uint8 image, as photos from elsewhere differ from a folder's: a
    random crop of 50-100% of its area (aspect 3:4 to 4:3) resized back, mirrored half the time,
    and re-encoded as a JPEG of quality 30-95 (by Pillow); seeded, so a cache of their features
    is reproducible."""
    import io

    from torchvision.transforms import v2

    alter = v2.Compose([v2.RandomResizedCrop(images.shape[-1], scale=(0.5, 1.0), antialias=True),
                        v2.RandomHorizontalFlip()])
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(alter(image).permute(1, 2, 0).numpy()).save(buf, "JPEG",
                                                                         quality=int(torch.randint(30, 96, ())))
            out[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out

