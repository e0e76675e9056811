"""The training loop's throughput with TensorBoard event files on and off, side by side in one run
(alternating, so drift on a noisy machine hits both alike).

    python bench/tensorboard_overhead.py --preset pool-bn --images 4096 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cnnlab.data import load_splits  # noqa: E402
from cnnlab.presets import build_model, get_preset, resolve_config  # noqa: E402
from cnnlab.runtime import keep_freed_memory, memory_format  # noqa: E402
from cnnlab.tensorboard_log import Board  # noqa: E402
from cnnlab.run_state import RunContext  # noqa: E402
from cnnlab.train import fit_model  # noqa: E402


def images_per_s(preset: str, splits, board_on: bool, epochs: int) -> float:
    cfg = resolve_config(preset, data="-", epochs=epochs, device="cpu")
    torch.manual_seed(0)
    model = build_model(get_preset(preset).layers, len(splits.class_names)).to(
        memory_format=memory_format(cfg.channels_last))
    with tempfile.TemporaryDirectory() as tmp:
        board = Board(Path(tmp), board_on, log=lambda line: None)
        history = fit_model(model, splits, cfg, RunContext(torch.device("cpu"), log=lambda line: None, board=board)).history
        board.close()
    return statistics.mean(row["images_per_s"] for row in history[1:])  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pool-bn")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/train"))
    parser.add_argument("--images", type=int, default=4096, help="training images (default 4096)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    splits = load_splits(args.data, 32, 0.1, 0.1, 0, per_class=args.images // 8)
    rates = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):
            rates[on].append(images_per_s(args.preset, splits, on, args.epochs))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{args.preset}: {len(splits.train)} training images, {torch.get_num_threads()} threads")
    print(f"tensorboard off  {off:8.0f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[False])})")
    print(f"tensorboard on   {on:8.0f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[True])})")
    print(f"on / off         {on / off:8.3f}")


if __name__ == "__main__":
    main()
