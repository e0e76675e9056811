"""Transfer-learning speed, side by side in one run:

1. A 5-epoch frozen-base run: cnnlab's feature cache (the base runs once) against recomputing the
   base every epoch (Keras's way in the seed study), same head, same images.
2. Feature extraction (images/s) of VGG19 and EfficientNet-Lite0 with cnnlab's settings
   (channels_last, inference mode, its own batch size, the base as ``for_extraction`` gives it: Lite's
   batch norms folded) against the same without the fold and a plain eager loop (NCHW, no_grad,
   batch 64), and as a fraction of this machine's matrix-multiply peak, measured in the same run.

    python bench/transfer.py --data ../shared/data/cats-vs-dogs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnnlab.backbones import build, for_extraction, get_backbone  # noqa: E402
from cnnlab.data import ImageSet, Splits, load_splits  # noqa: E402
from cnnlab.config import TrainConfig  # noqa: E402
from cnnlab.runtime import compute_dtype  # noqa: E402
from cnnlab.features import Extraction, extract_features  # noqa: E402
from cnnlab.run_state import RunContext  # noqa: E402
from cnnlab.train import fit_model  # noqa: E402
from cnnlab.transfer_model import Head, TransferModel, freeze_base  # noqa: E402
from common import cpu_peak_gflops, forward_flops  # noqa: E402

QUIET = lambda m: None  # noqa: E731


def plain_extract(features, images, prep, batch=64) -> float:
    """A hand-written loop: NCHW, torch.no_grad; returns images/s."""
    features = features.to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = prep(images[i:i + batch]).contiguous()
            features(x)
    return len(images) / (time.perf_counter() - start)


def ours_extract(features, images, prep) -> float:
    """cnnlab's extraction: channels_last, inference mode, its own batch size."""
    features = features.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    extract_features(features, images, Extraction(prep, torch.device("cpu"), pool=False))
    return len(images) / (time.perf_counter() - start)


def cache_vs_recompute(splits: Splits, epochs: int) -> tuple[float, float]:
    built = build("efficientnet_lite0")
    built.features.to(memory_format=torch.channels_last)  # as cnnlab transfer runs it, in both arms
    prep = get_backbone("efficientnet_lite0").weights[0].preprocessing
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, preprocessing=prep)
    device = torch.device("cpu")
    how = Extraction(prep, device, pool=True)
    extract_features(built.features, splits.train.images[:16], how)  # warm-up
    # cnnlab: the base runs once, the head trains on the cached features
    torch.manual_seed(0)
    start = time.perf_counter()
    feats = {n: extract_features(built.features, getattr(splits, n).images, how)
             for n in ("train", "val")}
    feature_splits = Splits(ImageSet(feats["train"], splits.train.labels), ImageSet(feats["val"], splits.val.labels),
                            ImageSet(feats["val"][:1], splits.val.labels[:1]), splits.class_names)
    fit_model(Head("gap", built.channels, built.grid, 2), feature_splits, cfg, RunContext(device, log=QUIET))
    cached = time.perf_counter() - start
    # baseline: the frozen base runs on every batch of every epoch
    torch.manual_seed(0)
    model = TransferModel(built.features, Head("gap", built.channels, built.grid, 2))
    freeze_base(model, built.blocks, 0)
    start = time.perf_counter()
    fit_model(model, splits, cfg, RunContext(device, log=QUIET))
    recomputed = time.perf_counter() - start
    return cached, recomputed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cats-vs-dogs")
    parser.add_argument("--per-class", type=int, default=200, help="images per class for part 1")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--extract-images", type=int, default=128, help="images timed per extraction figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", default="", help="comma-separated: cache,vgg19,efficientnet_lite0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    splits = load_splits(args.data, 224, 0.2, 0.1, 0, per_class=args.per_class)
    peak = cpu_peak_gflops()
    bf16 = compute_dtype("auto", torch.device("cpu")) is not None
    ours_peak = cpu_peak_gflops(torch.bfloat16) if bf16 else peak
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 peak {peak:.1f} GFLOP/s"
          + (f", bf16 peak {ours_peak:.1f} GFLOP/s (cnnlab extracts in bfloat16 here)" if bf16 else "")
          + " (best of GEMM and 3x3 convolution)")
    if "cache" not in skip:
        cached, recomputed = cache_vs_recompute(splits, args.epochs)
        print(f"\n1. frozen EfficientNet-Lite0 base, gap head, {args.epochs} epochs on {len(splits.train)} train + "
              f"{len(splits.val)} val images")
        print(f"   feature cache (base once): {cached:7.1f} s")
        print(f"   recompute every epoch:     {recomputed:7.1f} s   -> cache is {recomputed / cached:.1f}x faster")
    print(f"\n2. feature extraction of {args.extract_images} images (224x224): cnnlab (channels_last, inference "
          "mode, batches of 4, batch norm folded) vs the same unfolded vs plain (NCHW, no_grad, batches of 64)")
    print(f"   {'backbone':<20}{'GFLOP/img':>10}{'cnnlab img/s':>14}{'% peak':>8}{'unfolded':>10}{'fold':>7}"
          f"{'plain img/s':>13}{'% peak':>8}{'ratio':>7}")
    images = splits.train.images[:args.extract_images]
    for name in ("vgg19", "efficientnet_lite0"):
        if name in skip:
            continue
        built = build(name)
        prep = get_backbone(name).weights[0].preprocessing
        flops = forward_flops(built.features, (3, 224, 224))
        folded = for_extraction(built.features.eval())
        ours_extract(folded, images[:8], prep)  # warm-up
        ours = ours_extract(folded, images, prep)
        unfolded = ours_extract(built.features, images, prep)
        plain = plain_extract(built.features, images, prep)
        frac = lambda v, top=peak: v * flops / (top * 1e9)  # noqa: E731
        print(f"   {name:<20}{flops / 1e9:>10.2f}{ours:>14.1f}{frac(ours, ours_peak):>8.1%}{unfolded:>10.1f}"
              f"{ours / unfolded:>6.2f}x{plain:>13.1f}{frac(plain):>8.1%}{ours / plain:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
