"""One training step, and on CUDA the same step captured once as a CUDA graph and replayed."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import distributed
from .augment import PhotoDraws, photo_augment
from .config import TrainConfig, augment_kinds
from .data import ImageSet, alternate_flips, apply_augment, augment_draws
from .imbalance import class_weights
from .metrics import loss_fn, predicted_class
from .multilabel import multilabel_loss, subset_correct
from .preprocessing import model_input
from .runtime import autocast, compute_dtype, to_device


def graph_ready(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Makes ``opt`` safe to capture in a CUDA graph: its learning rate becomes a tensor on
    ``device`` (a schedule then updates it in place, where the replayed step reads it) and its
    update one fused kernel. Call after loading a checkpoint too: that brings float rates back."""
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["fused"] = True
        if "capturable" in group:
            group["capturable"] = True


class TrainStep:
    """One optimizer step on the batch that ``index`` picks from a training set already on
    ``device``; sums the loss and the correct predictions on the device (no sync).

    On CUDA (``cfg.cuda_graph``, uint8 images), after ``WARMUP`` ordinary steps the step is
    captured once as a CUDA graph and then replayed: these small nets leave a GPU idle while the
    host queues a step's few hundred kernels, and a replay queues them all at once. The replay
    reads its batch indices, augmentation draws and learning rate from fixed device tensors,
    refreshed before each replay (``opt`` is made ``graph_ready`` here: make the step after
    loading a checkpoint into ``opt``). A smaller last batch runs as an ordinary step.

    Under torchrun ``index`` is the global batch and ``model`` a DDP wrapper: each rank takes its
    part of the batch and of the draws (distributed.shard), weights its loss by the part's size,
    and DDP averages the gradients; it runs op by op (capturing DDP's all-reduce in a graph is
    not attempted)."""
    WARMUP = 3

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, train: ImageSet, cfg: TrainConfig,
                 device: torch.device):
        self.model, self.opt, self.cfg, self.device = model, opt, cfg, device
        self.images, self.labels = train.images, train.labels
        self.prepare = cfg.preprocessing.on(device)
        self.dtype = compute_dtype(cfg.precision, device)
        self.total_loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.batches = torch.zeros((), device=device, dtype=torch.long)
        self.first_nonfinite = torch.full((), -1, device=device, dtype=torch.long)  # batch of the epoch, from 1
        # --class-weights balanced: the training split's, fixed for the run (on the device: a graph reads them there)
        self.class_weights = class_weights(train.labels).to(device) if cfg.class_weights == "balanced" else None
        # --augment crop/trivial, --mixup, --cutmix (augment.py): drawn per batch, run op by op (no CUDA graph)
        self.photo = photo_augment(cfg, train.labels) if train.images.dtype == torch.uint8 else None
        self.pad = cfg.translate if "shift" in augment_kinds(cfg.augment) else 0  # the shift's reflect padding
        self.graphed = (device.type == "cuda" and cfg.cuda_graph and train.images.dtype == torch.uint8
                        and not distributed.active() and self.photo is None)
        if self.graphed:
            graph_ready(opt, device)
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.warm_steps = 0
        self.inputs: tuple = ()
        self.failure: str | None = None  # why the capture failed, when it did
        self.epoch = 1  # set by the loop: alternating flips depend on it
        self.frozen: list[nn.Parameter] = []  # parameters whose gradients are dropped before the update
        self.flip_base = None
        if cfg.augment and cfg.flip == "alternate":  # seeded apart from the loop's generator; on the device, as
            # the batch index is: looking orientations up there needs no host sync each step
            draw = torch.rand(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
            self.flip_base = (draw < 0.5).to(device)

    def freeze(self, params: list[nn.Parameter]) -> None:
        """From now on ``params`` keep their values: their gradients (still computed, as DDP
        expects every parameter's) are dropped before each optimizer step, which skips them. A
        captured CUDA graph is recaptured."""
        if [id(p) for p in params] != [id(p) for p in self.frozen]:  # by identity: tensors' == is elementwise
            self.frozen = list(params)
            self.graph, self.warm_steps = None, 0

    def reset(self) -> None:
        """Zeroes the sums at the start of an epoch."""
        self.total_loss.zero_()
        self.correct.zero_()
        self.batches.zero_()
        self.first_nonfinite.fill_(-1)

    def __call__(self, index: torch.Tensor, generator: torch.Generator) -> None:
        draws = None
        if self.cfg.augment:
            draws = augment_draws(len(index), generator, self.pad, self.flip_base is None)
            if self.flip_base is not None:
                draws = (alternate_flips(self.flip_base, index.to(self.flip_base.device), self.epoch), *draws[1:])
        if self.photo is not None:  # its crops take the flip just drawn; the rest is drawn after it
            draws = self.photo.draw(len(index), self.images.shape[-1], generator, draws)
        if distributed.active():
            local = distributed.shard(index)
            draws = None if draws is None else draws.shard(distributed.shard) if isinstance(draws, PhotoDraws) else \
                tuple(None if t is None else distributed.shard(t) for t in draws)
            self.run(local, draws, distributed.loss_weight(len(local), len(index)))
        elif not self.graphed or len(index) != self.cfg.batch_size:
            self.run(index, draws)
        elif self.graph is None and self.warm_steps < self.WARMUP:
            self._warm(index, draws)
        elif self.graph is not None or self._capture(index, draws):
            self._replay(index, draws)
        else:
            self.run(index, draws)

    def run(self, index: torch.Tensor, draws: tuple | None, weight: float = 1.0) -> None:
        """The step itself, as ordinary (eager) PyTorch; ``weight`` scales the loss that is
        differentiated (a rank's part of a batch), not the loss that is summed."""
        y = target = self.labels[index]
        photo = draws if isinstance(draws, PhotoDraws) else None  # uint8 crops and TrivialAugment, then the rest
        x = model_input(self.images[index] if photo is None else self.photo.images(self.images[index], photo),
                        self.prepare)
        shift = draws if photo is None else photo.shift
        if shift is not None:
            x = apply_augment(x, shift, self.cfg.translate)
        if photo is not None:  # MixUp or CutMix: soft targets
            x, target = self.photo.mix(x, y, photo)
        with autocast(self.device, self.dtype, cache=False):
            logits = self.model(x)
            loss = (multilabel_loss(logits, target, self.cfg.label_smoothing) if self.cfg.multi_label else
                    loss_fn(logits, target, self.cfg.label_smoothing, self.class_weights))
        self.opt.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()
        for p in self.frozen:
            p.grad = None
        with warnings.catch_warnings():  # a graph-ready optimizer warns when stepped outside a graph
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.opt.step()
        self.total_loss += loss.detach() * len(y)
        # several labels per image: the images whose every label is right (subset accuracy)
        self.correct += (subset_correct(logits, y, self.cfg.threshold) if self.cfg.multi_label else
                         (predicted_class(logits) == y).sum())
        # in place, on the device: no sync, and a replayed graph keeps updating the same tensors
        self.batches += 1
        diverged = (self.first_nonfinite < 0) & ~torch.isfinite(loss.detach())
        self.first_nonfinite.copy_(torch.where(diverged, self.batches, self.first_nonfinite))

    def _warm(self, index, draws) -> None:
        # PyTorch's recipe: warm-up steps on a side stream, so cuDNN's autotuning and lazy
        # workspaces are done before capture; they are real steps of the run
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.run(index, draws)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.warm_steps += 1

    def _capture(self, index, draws) -> bool:
        """Records the step as a CUDA graph (running nothing); on failure (an operation that
        cannot be captured, say from a newer or older PyTorch) the run goes on op by op."""
        static_draws = None if draws is None else tuple(
            None if t is None else to_device(t, self.device).clone() for t in draws)
        self.inputs = (index.clone(), static_draws)
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                self.run(*self.inputs)
        except RuntimeError as exc:  # nothing ran during the capture, so no weight has changed
            self.graphed = False
            self.failure = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return False
        self.graph = graph
        return True

    def _replay(self, index, draws) -> None:
        static_index, static_draws = self.inputs
        static_index.copy_(index)
        for static, new in zip(static_draws or (), draws or ()):
            if static is not None:
                static.copy_(new if new.device == static.device else new.pin_memory(), non_blocking=True)
        self.graph.replay()
