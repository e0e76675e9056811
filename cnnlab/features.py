"""A frozen base's features: extracted in batches (interruptible, sharded over ranks), and kept in
the cache, sealed, keyed by the backbone, its weights file and every image file of the split."""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import cache, distributed
from .atomic import WriteError
from .cache import default_cache_dir
from .config import TransferConfig
from .data import Splits, photo_variants
from .errors import RunInterrupted
from .inference import inference_batch, predict_logits, tta_views
from .interrupts import InterruptGuard
from .onnx_extraction import OnnxBase, extraction_base
from .preprocessing import Preprocessing
from .progress import Progress
from .run_state import RunContext
from .runtime import autocast, compute_dtype


def _feature_key(cfg: TransferConfig, weights_path: Path, preprocessing: Preprocessing, splits: Splits,
                 dtype: torch.dtype | None, below: int = 0) -> str:
    digest = hashlib.sha256(f"{cfg.backbone}|{preprocessing}|{cfg.head}|{weights_path}|{dtype}".encode())
    if cfg.feature_copies:  # (the key of a cache without copies is as it always was)
        digest.update(f"|copies {cfg.feature_copies} seed {cfg.seed}".encode())
    if below:  # the maps below the last ``below`` blocks (likewise)
        digest.update(f"|below {below}".encode())
    st = os.stat(weights_path)
    digest.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    for part in (splits.train, splits.val, splits.test):
        for f in part.files:
            s = os.stat(f)
            digest.update(f"|{f}|{s.st_size}|{s.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Extraction:
    """How a base's features are computed: the photos prepared by ``preprocessing`` on ``device``,
    convolutions in ``compute_dtype(precision)``, averaged over the grid when ``pool``, in
    batches of ``batch_size`` (None: ``inference.inference_batch``'s choice)."""
    preprocessing: Preprocessing
    device: torch.device
    pool: bool
    precision: str = "auto"
    batch_size: int | None = None


@torch.inference_mode()
def extract_features(base: nn.Module, images: torch.Tensor, how: Extraction,
                     view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     log: Callable[[str], None] | None = None, guard: InterruptGuard | None = None) -> torch.Tensor:
    """The base's outputs for uint8 images, float16, (N, C) when ``how.pool`` else (N, C, H, W);
    with ``view``, for that view of each prepared batch (one of ``inference.tta_views``). With
    ``guard``, a signal stops it at the end of a batch (raises ``RunInterrupted`` with epoch 0):
    on a CPU the whole extraction can take minutes. Under torchrun each rank extracts its part of
    ``images`` and every rank gets all the features (a signal then stops every rank at the end of
    the same batch)."""
    base.eval()
    device = how.device
    dtype = compute_dtype(how.precision, device)
    batch_size = how.batch_size or inference_batch(images)
    prepare = how.preprocessing.on(device)
    first, stop = distributed.shard_range(len(images))
    ranks = distributed.active()
    per_rank = -(-len(images) // distributed.world_size())  # every rank walks as many batches (some empty),
    batches = math.ceil(per_rank / batch_size)              # so that all take part in each signal check
    out = []
    progress = Progress(len(images), "features", "images", log, distributed.is_main())
    for b, i in enumerate(range(0, per_rank, batch_size)):
        signum = guard.signum if guard is not None else None
        if ranks:
            signum = distributed.stop_flags(signum, torch.tensor(-1, device=device))[0]
        if signum:
            progress.close()
            raise RunInterrupted(signum, 0, b, batches)
        part = images[first + i:min(first + i + batch_size, stop)]
        if len(part):
            with autocast(device, dtype):
                x = prepare(part)
                y = base(view(x) if view else x).float()
            out.append((y.mean((2, 3)) if how.pool else y).half().cpu())
        progress.update(len(part) * distributed.world_size())  # every rank's, about
    progress.close()
    if ranks:
        return distributed.gather_rows(torch.cat(out), len(images))
    return torch.cat(out)


def cached_features(cfg: TransferConfig, base: nn.Module, splits: Splits, weights_path: Path,
                    ctx: RunContext, below: int = 0) -> tuple[dict, bool]:
    """({'train'|'val'|'test': features}, whether they came from the disk cache): read from the
    cache, or computed once and cached; then the features of each further view of the test split
    that test-time augmentation scores (``inference.tta_views``) as 'test <view>' (none when
    fine-tuning will change the base), each view in a cache file of its own, so that runs with and
    without test-time augmentation share the rest. With ``below`` K, the features are the maps the
    base's last K blocks take (``backbones.split_base``), unpooled, test views included: fine-tuning
    those blocks then trains on them and the test is scored from them.
    Under torchrun the ranks extract together and rank 0 writes the cache; whether to read it is
    rank 0's call, so all ranks agree. The base runs on ``ctx.device`` with the run's
    preprocessing, logging to ``ctx.log``; ``ctx.guard`` stops it at the end of a batch."""
    device, preprocessing, log = ctx.device, ctx.preprocessing, ctx.log
    dtype = compute_dtype(cfg.precision, device)
    key = _feature_key(cfg, weights_path, preprocessing, splits, dtype, below)
    extractor = functools.cache(lambda: extraction_base(base, preprocessing.size, device, dtype, log, below))
    how = Extraction(preprocessing, device, pool=cfg.head == "gap" and not below, precision=cfg.precision)

    def extract(images: torch.Tensor, view=None) -> torch.Tensor:
        return extract_features(extractor(), images, how, view, log, ctx.guard)

    def all_splits() -> dict:
        start = time.perf_counter()
        result = {name: extract(getattr(splits, name).images) for name in ("train", "val", "test")}
        copies = [extract(photo_variants(splits.train.images, cfg.seed * 1000 + k))
                  for k in range(cfg.feature_copies)]  # one copy in memory at a time
        result["train"] = torch.cat([result["train"], *copies])
        n = sum(len(v) for v in result.values())
        by = ", onnxruntime" if isinstance(extractor(), OnnxBase) else ""
        log(f"extracted features of {n} images in {time.perf_counter() - start:.1f}s "
            f"({n / (time.perf_counter() - start):.1f} images/s{by})")
        return result

    def test_view(name: str, view) -> dict:
        start = time.perf_counter()
        out = extract(splits.test.images, view)
        log(f"extracted features of the test split's {name} images in {time.perf_counter() - start:.1f}s")
        return {"test": out}

    result, hit = _from_cache(default_cache_dir() / f"features-{key}.pt", all_splits, log)
    for _, name, view in [] if cfg.fine_tune_epochs and not below else tta_views(cfg.tta)[1:]:
        path = default_cache_dir() / f"features-{key}-test-{name.replace(' ', '-')}.pt"
        views, view_hit = _from_cache(path, lambda name=name, view=view: test_view(name, view), log)
        result[_test_key(name)], hit = views["test"], hit and view_hit
    return result, hit


def _from_cache(path: Path, compute: Callable[[], dict], log: Callable[[str], None]) -> tuple[dict, bool]:
    """(the tensors cached at ``path``, True), or (``compute()``, False) with rank 0 caching them."""
    if distributed.on_main(lambda: cache.check(path) is not None):
        try:
            return torch.load(path, weights_only=True), True
        except Exception as exc:  # sealed, yet not what torch.save wrote: rebuilt all the same
            cache.warn_damaged(path, type(exc).__name__)
    result = compute()
    if not distributed.is_main():
        return result, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(result, buf)
        cache.store(path, buf.getvalue())
    except (OSError, WriteError) as exc:
        log(f"warning: could not cache features ({exc})")
    return result, False


@torch.inference_mode()
def through_tail(tail: nn.Module, maps: dict, pool: bool, ctx: RunContext, precision: str = "auto") -> dict:
    """What the base makes of cached maps (``cached_features`` with ``below``): each entry of
    ``maps`` run through ``tail``, the frozen blocks above them (in inference mode, on a copy),
    averaged over the grid when ``pool``, float16, as ``cached_features`` would have given them."""
    tail = copy.deepcopy(tail).eval()
    dtype = compute_dtype(precision, ctx.device)
    out = {}
    for name, x in maps.items():
        size = inference_batch(x)
        parts = []
        for i in range(0, len(x), size):
            with autocast(ctx.device, dtype):
                y = tail(x[i:i + size].to(ctx.device).float()).float()
            parts.append((y.mean((2, 3)) if pool else y).half().cpu())
        out[name] = torch.cat(parts)
    return out


def cached_test_logits(head: nn.Module, features: dict, ctx: RunContext) -> torch.Tensor:
    """The test split's logits from its cached features, each view of ``tta_views(ctx.tta)``
    weighted as ``inference.augmented_logits`` weighs it: the same scores as the whole model on the
    photos (up to the cache's float16 rounding) without running the base again. ``head``: the
    head, or for cached maps the blocks above them with the head (``transfer_model.TransferModel``)."""
    return sum(weight * predict_logits(head, features[_test_key(name)], ctx.preprocessing, ctx.device,
                                       precision=ctx.precision)
               for weight, name, _ in tta_views(ctx.tta))


def _test_key(view: str) -> str:
    """Where ``cached_features`` keeps the test split's features of the view named ``view``."""
    return "test" if view == "image" else f"test {view}"
