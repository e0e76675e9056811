"""A finished run as one ONNX file that runs without cnnlab or PyTorch: the run's preprocessing
inside the graph (input: RGB pixel values 0-255, float32, N x 3 x H x W at the run's size, any
batch), class probabilities out, the class names, input size and cnnlab version in the metadata.
It checks itself before it says done: onnxruntime and PyTorch on a batch of the run's own test
images, their largest probability difference and top-1 agreement printed."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .data import load_splits
from .errors import CnnlabError
from .metrics import probabilities
from .preprocessing import Preprocessing
from .runs import load_run
from .saved_model import OnnxModel, check_run_files, load_model
from .text import NAME_MAX, name_bytes, shown
from .version import __version__

FORMATS = ("onnx",)
CHECK_IMAGES = 64


class Exported(nn.Module):
    """``model`` with ``preprocessing`` before it and probabilities after it."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        self.bgr = preprocessing.order == "BGR"
        prepare = preprocessing.on("cpu")
        self.register_buffer("a", prepare.a)
        self.register_buffer("b", prepare.b)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.flip(1) if self.bgr else pixels
        return probabilities(self.model(x * self.a + self.b))


def export_run(run_dir: str | Path, output: str | Path | None = None, fmt: str = "onnx",
               log: Callable[[str], None] = print) -> Path:
    """Writes ``run_dir``'s model as ``output`` (default RUN_DIR/model.onnx), checked with
    onnxruntime against PyTorch; returns its path."""
    if fmt not in FORMATS:
        raise CnnlabError(f"unknown --format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    check_run_files(run_dir)
    config, metrics = load_run(run_dir)
    if metrics is None:
        raise CnnlabError(f"{run_dir} is not a finished run (no metrics.json); finish it with `cnnlab resume "
                          f"{run_dir}` first")
    output = _checked_output(run_dir, output)
    model, config, preprocessing = load_model(run_dir, torch.device("cpu"))
    wrapper = Exported(model.float().eval(), preprocessing).eval()
    images, what = _check_images(config, preprocessing, log)
    _write_onnx(wrapper, images, output, {"class_names": json.dumps(config["class_names"]),
                                          "input_size": str(preprocessing.size), "cnnlab_version": __version__,
                                          "preprocessing": json.dumps(preprocessing.__dict__),
                                          "run": shown(run_dir.name)})
    with torch.no_grad():
        expected = wrapper(images.float()).numpy()
    got = OnnxModel(output).probabilities(images)
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    log(f"checked on {len(images)} {what}: onnxruntime vs PyTorch, largest probability difference "
        f"{np.abs(got - expected).max():.2e}, top-1 agreement {agree:.2%}")
    if agree < 1.0 and np.abs(got - expected).max() > 1e-3:
        log("warning: onnxruntime and PyTorch disagree on some images; the file was written, compare before use")
    return output


def _checked_output(run_dir: Path, output: str | Path | None) -> Path:
    """Where the export goes (default RUN_DIR/model.onnx), or a one-line error: only a .onnx name,
    never one of the run's own files (its weights, checkpoint, records) nor anything not a plain
    file, in a writable folder."""
    output = Path(output) if output else run_dir / "model.onnx"
    if len(name_bytes(output.name)) > NAME_MAX:
        raise CnnlabError(f"-o {shown(output.name[:40])}... is longer than a file name may be ({NAME_MAX} bytes); "
                          "pass -o a shorter name")
    if output.exists() and output.resolve().parent == run_dir.resolve() and output.suffix.lower() != ".onnx":
        raise CnnlabError(f"-o {shown(output)} is one of the run's own files: the export would replace it and break "
                          f"the run; pass -o a .onnx file (default {shown(run_dir / 'model.onnx')})")
    if output.suffix.lower() != ".onnx":
        raise CnnlabError(f"-o {shown(output)} does not end in .onnx; pass -o a file name ending in .onnx")
    if output.exists() and not output.is_file():
        raise CnnlabError(f"-o {shown(output)} is not a plain file; pass -o a new .onnx file name")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise CnnlabError(f"cannot write {shown(output)}; pass -o a file name in a writable folder")
    return output


def _check_images(config: dict, preprocessing: Preprocessing, log) -> tuple[torch.Tensor, str]:
    """A batch of the run's own test images (or, where its data is gone, random ones, said so)."""
    try:
        splits = load_splits(config["data"], preprocessing.size, config["val_split"], config["test_split"],
                             config["seed"])
        same = len(splits.test) == config.get("data_info", {}).get("test_size")
        return splits.test.images[:CHECK_IMAGES], "of the run's test images" if same else "images of its data folder"
    except (CnnlabError, KeyError, OSError) as exc:
        log(f"note: the run's data is not at hand ({exc}); checking on random images instead")
        generator = torch.Generator().manual_seed(0)
        shape = (16, 3, preprocessing.size, preprocessing.size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator), "random images"


def _write_onnx(wrapper: nn.Module, images: torch.Tensor, output: Path, metadata: dict) -> None:
    """Exports ``wrapper`` with a dynamic batch and ``metadata``, atomically (temporary file, rename)."""
    import onnx

    try:
        with atomic_path(output) as tmp:  # removed on an error, Ctrl-C or SIGTERM (atomic.py)
            torch.onnx.export(wrapper, (images[:2].float(),), str(tmp), input_names=["pixels"],
                              output_names=["probabilities"], external_data=False, verbose=False,
                              dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}})
            graph = onnx.load(str(tmp))
            for key, value in metadata.items():
                graph.metadata_props.add(key=key, value=value)
            onnx.save(graph, str(tmp))
    except OSError as exc:
        raise CnnlabError(f"cannot write {shown(output)} ({exc.strerror}); pass -o a file in a writable folder") from None
