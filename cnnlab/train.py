"""The one training loop: one epoch, ``fit``, and a whole run (``train``, ``resume``), the end of
which ``finish_run`` writes for train and transfer runs alike (the optimizer, its schedules and
Lookahead are in optimizer.py).

The path of a step: ``train_one_epoch`` draws the epoch's order, ``step.TrainStep`` slices each
batch from the uint8 images already in memory, prepares it on the device (preprocessing.py),
augments it as a whole batch (data.py), and runs forward, loss, backward and the optimizer.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import __version__, distributed, kernels
from .checkpoint import checkpoint_state, read_checkpoint, restore, steps_done
from .config import TrainConfig, from_record
from .data import ImageSet, Splits, load_splits
from .early_stopping import EarlyStopping
from .errors import CnnlabError
from .inference import confident_mistakes, predict_logits, score, score_logits
from .interrupts import Interrupted, InterruptGuard, guarded_run, read_marker
from .layers import Whiten
from .optimizer import Lookahead, lr_factor, make_optimizer
from .preprocessing import Preprocessing
from .presets import build_model, count_parameters, get_preset, init_whitening
from .runs import (create_run_dir, run_record, save_torch, write_history, write_json,
                   unfinished_config, write_results, write_samples)
from .runtime import compute_dtype, environment, memory_format, setup
from .step import TrainStep
from .tensorboard_log import Board


def _progress(total: int, epoch: int, epochs: int):
    if not sys.stderr.isatty() or not distributed.is_main():
        return None  # no bar, and no running loss to read (each read waits for a GPU)
    from tqdm import tqdm
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True)


def train_one_epoch(step: TrainStep, sched, train: ImageSet, cfg: TrainConfig, generator: torch.Generator,
                    epoch: int, guard: InterruptGuard | None = None, board: Board | None = None,
                    lookahead: Lookahead | None = None) -> dict:
    """One pass over ``train`` (already on the step's device) in a seeded random order; returns
    loss and accuracy. ``step`` carries a captured CUDA graph from epoch to epoch; ``board``
    logs each step's learning rate; ``lookahead`` averages the weights as they go."""
    step.model.train()
    step.epoch = epoch
    n = len(train)
    order = torch.randperm(n, generator=generator).to(step.device)  # one copy an epoch, not one a step
    starts = [s for s in range(0, n, cfg.batch_size) if n - s >= 2 or s == 0]  # BN needs 2+ samples
    step.reset()
    seen = 0
    bar = _progress(len(starts), epoch, cfg.epochs)
    cpu = step.device.type == "cpu"  # on a CPU reading the flag costs nothing; a GPU is asked once an epoch
    ranks = distributed.active()
    for i, start in enumerate(starts):
        index = order[start:start + cfg.batch_size]
        step(index, generator)
        if board is not None:  # the rate this step used, from the schedule: reading it off a GPU would wait
            board.step(sched.last_epoch + 1, sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch))
        sched.step()
        if lookahead is not None:
            lookahead.after_step(sched.last_epoch)
        seen += len(index)
        signum = guard.signum if guard is not None else None
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
            raise Interrupted(signum, epoch, i + 1, len(starts))
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


def fit(model: nn.Module, splits: Splits, cfg: TrainConfig, device: torch.device,
        run_dir: Path | None = None, log: Callable[[str], None] = print,
        state: dict | None = None, guard: InterruptGuard | None = None,
        board: Board | None = None) -> tuple[list[dict], EarlyStopping]:
    """Trains ``model`` for up to ``cfg.epochs``, from ``state`` (a checkpoint) when given;
    returns the history and the early-stopping state (its best weights are restored into
    ``model`` when asked). With ``run_dir``, writes ``checkpoint.pt`` and ``history.csv``
    after every epoch; with ``board``, TensorBoard events."""
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg, compute_dtype(cfg.precision, device))
    steps = max(1, math.ceil(len(splits.train) / cfg.batch_size)) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, steps))
    stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta, cfg.mode, cfg.restore_best_weights,
                            cfg.start_from_epoch)
    lookahead = Lookahead(model, steps) if cfg.lookahead else None
    history: list[dict] = []
    first = 1
    if state is not None:
        first, history = restore(state, model, opt, sched, stopper, generator, lookahead)
    on_device = splits.train.to(device)
    step = TrainStep(distributed.wrap(model, device), opt, on_device, cfg, device)
    whiten_biases = [m.bias for m in model.modules() if isinstance(m, Whiten) and m.bias.requires_grad]
    stop = stopper.stopped_epoch is not None
    for epoch in range(first, cfg.epochs + 1):
        if stop:
            break
        lr = float(opt.param_groups[0]["lr"])
        start = time.perf_counter()
        step.freeze(whiten_biases if epoch > cfg.whiten_bias_epochs else [])
        train_logs = train_one_epoch(step, sched, on_device, cfg, generator, epoch, guard, board, lookahead)
        if lookahead is not None and epoch == cfg.epochs:
            lookahead.finish()
        if step.failure:
            log(f"note: the training step could not be captured as a CUDA graph ({step.failure}); "
                "it runs op by op (--no-cuda-graph skips the attempt)")
            step.failure = None
        train_seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": train_logs["loss"], "accuracy": train_logs["accuracy"]}
        if len(splits.val):  # none with --val-split 0
            # at most the mirror image each epoch: level 2's six views are for the one test at the end
            val = score(model, splits.val, splits.class_names, cfg.preprocessing, device, tta=min(int(cfg.tta), 1),
                        precision=cfg.precision)
            row.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_precision": val["precision"],
                        "val_recall": val["recall"], "val_f1": val["f1"]})
        seconds = time.perf_counter() - start
        row.update({"lr": lr, "seconds": seconds, "train_seconds": train_seconds,
                    "images_per_s": train_logs["images"] / train_seconds})
        history.append(row)
        stop = stopper.update(epoch, row, model)
        if run_dir is not None:
            save_torch(run_dir / "checkpoint.pt",
                       checkpoint_state(epoch, model, opt, sched, stopper, generator, history, device, lookahead))
            write_history(run_dir / "history.csv", history)
        if board is not None:
            board.epoch(sched.last_epoch, row)
        log(_epoch_line(row, cfg.epochs, stopper))
        if stop:
            log(f"early stopping: {cfg.monitor} did not improve for {cfg.patience} epoch(s) after epoch "
                f"{stopper.best_epoch}")
    if stopper.restore(model):
        log(f"restored the weights of epoch {stopper.best_epoch} (best {cfg.monitor} {stopper.best:.4f})")
    return history, stopper


def _epoch_line(row: dict, epochs: int, stopper: EarlyStopping) -> str:
    mark = " *" if stopper.best_epoch == row["epoch"] else ""
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


def train(cfg: TrainConfig, log: Callable[[str], None] = print, splits: Splits | None = None) -> Path:
    """Loads data, trains, tests once on the held-out split and writes the run directory."""
    started = time.perf_counter()
    layers = list(get_preset(cfg.preset).layers)
    device, splits, model = _start(cfg, layers, splits, log)
    run_dir = distributed.on_main(lambda: create_run_dir(cfg.out, cfg.name or cfg.preset))
    params = count_parameters(model)
    if distributed.is_main():
        write_json(run_dir / "config.json", run_record(
            "train", asdict(cfg), splits, params, environment(device, cfg.precision),
            layers=layers, ranks=distributed.describe(cfg.batch_size)))
    ranks = f" x {distributed.world_size()} ranks" if distributed.active() else ""
    log(f"{cfg.preset}: {params:,} parameters, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {device}{ranks}; loaded in {time.perf_counter() - started:.1f}s")
    log(f"run directory: {run_dir}")
    board = Board(run_dir, cfg.tensorboard and distributed.is_main(), log=log, validated=len(splits.val) > 0)
    return _run(cfg, run_dir, model, splits, device, None, log, board)


def resume(run_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Continues a stopped run from its last checkpoint, with the model rebuilt from the layers
    the run recorded; a finished run is left as it is."""
    run_dir = Path(run_dir)
    config = unfinished_config(run_dir, log)
    if config is None:
        return run_dir
    cfg = from_record(TrainConfig, config)
    device, splits, model = _start(cfg, config["layers"], None, log)
    if splits.class_names != config["class_names"]:
        raise CnnlabError(f"the data at {cfg.data} no longer has the run's classes; restore it or start a new run")
    state = read_checkpoint(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").is_file() else None
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
    done = steps_done(state) if state is not None else 0
    board = Board(run_dir, cfg.tensorboard and distributed.is_main(), done + 1, log, validated=len(splits.val) > 0)
    return _run(cfg, run_dir, model, splits, device, state, log, board)


def _run(cfg: TrainConfig, run_dir: Path, model, splits: Splits, device, state, log, board: Board) -> Path:
    """Trains (a signal stops it at the end of a batch), then tests once and writes the results
    (under torchrun every rank trains and tests, rank 0 writes)."""
    writes = distributed.is_main()
    with guarded_run(run_dir, log) as guard, closing(board):
        if writes:
            write_samples(run_dir, splits.train, splits.class_names, cfg.seed)
        history, stopper = fit(model, splits, cfg, device, run_dir if writes else None, log, state, guard, board)
        finish_run(run_dir, model, splits, device, history, stopper, cfg.preprocessing, cfg.tta, cfg.precision,
                   log, board=board, settings=asdict(cfg))
    return run_dir


def finish_run(run_dir: Path, model: nn.Module, splits: Splits, device: torch.device, history: list[dict],
               stopper: EarlyStopping, preprocessing: Preprocessing, tta: int, precision: str,
               log: Callable[[str], None], boundary: int | None = None, extra: dict | None = None,
               board: Board | None = None, settings: dict | None = None, explain_mistakes: bool = False,
               logits: torch.Tensor | None = None) -> None:
    """Tests once on the held-out split and writes the run's results (runs.write_results, and
    to ``board`` the plots and ``settings`` with the test scores); ``boundary`` marks where
    fine-tuning began on the curves, ``extra`` joins the metrics; ``explain_mistakes`` shows the
    most confident mistakes with the Grad-CAM map of the class they were taken for; ``logits``,
    the test split's already computed (from cached features), saves the pass through ``model``."""
    if logits is None:
        logits = predict_logits(model, splits.test.images, preprocessing, device, tta=tta, precision=precision)
    test = score_logits(logits, splits.test.labels, splits.class_names)
    best = stopper.best_epoch or len(history)
    train_time = sum(r["seconds"] for r in history)
    metrics = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_precision": test["precision"],
        "test_recall": test["recall"], "test_f1": test["f1"],
        "train_time_s": train_time, "epochs_run": len(history), "best_epoch": best,
        "stopped_early": stopper.stopped_epoch is not None, "monitor": stopper.monitor, "best_value": stopper.best,
        "best_val_accuracy": history[best - 1].get("val_accuracy"),  # None: no validation images
        "train_accuracy_at_best": history[best - 1]["accuracy"],
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "parameters": count_parameters(model), "weights": "best" if stopper.best_weights is not None else "last",
        "test_size": len(splits.test), "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
        **(extra or {}),
    }
    if not distributed.is_main():  # the test was scored by every rank together; rank 0 writes it
        return
    mistakes = confident_mistakes(logits, splits.test.labels)
    shown, title = splits.test.images[mistakes["index"]], "most confident mistakes (test)"
    if explain_mistakes and len(shown):
        try:
            from .explain import explainable, overlays
            pictures, _, _ = overlays(explainable(model), shown, preprocessing, classes=mistakes["predicted"])
            shown, title = torch.from_numpy(pictures).permute(0, 3, 1, 2), f"{title}, Grad-CAM of the class predicted"
        except CnnlabError as exc:  # no grad-cam package: the photos as they are
            log(f"note: {exc}")
    write_results(run_dir, {k: v.cpu() for k, v in model.state_dict().items()}, history, test, mistakes, shown,
                  splits.class_names, metrics, boundary, title)
    if board is not None:
        board.finish(run_dir, board.last_step, settings or {}, metrics)
    log(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
        f"({len(history)} epochs, best {best}, {train_time:.1f}s training)")
