"""The CIFAR-10 models as data: a preset is a layer list plus default settings.

A layer is a short string:

    conv32        3x3 conv, 32 filters, 'same' padding (``conv32:valid`` for none, ``:nobias``
                  without a bias, ``:dirac`` with its first filters initialised to pass their
                  input channels through, as airbench does)
    bn            batch norm over channels (``bn:noscale`` keeps its scale at 1 and trains only
                  its bias; ``:momentum=0.4``, ``:eps=1e-12`` set PyTorch's momentum and eps)
    relu, gelu    activations
    pool2         2x2 max-pooling (``pool3`` etc.)
    drop0.25      dropout
    flatten       flatten to a vector
    gap           global average pooling to one value per channel (``--head gap`` puts it in
                  flatten's place: the dense layers then keep their size at any image size)
    dense128      fully connected layer with 128 units
    dense         the output layer: one unit per class (``dense:nobias`` without a bias,
                  ``:unitstd`` with its initial weights rescaled to standard deviation 1)
    whiten        frozen 2x2 conv initialised from the data's patch statistics (airbench)
    scale0.111    multiply by a constant (logit temperature)

Adding a preset is one entry in ``PRESETS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from . import architectures
from .config import TrainConfig, validate
from .errors import CnnlabError
from .layers import Dropout, GlobalAvgPool, Net, Scale, Whiten
from .preprocessing import CIFAR10, UNIT

SEED_BLOCKS = ["conv32", "bn", "relu", "pool2", "conv64", "bn", "relu", "pool2"]
DROPOUT_LAYERS = ["conv32", "bn", "relu", "pool2", "drop0.25",
                  "conv64", "bn", "relu", "pool2", "drop0.25",
                  "flatten", "dense128", "relu", "drop0.5", "dense"]


def _airbench_group(width: int, conv: str = "nobias", bn: str = "bn") -> list[str]:
    return [f"conv{width}:{conv}", "pool2", bn, "gelu", f"conv{width}:{conv}", bn, "gelu"]


def _airbench_net(widths: tuple[int, int, int], conv: str = "nobias", bn: str = "bn",
                  head: tuple[str, str] = ("dense:nobias", "scale0.111")) -> tuple[str, ...]:
    groups = [layer for width in widths for layer in _airbench_group(width, conv, bn)]
    return tuple(["whiten", "gelu"] + groups + ["pool3", "flatten", *head])


# airbench94's batch norm: its scale fixed at 1, statistics averaged with weight 0.4 (its own
# "momentum 0.6" is PyTorch's 1 - 0.6), eps 1e-12
AIRBENCH_BN = "bn:noscale:momentum=0.4:eps=1e-12"
AIRBENCH94_NET = ((64, 256, 256), "nobias:dirac", AIRBENCH_BN)  # widths, conv and batch-norm options


UNIT_STD_HEAD = ("dense:nobias:unitstd", "scale0.00390625")  # airbench94_muon's head: unit-std rows, logits / 256


def muon_recipe(batch_size: int, lr: float) -> dict:
    """airbench94_muon's recipe at ``batch_size`` with Muon learning rate ``lr``, for a mean (not
    summed) loss. Its SGD rates and decay are per image (it sums the loss): 0.053 for the biases,
    0.67 for the head, decay 2e-6 a step; times the batch they are this mean loss's rates, given as
    scales of ``lr`` (at its batch 2000 and lr 0.24: 106 / 0.24, 1340 / 0.24 and weight decay
    0.004 / 0.24 at the base lr)."""
    return {"batch_size": batch_size, "optimizer": "muon", "lr": lr, "momentum": 0.85,
            "weight_decay": 2e-6 * batch_size / lr, "bias_lr_scale": 0.053 * batch_size / lr,
            "head_lr_scale": 0.67 * batch_size / lr, "schedule": "linear", "label_smoothing": 0.2, "augment": True,
            "translate": 2, "flip": "alternate", "tta": 2, "whiten_bias_epochs": 3, "whiten_bias_scaled": True,
            "preprocessing": CIFAR10, "monitor": "val_accuracy", "head": "gap"}


# airbench94_muon as published is muon_recipe(2000, 0.24): batches of 2000 keep a GPU busy. On a CPU
# a step's images/s hardly depend on the batch, so more steps an epoch cost little: batches of 500
# with the Muon lr cut in proportion (0.12) scored best of those tried on a tuning split, for both
# nets (BENCHMARKS.md, "Batches of 500")
CPU_MUON_RECIPE = muon_recipe(500, 0.12)


@dataclass(frozen=True)
class Preset:
    """A named model: its layers, what it adds, and its default training settings."""
    layers: tuple[str, ...]
    description: str
    settings: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "conv": Preset(
        ("conv32:valid", "relu", "conv64:valid", "relu", "flatten", "dense128", "relu", "dense"),
        "convolutions only (seed study)",
        # NCHW: its flatten after a 28x28x64 conv would copy channels_last activations every step
        {"epochs": 20, "channels_last": False}),
    "pool-bn": Preset(
        tuple(SEED_BLOCKS + ["flatten", "dense128", "relu", "dense"]),
        "+ max-pooling and batch norm (seed study)",
        {"epochs": 20}),
    "dropout": Preset(
        tuple(DROPOUT_LAYERS),
        "+ dropout 0.25 after each block, 0.5 before the output (seed study)",
        {"epochs": 60}),
    "early-stop": Preset(
        tuple(DROPOUT_LAYERS),
        "dropout + early stopping on val_loss, patience 5, best weights restored (seed study)",
        # dropout's budget, so this variant adds one idea to dropout: the seed capped it at 20 and
        # stopped at 12, but a from-scratch dropout net's val_loss still falls at epoch 20 in most
        # random streams, where a cap of 20 would end the run before early stopping could act
        {"epochs": 60, "monitor": "val_loss", "patience": 5}),
    "fast": Preset(
        _airbench_net((64, 192, 192), AIRBENCH94_NET[1], AIRBENCH94_NET[2], head=UNIT_STD_HEAD),
        "speedrun's recipe on a narrower net (64-192-192: two thirds of its convolution work) in batches of 500, "
        "8 epochs: level with the airbench94 port in less time on a CPU",
        {"epochs": 8, **CPU_MUON_RECIPE}),
    "airbench94": Preset(
        _airbench_net(*AIRBENCH94_NET),
        "airbench94 (the paper's record) on cnnlab's loop: whitening whose bias trains 3 epochs, dirac-initialised convs, "
        "batch-norm biases at 64x the lr, Lookahead, label smoothing, alternating flips, 6-view test-time "
        "augmentation, batch 1024",
        # airbench94's hyperparameters for a mean (not summed) loss: its lr 11.5 per 1024 images and
        # decoupled weight decay 0.0153, with Nesterov momentum 0.85, are lr 11.5 / (1 + 1 / 0.15) = 1.5
        # and weight decay 0.0153 / 11.5 = 0.00133 here; 10 epochs where it takes 9.9
        {"epochs": 10, "batch_size": 1024, "optimizer": "sgd", "lr": 1.5, "momentum": 0.85, "nesterov": True,
         "weight_decay": 0.0153 / 11.5, "bias_lr_scale": 64.0, "schedule": "triangle", "label_smoothing": 0.2,
         "augment": True, "translate": 2, "flip": "alternate", "tta": 2, "whiten_bias_epochs": 3,
         "lookahead": True, "preprocessing": CIFAR10, "monitor": "val_accuracy", "head": "gap"}),
    "speedrun": Preset(
        _airbench_net(*AIRBENCH94_NET, head=UNIT_STD_HEAD),
        "the highest CIFAR-10 accuracy per CPU-minute: airbench94_muon on cnnlab's loop (airbench94's net; Muon on "
        "the conv filters, SGD on biases and head; alternating flips, 6-view test-time augmentation), 8 epochs, "
        "in batches of 500 (the GPU record's 2000 at a quarter: more steps cost a CPU little)",
        {"epochs": 8, **CPU_MUON_RECIPE}),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a one-line error listing the known ones."""
    if name not in PRESETS:
        raise CnnlabError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)} "
                          "(see `cnnlab presets`)")
    return PRESETS[name]


def resolve_config(preset: str, **overrides) -> TrainConfig:
    """The model's settings (a preset's, or for a torchvision or timm architecture
    ``architectures.SETTINGS``) on top of the defaults, then every non-None override, the image
    size (``image_size``, else the model's) folded into the preprocessing; validated."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if preset in PRESETS:
        settings = PRESETS[preset].settings
    elif architectures.find(preset) is None:
        raise architectures.unknown(preset)
    elif "head" in given:
        raise CnnlabError(f"--head shapes a preset's head; {preset} keeps its own (leave --head out)")
    else:
        settings = architectures.SETTINGS
    merged = {**settings, **given}
    size = merged.get("image_size") or merged.get("preprocessing", UNIT).size
    merged.update(image_size=size, preprocessing=replace(merged.get("preprocessing", UNIT), size=size))
    cfg = TrainConfig(preset=preset, **merged)
    validate(cfg)
    if cfg.val_split == 0 and str(given.get("monitor", "")).startswith("val_"):  # a preset's own monitor just rests
        raise CnnlabError(f"--val-split 0 leaves no validation images to --monitor {cfg.monitor}; monitor loss or "
                          "accuracy, or keep a --val-split above 0")
    return cfg


def preset_layers(name: str, head: str | None = None) -> list[str]:
    """The preset's layers with its head (``head``, else the preset's own setting): ``gap`` puts
    global average pooling in flatten's place, so the dense layers keep their size at any image
    size; with ``flatten`` the first dense layer is sized for the image (build_model tracks shapes)."""
    head = head or get_preset(name).settings.get("head", TrainConfig.head)
    return [("gap" if layer == "flatten" and head == "gap" else layer) for layer in get_preset(name).layers]


def model_spec(cfg: TrainConfig) -> dict:
    """How the run's model is rebuilt, as config.json records it: ``layers`` (a preset's, its head
    applied) or ``architecture`` ("torchvision:resnet18")."""
    if cfg.preset in PRESETS:
        return {"layers": preset_layers(cfg.preset, cfg.head)}
    found = architectures.find(cfg.preset)
    if found is None:
        raise architectures.unknown(cfg.preset)
    return {"architecture": found}


def network_spec(record: dict) -> dict:
    """The part of a run's config.json (or of ``model_spec``) that says how to rebuild its model."""
    if record.get("architecture"):
        return {"architecture": record["architecture"]}
    return {"layers": record.get("layers")}


def build_network(spec: dict | list | tuple, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """The model ``spec`` describes (``model_spec``'s or ``network_spec``'s value, or a layer list),
    with fresh weights, for ``num_classes`` and inputs of ``in_shape``."""
    if isinstance(spec, dict):
        if spec.get("architecture"):
            return architectures.build(spec["architecture"], num_classes, in_shape[1])
        spec = spec["layers"]
    return build_model(spec, num_classes, in_shape)


def _parse(spec: str) -> tuple[str, str, list[str]]:
    name, *options = spec.split(":")
    head = name.rstrip("0123456789.")
    return head, name[len(head):], options


def _value(options: list[str], key: str, default: float, spec: str) -> float:
    """The number of a ``key=value`` option, or ``default``."""
    for option in options:
        if option.startswith(key + "="):
            try:
                return float(option[len(key) + 1:])
            except ValueError:
                raise CnnlabError(f"layer '{spec}': {option} is not a number") from None
    return default


def _batch_norm(c: int, options: list[str], spec: str, kind: type = nn.BatchNorm2d) -> nn.modules.batchnorm._BatchNorm:
    """``kind`` (over channels, or ``nn.BatchNorm1d`` over a flattened layer's units) with ``spec``'s options."""
    bn = kind(c, eps=_value(options, "eps", 1e-5, spec), momentum=_value(options, "momentum", 0.1, spec))
    if "noscale" in options:
        bn.weight.requires_grad_(False)
    return bn


def _conv(c: int, width: int, pad: int, options: list[str]) -> nn.Conv2d:
    conv = nn.Conv2d(c, width, 3, padding=pad, bias="nobias" not in options)
    if "dirac" in options:  # the first min(c, width) filters copy their input channel at first
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:min(c, width)])
            if conv.bias is not None:
                conv.bias.zero_()
    return conv


def build_model(layers: tuple[str, ...] | list[str], num_classes: int,
                in_shape: tuple[int, int, int] = (3, 32, 32)) -> Net:
    """Builds a ``Net`` (an ``nn.Sequential`` that fuses batch norm, ReLU and 2x2 pooling when
    training on CPU) from a layer list, tracking shapes to size each layer."""
    c, h, w = in_shape
    flat = None
    modules: list[nn.Module] = []
    for spec in layers:
        head, arg, options = _parse(spec)
        if head == "conv":
            pad = 0 if "valid" in options else 1
            modules.append(_conv(c, int(arg), pad, options))
            c, h, w = int(arg), h + 2 * pad - 2, w + 2 * pad - 2
        elif head == "whiten":
            modules.append(Whiten(c))
            c, h, w = 8 * c, h - 1, w - 1
        elif head == "bn":
            modules.append(_batch_norm(c, options, spec) if flat is None else _batch_norm(flat, options, spec, nn.BatchNorm1d))
        elif head == "relu":
            modules.append(nn.ReLU(inplace=True))
        elif head == "gelu":
            modules.append(nn.GELU())
        elif head == "pool":
            k = int(arg or 2)
            modules.append(nn.MaxPool2d(k))
            h, w = h // k, w // k
        elif head == "drop":
            modules.append(Dropout(float(arg)))
        elif head == "flatten":
            modules.append(nn.Flatten())
            flat = c * h * w
        elif head == "gap":
            modules.append(GlobalAvgPool())
            flat = c
        elif head == "dense":
            if flat is None:
                raise CnnlabError(f"layer '{spec}' needs a 'flatten' before it")
            units = int(arg) if arg else num_classes
            modules.append(nn.Linear(flat, units, bias="nobias" not in options))
            if "unitstd" in options:
                with torch.no_grad():
                    modules[-1].weight.div_(modules[-1].weight.std())
            flat = units
        elif head == "scale":
            modules.append(Scale(float(arg)))
        else:
            raise CnnlabError(f"unknown layer '{spec}' in preset; see `cnnlab presets` for the layer names")
        if h <= 0 or w <= 0:
            raise CnnlabError(f"layer '{spec}' shrinks a {in_shape[1]}x{in_shape[2]} image to nothing; "
                              "use larger images or fewer poolings")
    return Net(*modules)


@torch.no_grad()
def init_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Sets every ``Whiten`` layer from the eigenvectors of 2x2 patches of ``images``
    (normalized float NCHW), as airbench does: filters +/- each eigenvector, scaled by
    1/sqrt(eigenvalue)."""
    for layer in model.modules():
        if isinstance(layer, Whiten):
            c = layer.in_channels
            patches = images.unfold(2, 2, 1).unfold(3, 2, 1)
            patches = patches.transpose(1, 3).reshape(-1, c, 2, 2).float()
            flat = patches.reshape(len(patches), -1)
            flat = flat - flat.mean(0, keepdim=True)
            cov = (flat.T @ flat) / len(flat)
            eigenvalues, eigenvectors = torch.linalg.eigh(cov)
            filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None])
            filters = filters.reshape(-1, c, 2, 2)
            layer.weight.copy_(torch.cat([filters, -filters]))
            layer.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (as Keras's 'Total params')."""
    return sum(p.numel() for p in model.parameters())


def summary_rows(model: nn.Sequential, in_shape=(3, 32, 32)) -> list[tuple[str, str, int]]:
    """(layer, output shape, parameters) for each layer, like Keras's ``model.summary()``."""
    rows = []
    x = torch.zeros(1, *in_shape)
    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model):
            x = layer(x)
            name = f"{type(layer).__name__.lower()}_{i}"
            shape = "(None, " + ", ".join(str(d) for d in x.shape[1:]) + ")"
            rows.append((name, shape, sum(p.numel() for p in layer.parameters())))
    return rows


def summary_table(preset: str, image_size: int = 32, classes: int = 10) -> str:
    """Keras's ``model.summary()`` for ``preset``: layer, output shape, parameters, totals."""
    shape = (3, image_size, image_size)
    model = build_model(preset_layers(preset), classes, shape)
    rows = summary_rows(model, shape)
    width = max(len(r[0]) for r in rows) + 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_parameters(model)
    return "\n".join([f'Model: "{preset}" (input {shape}, {classes} classes)',
                      f"{'Layer (type)':<{width}}{'Output Shape':<24}{'Param #':>10}", "=" * (width + 34),
                      *(f"{name:<{width}}{out_shape:<24}{params:>10,}" for name, out_shape, params in rows),
                      "=" * (width + 34), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                      f"Non-trainable params: {total - trainable:,}"])


def presets_listing() -> str:
    """Every preset: parameters (10 classes), what it adds, its layers and its settings."""
    lines = []
    for name, preset in PRESETS.items():
        params = count_parameters(build_model(preset_layers(name), 10))
        lines += [f"{name:<11} {params:>10,} params  {preset.description}",
                  f"{'':<11} layers: {' -> '.join(preset_layers(name))}"]
        if preset.settings:
            lines.append(f"{'':<11} settings: " + ", ".join(f"{k}={getattr(v, 'describe', lambda: v)()}"
                                                            for k, v in preset.settings.items()))
    lines.append(f"\nor any torchvision classification architecture, trained from scratch (timm's too, once installed): "
                 f"--model resnet18, convnext_tiny, ... (torchvision.models.list_models()); at "
                 f"{architectures.DEFAULT_SIZE}x{architectures.DEFAULT_SIZE} with the photo augmentation unless "
                 "--image-size and --augment say otherwise")
    return "\n".join(lines)
