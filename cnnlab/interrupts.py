"""Ctrl-C and SIGTERM: a run stops at the end of a batch, records where, and says how to continue."""
from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from . import distributed
from .errors import RunInterrupted
from .runs import write_json

MARKER = "interrupted.json"


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


@contextmanager
def guarded_run(run_dir: Path, log: Callable[[str], None], checkpoints: bool = True) -> Iterator[InterruptGuard]:
    """The part of a run that a signal stops at the end of a batch: a bare ``RunInterrupted`` from
    inside is raised again saying how to continue (from the last epoch's checkpoint, or, for
    a run without ``checkpoints``, from its start), with ``interrupted.json`` marking where. A
    signal that came after the last batch let the run finish: that is said when the block ends."""
    with InterruptGuard() as guard:
        try:
            yield guard
        except RunInterrupted as stop:
            if distributed.is_main():
                write_json(run_dir / MARKER, {"signal": stop.signum, "epoch": stop.epoch, "batch": stop.batch,
                                              "batches": stop.batches})
            where = f"epoch {stop.epoch}" if stop.epoch else "feature extraction"
            saved = (f"epoch {stop.epoch - 1}'s checkpoint is saved; " if checkpoints and stop.epoch else "")
            restart = "" if checkpoints else (" (a transfer run restarts from its first epoch, with the same "
                                              "result; its cached features make the frozen phase take seconds)")
            message = (f"{signal.Signals(stop.signum).name} during {where} (batch {stop.batch}/{stop.batches}); "
                       f"{saved}continue with: cnnlab resume {run_dir}{restart}")
            raise RunInterrupted(stop.signum, stop.epoch, stop.batch, stop.batches, message) from None
        if guard.signum is not None:  # the results were written (seconds) rather than lost
            log(f"signal {guard.signum} came after training ended: the run's results were written first")


def read_marker(run_dir: Path) -> dict | None:
    """Where the run was interrupted last (``guarded_run``'s record), if it was."""
    try:
        marker = json.loads((run_dir / MARKER).read_bytes())
    except (OSError, ValueError):  # none, or damaged: it only adds a line to what resume says
        return None
    return marker if isinstance(marker, dict) else None
