"""``cnnlab lr-find`` and ``cnnlab.lr_find``: fastai's learning-rate range test (lr_sweep.py) on the
model a run would train, a preset's as ``train`` builds it or a backbone's new head on the frozen
base's features, on the training split alone. It prints and returns the suggestion and draws the
curve; it changes no run and writes nothing to the cache beyond the decoded images."""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig, TransferConfig, validate_transfer
from .data import ImageSet
from .errors import CnnlabError
from .lr_sweep import Plan, Sweep, plot, random_state, restore_random, run_plan, sweep
from .text import fit_name, shown

# the settings of the run the sweep is for (epochs size it); its name and output are not
TRAIN_OPTIONS = {f.name for f in fields(TrainConfig)} - {"preset", "lr", "out", "name"}
TRANSFER_OPTIONS = {f.name for f in fields(TransferConfig)} - {"backbone", "lr", "out", "name"}


def lr_find(model: str, data: str, output: str | Path | None = None, log: Callable[[str], None] = print,
            steps: Plan | None = None, **options) -> Sweep:
    """The range test of preset or backbone ``model`` on ``data`` with the run's other ``options``
    (``epochs``, ``batch_size``, ``optimizer``, ``precision``, ``threads``, ``seed``, ``image_size``,
    ...), for ``steps`` (default: sized to that run, lr_sweep.plan); the curve is drawn to ``output``
    (a .png file; None: none). Returns the ``Sweep``, its ``suggestion`` the learning rate to train
    with."""
    from .presets import PRESETS
    state = random_state()  # building the model seeds the global streams: they are given back as they were
    try:
        if model in PRESETS:
            result, what = _preset(model, data, steps, options, log), model
        else:
            result, what = _backbone(model, data, steps, options, log), f"{model} head"
    finally:
        restore_random(state)
    if output is not None:
        plot(result, Path(output), f"learning-rate finder: {what}, suggested lr {result.suggestion:.3g}")
    log(f"{len(result.lrs)} steps in {result.seconds:.1f}s from lr {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}; "
        f"stopped: {result.stopped}; the loss is lowest at {result.lrs[result.lowest]:.3g}: suggested "
        f"{result.suggestion:.3g}, a third of it (fastai's valley {result.others['valley']:.3g}, minimum "
        f"{result.others['minimum']:.3g}, steep {result.others['steep']:.3g})")
    return result


def _unknown(options: dict, known: set, what: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise CnnlabError(f"lr-find does not take {', '.join(unknown)} for {what}")


def _preset(preset: str, data: str, steps: Plan | None, options: dict, log) -> Sweep:
    from .presets import model_spec, resolve_config
    from .train import _start
    _unknown(options, TRAIN_OPTIONS, "a preset")
    cfg = resolve_config(preset, data=data, **options)
    device, splits, model = _start(cfg, model_spec(cfg), None, log)  # the model train builds, its head at its size
    steps = steps or run_plan(cfg, len(splits.train))
    log(f"{preset}: sweeping {_describe(steps, cfg)} on {len(splits.train)} training images, {cfg.optimizer}, "
        f"{device}")
    return sweep(model, splits.train, cfg, device, steps)


def _describe(steps: Plan, cfg: TrainConfig) -> str:
    each = f"{steps.batches} batches of {cfg.batch_size}" if steps.batches > 1 else f"a batch of {cfg.batch_size}"
    return f"{steps.steps} steps of {each} (the run: {cfg.epochs} epochs)"


def _backbone(backbone: str, data: str, steps: Plan | None, options: dict, log) -> Sweep:
    from .backbones import pretrained, transfer_size
    from .data import load_run_splits
    from .features import Extraction, extract_features
    from .onnx_extraction import extraction_base
    from .runtime import compute_dtype, setup
    from .transfer import phase_config
    from .transfer_model import Head
    _unknown(options, TRANSFER_OPTIONS, "a backbone")
    cfg = TransferConfig(backbone=backbone, data=data, **options)
    validate_transfer(replace(cfg, lr=TransferConfig.lr))
    device = setup(cfg.device, cfg.threads)
    size = cfg.image_size or transfer_size(cfg.backbone, cfg.weights_variant, cfg.weights_file)  # as transfer's
    built, weights, _ = pretrained(cfg.backbone, cfg.weights_variant, cfg.weights_file, size)
    prep = weights.preprocessing
    splits = load_run_splits(cfg, prep.size)  # its labels file and several labels per image, as the run's
    torch.manual_seed(cfg.seed)
    head = Head(cfg.head, built.channels, built.grid, len(splits.class_names), cfg.multi_label).to(device)
    dtype = compute_dtype(cfg.precision, device)
    base = extraction_base(built.features.to(device), prep.size, device, dtype, log)
    log(f"{backbone}: features of {len(splits.train)} training images (kept in memory, not cached)")
    features = extract_features(base, splits.train.images,
                                Extraction(prep, device, pool=cfg.head == "gap", precision=cfg.precision), log=log)
    frozen = phase_config(cfg, cfg.epochs, TransferConfig.lr, prep)  # the frozen phase the sweep is sized to
    steps = steps or run_plan(frozen, len(splits.train), cheap=True)
    log(f"{backbone} head: sweeping {_describe(steps, frozen)}")
    return sweep(head, ImageSet(features, splits.train.labels), frozen, device, steps)


def describe(result: Sweep) -> str:
    """The last line ``cnnlab lr-find`` prints: the suggested learning rate alone."""
    return f"{result.suggestion:.3g}"


def output_path(output: str | None, out: str | None, model: str) -> Path:
    """Where the curve goes: ``-o FILE.png``, else ``--out DIR``/lr_find-MODEL.png (default runs/)."""
    if output is not None:
        if not str(output).lower().endswith(".png"):
            raise CnnlabError(f"-o {shown(output)} must name a .png file")
        return Path(output)
    return Path(out or "runs") / fit_name(f"lr_find-{model.replace('/', '_')}", ".png")
