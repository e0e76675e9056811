"""Checkpoints: everything needed to continue a run after an epoch exactly as if it had never
stopped."""
from __future__ import annotations

from pathlib import Path

import torch

from . import distributed
from .errors import CnnlabError
from .run_state import RunState
from .runs import load_torch
from .version import __version__
from .weights import load_weights_into

DAMAGED = "checkpoint.pt is damaged ({}); delete it to restart the run from epoch 1"


def read_checkpoint(path: Path) -> dict:
    """A run's checkpoint.pt, or a one-line error when it is not one."""
    state = load_torch(path)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise CnnlabError(DAMAGED.format("not a checkpoint"))
    return state


def checkpoint_state(run: RunState, device: torch.device) -> dict:
    """The state after ``run.epoch``: weights, optimizer, schedule, early stopping, random-number
    states and history, the Lookahead average (``optimizer.Lookahead``) where there is one, and
    the cnnlab version, device type and number of ranks that wrote it."""
    extra = {} if run.lookahead is None else {"lookahead": run.lookahead.state_dict()}
    return {**extra, "epoch": run.epoch, "model": run.model.state_dict(),
            "optimizer": portable(run.optimizer.state_dict()), "scheduler": run.schedule.state_dict(), "stopper": run.early_stopping.state_dict(),
            "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(), "history": run.history,
            "cnnlab": __version__, "device": device.type, "world_size": distributed.world_size()}


def portable(opt_state: dict) -> dict:
    """An optimizer's state with plain-number learning rates (``step.graph_ready`` made them GPU
    tensors), so that a checkpoint written on a GPU resumes anywhere."""
    groups = [{**group, "lr": float(group["lr"])} for group in opt_state["param_groups"]]
    return {**opt_state, "param_groups": groups}


def restore(state: dict, run: RunState) -> None:
    """Loads ``checkpoint_state``'s result into ``run``: its objects, the epoch it finished and
    the history so far."""
    load_weights_into(run.model, state.get("model"), "the checkpoint", "this run's model",
                      "delete checkpoint.pt to restart the run from epoch 1")
    try:
        opt = run.optimizer
        flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for group, kept in zip(opt.param_groups, flags):  # how to step is this machine's choice, not the file's
            group.update(kept)
        run.schedule.load_state_dict(state["scheduler"])
        run.early_stopping.load_state_dict(state["stopper"])
        run.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if run.lookahead is not None:
            run.lookahead.load_state_dict(state["lookahead"])
        run.epoch, run.history = int(state["epoch"]), list(state["history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CnnlabError(DAMAGED.format(f"{type(exc).__name__}: {str(exc)[:80]}")) from None
