"""How weights move: the optimizer and its parameter groups, the learning-rate schedules, and
Lookahead (airbench's moving average of the weights, folded back into them every few steps)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig
from .layers import Whiten


def _scaled_biases(model: nn.Module, whitening: bool) -> list[nn.Parameter]:
    """The trainable parameters of the batch-norm layers (with ``bn:noscale``, only their biases),
    and with ``whitening`` the whitening layer's bias."""
    norms = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False) if p.requires_grad]
    return norms + ([m.bias for m in model.modules() if isinstance(m, Whiten) and m.bias.requires_grad]
                    if whitening else [])


def _output_layer(model: nn.Module) -> list[nn.Parameter]:
    """The output layer's trainable parameters (the last ``nn.Linear``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [p for p in linears[-1].parameters() if p.requires_grad] if linears else []


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The parameters that train, in groups: the rest first, then with ``cfg.bias_lr_scale`` != 1
    the biases of batch norm (and with ``cfg.whiten_bias_scaled`` the whitening layer's), with ``cfg.head_lr_scale``
    != 1 the output layer, each at ``lr`` times its scale with its weight decay divided by it (the
    decay per step stays the same; airbench's biases move 64x faster, decay alike). With
    ``cfg.optimizer == "muon"`` the conv filters come first, in a group marked ``orthogonal``
    (see ``Muon``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    special = {}
    if cfg.bias_lr_scale != 1:
        special.update({id(p): cfg.bias_lr_scale for p in _scaled_biases(model, cfg.whiten_bias_scaled)})
    if cfg.head_lr_scale != 1:
        special.update({id(p): cfg.head_lr_scale for p in _output_layer(model)})
    filters = {id(p) for p in params if p.dim() == 4} if cfg.optimizer == "muon" else set()
    groups = [{"params": [p for p in params if id(p) in filters], "orthogonal": True, "weight_decay": 0.0}] \
        if filters else []
    groups.append({"params": [p for p in params if id(p) not in special and id(p) not in filters]})
    for scale in sorted(set(special.values())):
        groups.append({"params": [p for p in params if special.get(id(p)) == scale and id(p) not in filters],
                       "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay / scale})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig, dtype: torch.dtype | None) -> torch.optim.Optimizer:
    """The run's optimizer over the parameters that train (``param_groups``); ``dtype`` is the
    run's compute dtype (``runtime.compute_dtype``), which Muon's matrix products take too."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    dtype=dtype or torch.float32)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one pass over each tensor instead of about ten (it shows on conv's large dense layer)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """About ``U V^T`` for ``g = U S V^T`` (2-D), by airbench's quintic Newton-Schulz iteration in
    ``dtype`` (airbench's bfloat16): its coefficients maximise the slope at zero, so 3 steps bring
    every singular value to roughly 0.5-1.5, which trains as well as exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # the top singular value at most 1
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """airbench94_muon's optimizer. Groups marked ``orthogonal`` (the conv filters) take Muon steps:
    Nesterov momentum (``buf = MOMENTUM * buf + g``), each filter bank rescaled to norm
    sqrt(out_channels), then a step of ``lr`` along the orthogonalized momentum (scale-free, so a
    summed or averaged loss is alike). Every other group takes SGD-Nesterov steps with momentum
    ``momentum`` and L2 ``weight_decay``, as ``torch.optim.SGD`` does. ``dtype``: the
    orthogonalization's, airbench's bfloat16 by default; float32 where bfloat16 would be emulated
    (emulated, its matrix products cost more than the step's convolutions)."""
    MOMENTUM = 0.6  # airbench94_muon's momentum for the filters (its SGD groups use 0.85)

    def __init__(self, params, lr: float, momentum: float = 0.85, weight_decay: float = 0.0,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "orthogonal": False})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.MOMENTUM if group["orthogonal"] else group["momentum"]
                g = p.grad if group["orthogonal"] or not group["weight_decay"] else \
                    p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                g = g.add(state["momentum_buffer"], alpha=momentum)  # Nesterov
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    g = orthogonalize(g.reshape(len(g), -1), dtype=self.dtype).view(g.shape)
                p.sub_(g * lr)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` steps."""
    t = step / max(total, 1)
    if schedule == "onecycle":  # a triangle: 0.2 -> 1 over the first 20%, then down to 0
        return 0.2 + 0.8 * t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8)
    if schedule == "triangle":  # airbench94's: 0.2 -> 1 over the first 23%, then down to 0.07
        return 0.2 + 0.8 * t / 0.23 if t < 0.23 else 1.0 - 0.93 * min(1.0, (t - 0.23) / 0.77)
    if schedule == "linear":  # airbench94_muon's: straight down from 1 to 0
        return max(0.0, 1.0 - t)
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
