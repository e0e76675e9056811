"""Training-step throughput of the airbench94 preset (or another) in cnnlab's loop against the
airbench94 CPU port (`../shared/anchors/airbench94_cpu.py`, imported from there: its own net,
optimizer groups, bfloat16 autocast and summed loss), side by side on the same random batches, alternating rounds; with
--profile, where a cnnlab step spends its time (torch.profiler, by operator).

    python bench/speedrun_step.py                 # images/s of each, and the ratio
    python bench/speedrun_step.py --profile       # + the top operators of one cnnlab step
    python bench/speedrun_step.py --preset speedrun --batch 2000
    python bench/speedrun_step.py --preset fast --batch 2000 --native both --no-port   # the native kernels' gain
    python bench/speedrun_step.py --preset speedrun --batch 500 --muon both --no-port  # Muon in the run's dtype
    python bench/speedrun_step.py --port-precision both   # the port as shipped and with its autocast off
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model  # noqa: E402
from cnnlab.data import ImageSet  # noqa: E402
from cnnlab.optimizer import make_optimizer  # noqa: E402
from cnnlab.presets import build_model, get_preset, init_whitening, resolve_config  # noqa: E402
from cnnlab.runtime import compute_dtype, keep_freed_memory, memory_format, setup  # noqa: E402
from cnnlab.step import TrainStep  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "anchors" / "airbench94_cpu.py"


def cnnlab_stepper(preset: str, images: torch.Tensor, labels: torch.Tensor, batch: int,
                   muon_bf16: bool = False):
    """A step of ``preset`` as ``cnnlab train`` runs it; with ``muon_bf16``, Muon orthogonalizes in
    airbench's bfloat16 whatever the run's dtype."""
    cfg = resolve_config(preset, data="x", batch_size=batch)
    model = build_model(get_preset(preset).layers, 10).to(memory_format=memory_format(cfg.channels_last))
    init_whitening(model, cfg.preprocessing(images[:1000], channels_last=False))
    dtype = torch.bfloat16 if muon_bf16 else compute_dtype(cfg.precision, torch.device("cpu"))  # Muon's alone
    step = TrainStep(model, make_optimizer(model, cfg, dtype), ImageSet(images, labels), cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    model.train()
    return lambda i: step(torch.randperm(len(images), generator=generator)[:batch], generator)


def port_stepper(images: torch.Tensor, labels: torch.Tensor, batch: int, bf16: bool = True):
    """A step of the port: in its bfloat16 autocast as shipped, or with it off (``bf16`` False)."""
    spec = importlib.util.spec_from_file_location("airbench94_cpu", ANCHOR)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)  # defines only: its main() runs under __main__
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    model = ab.make_net()
    x_all = ab.T.Normalize(ab.CIFAR_MEAN, ab.CIFAR_STD)(images.float() / 255).to(memory_format=torch.channels_last)
    hyp = ab.hyp["opt"]
    scale = 1024 * (1 + 1 / (1 - hyp["momentum"]))
    lr, wd = hyp["lr"] / scale, hyp["weight_decay"] * batch / scale
    norm = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    opt = torch.optim.SGD([dict(params=norm, lr=lr * 64, weight_decay=wd / (lr * 64)),
                           dict(params=other, lr=lr, weight_decay=wd / lr)], momentum=hyp["momentum"], nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    model.train()

    def step(i):
        idx = torch.randperm(len(images))[:batch]
        inputs = ab.batch_crop(ab.F.pad(x_all[idx], (2,) * 4, "reflect"), 32)  # its crop, here per batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs)
        loss = loss_fn(out.float(), labels[idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def with_native(on: bool, step):
    """``step`` run with cnnlab's native kernels switched on or off (CNNLAB_NATIVE, read at each call)."""
    def run(i):
        before = os.environ.get("CNNLAB_NATIVE")
        os.environ["CNNLAB_NATIVE"] = "1" if on else "0"
        try:
            step(i)
        finally:
            if before is None:
                del os.environ["CNNLAB_NATIVE"]
            else:
                os.environ["CNNLAB_NATIVE"] = before
    return run


def timed(step, steps: int) -> float:
    step(-1)  # warm-up: oneDNN picks its kernels on the first call
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="airbench94", help="the port's own recipe by default: the same step")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-port", action="store_true")
    parser.add_argument("--port-precision", choices=("bf16", "fp32", "both"), default="bf16",
                        help="the port in its bfloat16 autocast as shipped (default), with it off, or both")
    parser.add_argument("--native", choices=("on", "both"), default="on",
                        help="both: the preset's step with the native kernels and without, alternating rounds")
    parser.add_argument("--muon", choices=("run", "both"), default="run",
                        help="both: the preset's step with Muon in the run's dtype and in bfloat16, alternating rounds")
    args = parser.parse_args()
    setup("cpu", args.threads)
    keep_freed_memory()  # as the command line does: both steps reuse their freed activation buffers
    os.environ["THREADS"] = str(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    print(f"cpu: {cpu_model()}, {args.threads} threads; {args.preset}, native kernels {args.native}, batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds", flush=True)
    steppers = {args.preset: cnnlab_stepper(args.preset, images, labels, args.batch)}
    if args.native == "both":  # one model each: the same work, its own optimizer state
        steppers[args.preset] = with_native(True, steppers[args.preset])
        steppers[f"{args.preset} (stock)"] = with_native(False, cnnlab_stepper(args.preset, images, labels,
                                                                               args.batch))
    if args.muon == "both":
        steppers[f"{args.preset} (Muon bf16)"] = cnnlab_stepper(args.preset, images, labels, args.batch, muon_bf16=True)
    if not args.no_port:
        for precision in ("bf16", "fp32") if args.port_precision == "both" else (args.port_precision,):
            steppers[f"airbench94 port ({precision})"] = port_stepper(images, labels, args.batch, precision == "bf16")
    totals = {name: 0.0 for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            totals[name] += timed(step, args.steps)
    rates = {name: args.batch * args.steps * args.rounds / seconds for name, seconds in totals.items()}
    for name, rate in rates.items():
        print(f"{name:<24} {rate:8.0f} images/s", flush=True)
    first = rates[args.preset]
    for name, rate in list(rates.items())[1:]:
        print(f"ratio {args.preset} / {name}: {first / rate:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step = steppers[args.preset]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
