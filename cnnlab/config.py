"""Run settings as plain dataclasses: everything needed to rerun a train or a transfer run, the
choices each setting takes, and the checks that turn a bad value into a one-line error. The command
line takes its choices and defaults from here. Nothing here imports torch."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import CnnlabError
from .preprocessing import UNIT, Preprocessing

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("none", "onecycle", "triangle", "linear", "cosine")
FLIPS = ("random", "alternate")
TTA_LEVELS = (0, 1, 2)
PRECISIONS = ("auto", "fp32", "bf16")
AUTO = "auto"  # --lr auto: the learning-rate finder picks it
MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
            "val_balanced_accuracy", "val_map", "val_micro_f1")
MULTI_LABEL_MONITORS = ("val_map", "val_micro_f1")  # scores of several labels per image (--multi-label) only
CLASS_WEIGHTS = ("none", "balanced")  # balanced: scikit-learn's inverse class frequency in the loss (imbalance.py)
SAMPLERS = ("shuffle", "balanced")  # an epoch's order: every image once, or drawn evenly from every class
MODES = ("auto", "min", "max")
HEADS = ("flatten", "gap")
AUGMENTS = ("shift", "crop", "trivial")  # --augment's kinds (augment_kinds); shift and crop exclude each other
WEIGHTS_VARIANTS = ("torchvision", "keras", "pypi")

# upper limits: past them a setting asks for more than any machine has (memory, threads), never for a better run
MAX_IMAGE_SIZE = 1024  # pixels a side: one photo's activations in a base grow with its square (VGG19: 3 GB at 1024)
MAX_THREADS = 1024  # CPU threads: PyTorch starts about twice as many; more than any machine's cores
MAX_BATCH = 65536  # images per batch (a whole CIFAR-10 training set fits in one)
MAX_EPOCHS = 100_000  # per phase; history, curves and the report grow with them
MAX_FEATURE_COPIES = 16  # altered copies of each training photo: each adds a full set of features to memory
MAX_SEED = 2**32 - 1  # numpy's and every rank's seed derived from it stay in range


@dataclass
class TrainConfig:
    """Everything needed to rerun a training run. Defaults are the seed study's (Adam 1e-3,
    batch 128, inputs scaled to [0, 1]); a preset's settings override them, and explicit
    values override the preset's."""
    preset: str = ""  # empty where the model comes from elsewhere (a transfer run's phases)
    data: str = ""
    labels: str | None = None  # a CSV/TSV file of image,label[,split] (labels.py); None: the class folders of data
    epochs: int = 20
    batch_size: int = 128
    lr: float | str = 1e-3  # "auto": the learning-rate finder's suggestion (lr_sweep.py), recorded as lr_found
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "none"
    label_smoothing: float = 0.0
    class_weights: str = "none"  # one of CLASS_WEIGHTS
    sampler: str = "shuffle"  # one of SAMPLERS
    multi_label: bool = False  # several labels per image (a labels file's "a;b"): sigmoid outputs, BCE (multilabel.py)
    threshold: float = 0.5  # --multi-label: a label is predicted at this probability, while training and untuned
    tune_thresholds: bool = True  # --multi-label: each label's threshold set to maximise validation F1 at the end
    val_split: float = 0.1
    test_split: float = 0.1
    seed: int = 0
    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best_weights: bool = True
    start_from_epoch: int = 0
    augment: bool | str = False  # True: shift and flip (as every older run); or kinds of AUGMENTS, "crop,trivial"
    translate: int = 4  # augmenting: pixels of reflect padding a random crop may shift by
    flip: str = "random"  # augmenting: "random" per image per batch, or "alternate" (data.alternate_flips)
    crop_scale: float = 0.35  # --augment crop: the smallest share of an image's area a crop keeps (torchvision's 0.08)
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha) for each batch (augment.py); 0: none
    cutmix: float = 0.0  # CutMix's alpha, as mixup's; both set: one or the other per batch
    image_size: int | None = None  # pixels a side the images are decoded and trained at; None: the model's default
    head: str = "flatten"  # a preset's head: flatten -> dense, or global average pooling ("gap") -> dense
    tta: int = 0  # test-time augmentation: 0 none, 1 + the mirror image, 2 + both mirrored 1-pixel shifts (test only; validation takes at most 1)
    whiten_bias_epochs: int = 0  # epochs the whitening layer's bias trains before it freezes (airbench: 3)
    bias_lr_scale: float = 1.0  # batch-norm biases' lr multiplier, their decay per step unchanged
    whiten_bias_scaled: bool = False  # the whitening bias trains at bias_lr_scale too (airbench94_muon; airbench94: at lr)
    head_lr_scale: float = 1.0  # the output layer's lr multiplier, its decay per step unchanged
    lookahead: bool = False  # airbench's moving average of the weights (optimizer.Lookahead)
    preprocessing: Preprocessing = UNIT
    channels_last: bool = True  # memory layout of weights and batches (conv sets False: see presets)
    threads: int | None = None
    device: str = "auto"
    cuda_graph: bool = True  # on CUDA, replay each training step as one CUDA graph
    precision: str = "auto"  # see runtime.compute_dtype
    tensorboard: bool = True  # event files in the run directory (tensorboard_log.py)
    mlflow: str | None = None  # an MLflow tracking URI or folder the run logs to (mlflow_log.py); None: none
    sync_bn: bool = False  # under torchrun: batch norm over the global batch, not each rank's part
    out: str = "runs"
    name: str | None = None
    cache_dir: str | None = None


@dataclass
class TransferConfig:
    """Everything needed to rerun a transfer run."""
    data: str = ""
    labels: str | None = None  # as TrainConfig's
    backbone: str = "efficientnet_lite0"  # its ImageNet weights install from PyPI: works offline; the study sets vgg19
    weights_file: str | None = None  # None: the backbone's shipped, cached or downloaded file
    weights_variant: str | None = None  # one of WEIGHTS_VARIANTS; None: the backbone's first
    image_size: int | None = None  # the input size the base sees; None: backbones.transfer_size (the run records it)
    head: str = "gap"  # held-out photos: better than the seed's flatten head (BENCHMARKS.md); reproduce keeps flatten
    epochs: int = 10  # the head on cached features: seconds; a converged head starts fine-tuning well (BENCHMARKS.md)
    batch_size: int = 128  # older runs' and the seed study's 32 fine-tune at a quarter of the speed on a CPU
    lr: float | str = 3e-3  # "auto" as TrainConfig's: the finder's suggestion for the head
    fine_tune_epochs: int = 5  # then the last --unfreeze blocks with the head: beat a linear probe (BENCHMARKS.md)
    unfreeze: int = 1
    fine_tune_lr: float | None = 1e-3  # None: lr / 10 (as older runs and the seed study's recipe)
    fine_tune_cached: bool = True  # fine-tuning trains on cached maps of the frozen blocks below (transfer.py)
    augment: bool = False
    class_weights: str = "none"  # as TrainConfig's, in both phases
    sampler: str = "shuffle"  # as TrainConfig's, in both phases
    multi_label: bool = False  # as TrainConfig's
    threshold: float = 0.5  # as TrainConfig's
    tune_thresholds: bool = True  # as TrainConfig's
    val_split: float = 0.1
    test_split: float = 0.1
    seed: int = 0
    monitor: str = "val_loss"
    patience: int | None = None
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"  # as train's: bfloat16 where the device computes it natively
    tensorboard: bool = True
    mlflow: str | None = None  # as TrainConfig's
    out: str = "runs"
    name: str | None = None
    feature_cache: bool = True
    feature_copies: int = 0  # altered copies of each training photo whose features join the cache (data.photo_variants)
    tta: int = 1  # test and evaluate with the mirror image too: photos from elsewhere gain most from it (BENCHMARKS.md)


@dataclass
class ReproduceConfig:
    """The whole seed study (``cnnlab reproduce``): where its data and runs go, how much of it, the
    transfer runs' backbone, and the settings every run takes."""
    data_root: str | None = None  # holding cifar10/ and cats-vs-dogs/; None: $CNNLAB_DATA, else downloads
    out: str = "runs/reproduce"
    quick: bool = False  # a share of the data and epochs (study.QUICK), with the full study's time estimated
    backbone: str = "vgg19"
    weights_file: str | None = None  # None: the backbone's shipped, cached or downloaded file
    seed: int = 0
    precision: str = "auto"  # every run's
    threads: int | None = None  # every run's

    def __post_init__(self):
        _check([_choice(self.precision, PRECISIONS, "--precision"), *_seed_and_threads(self)])


# Settings added since runs recorded every setting: a record without one was trained as its default
# says (the default keeps the older behaviour), so such a run still loads, resumes and reports.
# A new setting whose default keeps what older runs did is added here; any other is refused below.
LATER_SETTINGS = frozenset({"mlflow", "labels", "class_weights", "sampler", "crop_scale", "mixup", "cutmix",
                            "image_size", "head", "multi_label", "threshold", "tune_thresholds"})


# Settings added since, whose default is not what older runs did: a record without one ran as this says.
EARLIER_VALUES = {"fine_tune_cached": False}


def from_record(config: type, record: dict):
    """The config dataclass a run's config.json was written from (its other keys ignored; a
    setting of ``LATER_SETTINGS`` it lacks takes its default, one of ``EARLIER_VALUES`` the value
    given there), or a one-line error for a record without another setting (one written by an
    older cnnlab)."""
    missing = [f.name for f in fields(config)
               if f.name not in record and f.name not in LATER_SETTINGS and f.name not in EARLIER_VALUES]
    if missing:
        raise CnnlabError(f"this run's config.json has no {', '.join(missing[:3])}: an older cnnlab wrote it; "
                          "train the run again")
    values = {f.name: record.get(f.name, EARLIER_VALUES.get(f.name)) for f in fields(config)
              if f.name in record or f.name in EARLIER_VALUES}
    if "preprocessing" in values:
        values["preprocessing"] = Preprocessing.from_dict(values["preprocessing"])
    return config(**values)


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise CnnlabError(message)


def _choice(value, choices: tuple, what: str) -> tuple[bool, str]:
    return value in choices, f"unknown {what} '{value}'; choose one of: {', '.join(map(str, choices))}"


def augment_kinds(value: bool | str | None) -> tuple[str, ...]:
    """The kinds of AUGMENTS an ``augment`` setting names: True (every older run's) is shift and
    flip, False or None none, a string a comma-separated list such as "crop,trivial"."""
    if isinstance(value, str):
        return tuple(kind.strip() for kind in value.split(",") if kind.strip())
    return ("shift",) if value else ()


def parse_augment(text: str) -> bool | str:
    """``--augment KINDS`` as the setting records it (a bare "shift" is True, as the switch always
    was), or ValueError with the one line to show."""
    kinds = augment_kinds(text)
    ok, problem = _augment_problem(text)
    if not ok:
        raise ValueError(problem)
    return True if kinds == ("shift",) else ",".join(k for k in AUGMENTS if k in kinds)


def _augment_problem(value) -> tuple[bool, str]:
    kinds = augment_kinds(value)
    unknown = [k for k in kinds if k not in AUGMENTS]
    if unknown or (isinstance(value, str) and not kinds):
        return False, f"unknown --augment '{unknown[0] if unknown else value}'; choose from: {', '.join(AUGMENTS)}"
    return ("shift" not in kinds or "crop" not in kinds,
            "--augment shift and crop exclude each other (a crop moves the image already); give one")


def name_problem(name: str | None) -> str | None:
    """Why ``name`` cannot name a run directory inside ``--out`` (None when it can): a name is one
    plain folder name, never a path."""
    if name is None:
        return None
    if not name.strip():
        return "--name is empty; pass a name such as my-run"
    if name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("~"):
        return (f"--name {name!r} is not a plain name (no path separators, '.', '..' or '~'); pass a folder "
                "name such as my-run, and --out DIR for where the run goes")
    return None


def _at_most(value, limit: int, flag: str, why: str) -> tuple[bool, str]:
    """``value`` (None: unset) is at most ``limit``; the message names the flag, the limit and why."""
    return (value is None or value <= limit,
            f"{flag} must be at most {limit:,} (got {value}): {why}")


def _seed_and_threads(cfg) -> list[tuple[bool, str]]:
    return [(0 <= cfg.seed <= MAX_SEED, f"--seed must be 0 to {MAX_SEED} (got {cfg.seed})"),
            (cfg.threads is None or cfg.threads >= 1, f"--threads must be at least 1 (got {cfg.threads})"),
            _at_most(cfg.threads, MAX_THREADS, "--threads", "pass at most the machine's CPU cores")]


def _finite(cfg) -> list[tuple[bool, str]]:
    """Every number setting must be finite: nan and inf pass every range check unnoticed."""
    return [(math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
            for f in fields(cfg) if isinstance(value := getattr(cfg, f.name), float)]


def _common(cfg) -> list[tuple[bool, str]]:
    """The checks train and transfer settings share."""
    name = name_problem(cfg.name)
    return _finite(cfg) + [
        (name is None, name),
        (cfg.epochs >= 1, f"--epochs must be at least 1 (got {cfg.epochs})"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})"),
        (cfg.lr == AUTO or (isinstance(cfg.lr, (int, float)) and not isinstance(cfg.lr, bool) and cfg.lr > 0),
         f"--lr must be positive, or {AUTO} (got {cfg.lr})"),
        (0 <= cfg.val_split < 1, f"--val-split must be in [0, 1) (got {cfg.val_split})"),
        (0 < cfg.test_split < 1, f"--test-split must be between 0 and 1 (got {cfg.test_split})"),
        (cfg.val_split + cfg.test_split < 1,
         f"--val-split + --test-split must be below 1 (got {cfg.val_split + cfg.test_split:g})"),
        _choice(cfg.monitor, MONITORS, "monitor metric"),
        _choice(int(cfg.tta), TTA_LEVELS, "--tta level"),
        _choice(cfg.precision, PRECISIONS, "--precision"),
        _choice(cfg.class_weights, CLASS_WEIGHTS, "--class-weights"),
        _choice(cfg.sampler, SAMPLERS, "--sampler"),
        *_multi_label(cfg),
        (cfg.patience is None or cfg.patience >= 0, f"--patience must be 0 or more (got {cfg.patience})"),
        _at_most(cfg.epochs, MAX_EPOCHS, "--epochs", "more would never end"),
        _at_most(cfg.batch_size, MAX_BATCH, "--batch-size", "a larger batch would not fit in memory"),
        *_seed_and_threads(cfg),
    ]


def _multi_label(cfg) -> list[tuple[bool, str]]:
    """The checks of ``--multi-label`` and ``--threshold`` (train and transfer alike)."""
    return [
        (0 < cfg.threshold < 1, f"--threshold must be between 0 and 1, a probability (got {cfg.threshold})"),
        (not cfg.multi_label or cfg.labels is not None,
         "--multi-label reads each image's labels from a file, not from class folders (a folder gives an image one "
         "class): pass --labels FILE, its label column holding class names separated by ';' (cat;dog)"),
        (not cfg.multi_label or cfg.class_weights == "none",
         "--class-weights balanced weighs one class per image and --multi-label gives several; leave it out "
         "(--sampler balanced draws images by their rarest label)"),
        (cfg.multi_label or cfg.monitor not in MULTI_LABEL_MONITORS,
         f"--monitor {cfg.monitor} is a score of several labels per image; add --multi-label, or monitor val_f1"),
        (not cfg.multi_label or cfg.monitor != "val_balanced_accuracy",
         "--monitor val_balanced_accuracy is a score of one class per image; with --multi-label monitor val_map, "
         "val_f1 or val_loss"),
    ]


def validate(cfg: TrainConfig) -> None:
    """One-line errors for training settings out of range."""
    _check(_common(cfg) + [
        _choice(cfg.optimizer, OPTIMIZERS, "optimizer"),
        _choice(cfg.schedule, SCHEDULES, "schedule"),
        _choice(cfg.flip, FLIPS, "--flip"),
        (0 <= cfg.translate <= 8, f"--translate must be 0 to 8 pixels (got {cfg.translate})"),
        _augment_problem(cfg.augment),
        (0 < cfg.crop_scale <= 1, f"--crop-scale must be above 0 and at most 1 (got {cfg.crop_scale})"),
        (cfg.mixup >= 0 and cfg.cutmix >= 0, f"--mixup and --cutmix must be 0 or more (got {cfg.mixup}, {cfg.cutmix})"),
        _choice(cfg.head, HEADS, "--head"),
        (cfg.image_size is None or 8 <= cfg.image_size <= MAX_IMAGE_SIZE,
         f"--image-size must be 8 to {MAX_IMAGE_SIZE} pixels (got {cfg.image_size})"),
        (cfg.whiten_bias_epochs >= 0, f"--whiten-bias-epochs must be 0 or more (got {cfg.whiten_bias_epochs})"),
        (cfg.bias_lr_scale > 0, f"--bias-lr-scale must be positive (got {cfg.bias_lr_scale})"),
        (cfg.head_lr_scale > 0, f"--head-lr-scale must be positive (got {cfg.head_lr_scale})"),
        _choice(cfg.mode, MODES, "--mode"),
        (cfg.min_delta >= 0, f"--min-delta must be 0 or more (got {cfg.min_delta})"),
        (0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})"),
        (cfg.weight_decay >= 0, f"--weight-decay must be 0 or more (got {cfg.weight_decay})"),
        (8 <= cfg.preprocessing.size <= MAX_IMAGE_SIZE,
         f"the input size must be 8 to {MAX_IMAGE_SIZE} pixels (got {cfg.preprocessing.size})"),
        (cfg.start_from_epoch >= 0, f"--start-from-epoch must be 0 or more (got {cfg.start_from_epoch})"),
        (cfg.val_split > 0 or cfg.patience is None or not cfg.monitor.startswith("val_"),
         f"--val-split 0 leaves no validation images for early stopping on {cfg.monitor}; stop on --monitor loss "
         "(or accuracy), or keep a --val-split above 0"),
    ])


def validate_transfer(cfg: TransferConfig) -> None:
    """One-line errors for transfer settings out of range."""
    _check(_common(cfg) + [
        (cfg.fine_tune_epochs >= 0, f"--fine-tune-epochs must be 0 or more (got {cfg.fine_tune_epochs})"),
        _at_most(cfg.fine_tune_epochs, MAX_EPOCHS, "--fine-tune-epochs", "more would never end"),
        (cfg.unfreeze >= 1, f"--unfreeze must be at least 1 (got {cfg.unfreeze})"),
        (cfg.image_size is None or cfg.image_size >= 32,
         f"--image-size must be at least 32, the base's total stride (got {cfg.image_size})"),
        _at_most(cfg.image_size, MAX_IMAGE_SIZE, "--image-size",
                 "every photo is decoded and run at that size (the base's own, 224 to 260, is best)"),
        (cfg.feature_copies >= 0, f"--feature-copies must be 0 or more (got {cfg.feature_copies})"),
        _at_most(cfg.feature_copies, MAX_FEATURE_COPIES, "--feature-copies",
                 "each copy holds another set of every training photo's features (2 gain most; docs/transfer.md)"),
        (cfg.fine_tune_lr is None or cfg.fine_tune_lr > 0, f"--fine-tune-lr must be positive (got {cfg.fine_tune_lr})"),
        _choice(cfg.head, HEADS, "--head"),
        (cfg.val_split > 0, "a transfer run needs validation images (it keeps the better of its frozen and "
                            "fine-tuned weights by them); use a --val-split above 0"),
        (cfg.weights_variant is None or cfg.weights_variant in WEIGHTS_VARIANTS,
         f"unknown --weights-variant '{cfg.weights_variant}'; choose one of: {', '.join(WEIGHTS_VARIANTS)}"),
    ])


@dataclass
class ServeConfig:
    """`cnnlab serve`'s settings (serve.py, docs/serving.md)."""
    model: str = ""  # a finished run directory or an .onnx file made by `cnnlab export`
    host: str = "127.0.0.1"  # loopback: other machines reach the server only when told (--host 0.0.0.0)
    port: int = 8000  # 0: any free port (the one taken is printed)
    max_upload_mb: float = 10.0  # one request's body; a larger one is refused (413) before it is read whole
    batch_delay_ms: float = 5.0  # how long a request waits for others to share its model call; 0: no batching
    max_batch: int | None = None  # images per model call (None: 32, fewer for large inputs: 4 at 224x224)
    top: int = 5  # classes per image in an answer (at most the model's), unless a request asks ?top=K
    threads: int | None = None  # CPU threads of the model (default: PyTorch's and onnxruntime's own choice)


def validate_serve(cfg: ServeConfig) -> None:
    """One-line errors for serve settings out of range (the command line checks them as it parses)."""
    _check([
        (0 <= cfg.port <= 65535, f"--port must be 0 to 65535 (got {cfg.port})"),
        (0 < cfg.max_upload_mb <= 1024, f"--max-upload-mb must be above 0 and at most 1024 (got {cfg.max_upload_mb})"),
        (0 <= cfg.batch_delay_ms <= 1000, f"--batch-delay-ms must be 0 to 1000 (got {cfg.batch_delay_ms})"),
        (cfg.max_batch is None or 1 <= cfg.max_batch <= 1024, f"--max-batch must be 1 to 1024 (got {cfg.max_batch})"),
        (cfg.top >= 1, f"--top must be at least 1 (got {cfg.top})"),
        _at_most(cfg.threads, MAX_THREADS, "--threads", "more than any machine's cores"),
    ])
