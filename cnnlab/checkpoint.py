"""Checkpoints: everything needed to continue a run after an epoch exactly as if it had never
stopped, and what to say when saved weights do not fit a model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import __version__, distributed
from .errors import CnnlabError
from .runs import load_torch

if TYPE_CHECKING:  # evaluate and predict load weights through here without the training loop's modules
    from .early_stopping import EarlyStopping


DAMAGED = "checkpoint.pt is damaged ({}); delete it to restart the run from epoch 1"


def read_checkpoint(path: Path) -> dict:
    """A run's checkpoint.pt, or a one-line error when it is not one."""
    state = load_torch(path)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise CnnlabError(DAMAGED.format("not a checkpoint"))
    return state


def steps_done(state: dict) -> int:
    """Optimizer steps taken up to the checkpoint (0 where a damaged one does not say: ``restore``
    then names the damage)."""
    schedule = state.get("scheduler")
    steps = schedule.get("last_epoch") if isinstance(schedule, dict) else None
    return steps if isinstance(steps, int) else 0


def checkpoint_state(epoch: int, model: nn.Module, opt, sched, stopper: EarlyStopping, generator: torch.Generator,
                     history: list[dict], device: torch.device, lookahead=None) -> dict:
    """The state after ``epoch``: weights, optimizer, schedule, early stopping, random-number
    states and history, the Lookahead average (``optimizer.Lookahead``) where there is one, and
    the cnnlab version, device type and number of ranks that wrote it."""
    extra = {} if lookahead is None else {"lookahead": lookahead.state_dict()}
    return {**extra, "epoch": epoch, "model": model.state_dict(), "optimizer": portable(opt.state_dict()),
            "scheduler": sched.state_dict(), "stopper": stopper.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history, "cnnlab": __version__, "device": device.type,
            "world_size": distributed.world_size()}


def portable(opt_state: dict) -> dict:
    """An optimizer's state with plain-number learning rates (``step.graph_ready`` made them GPU
    tensors), so that a checkpoint written on a GPU resumes anywhere."""
    groups = [{**group, "lr": float(group["lr"])} for group in opt_state["param_groups"]]
    return {**opt_state, "param_groups": groups}


def restore(state: dict, model: nn.Module, opt, sched, stopper: EarlyStopping,
            generator: torch.Generator, lookahead=None) -> tuple[int, list[dict]]:
    """Loads ``checkpoint_state``'s result into the run's objects; returns the epoch to start
    from and the history so far."""
    load_weights_into(model, state.get("model"), "the checkpoint", "this run's model",
                      "delete checkpoint.pt to restart the run from epoch 1")
    try:
        flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for group, kept in zip(opt.param_groups, flags):  # how to step is this machine's choice, not the file's
            group.update(kept)
        sched.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["stopper"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        return int(state["epoch"]) + 1, list(state["history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CnnlabError(DAMAGED.format(f"{type(exc).__name__}: {str(exc)[:80]}")) from None


def key_mismatch(expected: dict, found, optional: str | None = None) -> str | None:
    """None when the state dict ``found`` fits ``expected``, else 'missing keys: ...; unexpected
    keys: ...; other shapes: ...'. Keys that start with ``optional`` may be missing."""
    weights = found if isinstance(found, dict) else {}
    have = set(weights)
    want = set(expected)
    missing = sorted(k for k in want - have if not (optional and k.startswith(optional)))
    unexpected = sorted(have - want)
    shapes = [k for k in sorted(have & want)
              if tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    return (f"missing keys: {', '.join(missing[:4]) or 'none'}; unexpected keys: {', '.join(unexpected[:4]) or 'none'}"
            + (f"; other shapes: {', '.join(shapes[:4])}" if shapes else ""))


def load_weights_into(model: nn.Module, state, what: str, target: str, fix: str, optional: str | None = None) -> None:
    """``model.load_state_dict(state)``, or a one-line error: '``what`` does not fit ``target``
    (which keys); ``fix``'. Keys that start with ``optional`` may be missing from ``state``."""
    problem = key_mismatch(model.state_dict(), state, optional)
    if problem is None:
        try:
            model.load_state_dict(state, strict=optional is None)
            return
        except (RuntimeError, TypeError, AttributeError) as exc:
            problem = str(exc).strip().splitlines()[0][:200]
    raise CnnlabError(f"{what} does not fit {target} ({problem}); {fix}")
