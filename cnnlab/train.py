"""The one training loop: one epoch, ``fit``, and a whole run (``train``, ``resume``), the end of
which ``finish_run`` writes for train and transfer runs alike (the optimizer, its schedules and
Lookahead are in optimizer.py).

The path of a step: ``train_one_epoch`` draws the epoch's order, ``step.TrainStep`` slices each
batch from the uint8 images already in memory, prepares it on the device (preprocessing.py),
augments it as a whole batch (data.py), and runs forward, loss, backward and the optimizer.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import distributed, kernels
from .checkpoint import checkpoint_state, read_checkpoint, restore
from .config import AUTO, TrainConfig, from_record
from .data import ImageSet, Splits, load_splits
from .early_stopping import EarlyStopping
from .errors import CnnlabError, RunInterrupted
from .inference import confident_mistakes, predict_logits, score, score_logits
from .interrupts import guarded_run, read_marker
from .layers import Whiten
from .lr_sweep import plot, sweep
from .metrics import METRICS_VERSION
from .presets import build_model, count_parameters, get_preset, init_whitening
from .run_state import Outcome, RunContext, RunState, steps_in
from .runs import (
    check_same_data,
    claim_run_dir,
    create_run_dir,
    run_record,
    save_torch,
    unfinished_config,
    write_finished,
    write_history,
    write_json,
    write_mistakes,
    write_samples,
)
from .runtime import environment, memory_format, setup
from .step import TrainStep
from .tensorboard_log import Board
from .version import __version__


def _progress(total: int, epoch: int, epochs: int):
    if not sys.stderr.isatty() or not distributed.is_main():
        return None  # no bar, and no running loss to read (each read waits for a GPU)
    from tqdm import tqdm
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True)


def train_one_epoch(step: TrainStep, run: RunState, train: ImageSet, cfg: TrainConfig, epoch: int,
                    ctx: RunContext) -> dict:
    """One pass over ``train`` (already on the step's device) in a seeded random order; returns
    loss and accuracy. ``step`` carries a captured CUDA graph from epoch to epoch; ``ctx.board``
    logs each step's learning rate; ``run.lookahead`` averages the weights as they go; a signal
    caught by ``ctx.guard`` stops it at the end of a batch."""
    step.model.train()
    step.epoch = epoch
    n = len(train)
    order = torch.randperm(n, generator=run.generator).to(step.device)  # one copy an epoch, not one a step
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
    """Trains ``run.model`` from ``run.epoch`` (0, or a restored checkpoint's) up to ``cfg.epochs``;
    restores the best epoch's weights when asked and returns ``run``. With ``ctx.checkpoints``,
    writes ``checkpoint.pt`` and ``history.csv`` after every epoch; with ``ctx.board``,
    TensorBoard events."""
    model, stopping, log = run.model, run.early_stopping, ctx.log
    on_device = splits.train.to(ctx.device)
    step = TrainStep(distributed.wrap(model, ctx.device), run.optimizer, on_device, cfg, ctx.device)
    whiten_biases = [m.bias for m in model.modules() if isinstance(m, Whiten) and m.bias.requires_grad]
    stop = stopping.stopped_epoch is not None
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        if stop:
            break
        lr = float(run.optimizer.param_groups[0]["lr"])
        start = time.perf_counter()
        step.freeze(whiten_biases if epoch > cfg.whiten_bias_epochs else [])
        train_logs = train_one_epoch(step, run, on_device, cfg, epoch, ctx)
        if run.lookahead is not None and epoch == cfg.epochs:
            run.lookahead.finish()
        if step.failure:
            log(f"note: the training step could not be captured as a CUDA graph ({step.failure}); "
                "it runs op by op (--no-cuda-graph skips the attempt)")
            step.failure = None
        train_seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": train_logs["loss"], "accuracy": train_logs["accuracy"]}
        if len(splits.val):  # none with --val-split 0
            # at most the mirror image each epoch: level 2's six views are for the one test at the end
            val = score(model, splits.val, splits.class_names, cfg.preprocessing, ctx.device,
                        tta=min(int(cfg.tta), 1), precision=cfg.precision)
            row.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_precision": val["precision"],
                        "val_recall": val["recall"], "val_f1": val["f1"]})
        seconds = time.perf_counter() - start
        row.update({"lr": lr, "seconds": seconds, "train_seconds": train_seconds,
                    "images_per_s": train_logs["images"] / train_seconds})
        run.history.append(row)
        run.epoch = epoch
        stop = stopping.update(epoch, row, model)
        if ctx.checkpoints:
            save_torch(ctx.run_dir / "checkpoint.pt", checkpoint_state(run, ctx.device))
            write_history(ctx.run_dir / "history.csv", run.history)
        if ctx.board is not None:
            ctx.board.epoch(run.schedule.steps, row)
        log(_epoch_line(row, cfg.epochs, stopping))
        if stop:
            log(f"early stopping: {cfg.monitor} did not improve for {cfg.patience} epoch(s) after epoch "
                f"{stopping.best_epoch}")
    if stopping.restore(model):
        log(f"restored the weights of epoch {stopping.best_epoch} (best {cfg.monitor} {stopping.best:.4f})")
    return run


def fit_model(model: nn.Module, splits: Splits, cfg: TrainConfig, ctx: RunContext,
              checkpoint: dict | None = None) -> RunState:
    """``fit`` on a fresh ``RunState`` for ``model``, continued from ``checkpoint`` when given."""
    run = RunState.start(model, cfg, len(splits.train), ctx.device)
    if checkpoint is not None:
        restore(checkpoint, run)
    return fit(run, splits, cfg, ctx)


def _epoch_line(row: dict, epochs: int, stopping: EarlyStopping) -> str:
    mark = " *" if stopping.best_epoch == row["epoch"] else ""
    val = f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  " if "val_loss" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  {val}"
            f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s{mark}")


# ---------------------------------------------------------------- a whole run

def _start(cfg: TrainConfig, layers, splits: Splits | None, log: Callable[[str], None] = print):
    """(device, splits, model) for ``cfg``: the data loaded and split (under torchrun rank 0
    fills the image cache, the others then read it), the model built from ``layers`` and seeded."""
    device = setup(cfg.device, cfg.threads)
    distributed.check_batch(cfg.batch_size)
    if splits is None:
        splits = distributed.main_first(lambda: load_splits(
            cfg.data, cfg.preprocessing.size, cfg.val_split, cfg.test_split, cfg.seed,
            Path(cfg.cache_dir) if cfg.cache_dir else None))
    splits.require_batch(cfg.batch_size)
    torch.manual_seed(cfg.seed)
    model = build_model(layers, len(splits.class_names), tuple(splits.train.images.shape[1:]))
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
          run_dir: Path | None = None) -> Path:
    """Loads data, trains, tests once on the held-out split and writes the run directory: a new one
    in ``cfg.out``, or ``run_dir`` (``--resume-if-exists`` starting the run it names)."""
    started = time.perf_counter()
    layers = list(get_preset(cfg.preset).layers)
    device, splits, model = _start(cfg, layers, splits, log)
    found = sweep(model, splits.train, cfg, device) if cfg.lr == AUTO else None
    if found is not None:  # on a copy, the random streams restored: the run trains as with --lr <the value found>
        cfg = replace(cfg, lr=found.suggestion)
        log(f"--lr auto: the learning-rate finder suggests {found.suggestion:.3g} ({len(found.lrs)} steps, "
            f"{found.seconds:.1f}s)")
    named = run_dir
    run_dir = distributed.on_main(lambda: claim_run_dir(named) if named is not None else
                                  create_run_dir(cfg.out, cfg.name or cfg.preset))
    params = count_parameters(model)
    if distributed.is_main():
        auto = {"lr_found": found.suggestion, "lr_auto": True} if found is not None else {}
        write_json(run_dir / "config.json", run_record(
            "train", asdict(cfg), splits, params, environment(device, cfg.precision, kernels.status),
            layers=layers, ranks=distributed.describe(cfg.batch_size), **auto))
        if found is not None:
            plot(found, run_dir / "lr_find.png", f"learning-rate finder: {cfg.preset}, lr {found.suggestion:.3g}")
    ranks = f" x {distributed.world_size()} ranks" if distributed.active() else ""
    log(f"{cfg.preset}: {params:,} parameters, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {device}{ranks}; loaded in {time.perf_counter() - started:.1f}s")
    log(f"run directory: {run_dir}")
    board = Board(run_dir, cfg.tensorboard and distributed.is_main(), log=log, validated=len(splits.val) > 0)
    ctx = _context(cfg, run_dir, device, log, board)
    ctx.started = started
    return _run(cfg, ctx, model, splits, None)


def resume(run_dir: str | Path, log: Callable[[str], None] = print, honoured: dict | None = None) -> Path:
    """Continues a stopped run from its last checkpoint, with the model rebuilt from the layers
    the run recorded, on exactly the data and split it started with (else a one-line error); a
    finished run is left as it is. ``honoured``: settings that cannot change the run (where it
    computes, where its data lies) that this attempt takes instead of the recorded ones."""
    run_dir = Path(run_dir)
    config = unfinished_config(run_dir, log)
    if config is None:
        return run_dir
    cfg = replace(from_record(TrainConfig, config), **(honoured or {}))
    device, splits, model = _start(cfg, config["layers"], None, log)
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
    return _run(cfg, _context(cfg, run_dir, device, log, board), model, splits, state)


def _context(cfg: TrainConfig, run_dir: Path, device: torch.device, log: Callable[[str], None],
             board: Board) -> RunContext:
    return RunContext(device, run_dir, cfg.preprocessing, cfg.tta, cfg.precision, asdict(cfg), log, board,
                      checkpoints=distributed.is_main())


def _run(cfg: TrainConfig, ctx: RunContext, model: nn.Module, splits: Splits, checkpoint: dict | None) -> Path:
    """Trains (a signal stops it at the end of a batch) from ``checkpoint`` when given, then tests
    once and writes the results (under torchrun every rank trains and tests, rank 0 writes)."""
    with guarded_run(ctx.run_dir, ctx.log) as guard, closing(ctx.board):
        ctx.guard = guard
        if distributed.is_main():
            write_samples(ctx.run_dir, splits.train, splits.class_names, cfg.seed)
        run = fit_model(model, splits, cfg, ctx, checkpoint)
        finish_run(ctx, model, splits, Outcome(run.history, run.early_stopping,
                                               extra={"train_accuracy_eval": _train_accuracy(model, splits, ctx)}))
    return ctx.run_dir


def _train_accuracy(model: nn.Module, splits: Splits, ctx: RunContext) -> float:
    """The training split's accuracy with the final weights in evaluation mode (dropout off, batch
    norm's running statistics): what the gap to validation accuracy should be measured with."""
    return score(model, splits.train, splits.class_names, ctx.preprocessing, ctx.device,
                 precision=ctx.precision)["accuracy"]


def finish_run(ctx: RunContext, model: nn.Module, splits: Splits, outcome: Outcome,
               logits: torch.Tensor | None = None) -> None:
    """Tests once on the held-out split and writes the run's results (runs.write_mistakes and write_finished, and
    to ``ctx.board`` the plots and the settings with the test scores); ``outcome.boundary`` marks
    where fine-tuning began on the curves, ``outcome.extra`` joins the metrics; the most confident
    mistakes are shown as ``ctx.mistake_pictures`` draws them; ``logits``, the test split's already
    computed (from cached features), saves the pass through ``model``."""
    if logits is None:
        logits = predict_logits(model, splits.test.images, ctx.preprocessing, ctx.device, tta=ctx.tta,
                                precision=ctx.precision)
    test = score_logits(logits, splits.test.labels, splits.class_names)
    metrics = _metrics(ctx, model, splits, outcome, test)
    if not distributed.is_main():  # the test was scored by every rank together; rank 0 writes it
        return
    mistakes = confident_mistakes(logits, splits.test.labels)
    shown, title = splits.test.images[mistakes["index"]], "most confident mistakes (test)"
    if ctx.mistake_pictures is not None and len(shown):
        try:
            shown, how = ctx.mistake_pictures(model, shown, ctx.preprocessing, mistakes["predicted"])
            title = f"{title}, {how}"
        except CnnlabError as exc:  # no grad-cam package: the photos as they are
            ctx.log(f"note: {exc}")
    write_mistakes(ctx.run_dir, mistakes, shown, splits.class_names, title)
    write_finished(ctx.run_dir, {k: v.cpu() for k, v in model.state_dict().items()}, outcome.history, test,
                   splits.class_names, metrics, outcome.boundary)
    if ctx.board is not None:
        ctx.board.finish(ctx.run_dir, ctx.board.last_step, ctx.settings, metrics)
    ctx.log(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
            f"({len(outcome.history)} epochs, best {metrics['best_epoch']}, {metrics['train_time_s']:.1f}s training)")


def _metrics(ctx: RunContext, model: nn.Module, splits: Splits, outcome: Outcome, test: dict) -> dict:
    """metrics.json: the test scores, how training went (``run_time_s``: this attempt's wall time,
    loading to results; ``train_time_s``: the epochs'), and ``outcome.extra``."""
    history, stopping = outcome.history, outcome.early_stopping
    best = stopping.best_epoch or len(history)
    return {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_precision": test["precision"],
        "test_recall": test["recall"], "test_f1": test["f1"], "test_balanced_accuracy": test["balanced_accuracy"],
        "metrics_version": METRICS_VERSION,
        "train_time_s": sum(r["seconds"] for r in history), "run_time_s": time.perf_counter() - ctx.started,
        "epochs_run": len(history), "best_epoch": best,
        "stopped_early": stopping.stopped_epoch is not None, "monitor": stopping.monitor, "best_value": stopping.best,
        "best_val_accuracy": history[best - 1].get("val_accuracy"),  # None: no validation images
        "train_accuracy_at_best": history[best - 1]["accuracy"],
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "parameters": count_parameters(model), "weights": "best" if stopping.best_weights is not None else "last",
        "test_size": len(splits.test), "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
        **outcome.extra,
    }
