"""Inference images/s of an exported model in onnxruntime against the same model in PyTorch
(float32, and cnnlab's own precision choice), side by side on this CPU, alternating rounds.

    python bench/onnx_inference.py --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.backbones import LITE_PREPROCESSING, build  # noqa: E402
from cnnlab.export import Exported, OnnxModel, _write_onnx  # noqa: E402
from cnnlab.preprocessing import CIFAR10, UNIT  # noqa: E402
from cnnlab.presets import build_model, get_preset  # noqa: E402
from cnnlab.runtime import autocast, compute_dtype  # noqa: E402
from cnnlab.transfer import Head, TransferModel  # noqa: E402
from common import rate  # noqa: E402

MODELS = {  # name -> (builder, preprocessing, batch)
    "pool-bn": (lambda: build_model(get_preset("pool-bn").layers, 10), UNIT, 256),
    "fast": (lambda: build_model(get_preset("fast").layers, 10), CIFAR10, 256),
    "efficientnet_lite0": (lambda: (lambda b: TransferModel(b.features, Head("gap", b.channels, b.grid, 2)))(
        build("efficientnet_lite0")), LITE_PREPROCESSING, 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dtype = compute_dtype("auto", torch.device("cpu"))
    print(f"{torch.get_num_threads()} threads; cnnlab's precision here: {dtype or torch.float32}")
    print(f"{'model':<20}{'onnxruntime':>14}{'torch fp32':>12}{'torch auto':>12}{'ort / fp32':>12}")
    for name in args.models.split(","):
        builder, prep, batch = MODELS[name]
        torch.manual_seed(0)
        wrapper = Exported(builder().eval().to(memory_format=torch.channels_last), prep).eval()  # as load_model lays it out
        images = torch.randint(0, 256, (batch, 3, prep.size, prep.size), dtype=torch.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            _write_onnx(wrapper, images, path, {"class_names": "[]", "input_size": str(prep.size)})
            ort = OnnxModel(path)

            def torch_run(x, cast):
                with torch.no_grad(), autocast(torch.device("cpu"), cast):
                    return wrapper(x.float().contiguous(memory_format=torch.channels_last))
            rates = {"ort": [], "fp32": [], "auto": []}
            for _ in range(args.rounds):
                rates["ort"].append(rate(ort.probabilities, images))
                rates["fp32"].append(rate(lambda x: torch_run(x, None), images))
                rates["auto"].append(rate(lambda x: torch_run(x, dtype), images))
        ort_, fp32, auto = (statistics.median(rates[k]) for k in ("ort", "fp32", "auto"))
        print(f"{name:<20}{ort_:>14.0f}{fp32:>12.0f}{auto:>12.0f}{ort_ / fp32:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
