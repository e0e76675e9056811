"""int8 ONNX for CPUs: a float file made by ``cnnlab export`` quantized by onnxruntime's static
quantization (QDQ format, weights int8 per output channel, activations uint8 with ranges calibrated
on a few hundred of the run's own training images), and the two files compared on labelled images.

What stays float: the preprocessing before the first convolution (pixels 0-255 in, the run's scale,
mean and std), the last weighted layer (the classifier: logits in float) and what follows it
(softmax or sigmoid, airbench's logit scale): quantizing them saves no time and costs accuracy. Activations are uint8 because x86 CPUs
multiply uint8 by int8 in one instruction (AVX-512 VNNI, AVX-VNNI, AMX): int8 x int8 runs about as slow
as float32 there (docs/serving.md has the measurements)."""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import CnnlabError
from .multilabel import label_average_precisions

CALIBRATION_IMAGES = 256  # a few hundred of the run's training images
CALIBRATION_BATCH = 16
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# no int8 kernel runs them: quantized, their scales would only be rounded per tensor between a dequantize and
# a quantize (airbench's batch norms after a pooling layer, which no convolution can absorb)
KEPT_FLOAT = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization"})
SCHEME = "static QDQ, int8 weights per output channel, uint8 activations (MinMax-calibrated)"


def calibration_sample(images: torch.Tensor, count: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` of ``images`` drawn at random (seeded: the same run calibrates the same way)."""
    if len(images) <= count:
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]


def float_nodes(graph) -> list[str]:
    """Names of the nodes that stay float: those no weighted layer (convolution, dense) feeds (the
    preprocessing), and those that feed no other weighted layer: the last one (the classifier: the
    logits stay float, a small layer) and what follows it (softmax or sigmoid, a logit scale)."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reach(start, step) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            node = todo.pop()
            if node.name not in seen:
                seen.add(node.name)
                todo += step(node)
        return seen
    weighted = [n for n in graph.node if n.op_type in WEIGHTED]
    below = reach(weighted, lambda n: [c for out in n.output for c in consumers.get(out, [])])
    above = reach([producer[i] for n in weighted for i in n.input if i in producer],
                  lambda n: [producer[i] for i in n.input if i in producer])
    return [n.name for n in graph.node if n.name not in below or n.name not in above]


class _Batches:
    """onnxruntime's CalibrationDataReader over uint8 images: float32 pixel batches, one at a time."""

    def __init__(self, images: torch.Tensor):
        self.images, self.start = images, 0

    def get_next(self):
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + CALIBRATION_BATCH].float().numpy()
        self.start += CALIBRATION_BATCH
        return {"pixels": batch}

    def rewind(self) -> None:
        self.start = 0


def quantize_file(float_path: Path, int8_path: Path, calibration: torch.Tensor, metadata: dict) -> None:
    """Writes ``float_path`` quantized to int8 as ``int8_path`` (``metadata`` in its properties),
    activation ranges calibrated on the uint8 ``calibration`` images."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise CnnlabError("--int8 needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    if not len(calibration):
        raise CnnlabError("--int8 calibrates on the run's training images, and its train split is empty; export "
                          "without --int8")
    kinds = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - KEPT_FLOAT)  # onnxruntime's own list, less those
    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(float_path), str(prepared))  # shapes inferred, batch norms folded into convolutions
            model = onnx.load(str(prepared))
            for i, node in enumerate(model.graph.node):  # every node named, so that nodes_to_exclude can name it
                node.name = node.name or f"node_{i}"
            onnx.save(model, str(prepared))
            quantize_static(str(prepared), str(int8_path), _Batches(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=kinds, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes(model.graph),
                            calibrate_method=CalibrationMethod.MinMax,
                            # (not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops, not merges, what it
                            # collected each time it reaches it; MinMax keeps only each batch's minima and maxima)
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except (OSError, CnnlabError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a graph onnxruntime cannot quantize: one line, not its traceback
            reason = " ".join(str(exc).split())[:200]
            raise CnnlabError(f"onnxruntime could not quantize this model ({type(exc).__name__}: {reason}); use the "
                              "float export (no --int8)") from None
    quantized = onnx.load(str(int8_path))
    del quantized.metadata_props[:]
    for key, value in {**metadata, "quantization": f"{SCHEME}, calibrated on {len(calibration)} training images"}.items():
        quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(int8_path))


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer writes its notes (a weight it quantizes per tensor, say) to the root
    logger: kept off the command line while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def compare(float_probs: np.ndarray, int8_probs: np.ndarray, labels: torch.Tensor, thresholds=None) -> dict:
    """Each file's score on images labelled ``labels``, the drop in points and how often the two
    decide alike: accuracy and top-1 classes for one label per image; for several (``labels`` 0/1,
    N x labels) mAP (multilabel.py's, scikit-learn's) and each label's yes or no at ``thresholds``."""
    if labels.dim() == 2:
        truth, cut = labels.numpy() > 0.5, np.asarray(0.5 if thresholds is None else thresholds, float)
        ap = [label_average_precisions(p, truth).mean() for p in (float_probs, int8_probs)]
        same = (float_probs >= cut) == (int8_probs >= cut)
        return {"images": len(truth), "measure": "mAP", "float_score": float(ap[0]), "int8_score": float(ap[1]),
                "drop_points": 100 * float(ap[0] - ap[1]), "agreement": float(same.mean()), "agreement_of": "label"}
    truth = labels.numpy()
    a, b = float_probs.argmax(1), int8_probs.argmax(1)
    float_acc, int8_acc = float((a == truth).mean()), float((b == truth).mean())
    return {"images": len(truth), "measure": "accuracy", "float_score": float_acc, "int8_score": int8_acc,
            "drop_points": 100 * (float_acc - int8_acc), "agreement": float((a == b).mean()), "agreement_of": "top-1"}
