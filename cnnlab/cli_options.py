"""Options of the ``cnnlab`` grammar that check their own values (numbers in a range, and on/off
switches that leave the default to the config or the preset) or that several commands share (labels
from a file, the balancing of imbalanced classes). Nothing here imports torch."""
from __future__ import annotations

import argparse
import math
from dataclasses import fields

from .config import CLASS_WEIGHTS, HEADS, MAX_IMAGE_SIZE, SAMPLERS, TrainConfig, TransferConfig, parse_augment


def number(g, flag: str, kind, low=None, metavar=None, **kw) -> None:
    """A number option, a bad value a parse error: at least ``low`` (above it if ``above``), below ``below``."""
    above, below, words = kw.pop("above", False), kw.pop("below", None), kw.pop("words", ())

    def parse(text):
        if text in words:  # a word the option takes besides numbers (--lr auto)
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {'an integer' if kind is int else 'a number'}"
                                             f"{''.join(f' or {w}' for w in words)}, not '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, not '{text}'")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"{flag} must be {'above' if above else 'at least'} {low:g}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{flag} must be below {below:g}, got {text}")
        return value
    g.add_argument(flag, type=parse, metavar=metavar, **kw)


def labels(g, what: str = "; the classes are its labels, sorted") -> None:
    """``--labels FILE``: labels from a CSV or TSV file (labels.py); ``what``: what the command does with them."""
    g.add_argument("--labels", metavar="FILE", help="labels from a CSV or TSV file instead of class folders: a header "
                   "naming the columns image (a path relative to --data, or absolute), label and optionally split "
                   f"(train, val or test){what} (docs/data-and-runs.md)")


def balance(g, default: type) -> None:
    """``--class-weights`` and ``--sampler``, for imbalanced classes; ``default``: the config class whose defaults apply."""
    g.add_argument("--class-weights", choices=CLASS_WEIGHTS, help="balanced: each image's loss weighted by n / "
                   f"(classes x its class's count), scikit-learn's 'balanced' (default {default.class_weights})")
    g.add_argument("--sampler", choices=SAMPLERS, help="shuffle: each training image once an epoch; balanced: as "
                   f"many drawn with replacement, every class alike (default {default.sampler})")


def multi_label(g, default: type, thresholds: bool = True) -> None:
    """``--multi-label``, and with ``thresholds`` ``--threshold`` and ``--tune-thresholds``: several labels
    per image (multilabel.py); ``default``: the config class whose defaults apply."""
    g.add_argument("--multi-label", action="store_true", default=None, help="several labels per image: the "
                   "labels file's label column holds class names separated by ';' (cat;dog); sigmoid outputs and "
                   "binary cross-entropy, scored by per-label F1 and average precision (needs --labels)")
    if not thresholds:
        return
    number(g, "--threshold", float, 0, "P", above=True, below=1, help="--multi-label: the probability at which a "
           f"label counts as predicted, while training and for labels left untuned (default {default.threshold})")
    switch(g, "--tune-thresholds", "--multi-label: at the end, each label's threshold set to the one that maximises "
                                   "its F1 on the validation split, saved with the run and used by predict, evaluate "
                                   "and export (default on; --no-tune-thresholds keeps --threshold for every label)")


def model_size(g) -> None:
    """train's ``--image-size`` and ``--head``: the size a model trains at, and a preset's head."""
    number(g, "--image-size", int, 8, "PX", below=MAX_IMAGE_SIZE + 1, help="pixels a side the images are decoded "
           "and trained at (default: a preset's 32, an architecture's 128); a preset adapts (its --head)")
    g.add_argument("--head", choices=HEADS, help="a preset's head: flatten -> dense, the dense layer sized for the "
                   "image, or gap: global average pooling -> dense, the same size at any image size (default: the "
                   f"preset's: {TrainConfig.head}, gap for the airbench nets)")


def photo_augment(g) -> None:
    """train's ``--augment [KINDS]`` (bare: the shift and flip, as the switch always was), ``--no-augment``,
    ``--crop-scale``, ``--mixup`` and ``--cutmix`` (augment.py)."""
    def kinds(text):
        try:
            return parse_augment(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    g.add_argument("--augment", nargs="?", const=True, type=kinds, metavar="KINDS",
                   help="augment each batch: alone or 'shift', a random shift (reflect-padded by --translate) and "
                        "flip; 'crop', a random resized crop (--crop-scale) and flip; 'trivial' adds TrivialAugment"
                        "Wide, as in 'crop,trivial' (default: none; a preset or an architecture may set it)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="no augmentation")
    number(g, "--crop-scale", float, 0, "F", above=True, help="--augment crop: the smallest share of an image's area a "
           f"crop keeps, 0.08 as torchvision's (default {TrainConfig.crop_scale}: milder, for small data)")
    number(g, "--mixup", float, 0, "ALPHA", help="MixUp each batch with Beta(ALPHA, ALPHA), soft targets (default 0: none)")
    number(g, "--cutmix", float, 0, "ALPHA", help="CutMix each batch, as --mixup (with both: one or the other per batch)")


def switch(g, flag: str, help: str) -> None:
    """``--flag`` / ``--no-flag``; unset (None) lets the config's or the preset's value apply."""
    g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)


# the settings of a train or a transfer run that a command line or a Python call may give
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "preset")
TRANSFER_KEYS = tuple(f.name for f in fields(TransferConfig))


def given_settings(args, keys) -> dict:
    """The settings among ``keys`` that a parsed command line set (None: left to the config's or
    the preset's default); the command line and the Python calls build their configs from this."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def positional_or_model(parser, args, keep: str, drop: str, noun: str, metavar: str) -> None:
    """A command taking its ``noun`` as ``metavar`` or as ``--model metavar``: whichever was given
    ends in ``args.<keep>`` (``args.<drop>`` removed); neither, or both, is the parser's error."""
    given = [v for v in (getattr(args, keep), getattr(args, drop)) if v is not None]
    delattr(args, drop)
    if len(given) != 1:
        parser.error(f"the following arguments are required: {metavar} (or --model {metavar})" if not given
                     else f"give the {noun} once: {metavar} or --model {metavar}, not both")
    setattr(args, keep, given[0])
