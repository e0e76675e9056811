"""Transfer learning: a pretrained conv base, frozen, a new head trained on cached features, then
optional fine-tuning of the last blocks. Both phases run through train.py's loop."""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import math
import os
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import cache, distributed
from .atomic import WriteError
from .backbones import build, for_extraction, pretrained
from .config import TrainConfig, TransferConfig, from_record, validate_transfer
from .data import ImageSet, Splits, load_splits, photo_variants
from .early_stopping import EarlyStopping
from .inference import inference_batch, predict_logits, tta_views
from .interrupts import InterruptGuard, Interrupted, guarded_run
from .onnx_extraction import OnnxBase, extraction_base
from .preprocessing import Preprocessing
from .presets import count_parameters
from .runs import create_run_dir, run_record, unfinished_config, write_history, write_json, write_samples
from .runtime import autocast, compute_dtype, default_cache_dir, environment, setup
from .tensorboard_log import Board
from .train import finish_run, fit


class Head(nn.Module):
    """The new classifier: Flatten -> Dense (the seed's) or global average pooling -> Dense.
    One output unit (sigmoid) for two classes, else one per class (softmax)."""

    def __init__(self, kind: str, channels: int, grid: int, classes: int):
        super().__init__()
        self.kind = kind
        inputs = channels * grid * grid if kind == "flatten" else channels
        self.linear = nn.Linear(inputs, 1 if classes == 2 else classes)

    def forward(self, x):
        if self.kind == "gap" and x.dim() == 4:
            x = x.mean((2, 3))
        return self.linear(x.flatten(1).float())


class TransferModel(nn.Module):
    """Conv base + new head. The base's batch-norm layers always run in inference mode (their
    statistics stay frozen), and while the base is frozen it runs wholly in inference mode."""

    def __init__(self, features: nn.Module, head: Head):
        super().__init__()
        self.features = features
        self.head = head
        self.base_frozen = True

    def forward(self, x):
        return self.head(self.features(x))

    def for_inference(self) -> TransferModel:
        """The same function for scoring, in fewer passes over memory: the base as
        ``backbones.for_extraction`` gives it (a folded copy of EfficientNet-Lite's), the head shared."""
        return TransferModel(for_extraction(self.features), self.head).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.base_frozen:
            self.features.eval()
        else:
            for m in self.features.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def freeze_base(model: TransferModel, blocks: list[nn.Module], unfreeze: int = 0) -> int:
    """Freezes the whole base, then unfreezes its last ``unfreeze`` blocks; returns how many
    blocks have trainable parameters."""
    for p in model.features.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - unfreeze:] if unfreeze else []:
        for p in block.parameters():
            p.requires_grad_(True)
    model.base_frozen = unfreeze == 0
    return sum(any(p.requires_grad for p in b.parameters()) for b in blocks)


# ---------------------------------------------------------------- feature cache

def _feature_key(cfg: TransferConfig, weights_path: Path, prep: Preprocessing, splits: Splits,
                 dtype: torch.dtype | None) -> str:
    digest = hashlib.sha256(f"{cfg.backbone}|{prep}|{cfg.head}|{weights_path}|{dtype}".encode())
    if cfg.feature_copies:  # (the key of a cache without copies is as it always was)
        digest.update(f"|copies {cfg.feature_copies} seed {cfg.seed}".encode())
    st = os.stat(weights_path)
    digest.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    for part in (splits.train, splits.val, splits.test):
        for f in part.files:
            s = os.stat(f)
            digest.update(f"|{f}|{s.st_size}|{s.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


@torch.inference_mode()
def extract_features(features: nn.Module, images: torch.Tensor, prep: Preprocessing, device: torch.device,
                     pool: bool, batch_size: int | None = None, log: Callable[[str], None] | None = None,
                     guard: InterruptGuard | None = None, precision: str = "auto",
                     view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The base's outputs for uint8 images, float16, (N, C) when ``pool`` else (N, C, H, W), its
    convolutions in ``compute_dtype(precision)``; with ``view``, for that view of each prepared
    batch (one of ``inference.tta_views``). With ``guard``, a signal stops it at the end of
    a batch (raises ``Interrupted`` with epoch 0): on a CPU the whole extraction can take minutes.
    Under torchrun each rank extracts its part of ``images`` and every rank gets all the features
    (a signal then stops every rank at the end of the same batch)."""
    features.eval()
    dtype = compute_dtype(precision, device)
    batch_size = batch_size or inference_batch(images)
    prepare = prep.on(device)
    first, stop = distributed.shard_range(len(images))
    ranks = distributed.active()
    per_rank = -(-len(images) // distributed.world_size())  # every rank walks as many batches (some empty),
    batches = math.ceil(per_rank / batch_size)              # so that all take part in each signal check
    out = []
    start = time.perf_counter()
    for b, i in enumerate(range(0, per_rank, batch_size)):
        signum = guard.signum if guard is not None else None
        if ranks:
            signum = distributed.stop_flags(signum, torch.tensor(-1, device=device))[0]
        if signum:
            raise Interrupted(signum, 0, b, batches)
        part = images[first + i:min(first + i + batch_size, stop)]
        if len(part):
            with autocast(device, dtype):
                x = prepare(part)
                y = features(view(x) if view else x).float()
            out.append((y.mean((2, 3)) if pool else y).half().cpu())
        if log and b % 250 == 249:
            done = (b + 1) * batch_size * distributed.world_size()
            log(f"  features: {done}/{len(images)} images, {done / (time.perf_counter() - start):.1f} images/s")
    if ranks:
        return distributed.gather_rows(torch.cat(out), len(images))
    return torch.cat(out)


def cached_features(cfg: TransferConfig, features: nn.Module, prep: Preprocessing, device: torch.device,
                    splits: Splits, weights_path: Path, log: Callable[[str], None],
                    guard: InterruptGuard | None = None) -> tuple[dict, bool]:
    """({'train'|'val'|'test': features}, whether they came from the disk cache): read from the
    cache, or computed once and cached; then the features of each further view of the test split
    that test-time augmentation scores (``inference.tta_views``) as 'test <view>' (none when
    fine-tuning will change the base), each view in a cache file of its own, so that runs with and
    without test-time augmentation share the rest.
    Under torchrun the ranks extract together and rank 0 writes the cache; whether to read it is
    rank 0's call, so all ranks agree."""
    dtype = compute_dtype(cfg.precision, device)
    key = _feature_key(cfg, weights_path, prep, splits, dtype)
    base = functools.cache(lambda: extraction_base(features, prep.size, device, dtype, log))  # only when needed

    def extract(images: torch.Tensor, view=None) -> torch.Tensor:
        return extract_features(base(), images, prep, device, cfg.head == "gap", log=log, guard=guard,
                                precision=cfg.precision, view=view)

    def all_splits() -> dict:
        start = time.perf_counter()
        result = {name: extract(getattr(splits, name).images) for name in ("train", "val", "test")}
        copies = [extract(photo_variants(splits.train.images, cfg.seed * 1000 + k))
                  for k in range(cfg.feature_copies)]  # one copy in memory at a time
        result["train"] = torch.cat([result["train"], *copies])
        n = sum(len(v) for v in result.values())
        by = ", onnxruntime" if isinstance(base(), OnnxBase) else ""
        log(f"extracted features of {n} images in {time.perf_counter() - start:.1f}s "
            f"({n / (time.perf_counter() - start):.1f} images/s{by})")
        return result

    def test_view(name: str, view) -> dict:
        start = time.perf_counter()
        out = extract(splits.test.images, view)
        log(f"extracted features of the test split's {name} images in {time.perf_counter() - start:.1f}s")
        return {"test": out}

    result, hit = _from_cache(default_cache_dir() / f"features-{key}.pt", all_splits, log)
    for _, name, view in [] if cfg.fine_tune_epochs else tta_views(cfg.tta)[1:]:
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


def cached_test_logits(head: nn.Module, feats: dict, tta: int, prep: Preprocessing, device: torch.device,
                       precision: str) -> torch.Tensor:
    """The test split's logits from its cached features, each view of ``tta_views(tta)`` weighted
    as ``inference.augmented_logits`` weighs it: the same scores as the whole model on the photos
    (up to the cache's float16 rounding) without running the base again."""
    return sum(weight * predict_logits(head, feats[_test_key(name)], prep, device, precision=precision)
               for weight, name, _ in tta_views(tta))


def _test_key(view: str) -> str:
    """Where ``cached_features`` keeps the test split's features of the view named ``view``."""
    return "test" if view == "image" else f"test {view}"


# ---------------------------------------------------------------- a run

def phase_config(cfg: TransferConfig, epochs: int, lr: float, prep: Preprocessing) -> TrainConfig:
    """The loop's settings for one phase (frozen or fine-tuning) of a transfer run."""
    # cuda_graph off: the captured step is tuned for the CIFAR-10 presets, not a whole pretrained base
    return TrainConfig(data=cfg.data, epochs=epochs, batch_size=cfg.batch_size, lr=lr, optimizer="adam",
                       val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, monitor=cfg.monitor,
                       patience=cfg.patience, augment=cfg.augment, preprocessing=prep, device=cfg.device,
                       cuda_graph=False, precision=cfg.precision, out=cfg.out)


def transfer(cfg: TransferConfig, log: Callable[[str], None] = print, splits: Splits | None = None,
             run_dir: Path | None = None) -> Path:
    """Frozen phase (cached features unless augmenting), optional fine-tuning, one test, a run
    directory (a new one, or ``run_dir`` when restarting a stopped run)."""
    validate_transfer(cfg)
    device = setup(cfg.device, cfg.threads)
    distributed.check_batch(cfg.batch_size)
    started = time.perf_counter()
    built, weights, weights_path = distributed.main_first(
        lambda: pretrained(cfg.backbone, cfg.weights_variant, cfg.weights_file, cfg.image_size))  # one download
    prep = weights.preprocessing
    if splits is None:
        splits = distributed.main_first(lambda: load_splits(cfg.data, prep.size, cfg.val_split, cfg.test_split,
                                                            cfg.seed))
    splits.require_batch(cfg.batch_size)
    torch.manual_seed(cfg.seed)
    head = Head(cfg.head, built.channels, built.grid, len(splits.class_names))
    model = TransferModel(built.features, head).to(device, memory_format=torch.channels_last)
    freeze_base(model, built.blocks, 0)
    restart = run_dir is not None
    run_dir = run_dir or distributed.on_main(lambda: create_run_dir(cfg.out, cfg.name or f"transfer-{cfg.backbone}"))
    writes = distributed.is_main()
    if writes:
        write_json(run_dir / "config.json", run_record(
            "transfer", asdict(cfg), splits, count_parameters(model), environment(device, cfg.precision),
            weights_variant=weights.variant, weights_path=str(weights_path), preprocessing=asdict(prep),
            feature_shape=[built.channels, built.grid, built.grid], blocks=len(built.blocks),
            ranks=distributed.describe(cfg.batch_size)))
    board = Board(run_dir, cfg.tensorboard and writes, 1 if restart else None, log)  # a restart hides the stopped attempt's
    with guarded_run(run_dir, log, checkpoints=False) as guard, closing(board):
        if writes:
            write_samples(run_dir, splits.train, splits.class_names, cfg.seed)
        log(f"{cfg.backbone} ({weights.describe()}), {cfg.head} head, {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test images, {device}"
            f"{f' x {distributed.world_size()} ranks' if distributed.active() else ''}; "
            f"ready in {time.perf_counter() - started:.1f}s")
        log(f"run directory: {run_dir}")
        history, stopper, boundary, extra, logits = _phases(cfg, model, built, prep, splits, weights_path, device,
                                                            run_dir, guard, log, board)
        finish_run(run_dir, model, splits, device, history, stopper, prep, cfg.tta, cfg.precision, log,
                   boundary=boundary, extra=extra, board=board, settings=asdict(cfg), explain_mistakes=True,
                   logits=logits)
    return run_dir


def _phases(cfg, model, built, prep, splits, weights_path, device, run_dir, guard, log, board):
    """(history, early stopping, fine-tuning's first epoch, extra metrics, the test split's logits
    when its cached features still hold for the model, else None)."""
    frozen_cfg = phase_config(cfg, cfg.epochs, cfg.lr, prep)
    extra = {"feature_cache": None}
    feats = None
    if cfg.feature_cache and not cfg.augment:
        start = time.perf_counter()
        feats, hit = cached_features(cfg, model.features, prep, device, splits, weights_path, log, guard)
        extra.update({"feature_cache": "hit" if hit else "written",
                      "feature_extraction_s": time.perf_counter() - start})
        labels = {n: getattr(splits, n).labels for n in ("train", "val", "test")}
        labels["train"] = labels["train"].repeat(cfg.feature_copies + 1)  # the photos, then each altered copy
        feature_splits = Splits(*(ImageSet(feats[n], labels[n]) for n in ("train", "val", "test")), splits.class_names)
        log(f"frozen phase: training the head on cached features ({cfg.epochs} epochs)")
        history, stopper = fit(model.head, feature_splits, frozen_cfg, device, None, log, guard=guard, board=board)
    else:
        log(f"frozen phase: base run every step ({cfg.epochs} epochs)")
        history, stopper = fit(model, splits, frozen_cfg, device, None, log, guard=guard, board=board)
    for row in history:
        row["phase"] = "frozen"
    if distributed.is_main():
        write_history(run_dir / "history.csv", history)
    boundary = None
    logits = None  # fine-tuning changes the base: the test then runs through the whole model
    if feats is not None and not cfg.fine_tune_epochs:
        logits = cached_test_logits(model.head, feats, cfg.tta, prep, device, cfg.precision)
    if cfg.fine_tune_epochs:
        board.offset_steps, board.offset_epochs = board.last_step, len(history)
        history, stopper, boundary = _fine_tune(cfg, model, built, prep, splits, device, guard, log, history,
                                                stopper, extra, board)
        if distributed.is_main():
            write_history(run_dir / "history.csv", history)
    return history, stopper, boundary, extra, logits


def _fine_tune(cfg, model, built, prep, splits, device, guard, log, history, frozen: EarlyStopping, extra, board):
    trainable = freeze_base(model, built.blocks, cfg.unfreeze)
    lr = cfg.fine_tune_lr or cfg.lr / 10
    log(f"fine-tuning: last {trainable} of {len(built.blocks)} blocks unfrozen, lr {lr:g}, batch-norm statistics "
        f"frozen ({cfg.fine_tune_epochs} epochs)")
    before = copy.deepcopy(model.state_dict())
    tune_cfg = replace(phase_config(cfg, cfg.fine_tune_epochs, lr, prep), seed=cfg.seed + 1)
    tuned, stopper = fit(model, splits, tune_cfg, device, None, log, guard=guard, board=board)
    offset = len(history)
    for row in tuned:
        row["epoch"] += offset
        row["phase"] = "fine-tune"
    boundary = offset + 1
    extra.update({"fine_tune_epochs": len(tuned), "unfrozen_blocks": trainable, "frozen_best_value": frozen.best})
    if stopper.best is not None and frozen.best is not None and not stopper.improves(stopper.best, frozen.best):
        log(f"fine-tuning did not beat the frozen phase's best {cfg.monitor}; keeping the frozen phase's weights")
        model.load_state_dict(before)
        stopper.best, stopper.best_epoch = frozen.best, frozen.best_epoch
    elif stopper.best_epoch is not None:
        stopper.best_epoch += offset
    stopper.stopped_epoch = frozen.stopped_epoch if stopper.stopped_epoch is None else stopper.stopped_epoch
    return history + tuned, stopper, boundary


def build_from_config(config: dict) -> tuple[TransferModel, Preprocessing]:
    """A transfer run's model (architecture only: weights come from its model.pt) and preprocessing."""
    prep = Preprocessing.from_dict(config["preprocessing"])
    built = build(config["backbone"], prep.size)
    head = Head(config["head"], built.channels, built.grid, len(config["class_names"]))
    return TransferModel(built.features, head), prep


def resume_transfer(run_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Restarts a stopped transfer run in its own directory. Seeded on the CPU it ends as an
    uninterrupted run would; the feature cache makes the frozen phase quick."""
    run_dir = Path(run_dir)
    config = unfinished_config(run_dir, log)
    if config is None:
        return run_dir
    log(f"restarting transfer run {run_dir} from its first epoch")
    return transfer(from_record(TransferConfig, config), log, run_dir=run_dir)
