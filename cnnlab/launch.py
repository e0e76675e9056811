"""How the ``cnnlab`` process runs among others: the relaunch of a command on N processes through
torchrun, which rank speaks, and the rank-aware end of a failed command. Nothing here imports torch
before a command needs it."""
from __future__ import annotations

import os
import sys
import time
import warnings

from .text import shown

# torchrun's rank, read before torch loads: only rank 0 (or a plain process) prints
MAIN_RANK = os.environ.get("RANK", "0") == "0"
# how long another rank that fails waits before it exits, so that rank 0 says why first: torchrun
# SIGTERMs every rank once one has exited, and rank 0 may not have reached its line yet
REPORT_WAIT_S = 3.0
# what a collective's error says when a peer rank is gone, as gloo and NCCL word it
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL error")
# the signals torchrun passes on to its ranks (its --signals-to-handle): its own four, and Slurm's
# warning before a job's end (`--signal=USR1@90`), which it would otherwise die of
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun(nproc: int, argv: list[str]) -> int:
    """``argv`` (without --nproc) again on ``nproc`` processes, through torchrun's own launcher;
    the exit code is the first failed rank's."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    import logging  # the ranks say what went wrong; torchrun's own summary of it would repeat it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "--signals-to-handle", FORWARDED_SIGNALS,
                        "-m", "cnnlab", *without_nproc(argv)]))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    except SignalException as exc:  # passed on to every rank, which stopped after the same batch and said so
        return 128 + int(exc.sigval)
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` and ``--nproc=N``: what each rank runs."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    return rest


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def say(message: str) -> None:
    """A line of progress on stdout, from rank 0 alone."""
    if MAIN_RANK:
        print(message, flush=True)


def error(line: str) -> None:
    """A failed command's one line on stderr, from rank 0 alone (a user's name in it shown escaped,
    so that it stays one harmless line); the other ranks wait for it."""
    if MAIN_RANK:
        print(shown(line), file=sys.stderr)
    leave_the_report_to_rank0()


def leave_the_report_to_rank0() -> None:
    """On a rank other than 0, waits before a failure's exit: the ranks fail alike (same arguments,
    same data), and rank 0 alone says why."""
    if not MAIN_RANK:
        try:
            time.sleep(REPORT_WAIT_S)
        except KeyboardInterrupt:  # a second Ctrl-C: exit now, still without a traceback
            pass


def peer_lost(exc: RuntimeError) -> str | None:
    """What a collective's error says when a peer rank is gone (under torchrun: another rank was
    killed or ran out of memory), as gloo and NCCL word it; None for any other error."""
    if not under_torchrun():
        return None
    text = str(exc)
    return next((s for s in PEER_LOST if s in text), None)


def _warning(message, category, filename, lineno, file=None, line=None):
    return f"cnnlab: warning: {message}\n"


def quiet_warnings() -> None:
    """Warnings as one ``cnnlab: warning:`` line each, said by rank 0 alone."""
    warnings.formatwarning = _warning
    if not MAIN_RANK:
        warnings.simplefilter("ignore")  # rank 0 says it once


def close(succeeded: bool) -> None:
    """Leaves the process group, if a command joined one (waiting for the peers after a success)."""
    if "torch" in sys.modules:
        from .distributed import close as close_group
        close_group(wait_for_peers=succeeded)
