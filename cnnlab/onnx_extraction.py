"""A frozen EfficientNet-Lite base run by onnxruntime for feature extraction in float32 on a CPU.

In float32 (CPUs without native bfloat16, or ``--precision fp32``) onnxruntime's CPU kernels run the
folded Lite bases faster than PyTorch's (BENCHMARKS.md, transfer learning), with the same features up
to float32 rounding. Where the CPU computes bfloat16, PyTorch's bfloat16 base is about as fast, and on
a GPU PyTorch runs it, so both stay PyTorch. ``CNNLAB_ONNXRUNTIME=0`` switches this off."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from .backbones import LiteFeatures, for_extraction, split_base
from .runtime import switched_off

SWITCH = "CNNLAB_ONNXRUNTIME"  # =0: PyTorch extracts the features instead


class OnnxBase(nn.Module):
    """``base`` exported to ONNX in memory and run by onnxruntime on ``threads`` CPU threads: a
    module that maps a float32 (N, 3, H, W) batch to the base's float32 output, as ``base`` does."""

    def __init__(self, base: nn.Module, size: int, threads: int):
        super().__init__()
        import onnxruntime

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's notes on shape inference
            # the TorchScript exporter: faster than the dynamo one for these graphs
            torch.onnx.export(base.eval(), (torch.zeros(1, 3, size, size),), buf, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # its threads would spin between batches, taking the cores from PyTorch's preprocessing of the next one
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # onnxruntime reads C-contiguous arrays: a channels_last batch is copied once here
        return torch.from_numpy(self.session.run(None, {"x": np.ascontiguousarray(x.float().numpy())})[0])


def extraction_base(features: nn.Module, size: int, device: torch.device, dtype: torch.dtype | None,
                    log=None, below: int = 0) -> nn.Module:
    """The fastest frozen copy of ``features`` for extracting features at ``size`` x ``size``:
    an EfficientNet-Lite base in float32 on a CPU run by onnxruntime (``OnnxBase``), anything else
    ``backbones.for_extraction``'s PyTorch copy. When the export fails, PyTorch's, with a warning.
    With ``below`` K, the copy stops below the base's last K blocks (``backbones.split_base``)."""
    base = for_extraction(features)
    if below:
        base = split_base(base, below)[0]
    if device.type != "cpu" or dtype is not None or not isinstance(features, LiteFeatures) or switched_off(SWITCH):
        return base
    try:
        return OnnxBase(base, size, torch.get_num_threads())
    except Exception as exc:  # an exporter or onnxruntime that cannot take the graph: PyTorch's is as exact
        if log:
            log(f"warning: onnxruntime cannot run this base ({type(exc).__name__}: {str(exc)[:120]}); "
                "extracting with PyTorch")
        return base
