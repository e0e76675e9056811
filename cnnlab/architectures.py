"""Any torchvision classification architecture (and timm's, where timm is installed) by name, built
from scratch for a run's classes and image size: what ``cnnlab train --model resnet18`` trains. A
run records it as ``architecture`` ("torchvision:resnet18") in config.json, and resume, evaluate,
predict, export and explain rebuild it from that record (presets.build_network)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .backbones import TORCHVISION_PREPROCESSING
from .errors import CnnlabError

SOURCES = ("torchvision", "timm")
DEFAULT_SIZE = 128  # pixels a side an architecture trains at unless --image-size says otherwise
# what an architecture trains with unless told otherwise: ImageNet's statistics and the photo
# augmentation (random resized crop and flip); the rest are TrainConfig's defaults (Adam 1e-3, batch 128)
SETTINGS = {"augment": "crop", "preprocessing": replace(TORCHVISION_PREPROCESSING, size=DEFAULT_SIZE)}


def torchvision_names() -> list[str]:
    """torchvision's classification architectures (not its detection, segmentation or video ones)."""
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def find(name: str) -> str | None:
    """``source:name`` for an architecture called ``name`` ("resnet18": torchvision's first, then
    timm's; "timm:resnet18" names the source), or None when there is none by that name."""
    source, _, bare = name.rpartition(":")
    if source and source not in SOURCES:
        return None
    if source in ("", "torchvision") and bare in torchvision_names():
        return f"torchvision:{bare}"
    timm = _timm() if source in ("", "timm") else None
    if timm is not None and bare in timm.list_models():
        return f"timm:{bare}"
    return None


def unknown(name: str) -> CnnlabError:
    """The one line for a --model that is neither a preset nor an architecture: where the choices are."""
    timm = " or timm's (timm.list_models())" if _timm() is not None else " (timm's too, once timm is installed)"
    return CnnlabError(f"unknown model '{name}': not a preset (`cnnlab presets` lists them) nor a torchvision "
                       f"architecture (torchvision.models.list_models(): resnet18, convnext_tiny, ...){timm}")


def _torchvision_options(name: str, size: int) -> dict:
    """What a few builders need to train at ``size`` from scratch with one output."""
    if name.startswith("vit_"):
        return {"image_size": size}
    if name == "maxvit_t":
        return {"input_size": (size, size)}
    if name in ("googlenet", "inception_v3"):  # no auxiliary heads: one tensor of logits in training too
        return {"aux_logits": False, "init_weights": True}
    return {}


def build(spec: str, num_classes: int, size: int) -> nn.Module:
    """The architecture ``spec`` ("torchvision:resnet18") with random weights, ``num_classes``
    outputs, checked to take ``size`` x ``size`` images (else a one-line error)."""
    source, _, name = spec.partition(":")
    try:
        if source == "timm":
            timm = _timm()
            if timm is None:
                raise CnnlabError(f"this run's model is timm's {name}: pip install timm")
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        else:
            import torchvision
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                                 **_torchvision_options(name, size))
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CnnlabError(f"cannot build {spec} ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
                          ) from None
    _check_size(model, spec, size)
    return model


def _check_size(model: nn.Module, spec: str, size: int) -> None:
    """A one-line error when ``model`` cannot take ``size`` x ``size`` images (too small for its strides)."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CnnlabError(f"{spec.partition(':')[2]} cannot take {size}x{size} images ({reason}); pass a larger "
                          "--image-size") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise CnnlabError(f"{spec} does not give one row of logits per image; choose another architecture")
