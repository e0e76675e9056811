"""Ctrl-C, SIGTERM and Slurm's SIGUSR1: a run stops at the end of a batch, records where, and says how
to continue; under Slurm, SIGUSR1 also requeues the job, as Lightning's SLURMEnvironment does."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from . import distributed
from .errors import RunInterrupted
from .runs import write_json

MARKER = "interrupted.json"
# Slurm's warning before it ends a job (`#SBATCH --signal=USR1@90`): stop, checkpoint, requeue
REQUEUE = getattr(signal, "SIGUSR1", None)
STOPS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, REQUEUE) if s is not None)
_held: list[int] = []  # a SIGUSR1 that came before the run's guard did (hold_requeue_signal)


def hold_requeue_signal() -> None:
    """From now on SIGUSR1 is held instead of ending the process (its default): a run still loading
    its data stops after its first batch, checkpointed, and one that has finished ignores it."""
    if REQUEUE is not None and threading.current_thread() is threading.main_thread():
        signal.signal(REQUEUE, lambda signum, frame: _held.append(signum))


class InterruptGuard:
    """While active, a first SIGINT, SIGTERM or SIGUSR1 (or a SIGUSR1 held before) only sets
    ``signum`` (the loop stops at the end of the batch); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOPS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if _held:
                self.signum = _held.pop()
                _held.clear()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def slurm_job() -> str | None:
    """This Slurm job's id as `scontrol requeue` takes it (an array task's as ARRAYJOB_TASK), when
    it runs under Slurm and scontrol is on the PATH; else None."""
    job = os.environ.get("SLURM_JOB_ID", "")
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        job = f"{array}_{task}"
    return job if re.fullmatch(r"[0-9]+(_[0-9]+)?", job) and shutil.which("scontrol") else None


def requeue(job: str) -> tuple[bool, str]:
    """`scontrol requeue JOB`: Slurm puts the job back in its queue, to run the same command again.
    Whether it did, and what happened as part of a sentence."""
    try:
        done = subprocess.run([shutil.which("scontrol") or "scontrol", "requeue", job], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`scontrol requeue {job}` could not run ({type(exc).__name__})"
    if done.returncode:
        said = " ".join((done.stderr or done.stdout).split())[:200]
        return False, f"`scontrol requeue {job}` failed (exit {done.returncode}{': ' + said if said else ''})"
    return True, f"Slurm job {job} is requeued (its command, with --resume-if-exists, continues the run)"


@contextmanager
def guarded_run(run_dir: Path, log: Callable[[str], None], checkpoints: bool = True) -> Iterator[InterruptGuard]:
    """The part of a run that a signal stops at the end of a batch: a bare ``RunInterrupted`` from
    inside is raised again saying how to continue (from the last epoch's checkpoint, or, for
    a run without ``checkpoints``, from its start), with ``interrupted.json`` marking where and which
    epoch's checkpoint stands; after SIGUSR1 under Slurm, rank 0 requeues the job first. A signal
    that came after the last batch let the run finish: that is said when the block ends."""
    with InterruptGuard() as guard:
        try:
            yield guard
        except RunInterrupted as stop:
            saved = stop.epoch - 1 if checkpoints and stop.epoch > 1 else None
            job = slurm_job() if stop.signum == REQUEUE and distributed.is_main() else None
            marker = {"signal": stop.signum, "epoch": stop.epoch, "batch": stop.batch, "batches": stop.batches,
                      "checkpoint_epoch": saved}
            if distributed.is_main():  # first: Slurm ends a job it requeues at once
                write_json(run_dir / MARKER, marker)
            requeued, said = requeue(job) if job else (False, "")
            if job:
                write_json(run_dir / MARKER, {**marker, "slurm_job": job, "requeued": requeued})
            where = f"epoch {stop.epoch}" if stop.epoch else "feature extraction"
            kept = (f"epoch {saved}'s checkpoint is saved; " if saved else
                    "no epoch had finished; " if checkpoints and stop.epoch else "")
            restart = "" if checkpoints else (" (a transfer run restarts from its first epoch, with the same "
                                              "result; its cached features make the frozen phase take seconds)")
            then = f"{said}, or continue with" if requeued else f"{said}; continue with" if said else "continue with"
            message = (f"{signal.Signals(stop.signum).name} during {where} (batch {stop.batch}/{stop.batches}); "
                       f"{kept}{then}: cnnlab resume {run_dir}{restart}")
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
