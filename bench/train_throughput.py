"""Training throughput (images/s) of cnnlab's loop against three baselines, side by side.

For each preset, the same model and batch size is trained for a fixed number of steps by:
  cnnlab    cnnlab.train.train_one_epoch: uint8 tensors in memory, batch-level preprocessing
            (and augmentation for presets that use it), channels_last (NCHW for conv, as its preset says)
  eager     a plain eager PyTorch loop over in-memory float tensors, NCHW, stock layers (nn.Dropout)
  tutorial  torchvision ImageFolder + DataLoader + ToTensor, decoding the JPEGs every epoch
  keras     Keras 3 on TensorFlow CPU, same layers, model.fit on in-memory arrays, default settings
            (jit_compile="auto"), timed from the end of its first batch to the end of its last
            (if installed: pip install -e '.[bench]')
  keras-noXLA  the same with jit_compile=False (a plain TensorFlow graph, as Keras 2 ran)
  no-native cnnlab with CNNLAB_NATIVE=0: PyTorch's kernels instead of cnnlab's native batch norm ->
            ReLU -> pooling (cnnlab/kernels.cpp; on CPU)
cnnlab runs in the precision `--precision auto` picks: bfloat16 autocast on CUDA and on CPUs with native
bfloat16 (AVX512-BF16, AMX), where a `cnnlab-fp32` column adds the same loop in float32; `keras-bf16` is
Keras with its "mixed_bfloat16" policy. With --device cuda: cnnlab (each step replayed as a CUDA graph),
cnnlab without the CUDA graph, and the eager loop in float32 (tutorial and keras skipped).
Each figure is also given as a fraction of this machine's peak in the column's precision, measured in
the same run as the best of GEMM and 3x3-convolution throughput (training FLOPs counted as 3x the
forward pass's multiply-adds x 2).

    python bench/train_throughput.py --data ../shared/data/cifar10/train
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab import kernels  # noqa: E402
from cnnlab.data import ImageSet, load_folder  # noqa: E402
from cnnlab.layers import Dropout  # noqa: E402
from cnnlab.presets import PRESETS, build_model, init_whitening, resolve_config  # noqa: E402
from cnnlab.runtime import compute_dtype, keep_freed_memory, memory_format, pick_device  # noqa: E402
from cnnlab.step import TrainStep  # noqa: E402
from cnnlab.optimizer import make_optimizer  # noqa: E402
from cnnlab.early_stopping import EarlyStopping  # noqa: E402
from cnnlab.run_state import RunContext, RunState, Schedule  # noqa: E402
from cnnlab.train import train_one_epoch  # noqa: E402
from common import cpu_peak_gflops, forward_flops, matmul_peak_gflops, sync  # noqa: E402


def bench_cnnlab(preset: str, data: ImageSet, steps: int, batch: int, device: torch.device,
                 cuda_graph: bool = True, precision: str = "auto", native: bool = True) -> float:
    # native=False: PyTorch's kernels instead of cnnlab's native ones, by the users' own switch
    with mock.patch.dict(os.environ, {} if native else {"CNNLAB_NATIVE": "0"}):
        return _bench_cnnlab(preset, data, steps, batch, device, cuda_graph, precision)


def _bench_cnnlab(preset: str, data: ImageSet, steps: int, batch: int, device: torch.device,
                  cuda_graph: bool, precision: str) -> float:
    cfg = resolve_config(preset, data="-", epochs=1, batch_size=batch, cuda_graph=cuda_graph, precision=precision)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as cnnlab's pick_device sets it
    torch.manual_seed(0)
    model = build_model(PRESETS[preset].layers, 10)
    init_whitening(model, cfg.preprocessing(data.images[:2000], channels_last=False))
    model = model.to(device, memory_format=memory_format(cfg.channels_last))  # as cnnlab train lays it out
    opt = make_optimizer(model, cfg, compute_dtype(cfg.precision, device))
    run = RunState(model, opt, Schedule(opt, "none", 1), EarlyStopping(), torch.Generator().manual_seed(0))
    ctx = RunContext(device)
    subset = data.subset(torch.arange(steps * batch)).to(device)
    step = TrainStep(model, opt, subset, cfg, device)  # as fit() keeps it, so its CUDA graph too
    if step.graphed:
        train_one_epoch(step, run, subset, cfg, 1, ctx)  # warms up, captures
    else:
        warm = data.subset(torch.arange(3 * batch)).to(device)
        train_one_epoch(TrainStep(model, opt, warm, cfg, device), run, warm, cfg, 1, ctx)
    start = time.perf_counter()
    logs = train_one_epoch(step, run, subset, cfg, 1, ctx)  # ends with a sync
    return logs["images"] / (time.perf_counter() - start)


def plain_model(preset: str) -> nn.Module:
    """The preset's model with stock PyTorch layers: nn.Dropout for cnnlab's faster dropout, and a
    plain nn.Sequential (no fused batch norm -> ReLU -> pooling)."""
    model = build_model(PRESETS[preset].layers, 10)
    return nn.Sequential(*[nn.Dropout(layer.p) if isinstance(layer, Dropout) else layer for layer in model])


def _eager_step(model, opt, x, y, label_smoothing):
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_eager(preset: str, data: ImageSet, steps: int, batch: int, device: torch.device) -> float:
    """A plain loop: float32 throughout (on CUDA too: no autocast, cuDNN's default settings)."""
    cfg = resolve_config(preset, data="-", batch_size=batch)
    torch.backends.cudnn.benchmark = False  # PyTorch's default
    torch.manual_seed(0)
    model = plain_model(preset).to(device)
    opt = make_optimizer(model, cfg, None)
    x_all = data.images[:steps * batch].to(device).float() / 255  # in memory, NCHW, as a hand-written loop has it
    y_all = data.labels[:steps * batch].to(device)
    model.train()
    for i in range(3):
        _eager_step(model, opt, x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch], cfg.label_smoothing)
    start = time.perf_counter()
    for i in range(steps):
        _eager_step(model, opt, x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch], cfg.label_smoothing)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def bench_tutorial(preset: str, root: Path, steps: int, batch: int) -> float:
    import torchvision
    from torchvision import transforms
    cfg = resolve_config(preset, data="-", batch_size=batch)
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = plain_model(preset)
    opt = make_optimizer(model, cfg, None)
    model.train()
    it = iter(loader)
    for _ in range(3):
        x, y = next(it)
        _eager_step(model, opt, x, y, cfg.label_smoothing)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        _eager_step(model, opt, x, y, cfg.label_smoothing)
    return steps * batch / (time.perf_counter() - start)


def keras_model(preset: str):
    import keras
    layers = [keras.Input((32, 32, 3))]
    for spec in PRESETS[preset].layers:
        name, *options = spec.split(":")
        head = name.rstrip("0123456789.")
        arg = name[len(head):]
        if head == "conv":
            layers.append(keras.layers.Conv2D(int(arg), 3, padding="valid" if "valid" in options else "same",
                                              use_bias="nobias" not in options))
        elif head == "bn":
            layers.append(keras.layers.BatchNormalization())
        elif head in ("relu", "gelu"):
            layers.append(keras.layers.Activation(head))
        elif head == "pool":
            layers.append(keras.layers.MaxPooling2D(int(arg or 2)))
        elif head == "drop":
            layers.append(keras.layers.Dropout(float(arg)))
        elif head == "flatten":
            layers.append(keras.layers.Flatten())
        elif head == "dense":
            layers.append(keras.layers.Dense(int(arg) if arg else 10))
        else:
            return None  # whiten/scale: no stock Keras layer
    return keras.Sequential(layers)


def bench_keras(preset: str, data: ImageSet, steps: int, batch: int, xla: bool = True,
                bf16: bool = False) -> float | None:
    """Keras's model.fit; ``xla=True`` is Keras 3's default (jit_compile="auto" compiles with XLA
    on TensorFlow), ``xla=False`` is a TensorFlow graph without XLA (Keras 2's default);
    ``bf16`` sets Keras's "mixed_bfloat16" policy (cnnlab's bfloat16 autocast, the Keras way)."""
    try:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
        import tensorflow as tf
    except ImportError:
        return None
    threads = torch.get_num_threads()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if bf16 else "float32")
    try:
        model = keras_model(preset)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    if model is None:
        return None
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile="auto" if xla else False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = (data.images[:(steps + 3) * batch].permute(0, 2, 3, 1).float() / 255).numpy()
    y = data.labels[:(steps + 3) * batch].numpy()
    model.fit(x[:3 * batch], y[:3 * batch], batch_size=batch, epochs=1, verbose=0)  # builds the graph
    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: ends.append(time.perf_counter()))
    model.fit(x[3 * batch:], y[3 * batch:], batch_size=batch, epochs=1, verbose=0, shuffle=False,
              callbacks=[clock])
    # steady state: from the end of the first batch to the end of the last, so fit()'s per-call
    # set-up (its data adapter, ~0.1-0.3 s) does not count against Keras
    return (len(ends) - 1) * batch / (ends[-1] - ends[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10/train")
    parser.add_argument("--presets", default="conv,pool-bn,dropout,early-stop,fast")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="tuned: glibc keeps freed memory, as the cnnlab command sets it (for every column, "
                             "since it is process-wide); default: glibc's defaults")
    parser.add_argument("--skip", default="", help="comma-separated: tutorial,keras,eager")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: cnnlab (bfloat16 autocast) and eager (float32) on the GPU, "
                             "fraction of the bfloat16 matmul peak; tutorial and keras skipped")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        keep_freed_memory()
    skip = set(filter(None, args.skip.split(",")))
    if device.type == "cuda":
        skip |= {"tutorial", "keras"}
    data, _, _ = load_folder(args.data, 32)
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0)))
    ours_dtype = compute_dtype("auto", device)
    if device.type == "cuda":
        peak = matmul_peak_gflops(8192, device=device, dtype=torch.bfloat16)
        peaks = {"cnnlab": peak}
        where = f"{torch.cuda.get_device_name(device)}, bf16 matmul peak {peak:.0f} GFLOP/s"
    else:
        peak = cpu_peak_gflops()
        peaks = {"cnnlab": cpu_peak_gflops(torch.bfloat16) if ours_dtype else peak}
        peaks["no-native"] = peaks["cnnlab"]
        where = (f"{args.threads} threads, malloc {args.malloc}, fp32 peak {peak:.0f} GFLOP/s"
                 + (f", bf16 peak {peaks['cnnlab']:.0f} GFLOP/s (cnnlab computes in bfloat16 here)" if ours_dtype else ""))
    if device.type == "cpu":
        where += f", native kernels {kernels.status()}"
    print(f"torch {torch.__version__}, {where}, {args.steps} timed steps per figure")
    print("images/s, best of --repeats (in brackets: nominal FLOP/s as a fraction of the peak of the column's "
          "precision, the best of GEMM and 3x3 convolution throughput measured above); ratios are cnnlab / column")
    for preset in args.presets.split(","):
        batch = resolve_config(preset, data="-").batch_size
        flops = 3 * forward_flops(build_model(PRESETS[preset].layers, 10))
        runs = {"cnnlab": lambda: bench_cnnlab(preset, data, args.steps, batch, device)}
        if device.type == "cuda":
            runs["no-graph"] = lambda: bench_cnnlab(preset, data, args.steps, batch, device, cuda_graph=False)
        else:
            runs["no-native"] = lambda: bench_cnnlab(preset, data, args.steps, batch, device, native=False)
            if ours_dtype:
                runs["cnnlab-fp32"] = lambda: bench_cnnlab(preset, data, args.steps, batch, device, precision="fp32")
        if "eager" not in skip:
            runs["eager"] = lambda: bench_eager(preset, data, args.steps, batch, device)
        if "keras" not in skip:
            runs["keras"] = lambda: bench_keras(preset, data, args.steps, batch)
            runs["keras-noXLA"] = lambda: bench_keras(preset, data, args.steps, batch, xla=False)
            runs["keras-bf16"] = lambda: bench_keras(preset, data, args.steps, batch, bf16=True)
        figures = {name: 0.0 for name in runs}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits every column alike
            for name, run in runs.items():
                figures[name] = max(figures[name], run() or 0.0)
        if "tutorial" not in skip:
            figures["tutorial"] = bench_tutorial(preset, Path(args.data), max(5, args.steps // 4), batch)
        ours = figures["cnnlab"]
        cells = []
        for name, value in figures.items():
            if not value:
                cells.append(f"{name} -")
                continue
            share = value * flops / (peaks.get(name, peak) * 1e9)
            cells.append(f"{name} {value:,.0f} ({share:.1%})" + ("" if name == "cnnlab" else f" {ours / value:.2f}x"))
        print(f"{preset:<11} batch {batch:<4} {flops / 3e6:5.1f} MFLOP/img | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
