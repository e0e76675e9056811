"""One Preprocessing value for every input: the seed's, CIFAR-10's and each backbone's weights'."""
from dataclasses import asdict

import pytest
import torch

from cnnlab.backbones import CAFFE_PREPROCESSING, LITE_PREPROCESSING, TORCHVISION_PREPROCESSING
from cnnlab.preprocessing import CIFAR10, UNIT, Preprocessing, model_input

IMAGES = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def formula(p: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """``(x * scale - mean) / std`` in float64, channels reordered first."""
    x = images.double()
    if p.order == "BGR":
        x = x.flip(1)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (p.mean, p.std))
    return (x * p.scale - mean) / std


@pytest.mark.parametrize("p", [UNIT, CIFAR10, TORCHVISION_PREPROCESSING, CAFFE_PREPROCESSING, LITE_PREPROCESSING])
def test_every_preprocessing_computes_its_formula(p):
    out = p(IMAGES)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.double(), formula(p, IMAGES), rtol=1e-6, atol=1e-5)


def test_the_seeds_scaling_is_exactly_x_over_255_and_bgr_flips_the_channels():
    assert torch.equal(UNIT(IMAGES), (IMAGES.float() * (1 / 255)).contiguous(memory_format=torch.channels_last))
    rgb = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    assert CAFFE_PREPROCESSING(rgb).flatten().tolist() == pytest.approx([250 - 103.939, 128 - 116.779, 10 - 123.68])


def test_constants_are_made_once_per_device_and_reused_for_every_batch():
    prepare = CIFAR10.on("cpu")
    a, b = prepare.a, prepare.b
    first, second = prepare(IMAGES), prepare(IMAGES[:2])
    assert prepare.a is a and prepare.b is b
    assert torch.equal(first[:2], second) and torch.equal(first, CIFAR10(IMAGES))


def test_a_recorded_preprocessing_reads_back_as_the_same_value():
    for p in (UNIT, CIFAR10, CAFFE_PREPROCESSING):
        assert Preprocessing.from_dict(asdict(p)) == p
    listed = {**asdict(CIFAR10), "mean": list(CIFAR10.mean), "std": list(CIFAR10.std)}  # as JSON gives it back
    assert Preprocessing.from_dict(listed) == CIFAR10


def test_model_input_prepares_images_and_passes_cached_features_through():
    prepare = LITE_PREPROCESSING.on("cpu")
    assert torch.equal(model_input(IMAGES, prepare), LITE_PREPROCESSING(IMAGES))
    features = torch.randn(5, 8).half()
    out = model_input(features, prepare)
    assert out.dtype == torch.float32 and torch.equal(out, features.float())
