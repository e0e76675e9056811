"""Images/s of finished runs as PyTorch (float32 and cnnlab's own precision), as the float ONNX file
and as the int8 one (`cnnlab export --int8`), side by side on this CPU in alternating rounds, and
the int8 file's accuracy beside the float file's on held-out photos.

    python bench/int8_throughput.py --runs runs/pool-bn runs/transfer-efficientnet_lite0 \
        --heldout ../shared/data/cats-vs-dogs --threads 2

Each run is exported twice into a temporary folder (float, then int8 with its own test-split check
printed). Speed is measured on the run's own test images, a batch repeated for --seconds, every
engine in turn in each of --rounds rounds; the median round is printed. --heldout scores both ONNX
files on every image of a labelled folder with the run's class names (held out: photos the run never
saw, e.g. the part of a folder the run was not trained on)."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.data import load_folder  # noqa: E402
from cnnlab.export import _run_splits, export_run  # noqa: E402
from cnnlab.preprocessing import model_input  # noqa: E402
from cnnlab.quantize import compare  # noqa: E402
from cnnlab.runtime import autocast, compute_dtype  # noqa: E402
from cnnlab.saved_model import load_model  # noqa: E402
from common import rate  # noqa: E402


def session(path: Path, threads: int):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(sess, images: torch.Tensor, batch: int = 32):
    import numpy as np
    return np.concatenate([sess.run(None, {"pixels": images[i:i + batch].float().numpy()})[0]
                           for i in range(0, len(images), batch)])


def bench_run(run: Path, args, tmp: Path) -> None:
    float_path, int8_path = tmp / f"{run.name}.onnx", tmp / f"{run.name}-int8.onnx"
    export_run(run, float_path, log=lambda m: None)
    export_run(run, int8_path, int8=True, max_drop=100.0, log=lambda m: print(f"  {m}"))
    cpu = torch.device("cpu")
    net, config, prep = load_model(run, cpu)
    infer = net.for_inference() if hasattr(net, "for_inference") else net  # a transfer base folded, as scoring does
    prepare, auto = prep.on(cpu), compute_dtype("auto", cpu)
    test = _run_splits(config, prep).test.images

    def torch_run(x, dtype):
        with torch.no_grad(), autocast(cpu, dtype):
            return infer(model_input(x, prepare))
    engines = {
        "torch fp32": lambda x: torch_run(x, None),
        "torch auto": lambda x: torch_run(x, auto),
        "ort float32": (lambda s: lambda x: s.run(None, {"pixels": x.float().numpy()}))(session(float_path, args.threads)),
        "ort int8": (lambda s: lambda x: s.run(None, {"pixels": x.float().numpy()}))(session(int8_path, args.threads)),
    }
    for batch in args.batches:
        images = test[:batch].repeat((batch + len(test) - 1) // len(test), 1, 1, 1)[:batch].contiguous()
        rates = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                rates[name].append(rate(engine, images, args.seconds))
        med = {name: statistics.median(v) for name, v in rates.items()}
        print(f"{run.name:<24}{batch:>6}" + "".join(f"{med[n]:>13.0f}" for n in engines)
              + f"{med['ort int8'] / med['ort float32']:>14.2f}x{med['ort int8'] / med['torch fp32']:>13.2f}x", flush=True)
    if args.heldout:
        held, _, _ = load_folder(args.heldout, prep.size, class_names=config["class_names"])
        scores = compare(onnx_probabilities(session(float_path, args.threads), held.images),
                         onnx_probabilities(session(int8_path, args.threads), held.images), held.labels)
        print(f"  held out ({scores['images']} photos of {args.heldout}): float32 {scores['float_score']:.2%}, "
              f"int8 {scores['int8_score']:.2%}, drop {scores['drop_points']:.2f} points, "
              f"top-1 agreement {scores['agreement']:.2%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run directories")
    parser.add_argument("--heldout", help="a labelled folder with the runs' classes, scored by both ONNX files")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {args.rounds} rounds of {args.seconds:g} s each, images/s (median round)")
    print(f"{'run':<24}{'batch':>6}{'torch fp32':>13}{'torch auto':>13}{'ort float32':>13}{'ort int8':>13}"
          f"{'int8/float32':>15}{'int8/torch':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            bench_run(run, args, Path(tmp))


if __name__ == "__main__":
    main()
