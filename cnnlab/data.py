"""Images in, uint8 tensors out: folders, labels files and CIFAR-10 decoded once, cached, split, batched.

Training never touches a JPEG: every image is decoded once into a uint8 tensor that is
cached on disk (keyed by the file list and image size: folders.py) and memory-mapped from there
(each split an entry of its own), batches are gathered from it, and augmentation runs on whole
batches. Labels come from class folders, or from a CSV or TSV file (labels.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cache import default_cache_dir
from .errors import CnnlabError
from .folders import check_folder, listed, load_files, scan_folder, take_rows
from .labels import read_labels
from .multilabel import label_counts, rarest_label, strata
from .runtime import to_device
from .text import shown

SPLIT_NAMES = ("train", "val", "test")
VAL_FOLDERS = ("val", "valid", "validation")  # beside train/, each is the validation split


@dataclass
class ImageSet:
    """Images as one uint8 tensor (N, 3, H, W) with integer labels (several labels per image:
    multi-hot float rows, N x classes); ``entry``: the image cache's
    file the tensor is memory-mapped from (folders.py), None where the images are in memory."""
    images: torch.Tensor
    labels: torch.Tensor
    files: list[str] = field(default_factory=list)
    entry: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images ``index`` picks; from a cache entry, mapped from an entry of their own
        (folders.take_rows), so that a split is never copied into memory."""
        files = [self.files[i] for i in index.tolist()] if self.files else []
        images, entry = take_rows(self.images, index, self.entry)
        return ImageSet(images, self.labels[index], files, entry)

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same images and labels on ``device`` (a training loop slices its batches there); on
        the CPU the same tensors, never a copy (mapped images stay mapped)."""
        images = self.images.to(device)
        return ImageSet(images, self.labels.to(device), self.files, self.entry if images is self.images else None)


@dataclass
class Splits:
    """Train/val/test sets sharing one list of class names, and where they came from."""
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- loading

def load_folder(root: str | Path, size: int, cache_dir: Path | None = None,
                class_names: list[str] | None = None, per_class: int | None = None) -> tuple[ImageSet, list[str], dict]:
    """All images under ``root`` (one subfolder per class) as an ``ImageSet``, through the cache.

    Returns the set, the class names and info (file count, skipped files, cache hit).
    """
    root = Path(root).resolve()
    classes, files = scan_folder(root, per_class)
    if class_names is not None and classes != class_names:
        raise CnnlabError(f"class folders in {shown(root)} ({listed(classes)}) differ from the expected "
                          f"classes ({listed(class_names)}); use a folder with the same class names")
    images, labels, kept, info, entry = load_files(files, classes, size, root, cache_dir)
    return ImageSet(images, labels, kept, entry), classes, info


def load_labelled(labels: str | Path, root: str | Path, size: int, cache_dir: Path | None = None,
                  class_names: list[str] | None = None, per_class: int | None = None, multi_label: bool = False
                  ) -> tuple[dict[str, ImageSet], list[str], dict]:
    """The images a labels file lists (labels.py), image paths relative to ``root``, through the
    cache: ({split: images} for the splits its split column gives, or {'train': every image}
    without one), the class names (its labels sorted, or ``class_names``, a run's, which every
    label must be one of) and info (as ``load_folder``'s, with the labels file). With
    ``multi_label`` each row names several classes and the targets are multi-hot, (N, classes)."""
    root = Path(root).resolve()
    check_folder(root)
    table = read_labels(labels, root, multi_label)
    table.check_classes(class_names)
    classes = class_names if class_names is not None else table.classes
    index = {name: i for i, name in enumerate(classes)}
    taken: dict[tuple, int] = {}  # (split, label): rows taken so far, for per_class
    split_of = {}
    for row in table.rows:
        key = (row.split or "train", row.label)
        taken[key] = taken.get(key, 0) + 1
        if per_class is None or taken[key] <= per_class:
            split_of[row.file] = key[0]
    rows = [row for row in table.rows if row.file in split_of]
    hot = _multi_hot([table.names(row) for row in rows], index) if multi_label else None
    # the class a file is keyed and counted under in the cache: its label, or its rarest one
    first = rarest_label(hot).tolist() if hot is not None else [index[row.label] for row in rows]
    images, targets, kept, info, entry = load_files([(row.file, c) for row, c in zip(rows, first)], classes, size,
                                                    root, cache_dir, table.path)
    if hot is not None:  # the multi-hot rows of the files read
        at = {row.file: i for i, row in enumerate(rows)}
        targets = hot[torch.tensor([at[file] for file in kept], dtype=torch.int64)]
    everything = ImageSet(images, targets, kept, entry)
    sets = {}
    for name in SPLIT_NAMES:
        pick = [i for i, file in enumerate(kept) if split_of[file] == name]
        if pick:
            sets[name] = everything.subset(torch.tensor(pick, dtype=torch.int64))
    info["labels_file"] = str(table.path.resolve())
    return sets, classes, info


def _multi_hot(names: list[tuple[str, ...]], index: dict[str, int]) -> torch.Tensor:
    """Float32 (N, classes): 1 where an image has the class."""
    hot = torch.zeros(len(names), len(index))
    for i, listed_names in enumerate(names):
        hot[i, [index[name] for name in listed_names]] = 1.0
    return hot


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
                seed: int = 0, cache_dir: Path | None = None, per_class: int | None = None,
                labels: str | None = None) -> Splits:
    """Train/val/test from ``data``: ``cifar10`` (torchvision's format, downloaded when
    missing), a folder with ``train/`` (and optionally ``val/``, ``valid/`` or ``validation/``, and
    ``test/``) subfolders, or a folder of class subfolders; or the images the ``labels`` file lists
    (paths relative to ``data``), split as its split column says. Splits that are not given are
    carved from train, stratified."""
    if labels is not None:
        return _labelled_splits(data, labels, size, cache_dir, per_class, (val_split, test_split, seed))
    if data == "cifar10":
        return _cifar10_splits(size, val_split, test_split, seed, cache_dir, per_class)
    root = Path(data)
    check_folder(root)
    given = _split_folders(root)
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


def load_multilabel_splits(data: str, labels: str | None, size: int = 32, val_split: float = 0.1,
                           test_split: float = 0.1, seed: int = 0, cache_dir: Path | None = None) -> Splits:
    """Train/val/test of the images the ``labels`` file lists, each with several labels (its label
    column's class names separated by ';'): multi-hot targets (N, classes). Splits not given are
    carved from train, stratified by each image's rarest label (multilabel.rarest_label)."""
    if labels is None:
        raise CnnlabError("--multi-label reads each image's labels from a file, not from class folders (a folder gives "
                          "an image one class): pass --labels FILE, its label column holding class names separated "
                          "by ';' (cat;dog)")
    return _labelled_splits(data, labels, size, cache_dir, None, (val_split, test_split, seed), multi_label=True)


def load_run_splits(cfg, size: int) -> Splits:
    """The splits a run's settings ``cfg`` name (a TrainConfig or TransferConfig: its data, labels
    file, split fractions, seed, cache and whether several labels per image), at ``size`` pixels."""
    cache_dir = Path(cfg.cache_dir) if getattr(cfg, "cache_dir", None) else None
    if cfg.multi_label:
        return load_multilabel_splits(cfg.data, cfg.labels, size, cfg.val_split, cfg.test_split, cfg.seed, cache_dir)
    return load_splits(cfg.data, size, cfg.val_split, cfg.test_split, cfg.seed, cache_dir, labels=cfg.labels)


def _labelled_splits(data: str, labels: str, size: int, cache_dir: Path | None, per_class: int | None,
                     carve: tuple[float, float, int], multi_label: bool = False) -> Splits:
    """The splits of a labels file's images; those it does not give carved as ``carve`` (val_split,
    test_split, seed) says."""
    if data == "cifar10":
        raise CnnlabError("--labels lists image files: pass --data FOLDER, the folder its relative paths start "
                          "from, not cifar10")
    sets, classes, info = load_labelled(labels, data, size, cache_dir, per_class=per_class, multi_label=multi_label)
    if "train" not in sets:
        raise CnnlabError(f"labels file {shown(labels)} has no readable image of split train; mark the training "
                          "images train in its split column (or drop the column to carve the splits)")
    return _fill_missing(sets, classes, info, *carve)


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root``: train/, test/ and the validation folder (val/, valid/ or
    validation/; a one-line error for two of them beside train/)."""
    given = {name: root / name for name in ("train", "test") if (root / name).is_dir()}
    val = [root / name for name in VAL_FOLDERS if (root / name).is_dir()]
    if len(val) > 1 and "train" in given:
        raise CnnlabError(f"{shown(root)} has both {val[0].name}/ and {val[1].name}/ beside train/; keep one "
                          "validation folder (val/, valid/ and validation/ are the same split)")
    if val:
        given["val"] = val[0]
    return given


def _fill_missing(sets: dict, classes, info, val_split, test_split, seed) -> Splits:
    given = sorted(sets)
    train = sets["train"]
    want_val = 0.0 if "val" in sets else val_split
    want_test = 0.0 if "test" in sets else test_split
    tr, va, te = stratified_split(strata(train.labels), want_val, want_test, seed)
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
    counts = label_counts(splits.train.labels, len(splits.class_names))
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

