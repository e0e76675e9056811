"""What JPEG compression costs a CIFAR-10 recipe: the shared images as they are, then re-encoded at
lower qualities, each trained and scored with the same recipe, seed and split.

    python bench/jpeg_quality.py                                   # speedrun:8, as shared and at 50 and 30
    python bench/jpeg_quality.py --qualities 90,50 --recipe fast:8
    python bench/jpeg_quality.py --per-class 250 --recipe speedrun:1 --qualities 50   # a smoke run

The shared files are JPEG already (Pillow's defaults: quality 75, 4:2:0 chroma), and no lossless copy
is on this machine, so what the first compression cost cannot be measured directly; the slope of
accuracy against further compression (train and test both at the quality, as a user's folder would
be) says how much the images' detail is worth to the recipe. Each row also gives the re-encoding's
PSNR against the shared images. Split as `bench/time_to_accuracy.py` does (a stratified tenth as test/).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model  # noqa: E402
from time_to_accuracy import cnnlab_run, make_split, parse_recipe  # noqa: E402


def reencode(split: Path, out: Path, quality: int) -> float:
    """out/<part>/<class>/<file> for every image of ``split``, saved again as JPEG at ``quality``
    (Pillow's defaults otherwise); returns the PSNR in dB of the new pixels against the old."""
    squared, count = 0.0, 0
    for source in sorted(split.rglob("*.*")):
        target = out / source.relative_to(split)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            old = image.convert("RGB")
        buffer = io.BytesIO()
        old.save(buffer, "JPEG", quality=quality)
        target.write_bytes(buffer.getvalue())
        new = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float64)
        squared += float(((new - np.asarray(old, dtype=np.float64)) ** 2).sum())
        count += new.size
    return 10 * math.log10(255 ** 2 / max(squared / count, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--recipe", default="speedrun:8", help="PRESET:EPOCHS[:PRECISION] (default speedrun:8)")
    parser.add_argument("--qualities", default="50,30", help="JPEG qualities to re-encode at, besides the images as "
                                                             "shared (default 50,30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, help="use only this many images of each class (a smoke run)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    recipe = parse_recipe(args.recipe)
    if recipe is None:
        parser.error(f"--recipe {args.recipe}: give PRESET:EPOCHS[:PRECISION], for example speedrun:8 or "
                     "speedrun:8:fp32")
    preset, epochs, precision = recipe
    try:
        qualities = [int(q) for q in args.qualities.split(",") if q]
    except ValueError:
        parser.error(f"--qualities {args.qualities}: give whole numbers, for example 50,30")
    if any(not 1 <= q <= 95 for q in qualities):
        parser.error("--qualities: each between 1 and 95 (Pillow's range for JPEG)")
    print(f"cpu: {cpu_model()}, {args.threads} threads; {args.recipe}, seed {args.seed}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shared = make_split(Path(args.data), Path(tmp) / "shared", args.per_class, args.split_seed)
        for quality in [None, *qualities]:
            data, psnr = shared, math.inf
            if quality is not None:
                data = Path(tmp) / f"q{quality}"
                psnr = reencode(shared, data, quality)
            seconds, accuracy = cnnlab_run(data, Path(tmp) / f"runs-{quality}", preset, epochs, precision, args.seed,
                                            args.threads)
            label = "as shared (q75)" if quality is None else f"re-encoded at {quality}"
            rows.append((label, psnr, seconds, accuracy))
            against = "" if quality is None else f"PSNR {psnr:.1f} dB against the shared images, "
            print(f"  {label}: {against}{seconds:.1f} s, {accuracy:.2%}", flush=True)
    print("| images | PSNR against the shared ones | training | test accuracy |\n| --- | --- | --- | --- |")
    for label, psnr, seconds, accuracy in rows:
        print(f"| {label} | {'-' if math.isinf(psnr) else f'{psnr:.1f} dB'} | {seconds:.1f} s | {accuracy:.2%} |")


if __name__ == "__main__":
    main()
