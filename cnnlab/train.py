"""The one training loop: one epoch, ``fit``, and a whole run (``train``, ``resume``), the end of
which ``finish_run`` writes for train and transfer runs alike (the optimizer, its schedules and
Lookahead are in optimizer.py).

The path of a step: ``train_one_epoch`` draws the epoch's order, ``step.TrainStep`` slices each
batch from the uint8 images already in memory, prepares it on the device (preprocessing.py),
augments it as a whole batch (data.py), and runs forward, loss, backward and the optimizer.
"""
from __future__ import annotations

import os
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed, kernels, user_model
from .callbacks import CallbackList
from .checkpoint import checkpoint_state, read_checkpoint, restore
from .config import AUTO, TrainConfig, from_record
from .data import ImageSet, Splits, load_run_splits
from .errors import CnnlabError, RunInterrupted
from .imbalance import epoch_order, say_notices
from .interrupts import guarded_run, read_marker
from .layers import Whiten
from .lr_sweep import plot, sweep
from .mlflow_log import require as require_mlflow
from .mlflow_log import tracker
from .presets import build_network, count_parameters, init_whitening, model_spec, network_spec
from .progress import bar
from .results import epoch_line, finish_run, train_accuracy, validation_columns
from .run_state import Outcome, RunContext, RunState, steps_in
from .runs import (
    check_same_data,
    claim_run_dir,
    create_run_dir,
    run_record,
    save_torch,
    unfinished_config,
    write_history,
    write_json,
    write_samples,
)
from .runtime import environment, memory_format, setup
from .step import TrainStep
from .tensorboard_log import Board
from .version import __version__


def _progress(total: int, epoch: int, epochs: int):
    # without a bar (piped output, other ranks) no running loss is read either: each read waits for a GPU
    return bar(total, f"epoch {epoch}/{epochs}", "batch", distributed.is_main())


def train_one_epoch(step: TrainStep, run: RunState, train: ImageSet, cfg: TrainConfig, epoch: int,
                    ctx: RunContext) -> dict:
    """One pass over ``train`` (already on the step's device) in a seeded order (``cfg.sampler``); returns
    loss and accuracy. ``step`` carries a captured CUDA graph from epoch to epoch; ``ctx.board``
    logs each step's learning rate; ``run.lookahead`` averages the weights as they go; a signal
    caught by ``ctx.guard`` stops it at the end of a batch."""
    step.model.train()
    step.epoch = epoch
    n = len(train)
    order = epoch_order(train.labels, run.generator, cfg.sampler).to(step.device)  # one copy an epoch, not a step
    starts = [s for s in range(0, n, cfg.batch_size) if n - s >= 2 or s == 0]  # BN needs 2+ samples
    step.reset()
    seen = 0
    bar = _progress(len(starts), epoch, cfg.epochs)
    cpu = step.device.type == "cpu"  # on a CPU reading the flag costs nothing; a GPU is asked once an epoch
    ranks = distributed.active()
    for i, start in enumerate(starts):
        index = order[start:start + cfg.batch_size]
        step(index, run.generator)
        if ctx.board is not None:  # the rate this step used, from the schedule: reading it off a GPU would wait
            ctx.board.step(run.schedule.steps + 1, run.schedule.rate())
        run.schedule.step()
        if run.lookahead is not None:
            run.lookahead.after_step(run.schedule.steps)
        seen += len(index)
        signum = ctx.guard.signum if ctx.guard is not None else None
        if ranks and (cpu or i % 16 == 15 or i == len(starts) - 1):  # all ranks stop after the same batch
            signum, nonfinite = distributed.stop_flags(signum, step.first_nonfinite)
            if nonfinite >= 0:
                break
        elif cpu and step.first_nonfinite >= 0:
            break
        if bar is not None:
            bar.update(1)
            if i % 10 == 0:
                # under torchrun: rank 0's part of the batches, about seen / ranks images
                bar.set_postfix(loss=f"{float(step.total_loss) * distributed.world_size() / seen:.4f}")
        if signum:
            if bar is not None:
                bar.close()
            raise RunInterrupted(signum, epoch, i + 1, len(starts))
    if bar is not None:
        bar.close()
    sums = torch.stack([step.total_loss.double(), step.correct.double(), step.first_nonfinite.double()])
    if ranks:  # every rank's images
        sums = torch.cat([distributed.reduce(sums[:2].clone()), distributed.reduce(sums[2:].clone(), "max")])
    loss_sum, correct, nonfinite = sums.tolist()  # one read, so one wait for a GPU, an epoch
    if nonfinite >= 0:
        raise Diverged(epoch, int(nonfinite), len(starts), cfg.lr)
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "images": seen}


class Diverged(CnnlabError):
    """The training loss turned non-finite: the run stops there, its last good checkpoint kept."""

    def __init__(self, epoch: int, batch: int, batches: int, lr: float):
        kept = f"epoch {epoch - 1}'s checkpoint is kept" if epoch > 1 else "no epoch had finished"
        super().__init__(f"training diverged: the loss became non-finite in epoch {epoch}, batch {batch}/{batches}; "
                         f"the run stops ({kept}); train again with a lower --lr than {lr:g}")


def fit(run: RunState, splits: Splits, cfg: TrainConfig, ctx: RunContext) -> RunState:
    """Trains ``run.model`` from ``run.epoch`` (0, or a restored checkpoint's) up to ``cfg.epochs``
    and returns ``run``. After each epoch its callbacks hear of it (callbacks.py: early stopping,
    which restores the best epoch's weights at the end when asked; TensorBoard's ``ctx.board``; then
    ``ctx.callbacks``), and any may stop training; with ``ctx.checkpoints``, ``checkpoint.pt`` and
    ``history.csv`` are written next."""
    model, stopping, log = run.model, run.early_stopping, ctx.log
    callbacks = CallbackList([stopping, ctx.board, *ctx.callbacks])
    on_device = splits.train.to(ctx.device)
    step = TrainStep(distributed.wrap(model, ctx.device), run.optimizer, on_device, cfg, ctx.device)
    whiten_biases = [m.bias for m in model.modules() if isinstance(m, Whiten) and m.bias.requires_grad]
    stop = stopping.stopped_epoch is not None
    callbacks.on_train_begin(run)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        if stop:
            break
        row = _epoch(step, run, on_device, splits, cfg, ctx, whiten_biases)
        run.history.append(row)
        run.epoch = epoch
        stop = callbacks.on_epoch_end(epoch, row)
        if ctx.checkpoints:
            save_torch(ctx.run_dir / "checkpoint.pt", checkpoint_state(run, ctx.device))
            write_history(ctx.run_dir / "history.csv", run.history)
        log(epoch_line(row, cfg.epochs, stopping.best_epoch))
        if stopping.stopped_epoch == epoch:
            log(f"early stopping: {cfg.monitor} did not improve for {cfg.patience} epoch(s) after epoch "
                f"{stopping.best_epoch}")
        elif stop:
            log(f"a callback stopped training after epoch {epoch}")
    callbacks.on_train_end(run.history[-1] if run.history else {})
    if stopping.restored:
        log(f"restored the weights of epoch {stopping.best_epoch} (best {cfg.monitor} {stopping.best:.4f})")
    return run


def _epoch(step: TrainStep, run: RunState, train: ImageSet, splits: Splits, cfg: TrainConfig, ctx: RunContext,
           whiten_biases: list) -> dict:
    """Epoch ``run.epoch + 1``: trained on ``train`` (the training split on the device), then scored
    on the validation split; its history row."""
    epoch = run.epoch + 1
    lr = float(run.optimizer.param_groups[0]["lr"])
    start = time.perf_counter()
    step.freeze(whiten_biases if epoch > cfg.whiten_bias_epochs else [])
    train_logs = train_one_epoch(step, run, train, cfg, epoch, ctx)
    if run.lookahead is not None and epoch == cfg.epochs:
        run.lookahead.finish()
    if step.failure:
        ctx.log(f"note: the training step could not be captured as a CUDA graph ({step.failure}); "
                "it runs op by op (--no-cuda-graph skips the attempt)")
        step.failure = None
    train_seconds = time.perf_counter() - start
    row = {"epoch": epoch, "loss": train_logs["loss"], "accuracy": train_logs["accuracy"]}
    if len(splits.val):  # none with --val-split 0
        row.update(validation_columns(run.model, splits, cfg, ctx.device))
    seconds = time.perf_counter() - start
    row.update({"lr": lr, "seconds": seconds, "train_seconds": train_seconds,
                "images_per_s": train_logs["images"] / train_seconds})
    return row


def fit_model(model: nn.Module, splits: Splits, cfg: TrainConfig, ctx: RunContext,
              checkpoint: dict | None = None) -> RunState:
    """``fit`` on a fresh ``RunState`` for ``model``, continued from ``checkpoint`` when given."""
    run = RunState.start(model, cfg, len(splits.train), ctx.device)
    if checkpoint is not None:
        restore(checkpoint, run)
    return fit(run, splits, cfg, ctx)


# ---------------------------------------------------------------- a whole run

def _start(cfg: TrainConfig, layers, splits: Splits | None, log: Callable[[str], None] = print,
           module: nn.Module | None = None):
    """(device, splits, model) for ``cfg``: the data loaded and split (under torchrun rank 0
    fills the image cache, the others then read it), the model built from ``layers`` (presets.build_network:
    a layer list or a preset's or an architecture's record) and seeded, or ``module`` (your own) checked."""
    device = setup(cfg.device, cfg.threads)
    distributed.check_batch(cfg.batch_size)
    if splits is None:
        splits = distributed.main_first(lambda: load_run_splits(cfg, cfg.preprocessing.size))
    say_notices(splits.train.labels, splits.class_names, cfg, log)  # a smaller batch, skewed classes
    torch.manual_seed(cfg.seed)
    shape = tuple(splits.train.images.shape[1:])
    model = build_network(layers, len(splits.class_names), shape) if module is None else \
        user_model.checked(module, len(splits.class_names), shape)
    if any(isinstance(layer, Whiten) for layer in model.modules()):  # 5,000 float images: only where one is set
        init_whitening(model, cfg.preprocessing(splits.train.images[:5000], channels_last=False))
    for layer in model.modules():
        if isinstance(layer, Whiten):  # its bias trains for the first whiten_bias_epochs (fit freezes it)
            layer.bias.requires_grad_(cfg.whiten_bias_epochs > 0)
    if distributed.active():
        if device.type == "cpu":
            distributed.main_first(kernels.status)  # rank 0 compiles them on first use, the others load them
        if cfg.sync_bn:
            model, converted = distributed.sync_batch_norm(model)
            if converted and device.type == "cpu":
                log(f"note: --sync-bn: {converted} batch norm layer(s) normalise over the global batch; they run as "
                    "PyTorch layers, not cnnlab's fused CPU kernels (those use one rank's statistics)")
        if device.type == "cuda" and cfg.cuda_graph:
            log("note: under torchrun each training step runs op by op (capturing DDP's gradient all-reduce in "
                "a CUDA graph is not attempted)")
        distributed.vary_random_streams(cfg.seed)
    return device, splits, model.to(device, memory_format=memory_format(cfg.channels_last))


def train(cfg: TrainConfig, log: Callable[[str], None] = print, splits: Splits | None = None,
          run_dir: Path | None = None, module: nn.Module | None = None, callbacks: list | None = None) -> Path:
    """Loads data, trains, tests once on the held-out split and writes the run directory: a new one
    in ``cfg.out``, or ``run_dir`` (``--resume-if-exists`` starting the run it names). The model is
    ``cfg.preset``'s, or ``module`` (your own, saved with the run); ``callbacks`` hear of every
    epoch (callbacks.py)."""
    started = time.perf_counter()
    require_mlflow(cfg.mlflow)
    spec = model_spec(cfg) if module is None else {"layers": None}
    device, splits, model = _start(cfg, spec, splits, log, module)
    found = sweep(model, splits.train, cfg, device) if cfg.lr == AUTO else None
    if found is not None:  # on a copy, the random streams restored: the run trains as with --lr <the value found>
        cfg = replace(cfg, lr=found.suggestion)
        log(f"--lr auto: the learning-rate finder suggests {found.suggestion:.3g} ({len(found.lrs)} steps, "
            f"{found.seconds:.1f}s)")
    named = run_dir
    what = cfg.preset or user_model.class_path(model)
    run_dir = distributed.on_main(lambda: claim_run_dir(named) if named is not None else
                                  create_run_dir(cfg.out, cfg.name or cfg.preset or type(model).__name__.lower()))
    params = count_parameters(model)
    if distributed.is_main():
        auto = {"lr_found": found.suggestion, "lr_auto": True} if found is not None else {}
        own = {"module": what} if module is not None else {}
        write_json(run_dir / "config.json", run_record(
            "train", asdict(cfg), splits, params, environment(device, cfg.precision, kernels.status),
            **spec, ranks=distributed.describe(cfg.batch_size), **own, **auto))
        if module is not None:
            user_model.save(model, run_dir)
        if found is not None:
            plot(found, run_dir / "lr_find.png", f"learning-rate finder: {cfg.preset}, lr {found.suggestion:.3g}")
    ranks = f" x {distributed.world_size()} ranks" if distributed.active() else ""
    log(f"{what}: {params:,} parameters, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {device}{ranks}; loaded in {time.perf_counter() - started:.1f}s")
    log(f"run directory: {run_dir}")
    board = Board(run_dir, cfg.tensorboard and distributed.is_main(), log=log, validated=len(splits.val) > 0)
    ctx = _context(cfg, run_dir, device, log, board, callbacks)
    ctx.started = started
    return _run(cfg, ctx, model, splits, None)


def resume(run_dir: str | Path, log: Callable[[str], None] = print, honoured: dict | None = None,
           module: nn.Module | None = None, callbacks: list | None = None) -> Path:
    """Continues a stopped run from its last checkpoint, with the model rebuilt from the layers
    the run recorded (your own model: from the run's module.pt, or ``module``), on exactly the data
    and split it started with (else a one-line error); a finished run is left as it is.
    ``honoured``: settings that cannot change the run (where it computes, where its data lies) that
    this attempt takes instead of the recorded ones."""
    run_dir = Path(run_dir)
    config = unfinished_config(run_dir, log)
    if config is None:
        return run_dir
    cfg = replace(from_record(TrainConfig, config), **(honoured or {}))
    require_mlflow(cfg.mlflow)
    if config.get("module") and module is None:
        module = user_model.load(run_dir, config["module"])
    device, splits, model = _start(cfg, network_spec(config), None, log, module)
    check_same_data(run_dir, config, splits, log)
    state = read_checkpoint(run_dir / "checkpoint.pt") if os.path.lexists(run_dir / "checkpoint.pt") else None
    if state is None:
        log(f"{run_dir} has no checkpoint yet: starting its training from epoch 1")
    else:
        for key, now in (("cnnlab", __version__), ("device", device.type)):
            if state.get(key) != now:
                log(f"notice: the checkpoint was written with {key} {state.get(key)}, resuming with {now}")
        if state.get("world_size", 1) != distributed.world_size():
            log(f"notice: the checkpoint was written by {state.get('world_size', 1)} rank(s), resuming on "
                f"{distributed.world_size()}: the global batch, schedule and steps stay as they were")
        interrupted = read_marker(run_dir)
        if interrupted and interrupted.get("epoch") == state["epoch"] + 1:
            log(f"epoch {interrupted['epoch']} was interrupted at batch {interrupted['batch']}/"
                f"{interrupted['batches']}: it restarts from its beginning")
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    # events after the checkpoint's last step came from the attempt that stopped: hidden, then written anew
    done = steps_in(state.get("scheduler")) if state is not None else 0
    board = Board(run_dir, cfg.tensorboard and distributed.is_main(), done + 1, log, validated=len(splits.val) > 0)
    return _run(cfg, _context(cfg, run_dir, device, log, board, callbacks), model, splits, state)


def _context(cfg: TrainConfig, run_dir: Path, device: torch.device, log: Callable[[str], None],
             board: Board, callbacks: list | None) -> RunContext:
    trackers = [tracker(cfg.mlflow, run_dir, asdict(cfg), log)]
    return RunContext(device, run_dir, cfg.preprocessing, cfg.tta, cfg.precision, asdict(cfg), log, board,
                      checkpoints=distributed.is_main(), callbacks=[*(callbacks or []), *filter(None, trackers)])


def _run(cfg: TrainConfig, ctx: RunContext, model: nn.Module, splits: Splits, checkpoint: dict | None) -> Path:
    """Trains (a signal stops it at the end of a batch) from ``checkpoint`` when given, then tests
    once and writes the results (under torchrun every rank trains and tests, rank 0 writes)."""
    with guarded_run(ctx.run_dir, ctx.log) as guard, closing(ctx.board):
        ctx.guard = guard
        if distributed.is_main():
            write_samples(ctx.run_dir, splits.train, splits.class_names, cfg.seed)
        run = fit_model(model, splits, cfg, ctx, checkpoint)
        finish_run(ctx, model, splits, Outcome(run.history, run.early_stopping,
                                               extra={"train_accuracy_eval": train_accuracy(model, splits, ctx)}))
    return ctx.run_dir
