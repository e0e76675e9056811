"""The one training loop: settings, optimizer, schedule, early stopping, history, run directory."""
from __future__ import annotations

import copy
import ctypes
import json
import math
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, kernels
from .data import ImageSet, Splits, apply_augment, augment_draws, load_splits, normalizer, preprocess, to_device
from .errors import CnnlabError
from .metrics import confusion_matrix, summarize
from .presets import build_model, count_parameters, get_preset, init_whitening
from .runs import create_run_dir, load_run, load_torch, save_torch, write_csv, write_history, write_json

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "onecycle", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")


@dataclass
class TrainConfig:
    """Everything needed to rerun a training run. Defaults are the seed study's (Adam 1e-3,
    batch 128, inputs scaled to [0, 1]); a preset's settings override them, and explicit
    values override the preset's."""
    preset: str = "pool-bn"
    data: str = ""
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    label_smoothing: float = 0.0
    val_split: float = 0.1
    test_split: float = 0.1
    seed: int = 0
    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best_weights: bool = True
    start_from_epoch: int = 0
    augment: bool = False
    tta: bool = False
    normalize: str = "unit"
    channels_last: bool = True  # memory layout of weights and batches (conv sets False: see presets)
    image_size: int = 32
    threads: int | None = None
    device: str = "auto"
    cuda_graph: bool = True  # on CUDA, replay each training step as one CUDA graph
    precision: str = "auto"  # see compute_dtype
    out: str = "runs"
    name: str | None = None
    cache_dir: str | None = None


def resolve_config(preset: str, **overrides) -> TrainConfig:
    """The preset's settings on top of the defaults, then every non-None override; validated."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    values = {**get_preset(preset).settings, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = TrainConfig(preset=preset, **values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """One-line errors for settings out of range."""
    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1 (got {cfg.epochs})"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})"),
        (cfg.lr > 0, f"--lr must be positive (got {cfg.lr})"),
        (0 < cfg.val_split < 1, f"--val-split must be between 0 and 1 (got {cfg.val_split})"),
        (0 < cfg.test_split < 1, f"--test-split must be between 0 and 1 (got {cfg.test_split})"),
        (cfg.val_split + cfg.test_split < 1,
         f"--val-split + --test-split must be below 1 (got {cfg.val_split + cfg.test_split:g})"),
        (cfg.optimizer in OPTIMIZERS, f"unknown optimizer '{cfg.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}"),
        (cfg.schedule in SCHEDULES, f"unknown schedule '{cfg.schedule}'; choose one of: {', '.join(SCHEDULES)}"),
        (cfg.monitor in MONITORS, f"unknown monitor metric '{cfg.monitor}'; choose one of: {', '.join(MONITORS)}"),
        (cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision})"),
        (cfg.mode in ("auto", "min", "max"), f"--mode must be auto, min or max (got {cfg.mode})"),
        (cfg.patience is None or cfg.patience >= 0, f"--patience must be 0 or more (got {cfg.patience})"),
        (cfg.min_delta >= 0, f"--min-delta must be 0 or more (got {cfg.min_delta})"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})"),
        (cfg.weight_decay >= 0, f"--weight-decay must be 0 or more (got {cfg.weight_decay})"),
        (cfg.image_size >= 8, f"--image-size must be at least 8 (got {cfg.image_size})"),
        (cfg.threads is None or cfg.threads >= 1, f"--threads must be at least 1 (got {cfg.threads})"),
        (cfg.start_from_epoch >= 0, f"--start-from-epoch must be 0 or more (got {cfg.start_from_epoch})"),
    ]
    for ok, message in checks:
        if not ok:
            raise CnnlabError(message)


# ---------------------------------------------------------------- early stopping

def infer_mode(monitor: str) -> str:
    """'min' for losses, 'max' for accuracy, precision, recall and F1."""
    return "min" if "loss" in monitor else "max"


class EarlyStopping:
    """Keras's ``EarlyStopping`` semantics, epoch numbers counted from 1.

    * An epoch improves when ``value`` beats the best by more than ``min_delta``
      (below it for ``min``, above it for ``max``; ``auto`` infers the mode from the name).
    * Epochs before ``start_from_epoch`` are ignored entirely (no best, no patience).
    * ``patience`` non-improving epochs in a row stop training; ``None`` never stops, but
      the best epoch (and its weights) is still tracked.
    * With a ``baseline``, patience also runs out while the best has not beaten it.
    * ``restore`` puts the best epoch's weights back whether or not training stopped early
      (Keras 2 restored them only on an early stop: a well-known surprise).
    """

    def __init__(self, monitor: str = "val_loss", patience: int | None = None, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True, start_from_epoch: int = 0,
                 baseline: float | None = None):
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode = infer_mode(monitor) if mode == "auto" else mode
        self.restore_best_weights, self.start_from_epoch, self.baseline = restore_best_weights, start_from_epoch, baseline
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def improves(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def update(self, epoch: int, logs: dict, model: nn.Module | None = None) -> bool:
        """Records epoch ``epoch`` (1-based); returns True when training should stop."""
        value = logs[self.monitor]
        if epoch <= self.start_from_epoch or value is None or math.isnan(value):
            return False
        self.wait += 1
        if self.improves(value, self.best):
            self.best, self.best_epoch = value, epoch
            if model is not None and self.restore_best_weights:
                self.best_weights = copy.deepcopy(model.state_dict())
            if self.baseline is None or self.improves(value, self.baseline):
                self.wait = 0
            return False
        if self.patience is not None and self.wait >= self.patience and epoch > 1:
            self.stopped_epoch = epoch
            return True
        return False

    def restore(self, model: nn.Module) -> bool:
        """Loads the best epoch's weights into ``model``; True if it did."""
        if self.restore_best_weights and self.best_weights is not None:
            model.load_state_dict(self.best_weights)
            return True
        return False

    def state(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch}


# ---------------------------------------------------------------- pieces of the loop

def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed blocks of up to 256 MB for reuse instead of handing them
    back to the kernel. PyTorch's CPU tensors come straight from malloc, and by default each
    step's large activation buffers (16 MB for the seed presets' first block at batch 128) are
    mapped afresh and page-faulted in: ~1,600-2,300 page faults a step, ~10% of a step's time
    on 2 cores. Process-wide, so the command line calls it once at start; a no-op (False) off
    glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mapped = libc.mallopt(m_mmap_threshold, 256 << 20) or libc.mallopt(m_mmap_threshold, 32 << 20)  # older glibc caps it
        return bool(mapped) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else the CPU. On CUDA, cuDNN picks the fastest
    convolution for each input shape it meets (a run's shapes repeat every step)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CnnlabError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
        if (device.index or 0) >= count:
            raise CnnlabError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        raise CnnlabError(f"--device {name} is not supported; use cpu, cuda or cuda:N")
    return device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # one pass over each tensor instead of ~10 (+5% a step for conv's 6.4 M-parameter dense layer)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` steps."""
    t = step / max(total, 1)
    if schedule == "onecycle":  # airbench's triangle: 0.2 -> 1 over the first 20%, then down to 0
        return 0.2 + 0.8 * t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


Prepare = Callable[[torch.Tensor, torch.device], torch.Tensor]


def batch_normalization(normalization: "str | Prepare", device: torch.device) -> "tuple | Prepare":
    """What a loop passes to ``to_input`` for every batch: a backbone's preprocessing as it is, a
    normalization name as its constants on ``device``, made once rather than once a batch."""
    return normalization if callable(normalization) else normalizer(normalization, device)


def to_input(batch: torch.Tensor, normalization: "str | tuple | Prepare", device: torch.device) -> torch.Tensor:
    """A batch as the model's input: uint8 images normalized by name or by ``normalizer``'s
    constants (or by a backbone's own preprocessing when ``normalization`` is a function); cached
    features just moved to ``device``."""
    if callable(normalization):
        return normalization(batch, device)
    if batch.dtype != torch.uint8:
        return batch.to(device).float()
    return preprocess(batch, normalization, device)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over classes; with a single output unit, binary cross-entropy on its sigmoid."""
    if logits.shape[1] == 1:
        target = y.float() * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities, (N, classes), for softmax and single-sigmoid heads alike."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.float())
        return torch.cat([1 - p, p], dim=1)
    return logits.float().softmax(1)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, not by emulation: an Ampere or newer GPU, or
    a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older PyTorch: no emulation to tell apart
            return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype that convolutions and matrix products run in (autocast; weights, optimizer and
    loss stay float32), or None for float32 throughout. ``auto``: bfloat16 where ``device``
    computes it natively (on this project's CPU oneDNN runs the seed presets' convolutions about
    2x and their matrix products about 4x faster than in float32: bench/train_throughput.py),
    float32 where it would only be emulated."""
    if precision == "fp32":
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` (from ``compute_dtype``) on ``device``; off for None. ``cache=False``
    inside a CUDA graph (and a training forward uses each weight once anyway)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          cache_enabled=cache)


def inference_batch(images: torch.Tensor) -> int:
    """Images per inference batch: about 620,000 input values (4 images at 224x224, 200 at 32x32).
    On a CPU, small batches keep activations in cache: EfficientNet-Lite0 runs about 2.5x faster
    in batches of 4 than of 64, and VGG19 about 1.4x (bench/transfer.py)."""
    values = images[0].numel() if len(images) else 1
    return max(1, min(500, 620_000 // values))


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, normalization: "str | Prepare", device: torch.device,
                   batch_size: int | None = None, tta: bool = False, precision: str = "auto") -> torch.Tensor:
    """Logits for uint8 images, in eval mode; ``tta`` averages with the mirrored images;
    ``precision`` as in ``compute_dtype``."""
    model.eval()
    dtype = compute_dtype(precision, device)
    batch_size = batch_size or inference_batch(images)
    normalization = batch_normalization(normalization, device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], normalization, device)
        with autocast(device, dtype):
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score(model: nn.Module, data: ImageSet, class_names: list[str], normalization: "str | Prepare",
          device: torch.device, tta: bool = False, precision: str = "auto") -> dict:
    """Loss (plain cross-entropy), accuracy, macro and per-class precision/recall/F1 and
    the confusion matrix of ``model`` on ``data``."""
    logits = predict_logits(model, data.images, normalization, device, tta=tta, precision=precision)
    return score_logits(logits, data.labels, class_names)


def score_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """``score`` from logits already computed."""
    loss = float(loss_fn(logits, labels)) if len(logits) else float("nan")
    cm = confusion_matrix(labels, predicted_class(logits), len(class_names))
    return {"loss": loss, **summarize(cm, class_names)}


def _progress(total: int, epoch: int, epochs: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    if not sys.stderr.isatty():
        return None  # no bar, and no running loss to read (each read waits for a GPU)
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True)


def graph_ready(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Makes ``opt`` safe to capture in a CUDA graph: its learning rate becomes a tensor on
    ``device`` (a schedule then updates it in place, where the replayed step reads it) and its
    update one fused kernel. Call after loading a checkpoint too: that brings float rates back."""
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["fused"] = True
        if "capturable" in group:
            group["capturable"] = True


class TrainStep:
    """One optimizer step on the batch that ``index`` picks from a training set already on
    ``device``; sums the loss and the correct predictions on the device (no sync).

    On CUDA (``cfg.cuda_graph``, uint8 images, no backbone preprocessing), after ``WARMUP``
    ordinary steps the step is captured once as a CUDA graph and then replayed: these small nets
    leave a GPU idle while the host queues a step's few hundred kernels, and a replay queues
    them all at once. The replay reads its batch indices, augmentation draws and learning rate
    from fixed device tensors, refreshed before each replay (``opt`` is made ``graph_ready`` here:
    make the step after loading a checkpoint into ``opt``). A smaller last batch runs as an
    ordinary step."""
    WARMUP = 3

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, train: ImageSet, cfg: TrainConfig,
                 device: torch.device, prepare: Prepare | None = None):
        self.model, self.opt, self.cfg, self.device = model, opt, cfg, device
        self.images, self.labels = train.images, train.labels
        self.normalization = batch_normalization(prepare or cfg.normalize, device)
        self.dtype = compute_dtype(cfg.precision, device)
        self.total_loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.graphed = (device.type == "cuda" and cfg.cuda_graph and prepare is None
                        and train.images.dtype == torch.uint8)
        if self.graphed:
            graph_ready(opt, device)
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.warm_steps = 0
        self.inputs: tuple = ()
        self.failure: str | None = None  # why the capture failed, when it did

    def reset(self) -> None:
        """Zeroes the sums at the start of an epoch."""
        self.total_loss.zero_()
        self.correct.zero_()

    def __call__(self, index: torch.Tensor, generator: torch.Generator) -> None:
        draws = augment_draws(len(index), generator) if self.cfg.augment else None
        if not self.graphed or len(index) != self.cfg.batch_size:
            self.run(index, draws)
        elif self.graph is None and self.warm_steps < self.WARMUP:
            self._warm(index, draws)
        elif self.graph is not None or self._capture(index, draws):
            self._replay(index, draws)
        else:
            self.run(index, draws)

    def run(self, index: torch.Tensor, draws: tuple | None) -> None:
        """The step itself, as ordinary (eager) PyTorch."""
        x = to_input(self.images[index], self.normalization, self.device)
        if draws is not None:
            x = apply_augment(x, draws)
        y = self.labels[index]
        with autocast(self.device, self.dtype, cache=False):
            logits = self.model(x)
            loss = loss_fn(logits, y, self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with warnings.catch_warnings():  # a graph-ready optimizer warns when stepped outside a graph
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.opt.step()
        self.total_loss += loss.detach() * len(y)
        self.correct += (predicted_class(logits) == y).sum()

    def _warm(self, index, draws) -> None:
        # PyTorch's recipe: warm-up steps on a side stream, so cuDNN's autotuning and lazy
        # workspaces are done before capture; they are real steps of the run
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.run(index, draws)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.warm_steps += 1

    def _capture(self, index, draws) -> bool:
        """Records the step as a CUDA graph (running nothing); on failure (an operation that
        cannot be captured, say from a newer or older PyTorch) the run goes on op by op."""
        static_draws = None if draws is None else tuple(
            None if t is None else to_device(t, self.device).clone() for t in draws)
        self.inputs = (index.clone(), static_draws)
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                self.run(*self.inputs)
        except RuntimeError as exc:  # nothing ran during the capture, so no weight has changed
            self.graphed = False
            self.failure = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return False
        self.graph = graph
        return True

    def _replay(self, index, draws) -> None:
        static_index, static_draws = self.inputs
        static_index.copy_(index)
        for static, new in zip(static_draws or (), draws or ()):
            if static is not None:
                static.copy_(new.pin_memory(), non_blocking=True)
        self.graph.replay()


def train_one_epoch(model, opt, sched, train: ImageSet, cfg: TrainConfig, device, generator,
                    epoch: int, guard: "InterruptGuard | None" = None, prepare: Prepare | None = None,
                    step: TrainStep | None = None) -> dict:
    """One pass over ``train`` (already on ``device``) in a seeded random order; returns loss
    and accuracy. ``step`` (a ``TrainStep`` over ``train``) carries a captured CUDA graph from
    epoch to epoch; without it, one is made for this epoch."""
    model.train()
    n = len(train)
    order = torch.randperm(n, generator=generator).to(device)  # one copy an epoch, not one a step
    starts = [s for s in range(0, n, cfg.batch_size) if n - s >= 2 or s == 0]  # BN needs 2+ samples
    step = step or TrainStep(model, opt, train, cfg, device, prepare)
    step.reset()
    seen = 0
    bar = _progress(len(starts), epoch, cfg.epochs)
    for i, start in enumerate(starts):
        index = order[start:start + cfg.batch_size]
        step(index, generator)
        sched.step()
        seen += len(index)
        if bar is not None:
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{float(step.total_loss) / seen:.4f}")
        if guard is not None and guard.signum is not None:
            if bar is not None:
                bar.close()
            raise Interrupted(guard.signum, epoch, i + 1, len(starts))
    if bar is not None:
        bar.close()
    return {"loss": float(step.total_loss) / seen, "accuracy": float(step.correct) / seen, "images": seen}


def key_mismatch(model: nn.Module, state) -> str:
    """'missing keys: ...; unexpected keys: ...' between a model and a loaded state dict."""
    weights = state.get("model", state) if isinstance(state, dict) else {}
    have = set(weights) if isinstance(weights, dict) else set()
    expected = model.state_dict()
    want = set(expected)
    shapes = [k for k in sorted(have & want) if getattr(weights[k], "shape", None) != expected[k].shape]
    return (f"missing keys: {', '.join(sorted(want - have)[:4]) or 'none'}; "
            f"unexpected keys: {', '.join(sorted(have - want)[:4]) or 'none'}"
            + (f"; other shapes: {', '.join(shapes[:4])}" if shapes else ""))


class Interrupted(Exception):
    """Training stopped on a signal at the end of a batch; the last epoch's checkpoint stands."""

    def __init__(self, signum: int, epoch: int, batch: int, batches: int):
        super().__init__(f"signal {signum}")
        self.signum, self.epoch, self.batch, self.batches = signum, epoch, batch, batches


class InterruptGuard:
    """While active, a first SIGINT/SIGTERM only sets ``signum`` (the loop stops at the end of
    the batch); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def checkpoint_state(epoch, model, opt, sched, stopper, generator, history, device) -> dict:
    """Everything needed to continue after ``epoch`` exactly as if never stopped."""
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": portable(opt.state_dict()),
            "scheduler": sched.state_dict(), "stopper": stopper.state(), "best_weights": stopper.best_weights,
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            "cnnlab": __version__, "device": device.type}


def portable(opt_state: dict) -> dict:
    """An optimizer's state with plain-number learning rates (``graph_ready`` made them GPU
    tensors), so that a checkpoint written on a GPU resumes anywhere."""
    groups = [{**group, "lr": float(group["lr"])} for group in opt_state["param_groups"]]
    return {**opt_state, "param_groups": groups}


def fit(model: nn.Module, splits: Splits, cfg: TrainConfig, device: torch.device,
        run_dir: Path | None = None, log: Callable[[str], None] = print,
        state: dict | None = None, guard: InterruptGuard | None = None,
        prepare: Prepare | None = None) -> tuple[list[dict], EarlyStopping]:
    """Trains ``model`` for up to ``cfg.epochs``, from ``state`` (a checkpoint) when given;
    returns the history and the early-stopping state (its best weights are restored into
    ``model`` when asked). With ``run_dir``, writes ``checkpoint.pt`` and ``history.csv``
    after every epoch."""
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    steps = max(1, math.ceil(len(splits.train) / cfg.batch_size)) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.schedule, s, steps))
    stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta, cfg.mode, cfg.restore_best_weights,
                            cfg.start_from_epoch)
    history: list[dict] = []
    first = 1
    if state is not None:
        first, history = _restore(state, model, opt, sched, stopper, generator)
    on_device = splits.train.to(device)
    step = TrainStep(model, opt, on_device, cfg, device, prepare)
    stop = stopper.stopped_epoch is not None
    for epoch in range(first, cfg.epochs + 1):
        if stop:
            break
        lr = float(opt.param_groups[0]["lr"])
        start = time.perf_counter()
        train_logs = train_one_epoch(model, opt, sched, on_device, cfg, device, generator, epoch, guard, prepare,
                                     step)
        if step.failure:
            log(f"note: the training step could not be captured as a CUDA graph ({step.failure}); "
                "it runs op by op (--no-cuda-graph skips the attempt)")
            step.failure = None
        train_seconds = time.perf_counter() - start
        val = score(model, splits.val, splits.class_names, prepare or cfg.normalize, device, tta=cfg.tta,
                    precision=cfg.precision)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "loss": train_logs["loss"], "accuracy": train_logs["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_precision": val["precision"],
               "val_recall": val["recall"], "val_f1": val["f1"], "lr": lr, "seconds": seconds,
               "train_seconds": train_seconds, "images_per_s": train_logs["images"] / train_seconds}
        history.append(row)
        stop = stopper.update(epoch, row, model)
        if run_dir is not None:
            save_torch(run_dir / "checkpoint.pt",
                       checkpoint_state(epoch, model, opt, sched, stopper, generator, history, device))
            write_history(run_dir / "history.csv", history)
        log(_epoch_line(row, cfg.epochs, stopper))
        if stop:
            log(f"early stopping: {cfg.monitor} did not improve for {cfg.patience} epoch(s) after epoch "
                f"{stopper.best_epoch}")
    if stopper.restore(model):
        log(f"restored the weights of epoch {stopper.best_epoch} (best {cfg.monitor} {stopper.best:.4f})")
    return history, stopper


def _restore(state, model, opt, sched, stopper, generator) -> tuple[int, list[dict]]:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError):
        raise CnnlabError(f"the checkpoint does not fit this run's model ({key_mismatch(model, state)}); "
                          "delete checkpoint.pt to restart the run from epoch 1") from None
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, kept in zip(opt.param_groups, flags):  # how to step is this machine's choice, not the file's
        group.update(kept)
    sched.load_state_dict(state["scheduler"])
    for key in ("best", "best_epoch", "wait", "stopped_epoch"):
        setattr(stopper, key, state["stopper"][key])
    stopper.best_weights = state["best_weights"]
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"] + 1, list(state["history"])


def _epoch_line(row: dict, epochs: int, stopper: EarlyStopping) -> str:
    mark = " *" if stopper.best_epoch == row["epoch"] else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s{mark}")


# ---------------------------------------------------------------- a whole run

def environment(device: torch.device, precision: str = "auto") -> dict:
    """Where a run ran: versions, device, threads, the dtype its precision setting gave here and,
    on a CPU, whether cnnlab's native kernels were in use (built here on first use)."""
    dtype = compute_dtype(precision, device)
    cpu = device.type == "cpu"
    return {"cnnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device) if cpu else torch.cuda.get_device_name(device),
            "compute_dtype": str(dtype or torch.float32).removeprefix("torch."),
            "native_kernels": kernels.status() if cpu else "not used on GPUs",
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _setup(cfg: TrainConfig, splits: Splits | None):
    """(device, splits, model) for ``cfg``: the data loaded and split, the model built and seeded."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if splits is None:
        splits = load_splits(cfg.data, cfg.image_size, cfg.val_split, cfg.test_split, cfg.seed,
                             Path(cfg.cache_dir) if cfg.cache_dir else None)
    if cfg.batch_size > len(splits.train):
        raise CnnlabError(f"--batch-size {cfg.batch_size} is larger than the training set "
                          f"({len(splits.train)} images); use a smaller batch")
    torch.manual_seed(cfg.seed)
    shape = tuple(splits.train.images.shape[1:])
    model = build_model(get_preset(cfg.preset).layers, len(splits.class_names), shape)
    init_whitening(model, preprocess(splits.train.images[:5000], cfg.normalize, channels_last=False))
    return device, splits, model.to(device, memory_format=memory_format(cfg.channels_last))


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a run keeps its weights in; ``Net`` lays its input out to match."""
    return torch.channels_last if channels_last else torch.contiguous_format


def train(cfg: TrainConfig, log: Callable[[str], None] = print, splits: Splits | None = None) -> Path:
    """Loads data, trains, tests once on the held-out split and writes the run directory."""
    started = time.perf_counter()
    device, splits, model = _setup(cfg, splits)
    run_dir = create_run_dir(cfg.out, cfg.name or cfg.preset)
    params = count_parameters(model)
    config = {**asdict(cfg), "kind": "train", "layers": list(get_preset(cfg.preset).layers),
              "class_names": splits.class_names, "input_shape": list(splits.train.images.shape[1:]),
              "parameters": params, "data_info": splits.info, "environment": environment(device, cfg.precision),
              "command": " ".join(sys.argv)}
    write_json(run_dir / "config.json", config)
    log(f"{cfg.preset}: {params:,} parameters, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {device}; loaded in {time.perf_counter() - started:.1f}s")
    log(f"run directory: {run_dir}")
    return _run(cfg, run_dir, model, splits, device, None, log)


def resume(run_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Continues a stopped run from its last checkpoint; a finished run is left as it is."""
    run_dir = Path(run_dir)
    config, metrics = load_run(run_dir)
    if metrics is not None:
        log(f"{run_dir} is finished (test accuracy {metrics['test_accuracy']:.4f}); nothing to resume")
        return run_dir
    cfg = TrainConfig(**{f.name: config[f.name] for f in fields(TrainConfig) if f.name in config})
    device, splits, model = _setup(cfg, None)
    if splits.class_names != config["class_names"]:
        raise CnnlabError(f"the data at {cfg.data} no longer has the run's classes; restore it or start a new run")
    state = load_torch(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").is_file() else None
    if state is None:
        log(f"{run_dir} has no checkpoint yet: starting its training from epoch 1")
    else:
        for key, now in (("cnnlab", __version__), ("device", device.type)):
            if state.get(key) != now:
                log(f"notice: the checkpoint was written with {key} {state.get(key)}, resuming with {now}")
        interrupted = _read_marker(run_dir)
        if interrupted and interrupted.get("epoch") == state["epoch"] + 1:
            log(f"epoch {interrupted['epoch']} was interrupted at batch {interrupted['batch']}/"
                f"{interrupted['batches']}: it restarts from its beginning")
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    return _run(cfg, run_dir, model, splits, device, state, log)


def _read_marker(run_dir: Path) -> dict | None:
    path = run_dir / "interrupted.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run(cfg, run_dir: Path, model, splits: Splits, device, state, log) -> Path:
    """Trains (under the interrupt guard), then tests once and writes the results."""
    with InterruptGuard() as guard:
        try:
            history, stopper = fit(model, splits, cfg, device, run_dir, log, state, guard)
        except Interrupted as stop:
            write_json(run_dir / "interrupted.json", {"signal": stop.signum, "epoch": stop.epoch,
                                                      "batch": stop.batch, "batches": stop.batches})
            name = signal.Signals(stop.signum).name
            raise RunInterrupted(f"{name} during epoch {stop.epoch} (batch {stop.batch}/{stop.batches}); "
                                 f"epoch {stop.epoch - 1}'s checkpoint is saved; continue with: "
                                 f"cnnlab resume {run_dir}", 128 + stop.signum) from None
        finish_run(cfg, run_dir, model, splits, device, history, stopper, log)
        note_late_signal(guard, log)
    return run_dir


def note_late_signal(guard: InterruptGuard, log: Callable[[str], None]) -> None:
    """Says so when a signal came after the last batch: the guard let the run write its results
    (seconds) rather than leave a trained run without them; a second Ctrl-C still stops at once."""
    if guard.signum is not None:
        log(f"signal {guard.signum} came after training ended: the run's results were written first")


def confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, count: int = 12) -> dict:
    """The ``count`` wrong predictions made with the highest probability."""
    probs = probabilities(logits)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    return {"index": order, "true": labels[order].tolist(), "predicted": predicted[order].tolist(),
            "probability": confidence[order].tolist()}


class RunInterrupted(CnnlabError):
    """A run stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def finish_run(cfg, run_dir, model, splits, device, history, stopper, log, prepare: Prepare | None = None,
               boundary: int | None = None, extra: dict | None = None) -> None:
    """Saves the weights, tests once on the held-out split, and writes metrics, the confusion
    matrix and the plots; ``boundary`` marks where fine-tuning began on the curves."""
    from .plots import image_grid, plot_run  # matplotlib loads only when a run is written

    save_torch(run_dir / "model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    logits = predict_logits(model, splits.test.images, prepare or cfg.normalize, device, tta=cfg.tta,
                            precision=cfg.precision)
    test = score_logits(logits, splits.test.labels, splits.class_names)
    mistakes = confident_mistakes(logits, splits.test.labels)
    image_grid(splits.test.images[mistakes["index"]], mistakes["predicted"], splits.class_names,
               run_dir / "mistakes.png", title="most confident mistakes (test)",
               captions=[f"{splits.class_names[t]} → {splits.class_names[p]} {q:.0%}" for t, p, q in
                         zip(mistakes["true"], mistakes["predicted"], mistakes["probability"])])
    if not (run_dir / "samples.png").exists():
        pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))[:18]
        image_grid(splits.train.images[pick], splits.train.labels[pick], splits.class_names,
                   run_dir / "samples.png", title="random training images")
    best = stopper.best_epoch or len(history)
    train_time = sum(r["seconds"] for r in history)
    metrics = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_precision": test["precision"],
        "test_recall": test["recall"], "test_f1": test["f1"],
        "train_time_s": train_time, "epochs_run": len(history), "best_epoch": best,
        "stopped_early": stopper.stopped_epoch is not None, "monitor": cfg.monitor, "best_value": stopper.best,
        "best_val_accuracy": history[best - 1]["val_accuracy"],
        "train_accuracy_at_best": history[best - 1]["accuracy"],
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "parameters": count_parameters(model), "weights": "best" if stopper.best_weights is not None else "last",
        "test_size": len(splits.test), "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"],
        **(extra or {}),
    }
    write_csv(run_dir / "confusion_matrix.csv",
              [[name] + row for name, row in zip(splits.class_names, test["confusion_matrix"])],
              ["true\\predicted"] + splits.class_names)
    plot_run(run_dir, history, best, test["confusion_matrix"], splits.class_names, boundary)
    write_json(run_dir / "metrics.json", metrics)  # last: its presence marks the run finished
    for leftover in ("checkpoint.pt", "interrupted.json"):
        (run_dir / leftover).unlink(missing_ok=True)
    log(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
        f"({len(history)} epochs, best {best}, {train_time:.1f}s training)")
