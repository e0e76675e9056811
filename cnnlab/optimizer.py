"""How weights move: the optimizer and its parameter groups, the learning-rate schedules, and
Lookahead (airbench's moving average of the weights, folded back into them every few steps)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def _norm_biases(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the batch-norm layers (with ``bn:noscale``, only their biases)."""
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False) if p.requires_grad]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over the parameters that train. With ``cfg.bias_lr_scale`` != 1 the
    batch-norm parameters form a second group whose learning rate is that many times larger and
    whose weight decay is as many times smaller, so that the decay per step stays the same
    (airbench: the biases move 64x faster, decay alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    scaled = {id(p) for p in _norm_biases(model)} if cfg.bias_lr_scale != 1 else set()
    groups = [{"params": [p for p in params if id(p) not in scaled]}]
    if scaled:
        s = cfg.bias_lr_scale
        groups.append({"params": [p for p in params if id(p) in scaled], "lr": cfg.lr * s,
                       "weight_decay": cfg.weight_decay / s})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # one pass over each tensor instead of ~10 (+5% a step for conv's 6.4 M-parameter dense layer)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` steps."""
    t = step / max(total, 1)
    if schedule == "onecycle":  # a triangle: 0.2 -> 1 over the first 20%, then down to 0
        return 0.2 + 0.8 * t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    if schedule == "triangle":  # airbench94's: 0.2 -> 1 over the first 23%, then down to 0.07
        return 0.2 + 0.8 * t / 0.23 if t < 0.23 else 1.0 - 0.93 * min(1.0, (t - 0.23) / 0.77)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


class Lookahead:
    """airbench's Lookahead: every ``EVERY`` steps the moving average of the weights (and the
    batch-norm statistics) takes a step towards them, ``ema += (1 - decay) * (w - ema)``, and the
    weights are then set to it; ``decay`` rises as ``0.95**5 * t**3`` with the fraction ``t`` of
    training done, so early steps are kept almost whole and late ones are averaged over many. After
    the last step the weights are the average (``finish``)."""
    EVERY = 5

    def __init__(self, model: nn.Module, total_steps: int):
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.tensors]
        self.total = max(1, total_steps)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step number ``step`` (from 1)."""
        if step % self.EVERY == 0:
            decay = 0.95 ** 5 * (min(step, self.total) / self.total) ** 3
            torch._foreach_lerp_(self.ema, self.tensors, 1 - decay)
            torch._foreach_copy_(self.tensors, self.ema)

    @torch.no_grad()
    def finish(self) -> None:
        """Sets the weights to the average."""
        torch._foreach_copy_(self.tensors, self.ema)

    def state_dict(self) -> list[torch.Tensor]:
        return [t.cpu() for t in self.ema]

    def load_state_dict(self, ema: list[torch.Tensor]) -> None:
        if len(ema) != len(self.ema) or any(a.shape != b.shape for a, b in zip(ema, self.ema)):
            raise ValueError("the checkpoint's Lookahead average does not fit this model")
        for mine, saved in zip(self.ema, ema):
            mine.copy_(saved)
