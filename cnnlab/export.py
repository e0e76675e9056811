"""A finished run as one ONNX file that runs without cnnlab or PyTorch: the run's preprocessing
inside the graph (input: RGB pixel values 0-255, float32, N x 3 x H x W at the run's size, any
batch), class probabilities out, the class names, input size and cnnlab version in the metadata.
It checks itself before it says done: onnxruntime and PyTorch on a batch of the run's own test
images, their largest probability difference and top-1 agreement printed."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import load_splits
from .errors import CnnlabError
from .metrics import probabilities
from .preprocessing import Preprocessing
from .runs import load_run
from .saved_model import OnnxModel, load_model

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
    config, metrics = load_run(run_dir)
    if metrics is None:
        raise CnnlabError(f"{run_dir} is not a finished run (no metrics.json); finish it with `cnnlab resume "
                          f"{run_dir}` first")
    output = Path(output) if output else run_dir / "model.onnx"
    if output.is_dir() or not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise CnnlabError(f"cannot write {output}; pass -o a file name in a writable folder")
    model, config, preprocessing = load_model(run_dir, torch.device("cpu"))
    wrapper = Exported(model.float().eval(), preprocessing).eval()
    images, what = _check_images(config, preprocessing, log)
    _write_onnx(wrapper, images, output, {"class_names": json.dumps(config["class_names"]),
                                          "input_size": str(preprocessing.size), "cnnlab_version": __version__,
                                          "preprocessing": json.dumps(preprocessing.__dict__), "run": run_dir.name})
    with torch.no_grad():
        expected = wrapper(images.float()).numpy()
    got = OnnxModel(output).probabilities(images)
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    log(f"checked on {len(images)} {what}: onnxruntime vs PyTorch, largest probability difference "
        f"{np.abs(got - expected).max():.2e}, top-1 agreement {agree:.2%}")
    if agree < 1.0 and np.abs(got - expected).max() > 1e-3:
        log("warning: onnxruntime and PyTorch disagree on some images; the file was written, compare before use")
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

    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".onnx")
    os.close(fd)
    try:
        torch.onnx.export(wrapper, (images[:2].float(),), tmp, input_names=["pixels"], output_names=["probabilities"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}}, external_data=False,
                          verbose=False)
        graph = onnx.load(tmp)
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, tmp)
        os.replace(tmp, output)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CnnlabError(f"cannot write {output} ({exc.strerror}); pass -o a file in a writable folder") from None
        raise
