"""Photo augmentations on whole uint8 batches (augment.py): each TrivialAugmentWide operation equal to
torchvision.transforms.v2's on the same image at the same magnitude, the batched random resized crop
equal to torchvision's resized_crop of the same box, MixUp and CutMix equal to torchvision's formulas
with targets that sum to 1, and every draw repeatable from the run's generator."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cnnlab.augment import (
    OPS,
    PhotoAugment,
    crop_boxes,
    magnitude_table,
    resized_crop,
    trivial_augment,
)
from cnnlab.config import TrainConfig, parse_augment, validate
from cnnlab.errors import CnnlabError


def photos(n=6, size=24, seed=0):
    """Smooth random images (a coarse pattern upsampled), as photos are: not pure noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 255
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").round().to(torch.uint8)


def torchvision_op(image, name, m):
    """torchvision's own TrivialAugmentWide operation ``name`` at magnitude ``m`` (its _apply_image_or_video_transform)."""
    if name == "shear_x":
        return TF.affine(image, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], center=[0, 0])
    if name == "shear_y":
        return TF.affine(image, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], center=[0, 0])
    if name in ("translate_x", "translate_y"):
        shift = [int(m), 0] if name == "translate_x" else [0, int(m)]
        return TF.affine(image, 0.0, shift, 1.0, [0.0, 0.0])
    calls = {"rotate": lambda: TF.rotate(image, m), "brightness": lambda: TF.adjust_brightness(image, 1.0 + m),
             "color": lambda: TF.adjust_saturation(image, 1.0 + m), "contrast": lambda: TF.adjust_contrast(image, 1.0 + m),
             "sharpness": lambda: TF.adjust_sharpness(image, 1.0 + m), "posterize": lambda: TF.posterize(image, int(m)),
             "solarize": lambda: TF.solarize(image, 255.0 * m), "autocontrast": lambda: TF.autocontrast(image),
             "equalize": lambda: TF.equalize(image), "identity": lambda: image}
    return calls[name]()


@pytest.mark.parametrize("name", OPS)
def test_each_trivial_augment_operation_is_torchvisions(name):
    images = photos()
    k = OPS.index(name)
    table = magnitude_table()
    bins = torch.tensor([0, 5, 12, 20, 27, 30])
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]) if name in ("shear_x", "rotate", "brightness", "color",
                                                                      "contrast", "sharpness", "translate_y") else 1.0
    magnitude = table[k, bins] * signs
    ours = trivial_augment(images, torch.full((len(images),), k), magnitude)
    for i in range(len(images)):
        theirs = torchvision_op(images[i], name, float(magnitude[i]))
        diff = (ours[i].int() - theirs.int()).abs()
        # geometric ones: a few pixels may fall on the other side of a sampling boundary; colour ones: rounding by 1
        assert (diff > 1).float().mean() <= 0.02 and (diff > 0).float().mean() <= 0.05, (name, i, float(magnitude[i]))


def test_trivial_augment_gives_each_image_its_own_operation():
    images = photos(4)
    op = torch.tensor([OPS.index("identity"), OPS.index("solarize"), OPS.index("equalize"), OPS.index("identity")])
    out = trivial_augment(images, op, torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(out[0], images[0]) and torch.equal(out[3], images[3])
    assert torch.equal(out[1], TF.solarize(images[1], 127.5)) and torch.equal(out[2], TF.equalize(images[2]))


def test_the_batched_crop_is_torchvisions_resized_crop_and_folds_the_flip_in():
    images = photos(5, 32)
    boxes = crop_boxes(5, 32, (0.08, 1.0), torch.Generator().manual_seed(3))
    out = resized_crop(images, boxes)
    flipped = resized_crop(images, boxes, torch.tensor([True, False, True, False, True]))
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        theirs = TF.resized_crop(images[i], top, left, h, w, [32, 32], antialias=True)
        # within 2 pixels of the crop's edge (a crop upsampled up to 4x) ours blends in the pixel just outside it,
        # where torchvision's resize repeats the edge: alike elsewhere
        inner = (out[i].int() - theirs.int()).abs()[:, 2:-2, 2:-2]
        assert inner.max() <= 1 and (out[i].int() - theirs.int()).abs().float().mean() < 1.5
        assert torch.equal(flipped[i], out[i].flip(-1)) if i % 2 == 0 else torch.equal(flipped[i], out[i])


def test_crop_boxes_follow_torchvisions_bounds():
    boxes = crop_boxes(2000, 64, (0.08, 1.0), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area, aspect = h * w / 64**2, w / h
    assert area.min() > 0.06 and area.max() <= 1 and aspect.min() > 0.7 and aspect.max() < 1.45
    assert 0.45 < area.mean() < 0.6  # uniform in [0.08, 1], less the tries that did not fit


def test_draws_are_repeatable_from_the_generator_and_mixing_matches_torchvision():
    aug = PhotoAugment(("crop", "trivial"), (0.35, 1.0), mixup=0.2, cutmix=1.0, classes=3)
    flips = torch.arange(8) % 3 == 0
    a, b = (aug.draw(8, 24, torch.Generator().manual_seed(5), (flips, None, None)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip((a.box, a.op, a.magnitude, a.flip), (b.box, b.op, b.magnitude, b.flip)))
    assert a.mix == b.mix and a.shift is None
    x, labels = torch.randn(8, 3, 24, 24), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    kinds = set()
    for seed in range(12):
        draws = aug.draw(8, 24, torch.Generator().manual_seed(seed), None)
        kind, lam, box = draws.mix
        kinds.add(kind)
        mixed, target = aug.mix(x.clone(), labels, draws)
        assert torch.allclose(target.sum(1), torch.ones(8)) and 0 <= lam <= 1
        one_hot = torch.nn.functional.one_hot(labels, 3).float()
        assert torch.allclose(target, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
        if kind == "mixup":
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
        else:
            top, bottom, left, right = box
            assert math.isclose(lam, 1 - (bottom - top) * (right - left) / 24**2)
            inside = torch.zeros(24, 24, dtype=torch.bool)
            inside[top:bottom, left:right] = True
            assert torch.equal(mixed[..., inside], x.roll(1, 0)[..., inside]) and torch.equal(mixed[..., ~inside],
                                                                                            x[..., ~inside])
    assert kinds == {"mixup", "cutmix"}


def test_augment_kinds_parse_and_bad_ones_are_one_line():
    assert parse_augment("shift") is True and parse_augment("trivial,crop") == "crop,trivial"
    with pytest.raises(ValueError, match="exclude each other"):
        parse_augment("crop,shift")
    with pytest.raises(CnnlabError, match="unknown --augment 'warp'"):
        validate(TrainConfig(preset="pool-bn", data="d", augment="warp"))
    with pytest.raises(CnnlabError, match="--crop-scale"):
        validate(TrainConfig(preset="pool-bn", data="d", augment="crop", crop_scale=0))
