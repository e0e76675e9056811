"""Argument parsing only: commands become calls, errors become one line and an exit code."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import fields

from .config import (FLIPS, HEADS, MODES, MONITORS, OPTIMIZERS, PRECISIONS, SCHEDULES, TTA_LEVELS,
                     WEIGHTS_VARIANTS, TrainConfig, TransferConfig)
from .cli_examples import EPILOGS
from .errors import CnnlabError, RunInterrupted

# torchrun's rank, read before torch loads: only rank 0 (or a plain process) prints
MAIN_RANK = os.environ.get("RANK", "0") == "0"
# how long another rank that fails waits before it exits, so that rank 0 says why first: torchrun
# SIGTERMs every rank once one has exited, and rank 0 may not have reached its line yet
REPORT_WAIT_S = 3.0


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2 (printed by rank 0 alone)."""

    def error(self, message):
        _leave_the_report_to_rank0()
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n" if MAIN_RANK else None)


def _number(kind, name, low=None, low_open=False, high_open=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"not '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, not '{text}'")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{name} must be {'above' if low_open else 'at least'} {low:g}, "
                                             f"got {text}")
        if high_open is not None and value >= high_open:
            raise argparse.ArgumentTypeError(f"{name} must be below {high_open:g}, got {text}")
        return value
    return parse


def _add_data_options(p, required=True):
    p.add_argument("--data", required=required, metavar="PATH",
                   help="image folder (one subfolder per class), or a folder with train/ (and val/, test/) "
                        "subfolders of that kind: a given test/ is the test set, scored once; "
                        "or 'cifar10' (torchvision's copy, downloaded into the cache when missing)")
    p.add_argument("--val-split", type=_number(float, "--val-split", 0, False, 1), metavar="F",
                   help=f"fraction of each class held out for validation (default {TrainConfig.val_split}); 0 trains "
                        "on every training image with no validation pass (train only; no early stopping on a "
                        "val_ metric then)")
    p.add_argument("--test-split", type=_number(float, "--test-split", 0, True, 1), metavar="F",
                   help=f"fraction of each class held out for the final test (default {TrainConfig.test_split})")
    p.add_argument("--seed", type=_number(int, "--seed", 0), metavar="S",
                   help=f"seed of splits, init, order (default {TrainConfig.seed})")


def _add_precision(p, auto: str, default: str | None = "auto") -> None:
    """``--precision``, ``auto`` described as ``auto``; ``default=None`` lets a config's own
    default apply."""
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=f"auto (default): {auto}")


def _add_tensorboard(p) -> None:
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard event files into the run directory as it trains (default; see them "
                        "with `tensorboard --logdir runs`)")


def _add_tta(p, default: str) -> None:
    p.add_argument("--tta", type=int, nargs="?", const=1, choices=TTA_LEVELS, metavar="LEVEL",
                   help="test-time augmentation when scoring: 1 (--tta alone) averages with the mirror image, 2 "
                        f"also with both mirrored 1-pixel shifts, 0 none (default {default})")
    p.add_argument("--no-tta", dest="tta", action="store_const", const=0, help="the same as --tta 0")


def _monitor_help(what: str) -> str:
    return f"metric for {what}: {', '.join(MONITORS)} (default {TrainConfig.monitor})"


def _add_train_options(p):
    preset = "; a preset may set its own"
    p.add_argument("--epochs", type=_number(int, "--epochs", 1), metavar="N", help="epochs (default: the preset's)")
    p.add_argument("--batch-size", type=_number(int, "--batch-size", 1), metavar="B",
                   help=f"batch size (default {TrainConfig.batch_size}{preset})")
    p.add_argument("--lr", type=_number(float, "--lr", 0, True), metavar="LR",
                   help=f"learning rate (default {TrainConfig.lr:g}{preset})")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"optimizer (default {TrainConfig.optimizer}{preset}); muon: Muon on the conv filters (--lr), "
                        "SGD-Nesterov with --momentum on the rest")
    p.add_argument("--momentum", type=_number(float, "--momentum", 0),
                   help=f"SGD momentum (default {TrainConfig.momentum}{preset})")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=_number(float, "--weight-decay", 0), metavar="WD",
                   help=f"weight decay (default {TrainConfig.weight_decay:g}{preset})")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help=f"learning-rate schedule (default {TrainConfig.schedule}{preset})")
    p.add_argument("--label-smoothing", type=_number(float, "--label-smoothing", 0, False, 1), metavar="E",
                   help=f"label smoothing (default {TrainConfig.label_smoothing:g}{preset})")
    p.add_argument("--monitor", metavar="METRIC", help=_monitor_help("the best epoch and early stopping"))
    p.add_argument("--patience", type=_number(int, "--patience", 0), metavar="P",
                   help="stop after P epochs without improvement of --monitor (default: never)")
    p.add_argument("--min-delta", type=_number(float, "--min-delta", 0), metavar="D",
                   help=f"smallest change that counts as an improvement (default {TrainConfig.min_delta:g})")
    p.add_argument("--mode", choices=MODES, help="whether --monitor should go down or up (default: from its name)")
    p.add_argument("--start-from-epoch", type=_number(int, "--start-from-epoch", 0), metavar="E",
                   help="ignore the first E epochs for the best epoch and patience")
    p.add_argument("--restore-best-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the best epoch's weights (default) or the last epoch's")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (reflect-padded by --translate) and horizontal flip on each batch")
    p.add_argument("--translate", type=_number(int, "--translate", 0), metavar="PX",
                   help=f"augmenting: pixels a random crop may shift by (default {TrainConfig.translate}{preset})")
    p.add_argument("--flip", choices=FLIPS, help="augmenting: random flips, or alternate: each image's orientation "
                                                 f"drawn once and all mirrored every other epoch (default "
                                                 f"{TrainConfig.flip}{preset})")
    _add_tta(p, "0; a preset may set its own")
    p.add_argument("--whiten-bias-epochs", type=_number(int, "--whiten-bias-epochs", 0), metavar="E",
                   help="epochs the whitening layer's bias trains before it freezes (a preset with one sets it)")
    p.add_argument("--bias-lr-scale", type=_number(float, "--bias-lr-scale", 0, True), metavar="S",
                   help="batch-norm biases' learning rate is S times --lr, their decay per step "
                        f"unchanged (default {TrainConfig.bias_lr_scale:g}{preset})")
    p.add_argument("--whiten-bias-scaled", action=argparse.BooleanOptionalAction, default=None,
                   help="the whitening layer's bias trains at --bias-lr-scale too, as in airbench94_muon (default "
                        "off: at --lr, as in airbench94; a preset may set it)")
    p.add_argument("--head-lr-scale", type=_number(float, "--head-lr-scale", 0, True), metavar="S",
                   help="the output layer's learning rate is S times --lr, its decay per step unchanged "
                        f"(default {TrainConfig.head_lr_scale:g}{preset})")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                   help="airbench's Lookahead: a moving average of the weights folded back into them every 5 "
                        "steps, the weights at the end (default off; a preset may set it)")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T", help="CPU threads")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    _add_precision(p, "bfloat16 convolutions and matrix products where the device computes bfloat16 natively "
                      "(Ampere+ GPUs; CPUs with AVX512-BF16 or AMX), float32 elsewhere", default=None)
    _add_tensorboard(p)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, replay each training step as one CUDA graph (default; --no-cuda-graph "
                        "runs it op by op; not under torchrun)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, batch norm computes its statistics over the whole global batch "
                        "(SyncBatchNorm) instead of each rank's part (default: off, each rank its own part, "
                        "as DDP does)")
    p.add_argument("--out", metavar="DIR", help=f"folder for run directories (default {TrainConfig.out}/)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cnnlab", description="Image-classification experiments on PyTorch: the CIFAR-10 "
                    "CNN study, trained, evaluated and plotted from the command line.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a preset and write a run directory", epilog=EPILOGS["train"],
                       formatter_class=fmt, description="Train a preset on an image folder; prints the run "
                       "directory's path last.")
    p.add_argument("--preset", help="model preset (see `cnnlab presets`); required unless --resume")
    _add_data_options(p, required=False)
    _add_train_options(p)
    p.add_argument("--name", help="run directory name (default: the preset; a clash gets a suffix)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run (same as `cnnlab resume`)")
    p.add_argument("--nproc", type=_number(int, "--nproc", 1), metavar="N",
                   help="run on N processes of this machine: the same as `torchrun --standalone "
                        "--nproc-per-node N -m cnnlab train ...` (README: Scale out)")

    p = sub.add_parser("resume", help="continue a stopped run from its last checkpoint", formatter_class=fmt,
                       epilog=EPILOGS["resume"], description="Continue a run stopped by Ctrl-C, SIGTERM or a "
                       "crash from its last epoch's checkpoint; a finished run is left unchanged.")
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = sub.add_parser("evaluate", help="score a finished run on a labelled image folder", formatter_class=fmt,
                       epilog=EPILOGS["evaluate"], description="Score a run on every image of a folder with the "
                       "same class subfolders (its test/ subfolder when present).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, metavar="PATH", help="labelled image folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("transfer", help="train a new head on a pretrained conv base, then fine-tune",
                       formatter_class=fmt, epilog=EPILOGS["transfer"],
                       description="Transfer learning: images resized to the backbone's input size and preprocessed "
                       "as its weights require; the conv base frozen and a new head trained on cached features; "
                       "then, with --fine-tune-epochs, the last --unfreeze blocks trained at a lower learning rate.")
    _add_data_options(p)
    p.add_argument("--backbone", help=f"vgg19, vgg16, efficientnet_lite0 (or _lite1, _lite2: larger), or a torchvision "
                   f"model name (resnet50, "
                   f"convnext_tiny, ...); default {TransferConfig.backbone}")
    p.add_argument("--weights", dest="weights_file", metavar="FILE",
                   help="weights file (.pth state dict, or Keras .h5 for VGG)")
    p.add_argument("--weights-variant", "--weights-kind", dest="weights_variant", choices=WEIGHTS_VARIANTS,
                   help="which weights (and so which preprocessing); default: the backbone's first")
    p.add_argument("--image-size", type=_number(int, "--image-size", 32), metavar="PX",
                   help="input size the base sees, photos resized to PX x PX (default: the size its weights were "
                        "trained at: 224, efficientnet_lite1 240, _lite2 260); larger costs time for a few "
                        "tenths of a point on new photos at most (BENCHMARKS.md)")
    p.add_argument("--head", choices=HEADS, help=f"flatten -> dense (the seed's) or global average pooling -> dense "
                   f"(default {TransferConfig.head})")
    p.add_argument("--epochs", type=_number(int, "--epochs", 1), metavar="N",
                   help=f"frozen-phase epochs (default {TransferConfig.epochs})")
    p.add_argument("--fine-tune-epochs", type=_number(int, "--fine-tune-epochs", 0), metavar="M",
                   help=f"epochs of fine-tuning after the frozen phase (default {TransferConfig.fine_tune_epochs})")
    p.add_argument("--unfreeze", type=_number(int, "--unfreeze", 1), metavar="K",
                   help=f"blocks of the base to unfreeze for fine-tuning, from the top (default {TransferConfig.unfreeze})")
    p.add_argument("--batch-size", type=_number(int, "--batch-size", 1), metavar="B",
                   help=f"batch size (default {TransferConfig.batch_size})")
    p.add_argument("--lr", type=_number(float, "--lr", 0, True), metavar="LR",
                   help=f"head learning rate (default {TransferConfig.lr:g})")
    p.add_argument("--fine-tune-lr", type=_number(float, "--fine-tune-lr", 0, True), metavar="LR",
                   help="fine-tuning learning rate (default: --lr / 10)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="flip/crop each batch (runs the base every step: no feature cache)")
    p.add_argument("--feature-copies", type=_number(int, "--feature-copies", 0), metavar="N",
                   help=f"N altered copies of each training photo (crop, mirror, JPEG re-encoding) join the feature "
                        f"cache: the frozen head learns photos as they come (default {TransferConfig.feature_copies})")
    _add_tta(p, f"{TransferConfig.tta}: the mirror image too")
    p.add_argument("--monitor", metavar="METRIC", help=_monitor_help("the best epoch"))
    p.add_argument("--patience", type=_number(int, "--patience", 0), metavar="P")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    _add_precision(p, "the base and the head in bfloat16 where the device computes it natively", default=None)
    _add_tensorboard(p)
    p.add_argument("--out", metavar="DIR", help=f"folder for run directories (default {TransferConfig.out}/)")
    p.add_argument("--name", help="run directory name (default transfer-BACKBONE)")

    p = sub.add_parser("predict", help="top-k classes for images, from a backbone or a run", formatter_class=fmt,
                       epilog=EPILOGS["predict"], description="Print the top classes of each image with their "
                       "probabilities: ImageNet classes for a backbone, the run's classes for a run directory.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", required=True, help="a backbone name (efficientnet_lite0, vgg19, ...), a run directory, "
                   "or a .onnx file made by `cnnlab export` (run by onnxruntime)")
    p.add_argument("--weights", dest="weights_file", metavar="FILE", help="weights file for a backbone")
    p.add_argument("--top", type=_number(int, "--top", 1), default=3, metavar="K", help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("explain", help="Grad-CAM: where the model looked, one PNG per image", formatter_class=fmt,
                       epilog=EPILOGS["explain"], description="Write, per image, the photo with the Grad-CAM heat "
                       "map of its top-1 class (or --class) overlaid, titled with the class and its probability.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", required=True, help="a backbone name (efficientnet_lite0, vgg19, ...) or a run directory")
    p.add_argument("--weights", dest="weights_file", metavar="FILE", help="weights file for a backbone")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class instead of the top-1")
    p.add_argument("--out", metavar="DIR", default="explanations", help="where the PNGs go (default explanations/)")

    p = sub.add_parser("export", help="a finished run as one ONNX file, checked with onnxruntime", formatter_class=fmt,
                       epilog=EPILOGS["export"], description="Write the run's model with its preprocessing inside "
                       "(input: RGB pixels 0-255, float32, N x 3 x H x W) and class probabilities out; check it with "
                       "onnxruntime against PyTorch on the run's test images.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", help="onnx (default), the only one so far")
    p.add_argument("-o", "--output", metavar="FILE", help="the file to write (default RUN_DIR/model.onnx)")

    p = sub.add_parser("report", help="one self-contained HTML page comparing runs", formatter_class=fmt,
                       epilog=EPILOGS["report"], description="Write one HTML file (images and charts embedded; "
                       "opens from disk with no network) comparing the given run directories.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--title", default="cnnlab report")

    p = sub.add_parser("reproduce", help="run the whole seed study and write its report (the main job)",
                       formatter_class=fmt, epilog=EPILOGS["reproduce"],
                       description="Run the four CIFAR-10 experiments and the transfer experiment of "
                       "SEED-STUDY.md, then write report.html and print its path.")
    p.add_argument("--data-root", metavar="DIR", help="folder holding cifar10/ and cats-vs-dogs/ (default: "
                   "$CNNLAB_DATA, else download CIFAR-10 and Oxford-IIIT Pet)")
    p.add_argument("--out", metavar="DIR", default="runs/reproduce", help="where runs and report.html go")
    p.add_argument("--quick", action="store_true", help="subsets and few epochs: the whole pipeline in minutes")
    p.add_argument("--backbone", default=TransferConfig.backbone, help="transfer backbone (default vgg19, as the original; "
                   "efficientnet_lite0 where VGG19 weights cannot be had)")
    p.add_argument("--weights", dest="weights_file", metavar="FILE", help="weights file for the backbone")
    p.add_argument("--seed", type=_number(int, "--seed", 0), default=0)
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T")
    _add_precision(p, "bfloat16 where the device computes it natively, float32 elsewhere")

    sub.add_parser("presets", help="list the presets with their layers and parameter counts",
                   formatter_class=fmt, epilog=EPILOGS["presets"])

    p = sub.add_parser("summary", help="print a preset's layer table", formatter_class=fmt,
                       epilog=EPILOGS["summary"], description="Layer, output shape (C, H, W) and parameters.")
    p.add_argument("--preset", required=True)
    p.add_argument("--image-size", type=_number(int, "--image-size", 8), default=32)
    p.add_argument("--classes", type=_number(int, "--classes", 2), default=10)

    p = sub.add_parser("study", help="run the seed study and print one comparison table", formatter_class=fmt,
                       epilog=EPILOGS["study"], description="Trains conv, pool-bn, dropout and early-stop "
                       "with the seed study's settings on one shared split.")
    p.add_argument("which", choices=["cifar10"], help="the study to run")
    _add_data_options(p)
    p.add_argument("--epochs-scale", type=_number(float, "--epochs-scale", 0, True), default=1.0, metavar="F",
                   help="multiply every preset's epochs by F (e.g. 0.1 for a quick look)")
    p.add_argument("--presets", help="comma-separated subset of conv,pool-bn,dropout,early-stop")
    p.add_argument("--batch-size", type=_number(int, "--batch-size", 1), metavar="B",
                   help=f"batch size for every run (default: the seed's {TrainConfig.batch_size})")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T")
    _add_precision(p, "bfloat16 where the device computes it natively, float32 elsewhere")
    p.add_argument("--out", metavar="DIR", default="runs")
    return parser


TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "preset")
TRANSFER_KEYS = tuple(f.name for f in fields(TransferConfig))


def _settings(args, keys) -> dict:
    """The settings among ``keys`` that the command line set (None: the config's default)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_train(args) -> int:
    from .config import resolve_config
    from .train import train
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    if args.resume:
        return cmd_resume(argparse.Namespace(run_dir=args.resume))
    for option in ("preset", "data"):
        if getattr(args, option) is None:
            raise CnnlabError(f"--{option} is required (or --resume RUN_DIR to continue a run)")
    _log(str(train(resolve_config(args.preset, **_settings(args, TRAIN_KEYS)), log=_log)))
    return 0


def cmd_transfer(args) -> int:
    from .transfer import transfer
    _log(str(transfer(TransferConfig(**_settings(args, TRANSFER_KEYS)), log=_log)))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_predictions, predict
    results = predict(args.images, args.model, args.weights_file, args.top)
    print(json.dumps({"predictions": results}) if args.json else format_predictions(results))
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    for path in explain(args.images, args.model, args.weights_file, args.class_name, args.out):
        print(path)
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    print(export_run(args.run_dir, args.output, args.format, log=_log))
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    print(build_report(args.run_dirs, args.output, args.title))
    return 0


def cmd_reproduce(args) -> int:
    from .study import reproduce
    report, failures = reproduce(args.data_root, args.out, args.quick, args.backbone, args.weights_file, args.seed,
                                 _log, precision=args.precision, threads=args.threads)
    if failures:
        _error(f"cnnlab reproduce: {len(failures)} part(s) failed (the report lists them): " + "; ".join(failures))
    _log(str(report))
    return 1 if failures else 0


def cmd_resume(args) -> int:
    from .runs import load_run
    from .train import resume
    from .transfer import resume_transfer
    transfer_run = load_run(args.run_dir)[0].get("kind") == "transfer"
    _log(str((resume_transfer if transfer_run else resume)(args.run_dir, log=_log)))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run, format_report
    from .runs import load_run
    result = evaluate_run(args.run_dir, args.data)
    print(json.dumps(result) if args.json else format_report(result, load_run(args.run_dir)[0]["class_names"]))
    return 0


def cmd_presets(args) -> int:
    from .presets import presets_listing
    print(presets_listing())
    return 0


def cmd_summary(args) -> int:
    from .presets import summary_table
    print(summary_table(args.preset, args.image_size, args.classes))
    return 0


def cmd_study(args) -> int:
    from .study import SEED_PRESETS, run_cifar10_study, write_study_table
    presets = tuple(p.strip() for p in args.presets.split(",")) if args.presets else SEED_PRESETS
    runs = run_cifar10_study(args.data, args.out, args.epochs_scale, args.seed or 0, presets, log=_log,
                             val_split=args.val_split, test_split=args.test_split, batch_size=args.batch_size,
                             precision=args.precision, threads=args.threads)
    if MAIN_RANK:
        table, path = write_study_table(runs, args.out)
        print("\n" + table)
        print(f"\ntable saved to {path}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """``argv`` (without --nproc) again on ``nproc`` processes, through torchrun's own launcher;
    the exit code is the first failed rank's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    import logging  # the ranks say what went wrong; torchrun's own summary of it would repeat it
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "cnnlab", *rest]))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    return 0


def _log(message: str) -> None:
    if MAIN_RANK:
        print(message, flush=True)


def _warning(message, category, filename, lineno, file=None, line=None):
    return f"cnnlab: warning: {message}\n"


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "transfer": cmd_transfer, "predict": cmd_predict,
            "report": cmd_report, "reproduce": cmd_reproduce, "evaluate": cmd_evaluate, "presets": cmd_presets,
            "summary": cmd_summary, "study": cmd_study, "export": cmd_export,
            "explain": cmd_explain}


def main(argv: list[str] | None = None) -> int:
    """The ``cnnlab`` command (under torchrun, one rank of it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    warnings.formatwarning = _warning
    if not MAIN_RANK:
        warnings.simplefilter("ignore")  # rank 0 says it once
    from .runtime import keep_freed_memory
    keep_freed_memory()
    code = None
    try:
        code = COMMANDS[args.command](args)
        return code
    except RunInterrupted as exc:
        _error(f"cnnlab {args.command}: stopped by {exc}")
        return exc.exit_code
    except CnnlabError as exc:
        _error(f"cnnlab {args.command}: error: {exc}")
        return 2
    except RuntimeError as exc:
        reason = _peer_lost(exc)
        if reason is None:
            raise
        _error(f"cnnlab {args.command}: error: another rank stopped ({reason}), so this one stops too; the run's "
               "last epoch checkpoint is kept: continue with `cnnlab resume RUN_DIR`")
        return 1
    except OSError as exc:  # the file system said no somewhere no check foresaw: still one line
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"cnnlab {args.command}: error: {exc.strerror or exc}{where}; check the paths given and the free "
               "disk space")
        return 2
    except KeyboardInterrupt:
        _error(f"cnnlab {args.command}: interrupted")
        return 130
    finally:
        if "torch" in sys.modules:
            from .distributed import close
            close(wait_for_peers=code == 0)


def _error(line: str) -> None:
    if MAIN_RANK:
        print(line, file=sys.stderr)
    _leave_the_report_to_rank0()


def _leave_the_report_to_rank0() -> None:
    """On a rank other than 0, waits before a failure's exit: the ranks fail alike (same arguments,
    same data), and rank 0 alone says why."""
    if not MAIN_RANK:
        try:
            time.sleep(REPORT_WAIT_S)
        except KeyboardInterrupt:  # a second Ctrl-C: exit now, still without a traceback
            pass


def _peer_lost(exc: RuntimeError) -> str | None:
    """What a collective's error says when a peer rank is gone (under torchrun: another rank was
    killed or ran out of memory), as gloo and NCCL word it; None for any other error."""
    text = str(exc)
    if "WORLD_SIZE" not in os.environ:
        return None
    return next((s for s in ("Connection reset by peer", "Connection closed by peer", "NCCL error") if s in text), None)


if __name__ == "__main__":
    sys.exit(main())
