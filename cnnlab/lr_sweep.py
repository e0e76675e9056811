"""fastai's learning-rate range test, on a copy, sized to the run: ``sweep`` trains a copy of a model
with the run's optimizer and batch at rates growing exponentially from ``START`` to ``END``, smooths
the loss as fastai does (a debiased moving average, beta 0.98 over 100 steps) and stops once that
exceeds ``DIVERGE`` times its minimum or the loss turns non-finite. How long it runs is ``plan``'s:
fastai's 100 steps, each averaging the loss of two batches at its rate where ``SHARE`` of the run's
batches affords it, fewer steps of one batch where it does not (a head on a frozen base's features,
whose steps cost next to nothing, takes the 100 steps of two). ``suggest`` is Leslie Smith's rule:
a third of the largest rate at which the loss still falls, read where the loss's running median
over one decade of rates is lowest; fastai's ``valley``, ``minimum`` and ``steep`` come along for
comparison. ``plot`` draws the curve. The model given, the global random streams and every file stay
as they were (``train --lr auto`` then trains exactly as ``--lr <the value found>`` would)."""
from __future__ import annotations

import copy
import math
import statistics
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

START, END, STEPS, BETA, DIVERGE = 1e-7, 10.0, 100, 0.98, 4.0  # fastai's range, steps, smoothing, stop
SHARE = 0.04  # the sweep's batches: at most this share of the run's (two per step only where it affords 200)
MIN_STEPS, BATCHES = 20, 2  # the fewest steps (2.5 a decade), the batches averaged per step where affordable
FRACTION = 3  # Smith (2017): train at a third of the largest rate at which the loss still falls


@dataclass(frozen=True)
class Plan:
    """How long a sweep runs: its steps, and the batches each averages at its rate (each one an
    optimizer step)."""
    steps: int = STEPS
    batches: int = 1


@dataclass
class Sweep:
    """One range test: the rate of each step taken, its loss smoothed as fastai smooths it, its raw
    loss (the mean of the step's batches), the running median of that over a decade of rates
    centred on it, and where that is lowest; the suggested rate and fastai's for comparison; why
    it stopped and how long it took; ``plot``: the PNG, once drawn."""
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    lowest: int = 0  # the step at which the running median is lowest
    suggestion: float = float("nan")
    others: dict[str, float] = field(default_factory=dict)  # fastai's valley, minimum and steep
    plan: Plan = Plan()
    stopped: str = "end of the range"
    seconds: float = 0.0
    plot: Path | None = None


def rates(start: float = START, end: float = END, steps: int = STEPS) -> list[float]:
    """``steps`` rates from ``start`` to ``end``, each the last times a constant."""
    return [start * (end / start) ** (i / max(steps - 1, 1)) for i in range(steps)]


def plan(run_batches: int) -> Plan:
    """The sweep for a run of ``run_batches`` optimizer steps: fastai's 100 steps of ``BATCHES``
    batches where ``SHARE`` of the run affords them, else of one batch, else as many steps of one
    batch as it affords (never fewer than ``MIN_STEPS``: a very short run pays more than ``SHARE``)."""
    budget = int(SHARE * run_batches)
    if budget >= STEPS * BATCHES:
        return Plan(STEPS, BATCHES)
    return Plan(min(STEPS, max(MIN_STEPS, budget)), 1)


def run_plan(cfg: TrainConfig, train_size: int, cheap: bool = False) -> Plan:
    """``plan`` for ``cfg``'s run on ``train_size`` images (its epochs of batches, the last one
    partial); ``cheap``: a head on features a frozen base computed once, whose steps cost next to
    nothing beside that base's pass over the images the run pays anyway: fastai's whole sweep."""
    if cheap:
        return Plan(STEPS, BATCHES)
    return plan(cfg.epochs * max(1, math.ceil(train_size / cfg.batch_size)))


def smooth(raw: list[float], beta: float) -> list[float]:
    """fastai's smoothed loss: a moving average with weight ``beta`` on the past, debiased."""
    average, out = 0.0, []
    for i, loss in enumerate(raw):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def running_median(raw: list[float], half: int) -> list[float]:
    """The median of each step's loss and the ``half`` steps either side of it (fewer at the ends)."""
    return [statistics.median(raw[max(0, i - half):i + half + 1]) for i in range(len(raw))]


def window(lrs: list[float], steps: int) -> tuple[int, int, int]:
    """(first, end, half): the steps a suggestion is taken from, as fastai takes them (not the first
    tenth of the planned steps, still settling, nor the last twentieth, 5 of 100, already diverging),
    and the half-width in steps of a window spanning one decade of rates."""
    first, end = steps // 10, len(lrs) - max(1, steps // 20)
    if end - first < 2:
        first, end = 0, len(lrs)
    per_decade = 1 / math.log10(lrs[1] / lrs[0]) if len(lrs) > 1 else 1.0
    return first, end, max(1, int(per_decade / 2))


def suggest(lrs: list[float], raw: list[float], steps: int) -> tuple[float, int, list[float]]:
    """Smith's rule, a third of the largest rate at which the loss still falls, that rate read where
    the running median of the loss over one decade of rates is lowest (centred: no lag, unlike
    fastai's moving average; a median: no pull from one bad batch); with the step of that lowest
    point and the running median."""
    first, end, half = window(lrs, steps)
    curve = running_median(raw, half)
    bottom = min(curve[first:end])
    flat = [i for i in range(first, end) if curve[i] == bottom]  # a flat bottom (a clean curve): its middle
    lowest = flat[len(flat) // 2]
    return lrs[lowest] / FRACTION, lowest, curve


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``: the longest stretch over which the loss keeps falling (a longest
    decreasing subsequence), and the rate halfway down it (its start plus a half of its length)."""
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


def fastai_suggestions(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """fastai's suggestions on its smoothed curve, for comparison: ``valley``, ``minimum`` (a tenth
    of the rate at the lowest loss) and ``steep`` (the rate where the loss falls fastest against
    log(lr))."""
    lowest = min(range(len(losses)), key=losses.__getitem__)
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(lrs) - 1)]
    steep = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]
    return {"valley": valley(lrs, losses), "minimum": lrs[lowest] / 10, "steep": steep}


def random_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_random(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def sweep(model: nn.Module, train: ImageSet, cfg: TrainConfig, device: torch.device, steps: Plan | None = None,
          span: tuple[float, float] = (START, END)) -> Sweep:
    """The range test of ``model`` (left untouched: a copy trains) on ``train`` (images, or a
    frozen base's features) with ``cfg``'s optimizer, batch, precision, augmentation and loss, for
    ``steps`` (default: ``run_plan``, sized to ``cfg``'s run); each parameter group's rate keeps its ratio to ``--lr`` (a preset's scaled
    biases and head); the schedule and Lookahead play no part. A training set smaller than the
    batch is one batch of every image, as ``train`` takes it."""
    if distributed.active():
        raise CnnlabError("the learning-rate finder runs on one process: run `cnnlab lr-find` first and pass "
                          "--lr with its value")
    cfg = replace(cfg, batch_size=min(cfg.batch_size, len(train)))  # a smaller set: each batch all of it, as training
    steps = steps or run_plan(cfg, len(train), cheap=train.images.is_floating_point())
    saved, started = random_state(), time.perf_counter()
    try:
        result = _sweep(model, train, cfg, device, steps, span)
    finally:
        restore_random(saved)
    result.seconds = time.perf_counter() - started
    return result


def _sweep(model: nn.Module, train: ImageSet, cfg: TrainConfig, device: torch.device, steps: Plan,
           span: tuple[float, float]) -> Sweep:
    base = cfg.lr if isinstance(cfg.lr, (int, float)) else TrainConfig.lr
    cfg = replace(cfg, lr=base, cuda_graph=False)  # each step at its own rate: no captured graph
    trial = copy.deepcopy(model)
    opt = make_optimizer(trial, cfg, compute_dtype(cfg.precision, device))
    ratios = [float(g["lr"]) / base for g in opt.param_groups]
    step = TrainStep(trial, opt, train.to(device), cfg, device)
    trial.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    n, order, at = len(train), None, len(train)
    beta = BETA ** (STEPS / steps.steps)  # fastai's smoothing per decade of rates, whatever the steps
    result, average, best = Sweep(plan=steps), 0.0, math.inf
    for i, lr in enumerate(rates(span[0], span[1], steps.steps)):
        for group, ratio in zip(opt.param_groups, ratios):
            group["lr"] = lr * ratio
        step.reset()
        images = 0
        for _ in range(steps.batches):
            if at + cfg.batch_size > n:  # a new pass over the training split, in a new order
                order, at = torch.randperm(n, generator=generator).to(device), 0
            index, at = order[at:at + cfg.batch_size], at + cfg.batch_size
            step(index, generator)
            images += len(index)
        loss = float(step.total_loss) / images
        if not math.isfinite(loss):
            result.stopped = f"the loss turned non-finite at lr {lr:.3g}"
            break
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        result.lrs.append(lr)
        result.losses.append(smoothed)
        result.raw.append(loss)
        best = min(best, smoothed)
        if smoothed > DIVERGE * best:
            result.stopped = f"the smoothed loss passed {DIVERGE:g}x its minimum at lr {lr:.3g}"
            break
    if not result.lrs:
        raise CnnlabError(f"the learning-rate finder's first step gave a non-finite loss at lr {span[0]:g}")
    result.suggestion, result.lowest, result.median = suggest(result.lrs, result.raw, steps.steps)
    first, end, _ = window(result.lrs, steps.steps)
    result.others = fastai_suggestions(result.lrs[first:end], result.losses[first:end])
    return result


def plot(result: Sweep, path: Path, title: str = "") -> Path:
    """The loss against the learning rate (log axis): each step's, fastai's smoothed curve and the
    running median the suggestion comes from, its lowest point and the suggestion marked; a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = result.lrs
    ax.plot(lrs, result.raw, color="0.75", linewidth=0.8, label="each step's loss")
    ax.plot(lrs, result.losses, color="tab:blue", label="smoothed as fastai smooths it")
    ax.plot(lrs, result.median, color="tab:orange", label="running median over a decade of rates")
    ax.set_xscale("log")
    lowest = result.lowest
    curves = result.raw[:lowest + 1] + result.losses[:lowest + 1]
    bottom, top = min(curves), max(result.losses[:lowest + 1] + result.median[:lowest + 1])
    span = max(top - bottom, 1e-3)  # the divergence past the minimum is clipped above the start
    ax.set_ylim(bottom - 0.1 * span, top + 0.7 * span)  # room above for the legend
    ax.plot([lrs[lowest]], [result.median[lowest]], "o", color="tab:red", label=f"its lowest, at {lrs[lowest]:.3g}")
    ax.axvline(result.suggestion, color="tab:red", linestyle=":", linewidth=1.2,
               label=f"suggested lr {result.suggestion:.3g} (a third of the lowest)")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate finder")
    ax.legend(loc="upper left", fontsize=8)
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
