"""Native CPU kernels (``kernels.cpp``), each a training-mode block in one step, for channels_last
float32 and bfloat16 batches: batch norm -> ReLU -> 2x2 max-pool, and the dropout after it when
there is one (the seed presets' block); 2x2 max-pool -> batch norm -> GELU, and batch norm -> GELU
(the airbench presets' blocks).

The library is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) into ``$CNNLAB_CACHE/kernels/`` (else
``~/.cache/cnnlab/kernels/``), keyed by the source, the compiler, its flags and this CPU, then
reused. Without a compiler, or with ``CNNLAB_NATIVE=0``, training runs PyTorch's own kernels
instead (the same function, slower on CPU); ``status()`` says which, and every run records it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import cache
from .runtime import switched_off

SOURCE = Path(__file__).with_name("kernels.cpp")
SWITCH = "CNNLAB_NATIVE"  # =0: PyTorch's own kernels instead
# best first: -march=native for this CPU's vector width, then portable, then without OpenMP
FLAG_SETS = (
    ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"],
    ["-O3", "-fno-trapping-math", "-fopenmp"],
    ["-O3", "-fno-trapping-math"],
)
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I, _F, _U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint32
_C = ctypes.c_int
SIGNATURES = {  # each function, as cnnlab_NAME_f32 and cnnlab_NAME_bf16
    "bn_relu_pool2_forward": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _F, _F, _U, _U, _U, _F, _P, _P, _P, _P, _P, _C],
    "bn_relu_pool2_backward": [_P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _F, _P, _P, _P, _C],
    "bn_gelu_forward": [_P, _I, _I, _I, _I, _C, _P, _P, _P, _P, _F, _F, _P, _P, _P, _P, _P, _C],
    "bn_gelu_backward": [_P, _P, _P, _I, _I, _I, _I, _C, _P, _P, _P, _P, _P, _P, _P, _C],
}


def find_compiler() -> str | None:
    """``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: this CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(compiler: str) -> str | None:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def build(cache_dir: Path, compiler: str | None) -> tuple[Path | None, str]:
    """Compiles ``kernels.cpp`` into ``cache_dir`` (or finds it there, already built); returns
    the library's path and a note, or None and why it could not be built."""
    if sys.platform == "win32":
        return None, "not built on Windows"
    version = _compiler_version(compiler) if compiler else None
    if version is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    same_for_all_flags = b"\0".join([SOURCE.read_bytes(), compiler.encode(), version.encode(),
                                      _cpu_signature().encode(), torch.__version__.encode()])
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(same_for_all_flags + b"\0" + " ".join(flags).encode()).hexdigest()[:16]
        target = cache_dir / f"cnnlab_kernels_{key}.so"
        if cache.check(target) is not None:  # a truncated library would kill the process on loading (SIGBUS)
            return target, f"cached {target.name}"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # then an atomic rename: no half-written library
                partial = Path(tmp) / target.name
                done = subprocess.run([compiler, *flags, *COMMON_FLAGS, str(SOURCE), "-o", str(partial)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    os.replace(partial, target)
                    cache.seal(target)
                    return target, f"built {target.name} with {' '.join(flags)}"
                errors.append((done.stderr.strip().splitlines() or ["failed"])[-1][:200])
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc)[:200])
    return None, f"{compiler} could not build it: {errors[-1]}"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library, built or found once per process, and a note saying how."""
    path, note = build(cache.default_cache_dir() / "kernels", find_compiler())
    if path is None:
        return None, note
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"could not load {path}: {exc}"
    for suffix in SUFFIX.values():
        for name, argtypes in SIGNATURES.items():
            function = getattr(lib, f"cnnlab_{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
    return lib, note


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they are switched off (``CNNLAB_NATIVE=0``) or cannot
    be built here."""
    return None if switched_off(SWITCH) else _load()[0]


def status() -> str:
    """One line for a run's record: whether the native kernels are in use, and if not, why."""
    if switched_off(SWITCH):
        return f"off ({SWITCH}=0)"
    lib, note = _load()
    return "on" if lib is not None else f"off: {note}"


def supports(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> bool:
    """Whether ``BNReLUPool2Native`` can take this batch and batch norm: a channels_last float32 or
    bfloat16 CPU tensor of at least 2x2 pixels, float32 parameters, and the kernels built."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in SUFFIX
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[2] >= 2 and x.shape[3] >= 2 and x.shape[1] > 0
            and all(t is not None and t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
            and library() is not None)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _call(lib: ctypes.CDLL, name: str, dtype: torch.dtype, *args) -> None:
    """``cnnlab_NAME_f32`` or ``_bf16`` on ``args`` (tensors as their data pointers), then the thread count."""
    getattr(lib, f"cnnlab_{name}_{SUFFIX[dtype]}")(*(_ptr(a) if isinstance(a, torch.Tensor) else a for a in args),
                                                   torch.get_num_threads())


def _backward_buffers(grad: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype):
    """A block's backward buffers: ``grad`` as the kernels read it (``dtype``, channels_last), and
    empty input (``shape``, channels_last), weight and bias gradients."""
    return (grad.to(dtype).contiguous(memory_format=torch.channels_last),
            torch.empty(shape, dtype=dtype, memory_format=torch.channels_last), torch.empty(shape[1]),
            torch.empty(shape[1]))


class BNReLUPool2Native(torch.autograd.Function):
    """``MaxPool2d(2)(relu(BatchNorm2d(x)))`` in training mode, then inverted dropout with rate
    ``p`` (none for 0), by the native kernels; updates ``running_mean``/``running_var`` in place
    (unbiased variance), as ``nn.BatchNorm2d`` does. The dropout mask is keyed by two draws from
    torch's default generator, so ``torch.manual_seed`` makes it repeat."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, p: float = 0.0):
        n, c, h, w = x.shape
        key0, key1 = (torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist() if p > 0 else (0, 0))
        threshold = min(round(p * 2**32), 2**32 - 1)
        ctx.scale = 1.0 / (1.0 - p)
        out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        flags = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        pooled = torch.empty((n, h // 2, w // 2, c), dtype=x.dtype)
        mean, invstd = torch.empty(c), torch.empty(c)
        ctx.lib = _load()[0]  # kept for the backward, whatever CNNLAB_NATIVE says by then
        _call(ctx.lib, "bn_relu_pool2_forward", x.dtype, x, n, h, w, c, weight, bias, running_mean, running_var,
              momentum, eps, key0, key1, threshold, ctx.scale, out, flags, pooled, mean, invstd)
        ctx.save_for_backward(x, weight, flags, pooled, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, flags, pooled, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        grad, grad_x, grad_weight, grad_bias = _backward_buffers(grad, x.shape, x.dtype)
        _call(ctx.lib, "bn_relu_pool2_backward", x.dtype, x, grad, flags, pooled, n, h, w, c, weight, mean, invstd,
              ctx.scale, grad_weight, grad_bias, grad_x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class BNGELUNative(torch.autograd.Function):
    """``gelu(BatchNorm2d(x))`` in training mode, after ``MaxPool2d(2)`` when ``pool``, by the native
    kernels (exact GELU, ``nn.GELU()``); updates ``running_mean``/``running_var`` in place (unbiased
    variance), as ``nn.BatchNorm2d`` does."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, pool: bool):
        n, c, h, w = x.shape
        oh, ow = (h // 2, w // 2) if pool else (h, w)
        out = torch.empty((n, c, oh, ow), dtype=x.dtype, memory_format=torch.channels_last)
        pooled = torch.empty((n, oh, ow, c), dtype=x.dtype) if pool else x
        where = torch.empty((n, oh, ow, c), dtype=torch.uint8) if pool else torch.empty(0, dtype=torch.uint8)
        mean, invstd = torch.empty(c), torch.empty(c)
        ctx.lib, ctx.pool, ctx.shape = _load()[0], pool, (n, c, h, w)
        _call(ctx.lib, "bn_gelu_forward", x.dtype, x, n, h, w, c, int(pool), weight, bias, running_mean, running_var,
              momentum, eps, out, pooled, where, mean, invstd)
        ctx.save_for_backward(pooled, where, weight, bias, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        pooled, where, weight, bias, mean, invstd = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad, grad_x, grad_weight, grad_bias = _backward_buffers(grad, ctx.shape, pooled.dtype)
        _call(ctx.lib, "bn_gelu_backward", pooled.dtype, grad, pooled, where, n, h, w, c, int(ctx.pool), weight, bias,
              mean, invstd, grad_weight, grad_bias, grad_x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None
