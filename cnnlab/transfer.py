"""Transfer learning: a pretrained conv base, frozen, a new head trained on cached features, then
optional fine-tuning of the last blocks. Both phases run through train.py's loop."""
from __future__ import annotations

import copy
import json
import time
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed, kernels
from .backbones import Built, pretrained, split_base, transfer_size
from .config import AUTO, TrainConfig, TransferConfig, from_record, validate_transfer
from .data import ImageSet, Splits, load_run_splits
from .errors import CnnlabError
from .features import cached_features, cached_test_logits, through_tail
from .inference import predict_logits
from .gradcam import explainable, overlays
from .imbalance import say_notices
from .interrupts import guarded_run
from .lr_sweep import plot, sweep
from .mlflow_log import require as require_mlflow
from .mlflow_log import tracker
from .preprocessing import Preprocessing
from .presets import count_parameters
from .run_state import Outcome, RunContext
from .runs import (check_same_data, claim_run_dir, create_run_dir, run_record, unfinished_config, write_history,
                   write_json, write_samples)
from .runtime import environment, setup
from .tensorboard_log import Board
from .train import finish_run, fit_model
from .transfer_model import Head, TransferModel, freeze_base

def phase_config(cfg: TransferConfig, epochs: int, lr: float, prep: Preprocessing) -> TrainConfig:
    """The loop's settings for one phase (frozen or fine-tuning) of a transfer run."""
    # cuda_graph off: the captured step is tuned for the CIFAR-10 presets, not a whole pretrained base
    return TrainConfig(data=cfg.data, epochs=epochs, batch_size=cfg.batch_size, lr=lr, optimizer="adam",
                       val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, monitor=cfg.monitor,
                       patience=cfg.patience, augment=cfg.augment, preprocessing=prep, device=cfg.device,
                       cuda_graph=False, precision=cfg.precision, out=cfg.out, labels=cfg.labels,
                       class_weights=cfg.class_weights, sampler=cfg.sampler, multi_label=cfg.multi_label,
                       threshold=cfg.threshold)


@dataclass
class _Job:
    """One transfer run's pieces, as its phases share them."""
    cfg: TransferConfig
    model: TransferModel
    built: Built
    splits: Splits
    weights_path: Path
    ctx: RunContext


def transfer(cfg: TransferConfig, log: Callable[[str], None] = print, splits: Splits | None = None,
             run_dir: Path | None = None, record: dict | None = None, callbacks: list | None = None) -> Path:
    """Frozen phase (cached features unless augmenting), optional fine-tuning, one test, a run
    directory (a new one, or ``run_dir``: a stopped run restarted, whose config.json is ``record``,
    or the run ``--resume-if-exists`` names, started there). A restart goes on with exactly the
    data, split and input the run recorded, or stops with a one-line error before writing a thing.
    ``callbacks`` hear of each phase and epoch (callbacks.py)."""
    validate_transfer(cfg)
    require_mlflow(cfg.mlflow)
    if cfg.image_size is None:  # recorded: the default may change, a run's input may not
        size = record["preprocessing"]["size"] if record else transfer_size(cfg.backbone, cfg.weights_variant,
                                                                             cfg.weights_file)
        cfg = replace(cfg, image_size=size)
    device = setup(cfg.device, cfg.threads)
    distributed.check_batch(cfg.batch_size)
    started = time.perf_counter()
    built, weights, weights_path = distributed.main_first(
        lambda: pretrained(cfg.backbone, cfg.weights_variant, cfg.weights_file, cfg.image_size))  # one download
    prep = weights.preprocessing
    if splits is None:
        splits = distributed.main_first(lambda: load_run_splits(cfg, prep.size))
    say_notices(splits.train.labels, splits.class_names, cfg, log)  # a smaller batch, skewed classes
    torch.manual_seed(cfg.seed)
    head = Head(cfg.head, built.channels, built.grid, len(splits.class_names), cfg.multi_label)
    model = TransferModel(built.features, head).to(device, memory_format=torch.channels_last)
    freeze_base(model, built.blocks, 0)
    restart = record is not None
    if restart:
        _same_start(record, run_dir, splits, {"weights_variant": weights.variant, "preprocessing": asdict(prep)}, log)
    named = run_dir
    run_dir = distributed.on_main(lambda: claim_run_dir(named) if named is not None else
                                  create_run_dir(cfg.out, cfg.name or f"transfer-{cfg.backbone}"))
    writes = distributed.is_main()
    if writes:
        write_json(run_dir / "config.json", run_record(
            "transfer", asdict(cfg), splits, count_parameters(model), environment(device, cfg.precision, kernels.status),
            weights_variant=weights.variant, weights_path=str(weights_path), preprocessing=asdict(prep),
            feature_shape=[built.channels, built.grid, built.grid], blocks=len(built.blocks),
            ranks=distributed.describe(cfg.batch_size)))
    board = Board(run_dir, cfg.tensorboard and writes, 1 if restart else None, log)  # a restart hides the stopped attempt's
    trackers = [*(callbacks or []), tracker(cfg.mlflow, run_dir, asdict(cfg), log)]
    ctx = RunContext(device, run_dir, prep, cfg.tta, cfg.precision, asdict(cfg), log, board,
                     mistake_pictures=gradcam_pictures, callbacks=[c for c in trackers if c is not None],
                     started=started)
    with guarded_run(run_dir, log, checkpoints=False) as guard, closing(board):
        ctx.guard = guard
        if writes:
            write_samples(run_dir, splits.train, splits.class_names, cfg.seed)
        log(f"{cfg.backbone} ({weights.describe()}), {cfg.head} head, {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test images, {device}"
            f"{f' x {distributed.world_size()} ranks' if distributed.active() else ''}; "
            f"ready in {time.perf_counter() - started:.1f}s")
        log(f"run directory: {run_dir}")
        outcome, logits = _phases(_Job(cfg, model, built, splits, weights_path, ctx))
        finish_run(ctx, model, splits, outcome, logits)
    return run_dir


def _same_start(record: dict, run_dir: Path, splits: Splits, inputs: dict, log: Callable[[str], None]) -> None:
    """A one-line error unless a restarted run sees what it started with: the data and split, and its
    weights' variant and preprocessing (``inputs``; the input size among them)."""
    check_same_data(run_dir, record, splits, log)
    for key, now in json.loads(json.dumps(inputs)).items():
        if record.get(key, now) != now:
            raise CnnlabError(f"the backbone's weights now give {key} {now}, {run_dir} started with {record[key]}; "
                              f"restore its weights file ({record.get('weights_path')}), or train a new run "
                              "(another --name)")


def gradcam_pictures(model: nn.Module, images: torch.Tensor, preprocessing: Preprocessing,
                     classes: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The mistakes picture of a transfer run: each photo under the Grad-CAM map of the class it
    was taken for (``RunContext.mistake_pictures``)."""
    pictures, _, _ = overlays(explainable(model), images, preprocessing, classes=classes)
    return torch.from_numpy(pictures).permute(0, 3, 1, 2), "Grad-CAM of the class predicted"


def _phases(job: _Job) -> tuple[Outcome, torch.Tensor | None]:
    """What training produced, and the test split's logits when its cached features still hold
    for the model (else None)."""
    cfg, model, splits, ctx = job.cfg, job.model, job.splits, job.ctx
    frozen_cfg = phase_config(cfg, cfg.epochs, cfg.lr, ctx.preprocessing)
    extra = {"feature_cache": None}
    features = maps = labels = None
    below = cfg.unfreeze if _tunes_on_cache(job) else 0
    if cfg.feature_cache and not cfg.augment:
        start = time.perf_counter()
        features, hit = cached_features(cfg, model.features, splits, job.weights_path, ctx, below)
        if below:  # the maps the blocks to fine-tune take; the frozen phase trains on what the base makes of them
            maps = features
            features = through_tail(split_base(model.features, below)[1], maps, cfg.head == "gap", ctx, cfg.precision)
        extra.update({"feature_cache": "hit" if hit else "written",
                      "feature_extraction_s": time.perf_counter() - start})
        labels = {n: getattr(splits, n).labels for n in ("train", "val", "test")}
        labels["train"] = torch.cat([labels["train"]] * (cfg.feature_copies + 1))  # the photos, then each altered copy
        feature_splits = Splits(*(ImageSet(features[n], labels[n]) for n in ("train", "val", "test")),
                                splits.class_names)
        frozen_cfg = _auto_lr(job, model.head, feature_splits.train, frozen_cfg)
        ctx.log(f"frozen phase: training the head on cached features ({cfg.epochs} epochs)")
        frozen = fit_model(model.head, feature_splits, frozen_cfg, ctx)
    else:
        frozen_cfg = _auto_lr(job, model, splits.train, frozen_cfg)
        ctx.log(f"frozen phase: base run every step ({cfg.epochs} epochs)")
        frozen = fit_model(model, splits, frozen_cfg, ctx)
    for row in frozen.history:
        row["phase"] = "frozen"
    if distributed.is_main():
        write_history(ctx.run_dir / "history.csv", frozen.history)
    outcome = Outcome(frozen.history, frozen.early_stopping, extra=extra)
    if not cfg.fine_tune_epochs:
        # fine-tuning would change the base: the test then runs through the whole model
        logits = cached_test_logits(model.head, features, ctx) if features is not None else None
        if features is not None and cfg.multi_label:  # the thresholds are tuned on these, without running the base
            outcome.val_logits = predict_logits(model.head, features["val"], ctx.preprocessing, ctx.device,
                                                precision=ctx.precision)
        return outcome, logits
    ctx.board.offset_steps, ctx.board.offset_epochs = ctx.board.last_step, len(frozen.history)
    tail = None if maps is None else TransferModel(split_base(model.features, below)[1], model.head)
    outcome = _fine_tune(job, outcome, tail, maps, labels)
    if distributed.is_main():
        write_history(ctx.run_dir / "history.csv", outcome.history)
    if tail is None:
        return outcome, None
    if cfg.multi_label:
        outcome.val_logits = predict_logits(tail, maps["val"], ctx.preprocessing, ctx.device, precision=ctx.precision)
    return outcome, cached_test_logits(tail, maps, ctx)  # the tuned blocks and head on the cached maps


def _tunes_on_cache(job: _Job) -> bool:
    """Whether fine-tuning trains the unfrozen blocks on cached maps of the frozen ones below them
    (``fine_tune_cached``, the feature cache on, no --augment, some block left frozen): the same
    function as running the whole base every step (batch norm frozen, blocks below in inference
    mode), with the base below run once."""
    cfg = job.cfg
    return bool(cfg.fine_tune_epochs and cfg.fine_tune_cached and cfg.feature_cache and not cfg.augment
                and cfg.unfreeze < len(job.built.blocks))


def _auto_lr(job: _Job, model: nn.Module, train: ImageSet, frozen_cfg: TrainConfig) -> TrainConfig:
    """With --lr auto: the learning-rate finder's suggestion for the frozen phase, swept on a copy of
    the model that phase trains, on what it trains on; recorded in config.json with its curve."""
    if job.cfg.lr != AUTO:
        return frozen_cfg
    found = sweep(model, train, frozen_cfg, job.ctx.device)
    job.cfg = replace(job.cfg, lr=found.suggestion)
    job.ctx.settings["lr"] = found.suggestion
    job.ctx.log(f"--lr auto: the learning-rate finder suggests {found.suggestion:.3g} ({len(found.lrs)} steps, "
                f"{found.seconds:.1f}s)")
    if distributed.is_main():
        path = job.ctx.run_dir / "config.json"
        write_json(path, {**json.loads(path.read_text()), "lr": found.suggestion, "lr_found": found.suggestion,
                          "lr_auto": True})
        plot(found, job.ctx.run_dir / "lr_find.png", f"learning-rate finder: {job.cfg.backbone} head, "
                                                     f"lr {found.suggestion:.3g}")
    return replace(frozen_cfg, lr=found.suggestion)


def _fine_tune(job: _Job, frozen: Outcome, tail: TransferModel | None = None, maps: dict | None = None,
               labels: dict | None = None) -> Outcome:
    """The fine-tuning phase after ``frozen``: the whole history, and the early-stopping state of
    the better phase. With ``tail`` (the unfrozen blocks and the head, sharing the model's layers),
    it trains on ``maps``, cached maps of the blocks below, with their ``labels``."""
    cfg, model, ctx = job.cfg, job.model, job.ctx
    blocks = job.built.blocks
    trainable = freeze_base(model, blocks, cfg.unfreeze)
    lr = cfg.fine_tune_lr or cfg.lr / 10
    ctx.log(f"fine-tuning: last {trainable} of {len(blocks)} blocks unfrozen, lr {lr:g}, batch-norm statistics "
            f"frozen ({cfg.fine_tune_epochs} epochs{', on cached maps of the blocks below' if tail else ''})")
    before = copy.deepcopy(model.state_dict())
    tune_cfg = replace(phase_config(cfg, cfg.fine_tune_epochs, lr, ctx.preprocessing), seed=cfg.seed + 1)
    if tail is None:
        tuned = fit_model(model, job.splits, tune_cfg, ctx)
    else:
        tail.base_frozen = False
        tuned = fit_model(tail, Splits(*(ImageSet(maps[n], labels[n]) for n in ("train", "val", "test")),
                                       job.splits.class_names), tune_cfg, ctx)
    stopping, best_frozen = tuned.early_stopping, frozen.early_stopping
    offset = len(frozen.history)
    for row in tuned.history:
        row["epoch"] += offset
        row["phase"] = "fine-tune"
    extra = {**frozen.extra, "fine_tune_epochs": len(tuned.history), "unfrozen_blocks": trainable,
             "frozen_best_value": best_frozen.best}
    if stopping.best is not None and best_frozen.best is not None and not stopping.improves(stopping.best,
                                                                                          best_frozen.best):
        ctx.log(f"fine-tuning did not beat the frozen phase's best {cfg.monitor}; keeping the frozen phase's weights")
        model.load_state_dict(before)
        stopping.best, stopping.best_epoch = best_frozen.best, best_frozen.best_epoch
    elif stopping.best_epoch is not None:
        stopping.best_epoch += offset
    if stopping.stopped_epoch is None:
        stopping.stopped_epoch = best_frozen.stopped_epoch
    return Outcome(frozen.history + tuned.history, stopping, offset + 1, extra)


def resume_transfer(run_dir: str | Path, log: Callable[[str], None] = print, honoured: dict | None = None,
                    callbacks: list | None = None) -> Path:
    """Restarts a stopped transfer run in its own directory, on exactly the data and split it
    started with (``honoured``: as train.resume's). Seeded on the CPU it ends as an uninterrupted run
    would; the feature cache makes the frozen phase quick."""
    run_dir = Path(run_dir)
    config = unfinished_config(run_dir, log)
    if config is None:
        return run_dir
    log(f"restarting transfer run {run_dir} from its first epoch")
    return transfer(replace(from_record(TransferConfig, config), **(honoured or {})), log, run_dir=run_dir,
                    record=config, callbacks=callbacks)
