"""Helpers shared by the benchmarks: the machine's matmul peak and a model's FLOPs."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


def _best_gflops(run, flops: float, repeats: int, device="cpu") -> float:
    """Best-of GFLOP/s of ``run()`` (one warm-up call first; CUDA synchronized around each)."""
    run()
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """Best-of GEMM throughput (single precision on the CPU with the current thread count; on
    CUDA pass the dtype the training computes in, bfloat16 under cnnlab's autocast)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _best_gflops(lambda: torch.mm(a, b), 2 * n ** 3, repeats, device)


def conv_peak_gflops(repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of throughput of a large 3x3 convolution on the CPU (channels_last, oneDNN). On this
    project's AMD CPU (AVX-512) it reaches about twice what ``torch.mm`` does in float32 (MKL's
    GEMM), so a machine's float32 peak is the larger of the two."""
    x = torch.randn(32, 256, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * 32 * 16 * 16 * 256 * 256 * 9
    return _best_gflops(lambda: torch.nn.functional.conv2d(x, w, padding=1), flops, repeats)


def cpu_peak_gflops(dtype: torch.dtype = torch.float32) -> float:
    """The best this CPU reached in ``dtype`` here: the larger of GEMM and 3x3-convolution throughput."""
    return max(matmul_peak_gflops(dtype=dtype), conv_peak_gflops(dtype=dtype))


def sync(device) -> None:
    """Waits for a CUDA device's queued work (timing needs it); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: nn.Module, shape=(3, 32, 32)) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers for one image."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k * 2
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features * 2
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return float(total)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) with its family, model number, clock and bfloat16 units,
    for every absolute figure a benchmark prints: one model name ("Intel(R) Xeon(R) Processor") has
    covered machines three times apart in speed."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first core's
    if "model name" not in fields:
        return "unknown"
    flags = set(fields.get("flags", "").split())
    units = [name for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    if not units:
        units = ["AVX-512, no bfloat16"] if "avx512f" in flags else ["no AVX-512"]
    clock = f", {float(fields['cpu MHz']):.0f} MHz" if "cpu MHz" in fields else ""
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
            f"{clock}; {', '.join(units)})")


def rate(run, images: torch.Tensor, seconds: float = 3.0) -> float:
    """Images a second ``run(images)`` keeps up over ``seconds``, after one warm-up call."""
    run(images)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(images)
        done += len(images)
    return done / (time.perf_counter() - start)


def linked_subset(source: Path, per_class: int, folder: Path) -> Path:
    """``folder/<class>/``: symbolic links to the first ``per_class`` images (by name) of each class
    folder of ``source`` (hidden folders left out), never a copy; links already there are kept."""
    for cls in sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")):
        (folder / cls.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(cls.iterdir())[:per_class]:
            link = folder / cls.name / image.name
            if not link.is_symlink():
                link.symlink_to(image.resolve())
    return folder
