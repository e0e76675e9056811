"""One run on many processes, the way torchrun runs it: the process group from torchrun's
environment (gloo on CPUs, NCCL on GPUs, one GPU per rank), each rank's share of every batch,
models wrapped in DistributedDataParallel, metrics made from every rank's data, and rank 0 as
the one that writes. Without torchrun (no ``WORLD_SIZE`` > 1) every function here is the
single-process identity, so a plain run is unchanged.

How a global batch is shared: every rank draws the same order and augmentation from the same
seeded generator and takes its contiguous part of each batch (``shard``); its loss is weighted by
its part's size (``loss_weight``), so DDP's average of the ranks' gradients is the gradient of the
whole batch's mean loss, as on one process.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import CnnlabError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # a rank waits this long for the others (rank 0 decoding a large image folder)
FREE_WAIT_S = 0.05  # GIL-free pause before leaving the group: see close()


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun), before any set-up."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes the run directory and prints (rank 0, or the only process)."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Joins torchrun's process group once (gloo for a CPU, NCCL for CUDA) and returns the
    device this rank computes on: its own GPU, ``cuda:LOCAL_RANK``, on CUDA. Without torchrun
    it returns ``device`` as it is."""
    if not launched():
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= count:
            raise CnnlabError(f"rank {launch_rank()} wants GPU {local}, but this machine has {count}; start "
                              f"at most {count} processes per node (torchrun --nproc-per-node {count})")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def close(wait_for_peers: bool = False) -> None:
    """Leaves the process group at the end of a command; ``wait_for_peers`` (the command succeeded)
    first meets the other ranks at a barrier, so none tears down while the others still talk."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers and active():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is already gone: there is no one left to wait for
            pass
    # gloo's worker threads free a collective's tensors after the call returned, and freeing one
    # that Python dropped takes the GIL; a worker still waiting for it when the interpreter
    # finalizes aborts the process ("terminate called without an active exception"). Sleeping
    # releases the GIL to them (the barrier above does too, while it waits).
    time.sleep(FREE_WAIT_S)
    dist.destroy_process_group()


def describe(batch_size: int) -> dict:
    """What a run's config.json records of its ranks."""
    size = world_size()
    return {"world_size": size, "backend": dist.get_backend() if active() else "none",
            "batch_per_rank": -(-batch_size // size)}


def check_batch(batch_size: int) -> None:
    """A one-line error when the global batch cannot give every rank at least one image."""
    if batch_size < world_size():
        raise CnnlabError(f"--batch-size {batch_size} is smaller than the {world_size()} ranks; --batch-size is "
                          "the global batch, shared by all ranks: use at least one image per rank")


# ---------------------------------------------------------------- sharing the work

def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of ``t`` along its first dimension (all of it on one process)."""
    return t.tensor_split(world_size())[rank()] if active() else t


def shard_range(n: int) -> tuple[int, int]:
    """(start, stop) of this rank's part of ``n`` rows, as ``shard`` cuts them."""
    if not active():
        return 0, n
    sizes = [len(p) for p in torch.arange(n).tensor_split(world_size())]
    start = sum(sizes[:rank()])
    return start, start + sizes[rank()]


def loss_weight(local: int, total: int) -> float:
    """The factor on a rank's mean loss over ``local`` of a batch's ``total`` images that makes
    DDP's gradient average the batch's mean (exactly 1 on one process and with equal parts)."""
    return local * world_size() / total if active() else 1.0


def gather_rows(part: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``shard_range`` part of ``total`` rows, concatenated in rank order, on every rank
    (``part`` itself on one process). Parts travel on the backend's device: the CPU for gloo."""
    if not active():
        return part
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [len(p) for p in torch.arange(total).tensor_split(world_size())]
    dtype = part.dtype
    wire = part.to(device, torch.float32 if dtype == torch.float16 else dtype)  # gloo has no float16 all-gather
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=wire.dtype, device=device)
    padded[:len(part)] = wire
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(part.device, dtype)


def reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` summed (or their maximum, ``op="max"``) over the ranks, in place."""
    if active():
        dist.all_reduce(values, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def barrier() -> None:
    if active():
        dist.barrier()


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


RANK0_FAILED = "rank 0 failed; its output says why"


def _on_rank0(fn: Callable[[], T], failed) -> tuple[T | None, str | None]:
    """(``fn()``, None) or (None, its one-line error), on rank 0; on any other failure the other
    ranks are sent ``failed`` (so none waits forever) and it is raised."""
    try:
        return fn(), None
    except CnnlabError as exc:
        return None, str(exc)
    except BaseException:
        _broadcast(failed)
        raise


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result (or its one-line error) handed to every rank:
    making the run directory, say."""
    if not active():
        return fn()
    result, error = _broadcast(_on_rank0(fn, (None, RANK0_FAILED)) if is_main() else None)
    if error is not None:
        raise CnnlabError(error)
    return result


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, rank 0 first and the others after it succeeded: rank 0 fills a
    cache (decoded images, compiled kernels) that the others then read instead of building."""
    if not active():
        return fn()
    result, error = _on_rank0(fn, RANK0_FAILED) if is_main() else (None, None)
    error = _broadcast(error)
    if error is not None:
        raise CnnlabError(error)
    return result if is_main() else fn()


def stop_flags(signum: int | None, first_nonfinite: torch.Tensor) -> tuple[int, int]:
    """(signal number or 0, first non-finite batch or -1), the largest over the ranks: a signal
    or a divergence seen by any rank stops every rank after the same batch."""
    flags = torch.stack([torch.tensor(signum or 0, device=first_nonfinite.device), first_nonfinite.long()])
    signal, nonfinite = reduce(flags, "max").tolist()
    return int(signal), int(nonfinite)


# ---------------------------------------------------------------- models

def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (its gradients averaged over the ranks in backward);
    ``model`` itself on one process or when nothing in it trains."""
    if not active() or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def vary_random_streams(seed: int) -> None:
    """Gives each rank its own stream of torch's default generator (dropout masks), after the
    model was built identically everywhere."""
    if active() and rank() > 0:
        torch.manual_seed(seed * 1000 + rank())


def sync_batch_norm(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` with every BatchNorm2d normalising over the whole global batch instead of each
    rank's part (``--sync-bn``), and how many it converted: PyTorch's SyncBatchNorm on GPUs,
    ``SyncBatchNorm2d`` (below) on CPUs, where PyTorch's does not run."""
    count = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    if not active() or not count:
        return model, 0
    if next(model.parameters()).device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), count
    return _convert_cpu(model), count


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        converted = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        for mine, theirs in zip(converted.parameters(), module.parameters()):  # bn:noscale's fixed scale
            mine.requires_grad_(theirs.requires_grad)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics (and their gradients) are summed over all ranks
    with all-reduce; in eval mode, or on one process, plain BatchNorm2d."""

    def forward(self, x):
        if not (self.training and active()):
            return super().forward(x)
        y, mean, var, count = _SyncBN.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * (count / (count - 1).clamp_min(1)), m)
        return y


class _SyncBN(torch.autograd.Function):
    """Batch norm over the global batch: sums and sums of squares (float64 across the wire) are
    all-reduced forward, the two sums of the backward likewise; the weight and bias gradients stay
    per rank, for DDP to average as it does every other gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        xf = x.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64)
        stats = torch.cat([xf.sum((0, 2, 3)).double(), (xf * xf).sum((0, 2, 3)).double(), count.to(x.device)])
        reduce(stats)
        c = x.shape[1]
        n = float(stats[-1])
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        mean, var = mean.float(), var.float()
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n = n
        ctx.dtype = x.dtype
        y = xhat * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)
        count = stats[-1:].float()
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _mean, _var, _n):
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[1]
        g = grad_y.float()
        local = torch.cat([g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))])
        grad_bias, grad_weight = local[:c].clone(), local[c:].clone()
        total = reduce(local.double()).float()
        mean_g, mean_gx = total[:c] / ctx.n, total[c:] / ctx.n
        grad_x = (weight * invstd).view(1, c, 1, 1) * (g - mean_g.view(1, c, 1, 1) - xhat * mean_gx.view(1, c, 1, 1))
        return grad_x.to(ctx.dtype), grad_weight, grad_bias, None
