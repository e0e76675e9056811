"""Where and how a process computes: the device, CPU threads, precision and autocast, memory
layout, the malloc setting, and the environment record each run keeps. Process-wide settings are
made here and nowhere else."""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from datetime import datetime, timezone
from typing import Callable

import torch

from . import distributed
from .errors import CnnlabError
from .version import __version__


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` (``CNNLAB_NATIVE``, ``CNNLAB_ONNXRUNTIME``) is
    0, switching that optional speed-up off."""
    return os.environ.get(variable, "1") == "0"


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed blocks of up to 256 MB for reuse instead of handing them
    back to the kernel. PyTorch's CPU tensors come straight from malloc, and by default each
    step's large activation buffers (16 MB for the seed presets' first block at batch 128) are
    mapped afresh and page-faulted in, thousands of page faults a step: a noticeable share of a
    step's time on a CPU. Process-wide, so the command line calls it once at start; a no-op
    (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mapped = libc.mallopt(m_mmap_threshold, 256 << 20) or libc.mallopt(m_mmap_threshold, 32 << 20)  # older glibc caps it
        return bool(mapped) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else the CPU. On CUDA, cuDNN picks the fastest
    convolution for each input shape it meets (a run's shapes repeat every step)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CnnlabError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
        if (device.index or 0) >= count:
            raise CnnlabError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        raise CnnlabError(f"--device {name} is not supported; use cpu, cuda or cuda:N")
    return device


def setup(device: str = "auto", threads: int | None = None) -> torch.device:
    """The device a run computes on (``pick_device``; under torchrun this rank's GPU, its process
    group joined: distributed.init), with PyTorch's CPU threads set to ``threads`` when given
    (else PyTorch's default: one per core, or torchrun's OMP_NUM_THREADS)."""
    picked = distributed.init(pick_device(device))
    if threads:
        torch.set_num_threads(threads)
    return picked


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. A CPU -> CUDA copy goes through pinned memory without blocking: a plain
    ``.to("cuda")`` waits for the GPU to finish its queue, so a training step that made one would
    stop the host from queuing the next step's kernels while the GPU runs this one."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, not by emulation: an Ampere or newer GPU, or
    a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older PyTorch: no emulation to tell apart
            return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype that convolutions and matrix products run in (autocast; weights, optimizer and
    loss stay float32), or None for float32 throughout. ``auto``: bfloat16 where ``device``
    computes it natively (oneDNN's bfloat16 convolutions and matrix products beat float32 there:
    BENCHMARKS.md), float32 where it would only be emulated."""
    if precision == "fp32":
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` (from ``compute_dtype``) on ``device``; off for None. ``cache=False``
    inside a CUDA graph (and a training forward uses each weight once anyway)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          cache_enabled=cache)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a run keeps its weights in; ``Net`` lays its input out to match."""
    return torch.channels_last if channels_last else torch.contiguous_format


def environment(device: torch.device, precision: str = "auto",
                kernel_status: Callable[[], str] | None = None) -> dict:
    """Where a run ran: versions, device, threads, the dtype its precision setting gave here and,
    on a CPU, whether cnnlab's native kernels were in use: ``kernel_status()`` (the caller passes
    ``kernels.status``, which builds them here on first use; asked on a CPU only)."""
    dtype = compute_dtype(precision, device)
    cpu = device.type == "cpu"
    kernels = (kernel_status() if kernel_status is not None else "not checked") if cpu else "not used on GPUs"
    return {"cnnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device) if cpu else torch.cuda.get_device_name(device),
            "compute_dtype": str(dtype or torch.float32).removeprefix("torch."),
            "native_kernels": kernels,
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
