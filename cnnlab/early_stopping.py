"""Early stopping with Keras's semantics: the best epoch, patience, and the best weights."""
from __future__ import annotations

import copy
import math

from torch import nn

from .callbacks import Callback


def infer_mode(monitor: str) -> str:
    """'min' for losses, 'max' for accuracy, precision, recall and F1."""
    return "min" if "loss" in monitor else "max"


class EarlyStopping(Callback):
    """Keras's ``EarlyStopping`` semantics, epoch numbers counted from 1; a callback
    (callbacks.py) of the loop, which reads its best epoch for the run's record.

    * An epoch improves when ``value`` beats the best by more than ``min_delta``
      (below it for ``min``, above it for ``max``; ``auto`` infers the mode from the name).
    * Epochs before ``start_from_epoch`` are ignored entirely (no best, no patience).
    * ``patience`` non-improving epochs in a row stop training; ``None`` never stops, but
      the best epoch (and its weights) is still tracked.
    * ``restore`` puts the best epoch's weights back whether or not training stopped early
      (Keras 2 restored them only on an early stop: a well-known surprise).
    """

    def __init__(self, monitor: str = "val_loss", patience: int | None = None, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True, start_from_epoch: int = 0):
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode = infer_mode(monitor) if mode == "auto" else mode
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.model: nn.Module | None = None  # the model whose best weights it keeps (on_train_begin's)
        self.restored = False  # on_train_end put the best weights back

    def on_train_begin(self, run) -> None:
        self.model = run.model

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        return self.update(epoch, logs, self.model)

    def on_train_end(self, logs: dict) -> None:
        self.restored = self.model is not None and self.restore(self.model)

    def improves(self, value: float, reference: float | None) -> bool:
        """Whether ``value`` beats ``reference`` (None: anything does) by more than ``min_delta``."""
        if reference is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def update(self, epoch: int, logs: dict, model: nn.Module | None = None) -> bool:
        """Records epoch ``epoch`` (1-based); returns True when training should stop."""
        value = logs.get(self.monitor)  # none without validation images (--val-split 0): nothing to judge
        if epoch <= self.start_from_epoch or value is None or math.isnan(value):
            return False
        self.wait += 1
        if self.improves(value, self.best):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if model is not None and self.restore_best_weights:
                self.best_weights = copy.deepcopy(model.state_dict())
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

    def state_dict(self) -> dict:
        """What a checkpoint keeps to continue exactly: the best so far, its weights, the wait."""
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        """Continues from ``state_dict()``'s result (the settings stay this object's own)."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best_weights = state["best_weights"]
