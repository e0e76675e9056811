"""Imbalanced classes: scikit-learn's balanced class weights for the training loss
(``--class-weights balanced``), the order of an epoch (``--sampler``: shuffled, or drawn evenly
from every class), and the notice a skewed training split gets."""
from __future__ import annotations

from typing import Callable

import torch

from .multilabel import label_counts, strata
from .text import shown

SKEW = 5  # the largest class over the smallest past which a run says so


def class_weights(labels: torch.Tensor, classes: int = 0) -> torch.Tensor:
    """One weight per class, ``n_samples / (n_classes * count)``: scikit-learn's
    ``compute_class_weight("balanced")``, ``n_classes`` counting the classes present in ``labels``
    (a class of ``classes`` absent from them weighs 0). Float32; every image's weight averages 1."""
    counts = torch.bincount(labels.cpu().long(), minlength=classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, len(labels) / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights.float()


def epoch_order(labels: torch.Tensor, generator: torch.Generator, sampler: str = "shuffle") -> torch.Tensor:
    """The training images of one epoch, in order, drawn from ``generator`` (the run's, so a run
    resumes bit for bit): ``shuffle``, each image once in a random order; ``balanced``, as many
    images drawn with replacement, each with a probability inverse to its class's count, so that
    every class is drawn about equally often (an image of several labels counted under its rarest:
    multilabel.strata). On the CPU."""
    if sampler != "balanced":
        return torch.randperm(len(labels), generator=generator)
    labels = strata(labels).cpu().long()
    chance = 1.0 / torch.bincount(labels).double()[labels]
    return torch.multinomial(chance, len(labels), replacement=True, generator=generator)


def say_notices(labels: torch.Tensor, class_names: list[str], cfg, log: Callable[[str], None]) -> None:
    """The notices a run's training split (``labels``) gets with settings ``cfg`` (a TrainConfig or
    TransferConfig), to ``log``: one line when it is smaller than a batch (each epoch is then one
    smaller batch), and ``skew_notice``'s when neither balancing option is set."""
    if cfg.batch_size > len(labels):
        log(f"notice: --batch-size {cfg.batch_size} is more than the {len(labels)} training images: each epoch is "
            "one batch of them all")
    skew = skew_notice(labels, class_names)
    if skew is not None and cfg.class_weights == "none" and cfg.sampler == "shuffle":
        log(skew)


def skew_notice(labels: torch.Tensor, class_names: list[str]) -> str | None:
    """One line when the largest class of ``labels`` (the training split's) has more than ``SKEW``
    times the images of the smallest, naming both and the options that help; else None."""
    counts = label_counts(labels, len(class_names))  # several labels per image: each label's images
    big, small = int(counts.argmax()), int(counts.argmin())
    if counts[small] == 0 or counts[big] <= SKEW * counts[small]:
        return None
    return (f"notice: the classes are imbalanced: {shown(class_names[big])} has {int(counts[big])} training images, "
            f"{float(counts[big] / counts[small]):.1f}x the {int(counts[small])} of {shown(class_names[small])}; "
            "--class-weights balanced (each class weighs alike in the loss) or --sampler balanced (each class drawn "
            "alike) helps the small classes, and the balanced accuracy shows how they fare")
