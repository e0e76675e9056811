"""A finished run as one ONNX file that runs without cnnlab or PyTorch: the run's preprocessing
inside the graph (input: RGB pixel values 0-255, float32, N x 3 x H x W at the run's size, any
batch), class probabilities out, the class names, input size and cnnlab version in the metadata.
It checks itself before it says done: onnxruntime and PyTorch on a batch of the run's own test
images, their largest probability difference and top-1 agreement printed. With ``int8``, that float
file is quantized (quantize.py, calibrated on the run's training images) and both files score the
run's whole test split: a larger accuracy drop than ``max_drop`` points writes nothing."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .data import load_multilabel_splits, load_splits
from .errors import CnnlabError
from .metrics import probabilities
from .mlflow_log import log_export
from .multilabel import thresholds_of
from .preprocessing import Preprocessing
from .quantize import SCHEME, calibration_sample, compare, quantize_file
from .runs import check_same_data, load_run
from .saved_model import OnnxModel, check_run_files, load_model
from .text import NAME_MAX, name_bytes, shown
from .version import __version__

FORMATS = ("onnx",)
CHECK_IMAGES = 64
INT8_NAME = "model-int8.onnx"  # an int8 export's default name in the run directory
MAX_DROP = 1.0  # accuracy points an int8 export may lose against the float file, unless --max-drop says otherwise


class Exported(nn.Module):
    """``model`` with ``preprocessing`` before it and probabilities after it (with ``multi_label``,
    several labels per image: each label's sigmoid, not a softmax over them)."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, multi_label: bool = False):
        super().__init__()
        self.model = model
        self.multi_label = multi_label
        self.bgr = preprocessing.order == "BGR"
        prepare = preprocessing.on("cpu")
        self.register_buffer("a", prepare.a)
        self.register_buffer("b", prepare.b)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.flip(1) if self.bgr else pixels
        logits = self.model(x * self.a + self.b)
        return torch.sigmoid(logits.float()) if self.multi_label else probabilities(logits)


def export_run(run_dir: str | Path, output: str | Path | None = None, fmt: str = "onnx",
               log: Callable[[str], None] = print, int8: bool = False, max_drop: float | None = None) -> Path:
    """Writes ``run_dir``'s model as ``output`` (default RUN_DIR/model.onnx, with ``int8``
    RUN_DIR/model-int8.onnx), checked with onnxruntime against PyTorch; returns its path. ``int8``:
    quantized, and refused (nothing written) if it scores more than ``max_drop`` points (default
    ``MAX_DROP``) below the float file on the run's test split."""
    if fmt not in FORMATS:
        raise CnnlabError(f"unknown --format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if max_drop is not None and not int8:
        raise CnnlabError("--max-drop bounds the accuracy an --int8 export may lose; add --int8, or leave --max-drop out")
    max_drop = MAX_DROP if max_drop is None else max_drop
    if not max_drop >= 0:  # NaN too
        raise CnnlabError(f"--max-drop must be a number of accuracy points, at least 0 (got {max_drop})")
    run_dir = Path(run_dir)
    check_run_files(run_dir)
    config, metrics = load_run(run_dir)
    if metrics is None:
        raise CnnlabError(f"{run_dir} is not a finished run (no metrics.json); finish it with `cnnlab resume "
                          f"{run_dir}` first")
    output = _checked_output(run_dir, output, INT8_NAME if int8 else "model.onnx")
    model, config, preprocessing = load_model(run_dir, torch.device("cpu"))
    wrapper = Exported(model.float().eval(), preprocessing, bool(config.get("multi_label"))).eval()
    splits = _int8_splits(run_dir, config, preprocessing, log) if int8 else None
    images, what = ((splits.test.images[:CHECK_IMAGES], "of the run's test images") if int8
                    else _check_images(config, preprocessing, log))
    metadata = {"class_names": json.dumps(config["class_names"]), "input_size": str(preprocessing.size),
                "cnnlab_version": __version__, "preprocessing": json.dumps(preprocessing.__dict__),
                "run": shown(run_dir.name)}
    if config.get("multi_label"):  # predict --model FILE.onnx reads these: every label above its threshold
        metadata.update({"multi_label": "true", "thresholds": json.dumps(thresholds_of(metrics, config))})
    with tempfile.TemporaryDirectory(prefix="cnnlab-export-") as tmp:  # the float file of an int8 export
        float_path = Path(tmp) / "model.onnx" if int8 else output
        _write_onnx(wrapper, images, float_path, metadata)
        with torch.no_grad():
            expected = wrapper(images.float()).numpy()
        got = OnnxModel(float_path).probabilities(images)
        agree = float((got.argmax(1) == expected.argmax(1)).mean())
        log(f"checked on {len(images)} {what}: onnxruntime vs PyTorch, largest probability difference "
            f"{np.abs(got - expected).max():.2e}, top-1 agreement {agree:.2%}")
        if agree < 1.0 and np.abs(got - expected).max() > 1e-3:
            log("warning: onnxruntime and PyTorch disagree on some images; the file was written, compare before use")
        if int8:
            thresholds = thresholds_of(metrics, config) if config.get("multi_label") else None
            _write_int8(float_path, output, splits, metadata, max_drop, log, thresholds)
    if log_export(run_dir, output):
        log(f"MLflow: {output.name} joined the run's MLflow run")
    return output


def _checked_output(run_dir: Path, output: str | Path | None, default: str = "model.onnx") -> Path:
    """Where the export goes (default RUN_DIR/``default``), or a one-line error: only a .onnx name,
    never one of the run's own files (its weights, checkpoint, records) nor anything not a plain
    file, in a writable folder."""
    output = Path(output) if output else run_dir / default
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


def _run_splits(config: dict, preprocessing: Preprocessing):
    """The run's splits, drawn again from its data as its config.json records them."""
    if config.get("multi_label"):  # several labels per image
        return load_multilabel_splits(config["data"], config.get("labels"), preprocessing.size, config["val_split"],
                                      config["test_split"], config["seed"])
    return load_splits(config["data"], preprocessing.size, config["val_split"], config["test_split"], config["seed"],
                       labels=config.get("labels"))


def _int8_splits(run_dir: Path, config: dict, preprocessing: Preprocessing, log):
    """The run's splits for an int8 export (calibration on train, scores on test), checked to be the
    very images the run was trained and tested on; a one-line error where its data is gone or changed."""
    try:
        splits = _run_splits(config, preprocessing)
    except (CnnlabError, KeyError, OSError) as exc:
        raise CnnlabError(f"--int8 calibrates on the run's training images and scores its test split, and its data "
                          f"is not at hand ({shown(str(exc))}); restore {shown(str(config.get('data')))} as the run "
                          "saw it, or export without --int8") from None
    check_same_data(run_dir, config, splits, log)
    return splits


def _write_int8(float_path: Path, output: Path, splits, metadata: dict, max_drop: float, log,
                thresholds: list[float] | None = None) -> None:
    """``float_path`` quantized into ``output``, written only once its test accuracy (mAP for several
    labels per image, decided at ``thresholds``) is within ``max_drop`` points of the float file's
    (atomically: a refusal or an error leaves nothing)."""
    calibration = calibration_sample(splits.train.images)
    try:
        with atomic_path(output) as tmp:
            quantize_file(float_path, tmp, calibration, metadata)
            test = splits.test
            scores = compare(OnnxModel(float_path).probabilities(test.images), OnnxModel(tmp).probabilities(test.images),
                             test.labels, thresholds)
            measure = scores["measure"]
            log(f"int8: {SCHEME}, calibrated on {len(calibration)} of the run's training images")
            log(f"on the run's {scores['images']} test images: float32 {measure} {scores['float_score']:.2%}, int8 "
                f"{scores['int8_score']:.2%} (drop {scores['drop_points']:.2f} points, --max-drop {max_drop:g}), "
                f"{scores['agreement_of']} agreement {scores['agreement']:.2%}")
            if scores["drop_points"] > max_drop + 1e-9:
                raise CnnlabError(f"int8 loses {scores['drop_points']:.2f} points of test {measure}, more than --max-drop "
                                  f"{max_drop:g}: nothing written; use the float export (no --int8), or pass a larger "
                                  "--max-drop")
            log(f"int8 file {tmp.stat().st_size / 1e6:.1f} MB, float32 {float_path.stat().st_size / 1e6:.1f} MB")
    except OSError as exc:
        raise CnnlabError(f"cannot write {shown(output)} ({exc.strerror}); pass -o a file in a writable folder") from None


def _check_images(config: dict, preprocessing: Preprocessing, log) -> tuple[torch.Tensor, str]:
    """A batch of the run's own test images (or, where its data is gone, random ones, said so)."""
    try:
        splits = _run_splits(config, preprocessing)
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
