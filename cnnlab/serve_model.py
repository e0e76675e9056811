"""The model `cnnlab serve` answers with, as one value: a finished run (PyTorch, with Grad-CAM) or a
file made by `cnnlab export` (onnxruntime, float or int8), that classifies uint8 batches, draws
Grad-CAM overlays and says what it is (name, version, classes, input size, preprocessing, the run's
scores). Uploaded bytes become an image here, decoded as `cnnlab predict` decodes a file, within
limits that keep a server's memory bounded (a decompression bomb is refused from its header)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import CnnlabError
from .folders import decode_image
from .gradcam import explainable, overlays
from .inference import inference_batch
from .metrics import probabilities
from .multilabel import probabilities as sigmoid_probabilities
from .preprocessing import model_input
from .runs import load_run
from .saved_model import OnnxModel, load_model, multilabel_thresholds
from .text import shown
from .version import __version__

MAX_PIXELS = 64_000_000  # an image's pixels (8000 x 8000): decoded, about 200 MB; a larger one is refused
SHOWN_NAME = 80  # characters of an uploaded file's name a message shows


class UploadError(CnnlabError):
    """An upload the server refuses: ``status`` is the HTTP status (4xx), the message one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def upload_name(name: str | None) -> str:
    """An uploaded file's name as a message shows it: escaped, and cut to ``SHOWN_NAME`` characters."""
    text = shown(name or "the upload")
    return text if len(text) <= SHOWN_NAME else text[:SHOWN_NAME] + "..."


def decode_upload(data: bytes, name: str, size: int) -> np.ndarray:
    """uint8 (3, size, size) RGB of an uploaded image, resized as `cnnlab predict` resizes a file;
    an ``UploadError`` for an empty file, one that is no image, a decompression bomb or a damaged one."""
    if not data:
        raise UploadError(422, f"{name} is empty; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"{name} declares more pixels than Pillow decodes safely (a decompression bomb); send "
                          "a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise UploadError(415, f"{name} is not an image Pillow reads (or its header is damaged); send a JPEG, PNG, "
                          "WebP, GIF, BMP or TIFF file") from None
    if width * height > MAX_PIXELS:
        raise UploadError(413, f"{name} has {width} x {height} pixels, more than the {MAX_PIXELS // 1_000_000} million "
                          "this server decodes; send a smaller image")
    pixels = decode_image((io.BytesIO(data), size))
    if pixels is None:
        raise UploadError(422, f"{name} is a damaged or truncated image (it could not be decoded); send the whole file")
    return np.frombuffer(pixels, np.uint8).reshape(size, size, 3).transpose(2, 0, 1)


def _digest(path: Path) -> str:
    """The first 12 hex digits of a file's SHA-256: the model's version (another training, another version)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


class ServedModel:
    """A run directory or an exported .onnx file, loaded once; ``classify`` and ``explain`` are
    called from one thread at a time (the server's model thread)."""

    def __init__(self, source: str | Path, device: torch.device | None = None, threads: int | None = None):
        path = Path(source)
        if path.suffix.lower() == ".onnx" and path.is_file():
            self._load_onnx(path, threads)
        elif (path / "config.json").is_file():
            self._load_run(path, device)
        else:
            raise CnnlabError(f"{shown(source)} is neither a run directory (no config.json) nor an .onnx file; pass a "
                              "run made by `cnnlab train` or `cnnlab transfer`, or a file made by `cnnlab export`")
        self.name, self.version = shown(path.stem if self.kind == "onnx" else path.name), _digest(self._weights)
        self._explainer = None

    def _load_onnx(self, path: Path, threads: int | None) -> None:
        self.kind, self._weights = "onnx", path
        self.onnx = OnnxModel(path)  # checks the file and reads its metadata
        import onnxruntime
        options = onnxruntime.SessionOptions()
        # the model's thread shares the CPU with decoding and the event loop: onnxruntime's threads sleep while
        # they wait instead of spinning (on 2 busy cores: 2-3x the requests/s, docs/serving.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads or 0
        self.onnx.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.onnx.session.get_modelmeta().custom_metadata_map
        self.classes, self.size = self.onnx.class_names, self.onnx.size
        self.preprocessing = json.loads(meta.get("preprocessing", "null"))
        self.quantization, self.metrics = meta.get("quantization"), None
        self.thresholds = self.onnx.thresholds  # several labels per image: each label's own, else None

    def _load_run(self, path: Path, device: torch.device | None) -> None:
        _, metrics = load_run(path)
        if metrics is None:
            raise CnnlabError(f"{shown(path)} is not a finished run (no metrics.json); finish it with `cnnlab resume "
                              f"{shown(path)}` first")
        self.kind, self._weights, self.quantization = "run", path / "model.pt", None
        self.net, config, self._prep = load_model(path, device)
        self.device = next(self.net.parameters()).device
        # a transfer model's base folded once (predict_logits folds a copy each call), float32 as `predict` runs it
        self._infer = self.net.for_inference() if hasattr(self.net, "for_inference") else self.net
        self._prepare = self._prep.on(self.device)
        self.classes, self.size, self.preprocessing = config["class_names"], self._prep.size, self._prep.__dict__
        self.thresholds = multilabel_thresholds(path)  # several labels per image: each label's own, else None
        self.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                        and k.startswith(("test_", "best_val", "train_accuracy", "epochs", "parameters"))}

    @property
    def batch(self) -> int:
        """Images a model call takes by default: 32, fewer for large inputs (about 620,000 input values,
        as cnnlab's inference takes them: 4 at 224x224), whose activations then stay in the CPU's caches."""
        return min(32, inference_batch(torch.empty(1, 3, self.size, self.size)))

    @property
    def explains(self) -> bool:
        """Whether Grad-CAM overlays can be drawn (a PyTorch run, not an ONNX file)."""
        return self.kind == "run"

    def classify(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, classes) of uint8 (N, 3, size, size) images, in float32."""
        step = inference_batch(images)  # a few images at a time: their activations stay in the CPU's caches
        if self.kind == "onnx":
            return self.onnx.probabilities(images, batch=step)
        with torch.no_grad():
            logits = [self._infer(model_input(images[i:i + step], self._prepare)).float().cpu()
                      for i in range(0, len(images), step)]
        outputs = probabilities if self.thresholds is None else sigmoid_probabilities
        return outputs(torch.cat(logits)).numpy()

    def explain(self, images: torch.Tensor) -> list[bytes]:
        """A PNG per image: the photo at the model's input size with the top-1 class's Grad-CAM heat
        map blended in (inputs under 128 pixels enlarged to 256 or more, pixels kept sharp)."""
        if self._explainer is None:  # a float32 copy with gradients, made on the first request that asks
            self._explainer = explainable(self.net)
        pictures, _, _ = overlays(self._explainer, images, self._prep)
        pngs = []
        for picture in pictures:
            photo = Image.fromarray(picture)
            if photo.width < 128:
                scale = -(-256 // photo.width)
                photo = photo.resize((photo.width * scale, photo.height * scale), Image.NEAREST)
            buf = io.BytesIO()
            photo.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pngs

    def metadata(self) -> dict:
        """What GET /metadata answers: the model, its classes, input and preprocessing, its scores."""
        return {"model": self.describe(), "classes": self.classes, "input_size": self.size,
                "input": "RGB, resized to input_size x input_size (bilinear), then preprocessing",
                "preprocessing": self.preprocessing, "metrics": self.metrics, "quantization": self.quantization,
                "gradcam": self.explains, "multi_label": self.thresholds is not None, "thresholds": self.thresholds}

    def describe(self) -> dict:
        """The model's name (the run's folder, or the file's name), version (a digest of its weights),
        kind and the cnnlab that serves it: in every answer."""
        return {"name": self.name, "version": self.version, "kind": self.kind, "cnnlab_version": __version__}
