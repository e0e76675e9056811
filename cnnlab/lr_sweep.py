"""fastai's learning-rate range test, on a copy: ``sweep`` trains a copy of a model with the run's
optimizer for up to ``STEPS`` batches of the training split at rates growing exponentially from
``START`` to ``END``, smooths the loss (a debiased moving average, beta 0.98) and stops once it
exceeds ``DIVERGE`` times its minimum or turns non-finite; ``valley`` is fastai's default suggestion
and ``plot`` draws the curve. The model given, the global random streams and every file stay as they
were (``train --lr auto`` then trains exactly as ``--lr <the value found>`` would)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .atomic import atomic_path
from .config import TrainConfig
from .data import ImageSet
from .errors import CnnlabError
from .optimizer import make_optimizer
from .runtime import compute_dtype
from .step import TrainStep

START, END, STEPS, BETA, DIVERGE = 1e-7, 10.0, 100, 0.98, 4.0


@dataclass
class Sweep:
    """One range test: the rate of each step taken, its smoothed and raw loss, the suggested rate
    (``valley``), why it stopped and how long it took; ``plot``: the PNG, once drawn."""
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    suggestion: float = float("nan")
    others: dict[str, float] = field(default_factory=dict)  # fastai's minimum and steep, for comparison
    stopped: str = "end of the range"
    seconds: float = 0.0
    plot: Path | None = None


def rates(start: float = START, end: float = END, steps: int = STEPS) -> list[float]:
    """``steps`` rates from ``start`` to ``end``, each the last times a constant."""
    return [start * (end / start) ** (i / max(steps - 1, 1)) for i in range(steps)]


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``: the longest stretch over which the loss keeps falling (a longest
    decreasing subsequence), and the rate two thirds of the way down it (its start plus a half
    of its length)."""
    n = len(losses)
    if n < 2:
        return lrs[0]
    lds, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[end] < lds[i]:
                end, start = i, i - lds[i]
    sections = (end - start) / 3
    return lrs[min(max(start + int(sections) + int(sections / 2), 0), n - 1)]


def alternatives(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """fastai's other suggestions, for comparison: ``minimum`` (a tenth of the rate at the lowest
    loss) and ``steep`` (the rate where the loss falls fastest against log(lr))."""
    lowest = min(range(len(losses)), key=losses.__getitem__)
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(lrs) - 1)]
    steep = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]
    return {"minimum": lrs[lowest] / 10, "steep": steep}


def random_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_random(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def sweep(model: nn.Module, train: ImageSet, cfg: TrainConfig, device: torch.device, steps: int = STEPS,
          span: tuple[float, float] = (START, END)) -> Sweep:
    """The range test of ``model`` (left untouched: a copy trains) on ``train`` with ``cfg``'s
    optimizer, batch, precision, augmentation and loss; each parameter group's rate keeps its ratio
    to ``--lr`` (a preset's scaled biases and head); the schedule and Lookahead play no part."""
    if distributed.active():
        raise CnnlabError("the learning-rate finder runs on one process: run `cnnlab lr-find` first and pass "
                          "--lr with its value")
    if cfg.batch_size > len(train):
        raise CnnlabError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images): "
                          "too few images for one batch of the learning-rate finder; use a smaller batch")
    saved, started = random_state(), time.perf_counter()
    try:
        result = _sweep(model, train, cfg, device, rates(span[0], span[1], steps))
    finally:
        restore_random(saved)
    result.seconds = time.perf_counter() - started
    return result


def _sweep(model: nn.Module, train: ImageSet, cfg: TrainConfig, device: torch.device, schedule: list[float]) -> Sweep:
    base = cfg.lr if isinstance(cfg.lr, (int, float)) else TrainConfig.lr
    cfg = replace(cfg, lr=base, cuda_graph=False)  # each step at its own rate: no captured graph
    trial = copy.deepcopy(model)
    opt = make_optimizer(trial, cfg, compute_dtype(cfg.precision, device))
    ratios = [float(g["lr"]) / base for g in opt.param_groups]
    step = TrainStep(trial, opt, train.to(device), cfg, device)
    trial.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    n, order, at = len(train), None, len(train)
    result, average, best = Sweep(), 0.0, math.inf
    for i, lr in enumerate(schedule):
        if at + cfg.batch_size > n:  # a new pass over the training split, in a new order
            order, at = torch.randperm(n, generator=generator).to(device), 0
        index, at = order[at:at + cfg.batch_size], at + cfg.batch_size
        for group, ratio in zip(opt.param_groups, ratios):
            group["lr"] = lr * ratio
        step.reset()
        step(index, generator)
        loss = float(step.total_loss) / len(index)
        if not math.isfinite(loss):
            result.stopped = f"the loss turned non-finite at lr {lr:.3g}"
            break
        average = BETA * average + (1 - BETA) * loss
        smooth = average / (1 - BETA ** (i + 1))
        result.lrs.append(lr)
        result.losses.append(smooth)
        result.raw.append(loss)
        best = min(best, smooth)
        if smooth > DIVERGE * best:
            result.stopped = f"the smoothed loss passed {DIVERGE:g}x its minimum at lr {lr:.3g}"
            break
    if not result.lrs:
        raise CnnlabError(f"the learning-rate finder's first step gave a non-finite loss at lr {schedule[0]:g}")
    skip = len(schedule) // 10  # as fastai: the first tenth of the steps, still settling, is not suggested from
    lrs, losses = (result.lrs[skip:], result.losses[skip:]) if len(result.lrs) > skip + 1 else (result.lrs,
                                                                                                result.losses)
    result.suggestion, result.others = valley(lrs, losses), alternatives(lrs, losses)
    return result


def plot(result: Sweep, path: Path, title: str = "") -> Path:
    """The smoothed loss against the learning rate (log axis), the suggestion marked, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    shown = len(result.lrs) - 5 if len(result.lrs) > 20 else len(result.lrs)  # as fastai: not the last 5 steps
    ax.plot(result.lrs[:shown], result.losses[:shown], color="tab:blue", label="training loss (smoothed)")
    ax.set_xscale("log")
    lowest = min(range(shown), key=result.losses.__getitem__)
    top = max(result.losses[:lowest + 1])  # the divergence past the minimum is clipped above it
    span = max(top - result.losses[lowest], 1e-3)
    ax.set_ylim(result.losses[lowest] - 0.1 * span, top + 0.5 * span)
    at = result.lrs.index(result.suggestion) if result.suggestion in result.lrs else None
    if at is not None:
        ax.plot([result.suggestion], [result.losses[at]], "o", color="tab:red",
                label=f"suggested lr {result.suggestion:.3g} (valley)")
    ax.axvline(result.suggestion, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or "learning-rate finder")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    result.plot = path
    return path
