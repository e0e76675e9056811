"""Input preparation: uint8 RGB images -> the float tensor a model was trained on, as one value.

A ``Preprocessing`` is the whole recipe: input size, channel order, scale and per-channel mean and
std, ``(x * scale - mean) / std`` after reordering the channels to ``order``. It belongs to the
weights, never to the architecture: the seed study's scaling to [0, 1] and CIFAR-10's statistics
are the two below, each pretrained backbone's weights carry their own (backbones.py), and every run
records its own in config.json, so that evaluate, predict and resume prepare images exactly as
training did. Every split, every batch and every prediction goes through this one function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when images are prepared, not when settings are read (cnnlab --help)
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """uint8 RGB (N, 3, size, size) -> ``(x * scale - mean) / std`` per channel, channels first
    reordered to ``order`` (the mean and std are in that order too)."""
    size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    order: str = "RGB"

    def on(self, device: torch.device | str) -> "Preprocessor":
        """This preprocessing with its constants on ``device``, made once: a loop calls this once,
        then the result on every batch."""
        return Preprocessor(self, device)

    def __call__(self, images: torch.Tensor, device: torch.device | str = "cpu",
                 channels_last: bool = True) -> torch.Tensor:
        """``images`` prepared on ``device`` (constants made for this call)."""
        return self.on(device)(images, channels_last)

    def describe(self) -> str:
        return (f"{self.order}, x*{self.scale:g}, mean {tuple(round(m, 3) for m in self.mean)}, "
                f"std {tuple(round(s, 3) for s in self.std)}, {self.size}x{self.size}")

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        """The value that ``dataclasses.asdict`` wrote into a run's config.json."""
        return cls(int(values["size"]), tuple(values["mean"]), tuple(values["std"]), float(values["scale"]),
                   values.get("order", "RGB"))


class Preprocessor:
    """A ``Preprocessing`` as the multiply-add ``x * a + b`` with ``a = scale / std`` and
    ``b = -mean / std`` per channel, both on one device."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device | str):
        import torch
        from .runtime import to_device

        self.preprocessing = preprocessing
        self.device = torch.device(device)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (preprocessing.mean, preprocessing.std))
        self.a = to_device(1.0 / ((1.0 / preprocessing.scale) * std), self.device)
        self.b = to_device(-mean / std, self.device)

    def __call__(self, images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        import torch

        x = images.to(self.device, non_blocking=True).float()
        if self.preprocessing.order == "BGR":
            x = x.flip(1)
        x = x.mul_(self.a).add_(self.b)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def model_input(batch: torch.Tensor, prepare: Preprocessor) -> torch.Tensor:
    """What a model takes for ``batch``: uint8 images prepared; anything else (a frozen base's
    cached features) moved to the device as float."""
    import torch

    if batch.dtype == torch.uint8:
        return prepare(batch)
    return batch.to(prepare.device).float()


UNIT = Preprocessing(32)  # scaled to [0, 1], nothing else: the seed study's
CIFAR10 = Preprocessing(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # its training set's statistics
