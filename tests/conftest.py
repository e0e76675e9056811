"""Tiny generated image folders, batch norms with random statistics, and a private image cache
for every test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 50)]


def make_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 32, ext: str = "png",
                seed: int = 0) -> Path:
    """``root/class_i/img_j.ext``: each class a noisy image of its own colour with a bar whose
    position says the class, so a small CNN can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.normal(0, 25, (size, size, 3)) + np.array(COLORS[c % len(COLORS)])
            img[:, (c * size) // classes: (c * size) // classes + 3] = 255
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{j:03d}.{ext}")
    return root


def random_bn(channels: int, seed: int, momentum: float | None = 0.1, dtype=torch.float32) -> nn.BatchNorm2d:
    """A BatchNorm2d with random scales (about half negative), shifts and running mean."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
    return bn

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own image cache, so no test sees another's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "tiny")
