"""TensorBoard event files, written into the run directory as a run trains, in Keras's layout:
``RUN/train`` and ``RUN/validation``, so that ``tensorboard --logdir runs`` shows every run by its
name with its train and validation curves overlaid on one chart per metric.

Every scalar is logged against the optimizer step (as Lightning does): per epoch each history.csv
column (``epoch_loss``, ``epoch_accuracy`` in both folders; ``epoch_precision``, ``epoch_recall``,
``epoch_f1`` for validation, with several labels per image ``epoch_map`` and ``epoch_micro_f1`` too;
the epoch, its seconds and images/s), per step the learning rate; at the end the curves and the
confusion matrix as images and the run's settings with its test scores as hparams. A resumed run purges what came after its checkpoint, so its curves go on without
duplicated points. Without the ``tensorboard`` package a run says so once and trains on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .callbacks import Callback

TRAIN_COLUMNS = {"loss": "epoch_loss", "accuracy": "epoch_accuracy", "lr": "epoch_lr", "seconds": "epoch_seconds",
                 "images_per_s": "epoch_images_per_s", "epoch": "epoch"}
VALIDATION_COLUMNS = {"val_loss": "epoch_loss", "val_accuracy": "epoch_accuracy", "val_precision": "epoch_precision",
                      "val_recall": "epoch_recall", "val_f1": "epoch_f1",
                      "val_balanced_accuracy": "epoch_balanced_accuracy",
                      "val_map": "epoch_map", "val_micro_f1": "epoch_micro_f1"}  # the last two: --multi-label
IMAGES = ("loss.png", "accuracy.png", "confusion_matrix.png")


def wait_past_event_files(folders: list[Path]) -> None:
    """Waits into the second after the newest event file's in ``folders``. TensorBoard reads a folder's
    files in name order, and a file is named by the second it was opened in, then the pid and a
    per-process count compared as text ("10" before "8"): a resumed run's file opened in the same
    second as the interrupted one's could be read first, its points before theirs."""
    stamps = [int(stamp) for folder in folders if folder.is_dir()
              for stamp in (p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*")) if stamp.isdigit()]
    wait = max(stamps) + 1 - time.time() if stamps else 0
    if wait > 0:
        time.sleep(wait)


class Board(Callback):
    """The event writers of one run, a callback of the loop (callbacks.py) (``enabled`` False: none, every call does nothing).
    ``purge_step``: the first step to write again when a run continues (events from it on, left by
    the interrupted attempt, are hidden); ``validated`` False (``--val-split 0``): no validation folder."""

    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None,
                 log: Callable[[str], None] = print, validated: bool = True):
        self.writers = None
        self.offset_steps = self.offset_epochs = 0  # a later phase of one run (transfer's fine-tuning) goes on
        self.last_step = 0
        self.rates: list[tuple[int, float]] = []  # written with the epoch's row, not between steps
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: the tensorboard package is not installed (pip install tensorboard): this run writes no "
                "TensorBoard event files")
            return
        parts = ("train", "validation") if validated else ("train",)
        wait_past_event_files([run_dir / part for part in parts])
        self.writers = {part: SummaryWriter(str(run_dir / part), purge_step=purge_step) for part in parts}

    def on_train_begin(self, run) -> None:
        self._schedule = run.schedule  # its step count places each epoch's points

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.epoch(self._schedule.steps, logs)

    def step(self, step: int, lr: float) -> None:
        """After optimizer step ``step`` (from 1), taken at learning rate ``lr``."""
        self.last_step = step + self.offset_steps
        if self.writers:
            self.rates.append((self.last_step, lr))

    def epoch(self, step: int, row: dict) -> None:
        """One history.csv row, logged at the step its epoch ended on; flushed, so a killed run
        keeps every finished epoch's points."""
        if not self.writers:
            return
        for at, lr in self.rates:
            self.writers["train"].add_scalar("learning_rate", lr, at)
        self.rates.clear()
        row = {**row, "epoch": row["epoch"] + self.offset_epochs}
        for part, columns in (("train", TRAIN_COLUMNS), ("validation", VALIDATION_COLUMNS)):
            if part not in self.writers:
                continue
            for column, tag in columns.items():
                if isinstance(row.get(column), (int, float)):
                    self.writers[part].add_scalar(tag, row[column], step + self.offset_steps)
            self.writers[part].flush()

    def finish(self, run_dir: Path, step: int, settings: dict, metrics: dict) -> None:
        """The run's plots as images and its settings with its test scores as hparams; closes."""
        if not self.writers:
            return
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams

        writer = self.writers["train"]
        for name in IMAGES:
            if (run_dir / name).is_file():
                with Image.open(run_dir / name) as im:
                    writer.add_image(name.removesuffix(".png"), np.asarray(im.convert("RGB")), step,
                                     dataformats="HWC")
        scores = {f"test/{k.removeprefix('test_')}": metrics[k]
                  for k in ("test_accuracy", "test_loss", "test_f1", "test_map") if k in metrics}  # map: --multi-label
        for tag, value in scores.items():
            writer.add_scalar(tag, value, step)
        plain = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}
        for summary in hparams(plain, scores):
            writer.file_writer.add_summary(summary, step)
        self.close()

    def close(self) -> None:
        for writer in (self.writers or {}).values():
            writer.close()
        self.writers = None
