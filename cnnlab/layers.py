"""cnnlab's own layers: a cheaper dropout, airbench's whitening conv, a constant scale, and
``Net``, the ``nn.Sequential`` every preset builds, which runs batch norm -> ReLU -> 2x2 max-pool
as one fused step when training on CPU, and pools before the ReLU everywhere else.

The fused step is cnnlab's native kernel (``kernels.py``, float32 and bfloat16, channels_last)
where it is built, else, in float32, ``BNReLUPool2`` below, made of PyTorch operations; bfloat16
without the native kernel runs the stock layers.

Why the fusion: on a CPU the seed presets' step time goes mostly to memory-bound passes over
the first block's 128x32x32x32 activations (batch-norm forward and backward, ReLU backward, pooling
backward with its zero fill), not to the convolutions. ``BNReLUPool2`` computes the same function
with the pooling moved before the normalization and ReLU, which is exact: per channel, batch norm
is ``a*x + b`` and ReLU is monotone, so ``max(relu(a*x + b)) = relu(a*max(x) + b)`` for ``a >= 0``
(and ``min`` for ``a < 0``). The backward pass only has non-zero output gradients at the pooled
positions, so its two per-channel sums are taken over the pooled quarter of the tensor and the input
gradient is one dense pass plus a scatter. State-dict keys and results are those of the unfused
layers (equal to rounding; tested in float64).

The airbench presets' blocks, conv -> 2x2 max-pool -> batch norm -> GELU and conv -> batch norm ->
GELU, run as one native step each too where the kernels are built (``bn_gelu``): there the stock
layers' memory-bound passes (pooling with int64 indices and its backward's zero fill over the
unpooled gradient, batch norm, GELU, each forward and backward) are most of a step that is not a
convolution. Without the kernels they run as the stock layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import CnnlabError


class Scale(nn.Module):
    """Multiplies its input by a constant."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class GlobalAvgPool(nn.Module):
    """Global average pooling: (N, C, H, W) -> (N, C), a head whose width does not grow with the image."""

    def forward(self, x):
        return x.mean((2, 3))


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``, with a cheaper mask: one 64-bit draw from torch's
    generator gives four 16-bit uniforms, so ``p`` is applied in steps of 1/65536 (exact for
    0.25 and 0.5), and a forward and backward faster than ``nn.Dropout``'s on a CPU. Seeded runs
    stay repeatable: the draws come from the global generator.
    On a GPU it is ``F.dropout``."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise CnnlabError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":  # a GPU has one fused dropout kernel; the mask trick pays on CPUs only
            return F.dropout(x, self.p, training=True)
        return x * keep_mask(x, self.p).to(x.dtype).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean tensor shaped (and laid out) like ``x``, each value True with probability 1 - p."""
    n = x.numel()
    draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = draws.view(torch.int16)[:n] >= round(p * 65536) - 32768
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        b, c, h, w = x.shape
        return keep.view(b, h, w, c).permute(0, 3, 1, 2)
    return keep.view(x.shape)


class Whiten(nn.Conv2d):
    """A frozen 2x2 conv whose filters whiten image patches (set by ``init_whitening``)."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 2 * in_channels * 4, kernel_size=2, padding=0, bias=True)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)


class BNReLUPool2(torch.autograd.Function):
    """Training-mode ``BatchNorm2d -> ReLU -> MaxPool2d(2)`` in one step (see the module docstring).
    Updates ``running_mean``/``running_var`` in place, as ``nn.BatchNorm2d`` does."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        c = x.shape[1]
        mean, var = torch.ops.aten.batch_norm_update_stats(x, running_mean, running_var, momentum)
        invstd = torch.rsqrt(var + eps)
        a = weight * invstd
        b = bias - mean * a
        if bool((a < 0).any()):  # pool the channels with a negative scale by their minimum
            sign = torch.where(a < 0, -1.0, 1.0).to(x.dtype).view(1, c, 1, 1)
            pooled, index = F.max_pool2d_with_indices(x * sign, 2)
            pooled = pooled * sign
        else:
            pooled, index = F.max_pool2d_with_indices(x, 2)
        out = torch.addcmul(b.view(1, c, 1, 1), pooled, a.view(1, c, 1, 1)).relu_()
        ctx.save_for_backward(x, index, pooled, out, mean, invstd, a)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index, pooled, out, mean, invstd, a = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w
        grad_z = torch.ops.aten.threshold_backward(grad_out, out, 0)  # through the ReLU
        grad_bias = grad_z.sum((0, 2, 3))
        grad_weight = invstd * ((grad_z * pooled).sum((0, 2, 3)) - mean * grad_bias)
        # batch norm's input gradient a * (g - mean(g) - xhat * mean(g * xhat)), with g non-zero
        # only at the pooled positions: a dense part c2 + c3 * x, plus a * g scattered there
        c3 = -a * invstd * grad_weight / count
        c2 = -a * grad_bias / count - c3 * mean
        grad_x = torch.addcmul(c2.view(1, c, 1, 1), x, c3.view(1, c, 1, 1))
        src = grad_z * a.view(1, c, 1, 1)
        if grad_x.is_contiguous(memory_format=torch.channels_last) and index.is_contiguous(
                memory_format=torch.channels_last) and src.is_contiguous(memory_format=torch.channels_last):
            def rows(t):  # (n, h*w, c) views: the scatter then walks memory in order
                return t.permute(0, 2, 3, 1).reshape(n, -1, c)
            rows(grad_x).scatter_add_(1, rows(index), rows(src))
        else:
            grad_x.flatten(2).scatter_add_(2, index.flatten(2), src.flatten(2))
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _is_pool2(layer: nn.Module) -> bool:
    return (type(layer) is nn.MaxPool2d and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2))
            and layer.padding in (0, (0, 0)) and layer.dilation in (1, (1, 1)) and not layer.ceil_mode
            and not layer.return_indices)


def _fusable(layers: list[nn.Module], i: int, x: torch.Tensor) -> bool:
    """Whether layers[i:i+3] are BatchNorm2d (training, affine, tracked), ReLU, MaxPool2d(2) and
    ``x`` is a CPU batch that needs gradients, in float32 or in a form the native kernels take."""
    if i + 2 >= len(layers):
        return False
    bn, relu, pool = layers[i:i + 3]
    return (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            and isinstance(relu, nn.ReLU) and _is_pool2(pool)
            and x.device.type == "cpu" and x.dim() == 4
            and x.requires_grad and torch.is_grad_enabled()
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and (x.dtype == torch.float32 or kernels.supports(x, bn)))


def _step_momentum(bn: nn.BatchNorm2d) -> float:
    """Counts one more training batch for ``bn`` and returns the weight its running statistics
    give this batch, as ``nn.BatchNorm2d`` does (a cumulative average when its momentum is None)."""
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def bn_relu_pool(x: torch.Tensor, bn: nn.BatchNorm2d, dropout: float = 0.0) -> torch.Tensor:
    """``MaxPool2d(2)(relu(bn(x)))`` for a training-mode ``bn``, fused (updates its statistics):
    by the native kernels where they take ``x``, else (float32) by ``BNReLUPool2``. ``dropout``
    (native kernels only) also applies a dropout of that rate to the result."""
    args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, _step_momentum(bn), bn.eps)
    if kernels.supports(x, bn):
        return kernels.BNReLUPool2Native.apply(*args, dropout)
    if dropout:
        raise ValueError("bn_relu_pool: dropout is fused by the native kernels only")
    return BNReLUPool2.apply(*args)


def _fused_dropout(layers: list[nn.Module], i: int, x: torch.Tensor) -> float:
    """The rate of a training-mode ``Dropout`` at layers[i] that the native kernel can apply
    along with the block before it (0 when there is none)."""
    if i < len(layers) and type(layers[i]) is Dropout and layers[i].training and layers[i].p > 0:
        return layers[i].p if kernels.supports(x, layers[i - 3]) else 0.0
    return 0.0


def _bn_gelu_span(layers: list[nn.Module], i: int, x: torch.Tensor) -> int:
    """How many layers from layers[i] the native (2x2 max-pool ->) batch norm -> GELU kernel runs
    as one step for ``x`` (3 with the pooling, 2 without, 0 when it cannot)."""
    pool = i < len(layers) and _is_pool2(layers[i])
    j = i + pool
    if j + 1 >= len(layers):
        return 0
    bn, gelu = layers[j:j + 2]
    fits = (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            and type(gelu) is nn.GELU and gelu.approximate == "none"
            and x.requires_grad and torch.is_grad_enabled() and kernels.supports(x, bn)
            and (not pool or x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2) > 1))
    return 2 + pool if fits else 0


def bn_gelu(x: torch.Tensor, bn: nn.BatchNorm2d, pool: bool = False) -> torch.Tensor:
    """``gelu(bn(x))``, after ``MaxPool2d(2)`` when ``pool``, for a training-mode ``bn``, by the
    native kernels (``kernels.supports(x, bn)`` must hold); updates its statistics."""
    return kernels.BNGELUNative.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, _step_momentum(bn),
                                      bn.eps, pool)


def _relu_then_pool(layers: list[nn.Module], i: int) -> bool:
    """Whether layers[i:i+2] are a ReLU and a max-pool, which may swap: ReLU is monotone, so
    ``maxpool(relu(x)) == relu(maxpool(x))`` bit for bit, gradients included, and the ReLU then
    runs (forward and backward) on a quarter of the values."""
    return i + 1 < len(layers) and isinstance(layers[i], nn.ReLU) and type(layers[i + 1]) is nn.MaxPool2d


class Net(nn.Sequential):
    """An ``nn.Sequential`` (same layers, same state-dict keys) whose forward fuses each
    batch norm -> ReLU -> 2x2 max-pool run when training on CPU (see ``bn_relu_pool``) and each
    (2x2 max-pool ->) batch norm -> GELU run where the native kernels take it (see ``bn_gelu``),
    and elsewhere pools before the ReLU (see ``_relu_then_pool``)."""

    def forward(self, x):
        layers = list(self)
        conv = next((layer for layer in layers if isinstance(layer, nn.Conv2d)), None)
        if conv is not None and x.dim() == 4:  # batches come channels_last; follow the weights
            weights_last = conv.weight.is_contiguous(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last if weights_last else torch.contiguous_format)
        i = 0
        while i < len(layers):
            if _fusable(layers, i, x):
                p = _fused_dropout(layers, i + 3, x)
                x = bn_relu_pool(x, layers[i], p)
                i += 4 if p else 3
            elif span := _bn_gelu_span(layers, i, x):
                x = bn_gelu(x, layers[i + span - 2], pool=span == 3)
                i += span
            elif _relu_then_pool(layers, i):
                x = layers[i](layers[i + 1](x))
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x
