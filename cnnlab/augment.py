"""Photo augmentations on whole uint8 batches, on the batch's device: a random resized crop (with
the horizontal flip folded into the same sampling grid), torchvision's TrivialAugmentWide with an
operation and a magnitude drawn for each image, and MixUp / CutMix, which turn the targets into
soft labels (torchvision.transforms.v2's formulas, pairing each image with the one before it in
the batch).

Every random choice is drawn on the CPU from the run's seeded generator (``PhotoAugment.draw``), so
a run is repeatable and resumes bit for bit on a CPU; applying them (``PhotoAugment.images``,
``PhotoAugment.mix``) is a few batched tensor operations (one sampling grid for every crop, one
call per TrivialAugment operation for the images that drew it), never a loop over images or PIL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig, augment_kinds

RATIO = (3 / 4, 4 / 3)  # a crop's aspect ratio range, torchvision's RandomResizedCrop's
ATTEMPTS = 10  # tries at a crop that fits before the whole image is taken (torchvision's)
BINS = 31  # TrivialAugmentWide's magnitude bins
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = frozenset(OPS[1:10])  # magnitudes given a random sign


def magnitude_table() -> torch.Tensor:
    """(len(OPS), BINS) float64: each operation's magnitude per bin, TrivialAugmentWide's space
    (translations in pixels, rotations in degrees, posterize in bits, solarize as a fraction of 255)."""
    ramp = torch.linspace(0.0, 0.99, BINS, dtype=torch.float64)
    values = {"translate_x": torch.linspace(0.0, 32.0, BINS, dtype=torch.float64),
              "translate_y": torch.linspace(0.0, 32.0, BINS, dtype=torch.float64),
              "rotate": torch.linspace(0.0, 135.0, BINS, dtype=torch.float64),
              "posterize": (8 - (torch.arange(BINS) / ((BINS - 1) / 6))).round().double(),
              "solarize": torch.linspace(1.0, 0.0, BINS, dtype=torch.float64)}
    return torch.stack([values.get(op, ramp if op in SIGNED else torch.zeros(BINS, dtype=torch.float64))
                        for op in OPS])


@dataclass
class PhotoDraws:
    """The random choices for one batch: per image a flip, a crop box (top, left, height, width)
    and a TrivialAugment operation with its magnitude; what ``data.apply_augment`` still does to
    the prepared batch (``shift``: its flip and reflect-padded shift, where there is no crop); and
    for the whole batch a mix: ("mixup" or "cutmix", lambda, (top, bottom, left, right))."""
    flip: torch.Tensor | None = None
    box: torch.Tensor | None = None
    op: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    shift: tuple | None = None
    mix: tuple | None = None

    def shard(self, part) -> PhotoDraws:
        """Each rank's part of the per-image choices (``part``: distributed.shard); the batch's mix
        stays whole (each rank mixes its own part)."""
        def cut(t):
            return None if t is None else part(t)
        shift = None if self.shift is None else tuple(cut(t) for t in self.shift)
        return replace(self, flip=cut(self.flip), box=cut(self.box), op=cut(self.op),
                       magnitude=cut(self.magnitude), shift=shift)


class PhotoAugment:
    """A run's photo augmentations: ``crop`` (random resized crop of ``scale`` of the area, then
    resized back to the batch's size), ``trivial`` (TrivialAugmentWide), MixUp with Beta(``mixup``,
    ``mixup``) and CutMix with Beta(``cutmix``, ``cutmix``) (both given: one or the other per batch,
    as torchvision's reference recipe picks), soft targets over ``classes``."""

    def __init__(self, kinds: tuple[str, ...], scale: tuple[float, float], mixup: float = 0.0, cutmix: float = 0.0,
                 classes: int = 0):
        self.crop, self.trivial = "crop" in kinds, "trivial" in kinds
        self.scale, self.mixup, self.cutmix, self.classes = scale, mixup, cutmix, classes
        self.table = magnitude_table()

    def draw(self, n: int, size: int, generator: torch.Generator, shift: tuple | None) -> PhotoDraws:
        """The choices for a batch of ``n`` images of ``size`` x ``size``; ``shift``: the flip (and
        shift) ``data.augment_draws`` drew, or None. A crop takes the flip into its grid."""
        draws = PhotoDraws(shift=shift)
        if self.crop:
            draws.box = crop_boxes(n, size, self.scale, generator)
            draws.flip, draws.shift = (None, None) if shift is None else (shift[0], None)
        if self.trivial:
            draws.op = torch.randint(len(OPS), (n,), generator=generator)
            magnitude = self.table[draws.op, torch.randint(BINS, (n,), generator=generator)]
            negative = (torch.rand(n, generator=generator) <= 0.5) & torch.tensor([op in SIGNED for op in OPS])[draws.op]
            draws.magnitude = torch.where(negative, -magnitude, magnitude)
        if self.mixup or self.cutmix:
            draws.mix = self._draw_mix(size, generator)
        return draws

    def _draw_mix(self, size: int, generator: torch.Generator) -> tuple:
        cutmix = bool(self.cutmix) and (not self.mixup or bool(torch.rand(1, generator=generator) < 0.5))
        alpha = self.cutmix if cutmix else self.mixup
        seed = int(torch.randint(2**62, (1,), generator=generator))  # Beta from numpy, seeded by the run's stream
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        if not cutmix:
            return "mixup", lam, None
        r_x, r_y = (int(v) for v in torch.randint(size, (2,), generator=generator))
        half = int(0.5 * math.sqrt(1.0 - lam) * size)
        left, top, right, bottom = max(r_x - half, 0), max(r_y - half, 0), min(r_x + half, size), min(r_y + half, size)
        return "cutmix", 1.0 - (right - left) * (bottom - top) / (size * size), (top, bottom, left, right)

    def images(self, images: torch.Tensor, draws: PhotoDraws) -> torch.Tensor:
        """The uint8 batch cropped (and flipped) and TrivialAugment-ed as ``draws`` say."""
        if draws.box is not None:
            images = resized_crop(images, draws.box, draws.flip)
        if draws.op is not None:
            images = trivial_augment(images, draws.op, draws.magnitude)
        return images

    def mix(self, x: torch.Tensor, labels: torch.Tensor, draws: PhotoDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """(prepared batch, target) with the batch's MixUp or CutMix: each image mixed with the one
        before it, the target the one-hot labels (or soft labels given) mixed alike; unmixed, the
        labels as they are."""
        if draws.mix is None:
            return x, labels
        kind, lam, box = draws.mix
        target = F.one_hot(labels, self.classes).float() if labels.dim() == 1 else labels.float()
        if kind == "mixup":
            x = x.roll(1, 0).mul_(1.0 - lam).add_(x.mul(lam))
        else:
            top, bottom, left, right = box
            x = x.clone()
            x[..., top:bottom, left:right] = x.roll(1, 0)[..., top:bottom, left:right]
        target = target.roll(1, 0).mul_(1.0 - lam).add_(target.mul(lam))
        return x.contiguous(memory_format=torch.channels_last), target


def photo_augment(cfg: TrainConfig, labels: torch.Tensor) -> PhotoAugment | None:
    """The run's ``PhotoAugment`` (``labels``: the training split's, for the number of classes), or
    None when it asks for none of these (the shift-and-flip augmentation alone stays in data.py)."""
    kinds = augment_kinds(cfg.augment)
    if not ({"crop", "trivial"} & set(kinds) or cfg.mixup or cfg.cutmix):
        return None
    classes = (labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1) if cfg.mixup or cfg.cutmix else 0
    return PhotoAugment(kinds, (cfg.crop_scale, 1.0), cfg.mixup, cfg.cutmix, classes)


# ---------------------------------------------------------------- random resized crop

def crop_boxes(n: int, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(n, 4) float64 (top, left, height, width): torchvision's ``RandomResizedCrop.get_params`` for
    ``n`` square images at once: up to ``ATTEMPTS`` draws of an area in ``scale`` and an aspect in
    ``RATIO`` (log-uniform), the first that fits, else the whole image. One draw from ``generator``,
    the arithmetic in numpy (a few hundred numbers: no thread pool to wake)."""
    u = torch.rand(n, 2 * ATTEMPTS + 2, generator=generator, dtype=torch.float64).numpy()
    area = size * size * (scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS])
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(low + (high - low) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.argmax(1)  # the first that fits (0 where none does)
    rows = np.arange(n)
    w = np.where(fits.any(1), w[rows, first], size)
    h = np.where(fits.any(1), h[rows, first], size)
    top = np.floor(u[:, -2] * (size - h + 1))
    left = np.floor(u[:, -1] * (size - w + 1))
    return torch.from_numpy(np.stack([top, left, h, w], 1))


def resized_crop(images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each uint8 image's ``box`` (top, left, height, width) resized bilinearly back to the image's
    size, mirrored where ``flip`` says: one sampling grid for the whole batch."""
    n, c, height, width = images.shape
    top, left, h, w = box.cpu().numpy().T  # the matrices in numpy: (n, 2, 3) numbers, then one copy
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = w / width * (np.where(flip.cpu().numpy(), -1.0, 1.0) if flip is not None else 1.0)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = torch.from_numpy(theta).to(images.device)
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- TrivialAugmentWide

def trivial_augment(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide with image i given operation ``OPS[op[i]]`` at ``magnitude[i]``: each
    operation is one batched call on the images that drew it (torchvision's formulas, nearest
    interpolation and black fill for the geometric ones)."""
    op, magnitude = op.to(images.device), magnitude.to(images.device)
    out = images.clone()
    for k, name in enumerate(OPS[1:], start=1):
        chosen = torch.nonzero(op == k).flatten()
        if len(chosen):
            out[chosen] = _OPERATIONS[name](images[chosen], magnitude[chosen])
    return out


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.float().view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a ratio per image: ``x * r + other * (1 - r)``, clamped, truncated to uint8."""
    r = _per_image(ratio)
    return x.float().mul(r).add_(other * (1.0 - r)).clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float32, device=x.device) / 13
    out = x.float()
    blurred = F.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view).mul_(1.0 - _per_image(factor)))
    return out.clamp_(0, 255).to(torch.uint8)


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """torchvision's ``affine_image`` with one inverse matrix per image ((m, 2, 3), pixel units about
    the image's centre): nearest neighbour, black outside."""
    m, c, height, width = x.shape
    theta = matrix.to(x.device, torch.float32).clone()
    theta[:, 0, 1] *= height / width
    theta[:, 1, 0] *= width / height
    theta[:, 0, 2] /= width / 2
    theta[:, 1, 2] /= height / 2
    grid = F.affine_grid(theta, [m, c, height, width], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False).round_().to(torch.uint8)


def _inverse(x: torch.Tensor, rows: tuple) -> torch.Tensor:
    return _affine(x, torch.stack([torch.stack(r, -1) for r in rows], 1))


def _shear(x: torch.Tensor, m: torch.Tensor, vertical: bool) -> torch.Tensor:
    """A shear about the top-left corner (torchvision: center [0, 0], shear atan(m) in degrees)."""
    m = m.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if vertical:  # y_in = m x + y + m w / 2
        return _inverse(x, ((one, zero, zero), (m, one, m * x.shape[3] / 2)))
    return _inverse(x, ((one, m, m * x.shape[2] / 2), (zero, one, zero)))


def _translate(x: torch.Tensor, m: torch.Tensor, vertical: bool) -> torch.Tensor:
    t = m.double().trunc()  # torchvision's int(magnitude)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return _inverse(x, ((one, zero, zero if vertical else -t), (zero, one, -t if vertical else zero)))


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    rot = torch.deg2rad(-degrees.double())  # torchvision's rotate passes -angle to the affine matrix
    cos, sin, zero = rot.cos(), rot.sin(), torch.zeros_like(rot)
    return _inverse(x, ((cos, sin, zero), (-sin, cos, zero)))


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    bits = bits.long().clamp(0, 8)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
    return x & mask.view(-1, 1, 1, 1)


def _equalize(x: torch.Tensor, _) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF
    return TF.equalize(x)


def _autocontrast(x: torch.Tensor, _) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF
    return TF.autocontrast(x)


_OPERATIONS = {
    "shear_x": lambda x, m: _shear(x, m, False),
    "shear_y": lambda x, m: _shear(x, m, True),
    "translate_x": lambda x, m: _translate(x, m, False),
    "translate_y": lambda x, m: _translate(x, m, True),
    "rotate": _rotate,
    "brightness": lambda x, m: x.float().mul_(_per_image(1.0 + m)).clamp_(0, 255).to(torch.uint8),
    "color": lambda x, m: _blend(x, _gray(x), 1.0 + m),
    "contrast": lambda x, m: _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1.0 + m),
    "sharpness": lambda x, m: _sharpness(x, 1.0 + m),
    "posterize": _posterize,
    "solarize": lambda x, m: torch.where(x >= _per_image(255.0 * m), 255 - x, x),
    "autocontrast": _autocontrast,
    "equalize": _equalize,
}
