"""A model loaded back for use: a finished run (its model rebuilt from config.json, its weights
from model.pt), a pretrained backbone by name, or a file made by ``cnnlab export`` run by
onnxruntime. evaluate, predict, export and explain load their models here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import get_backbone, pretrained
from .config import TrainConfig, from_record
from .errors import CnnlabError
from .multilabel import thresholds_of
from .preprocessing import Preprocessing
from .presets import build_network, network_spec
from .runs import load_run, load_torch
from .runtime import memory_format, pick_device
from .text import shown
from .transfer_model import build_from_config
from . import user_model
from .weights import load_weights_into


RUN_FILES = ("config.json", "metrics.json", "history.csv", "model.pt", "checkpoint.pt")


def check_run_files(run_dir: Path) -> None:
    """A one-line error for a run file that is there but not a regular file (a named pipe, a
    device): reading one could wait forever."""
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.exists() and not path.is_file():
            raise CnnlabError(f"{shown(path)} is not a regular file; restore the run's {name} or train the run again")


def load_model(run_dir: str | Path, device: torch.device | None = None, module: nn.Module | None = None):
    """(model in eval mode with the run's best weights, its config, its preprocessing), all
    from what the run directory recorded (for a run of your own model, ``module``: a fresh
    instance of its class, where the run's module.pt cannot be loaded)."""
    run_dir = Path(run_dir)
    check_run_files(run_dir)
    config, _ = load_run(run_dir)
    if config.get("kind") == "transfer":
        model, preprocessing = build_from_config(config)
    elif config.get("module"):  # your own model: the run's module.pt, or the one given
        model = module if module is not None else user_model.load(run_dir, config["module"])
        preprocessing = from_record(TrainConfig, config).preprocessing
    else:
        model = build_network(network_spec(config), len(config["class_names"]), tuple(config["input_shape"]))
        preprocessing = from_record(TrainConfig, config).preprocessing
    load_weights_into(model, load_torch(run_dir / "model.pt"), str(run_dir / "model.pt"), "the run's layers",
                      "retrain the run or restore its model.pt")
    device = device or pick_device()
    layout = memory_format(config.get("channels_last", True))
    return model.to(device, memory_format=layout).eval(), config, preprocessing


def torch_model(model: str, weights: str | None = None) -> tuple[nn.Module, Preprocessing, list[str]]:
    """(model in eval mode, its preprocessing, its class names) for a run directory or a backbone name."""
    if (Path(model) / "config.json").is_file():
        net, config, preprocessing = load_model(model)
        return net, preprocessing, config["class_names"]
    if Path(model).exists():
        raise CnnlabError(f"{shown(model)} is not a run directory (no config.json) nor an exported .onnx file; pass a run, "
                          "a .onnx file or a backbone name")
    built, weights_used, _ = pretrained(model, None, weights)
    net = built.net.to(pick_device(), memory_format=torch.channels_last).eval()
    return net, weights_used.preprocessing, get_backbone(model).class_names()


def multilabel_thresholds(model: str | Path) -> list[float] | None:
    """Each label's threshold when ``model`` is a run directory of several labels per image
    (``--multi-label``); None for a run of one class per image or anything else."""
    if not (Path(model) / "config.json").is_file():
        return None
    config, metrics = load_run(model)
    return thresholds_of(metrics, config) if config.get("multi_label") else None


class OnnxModel:
    """An exported file run by onnxruntime: its class names and input size from the metadata."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.class_names = json.loads(meta["class_names"])
            self.size = int(meta["input_size"])
            # several labels per image (an export of a --multi-label run): sigmoid outputs, each label's threshold
            self.thresholds = json.loads(meta["thresholds"]) if meta.get("multi_label") == "true" else None
        except ImportError:
            raise CnnlabError("running .onnx files needs onnxruntime: pip install onnxruntime") from None
        except Exception as exc:
            raise CnnlabError(f"{shown(path)} is not a model exported by `cnnlab export` ({type(exc).__name__}); "
                              "export the run again") from None

    def probabilities(self, images: torch.Tensor, batch: int = 32) -> np.ndarray:
        """Class probabilities for uint8 (N, 3, size, size) images, ``batch`` at a time (float32
        copies of a batch, never of all of them)."""
        parts = [self.session.run(None, {"pixels": images[i:i + batch].float().numpy()})[0]
                 for i in range(0, len(images), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)
