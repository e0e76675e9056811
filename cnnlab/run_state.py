"""What a run's training changes, as one value (``RunState``: model, optimizer, schedule, early
stopping, random stream, Lookahead, history), and what stays the same through it (``RunContext``:
where it writes, how it speaks, the hooks passed in). ``fit``, checkpointing and restore take these."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig
from .early_stopping import EarlyStopping
from .interrupts import InterruptGuard
from .optimizer import Lookahead, lr_factor, make_optimizer
from .preprocessing import Preprocessing
from .runtime import compute_dtype
from .tensorboard_log import Board


class Schedule:
    """The learning-rate schedule of a run: ``cfg.schedule``'s factor (``optimizer.lr_factor``) of
    each group's rate, stepped once per optimizer step; ``steps`` counts the steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: int):
        self.kind, self.total_steps = kind, total_steps
        self.base_lr = float(optimizer.param_groups[0]["lr"])
        self.steps = 0
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(kind, s, total_steps))

    def rate(self) -> float:
        """The first group's rate for the next step, computed rather than read (a rate on a GPU
        would make each read wait for it)."""
        return self.base_lr * lr_factor(self.kind, self.steps, self.total_steps)

    def step(self) -> None:
        self._scheduler.step()
        self.steps += 1

    def state_dict(self) -> dict:
        return self._scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._scheduler.load_state_dict(state)
        self.steps = int(state["last_epoch"])


def steps_in(state: dict) -> int:
    """Optimizer steps a saved ``Schedule.state_dict()`` had taken (0 where it does not say)."""
    steps = state.get("last_epoch") if isinstance(state, dict) else None
    return steps if isinstance(steps, int) else 0


@dataclass
class RunState:
    """Everything one phase of training changes; ``epoch`` is the last one finished."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    early_stopping: EarlyStopping
    generator: torch.Generator
    lookahead: Lookahead | None = None
    history: list[dict] = field(default_factory=list)
    epoch: int = 0

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, train_size: int, device: torch.device) -> RunState:
        """A fresh state for training ``model`` on ``train_size`` images with ``cfg``."""
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = make_optimizer(model, cfg, compute_dtype(cfg.precision, device))
        steps = max(1, math.ceil(train_size / cfg.batch_size)) * cfg.epochs
        early_stopping = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta, cfg.mode, cfg.restore_best_weights,
                                       cfg.start_from_epoch)
        lookahead = Lookahead(model, steps) if cfg.lookahead else None
        return cls(model, optimizer, Schedule(optimizer, cfg.schedule, steps), early_stopping, generator, lookahead)


@dataclass
class RunContext:
    """What stays the same through a run: its device, folder and test-time settings, where it
    logs, the interrupt guard, and the hooks passed in. ``checkpoints``: ``fit`` writes
    checkpoint.pt and history.csv into ``run_dir`` after every epoch (rank 0 of a from-scratch run).
    ``mistake_pictures(model, images, preprocessing, classes)`` turns the test's most confident
    mistakes into the pictures the run shows, with a title (None: the photos as they are);
    ``callbacks``: objects with callbacks.Callback's methods, told of each phase and epoch and of
    the finished run; ``started``: when this attempt began, for the run's whole wall time."""
    device: torch.device
    run_dir: Path | None = None
    preprocessing: Preprocessing | None = None
    tta: int = 0
    precision: str = "auto"
    settings: dict = field(default_factory=dict)
    log: Callable[[str], None] = print
    board: Board | None = None
    guard: InterruptGuard | None = None
    checkpoints: bool = False
    mistake_pictures: Callable | None = None
    callbacks: list = field(default_factory=list)  # the caller's (callbacks.py), after early stopping and TensorBoard
    started: float = field(default_factory=time.perf_counter)  # when this attempt at the run began


@dataclass
class Outcome:
    """What training produced, for ``finish_run``: the history, the early-stopping state, where
    fine-tuning began on the curves, metrics to add, and the validation split's logits when they
    are at hand (from cached features: what a multi-label run tunes its thresholds on)."""
    history: list[dict]
    early_stopping: EarlyStopping
    boundary: int | None = None
    extra: dict = field(default_factory=dict)
    val_logits: torch.Tensor | None = None
