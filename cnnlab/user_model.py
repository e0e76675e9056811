"""Your own ``torch.nn.Module`` as a run's model: checked against the data, saved with the run as
torch.save saves a module (its class by import path, its layers and settings by value), and loaded
back, which needs that class importable: a class defined in a notebook or script exists only there."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import CnnlabError

FILE = "module.pt"  # in the run directory, beside model.pt (the trained weights)


def class_path(module: nn.Module) -> str:
    """Where ``module``'s class is imported from, as ``package.module.Class``."""
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def checked(module: nn.Module, classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """``module`` when it maps a batch of ``input_shape`` images to ``classes`` scores each, else a
    one-line error (checked on two blank images in evaluation mode: no statistics change)."""
    if not isinstance(module, nn.Module):
        raise CnnlabError(f"model must be a preset's name or a torch.nn.Module (got {type(module).__name__}); "
                          "see `cnnlab presets`")
    was_training = module.training
    param = next(module.parameters(), None)
    blank = torch.zeros(2, *input_shape, device=param.device if param is not None else "cpu")
    try:
        with torch.no_grad():
            out = module.eval()(blank)
    except Exception as exc:  # whatever the user's forward raises, said in one line
        raise CnnlabError(f"your model {class_path(module)} failed on a batch of 2 x {' x '.join(map(str, input_shape))} "
                          f"images ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it must "
                          "take N x 3 x H x W at the run's image size") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CnnlabError(f"your model {class_path(module)} returns {got} for 2 images; the data has {classes} "
                          f"classes, so it must return 2 x {classes} scores (logits)")
    return module


def save(module: nn.Module, run_dir: Path) -> None:
    """``module`` into the run directory, to be rebuilt by ``load``."""
    try:
        torch.save(module, run_dir / FILE)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise CnnlabError(f"your model {class_path(module)} cannot be saved with the run ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); define its class at the top level of a module, without "
                          "lambdas among its attributes") from None


def load(run_dir: Path, name: str) -> nn.Module:
    """The module a run saved (its weights as they were at the start: model.pt or a checkpoint
    holds the trained ones), or a one-line error saying how to make its class importable."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise CnnlabError(f"{path} is missing: the run trained your own model {name}; restore the file, or pass "
                          "the model: cnnlab.load(run, model=...)")
    try:
        # a whole module unpickled, as torch.save wrote it: only from a run folder the user named
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CnnlabError(f"this run trained your own model {name}, whose class cannot be imported here "
                          f"({type(exc).__name__}); import the module that defines it first (a class defined in a "
                          "notebook or script exists only there), or pass a fresh one: cnnlab.load(run, model=...)"
                          ) from None
