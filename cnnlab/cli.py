"""Argument parsing only: commands become calls, errors become one line and an exit code."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import CnnlabError

EPILOGS = {
    "train": """examples:
  cnnlab train --preset pool-bn --data ../shared/data/cifar10/train
  cnnlab train --preset fast --data ~/data/cifar10/train --name fast-try
  cnnlab train --preset dropout --data cifar10 --epochs 30 --monitor val_accuracy --patience 5
  cnnlab train --preset conv --data photos/ --val-split 0.2 --test-split 0.2 --seed 1""",
    "evaluate": """examples:
  cnnlab evaluate runs/pool-bn --data ../shared/data/cifar10/train
  cnnlab evaluate runs/fast --data my-test-images/ --json""",
    "resume": """examples:
  cnnlab resume runs/dropout
  cnnlab train --resume runs/dropout""",
    "transfer": """examples:
  cnnlab transfer --data ../shared/data/cats-vs-dogs --backbone efficientnet_lite0 --head gap
  cnnlab transfer --data ../shared/data/cats-vs-dogs --backbone efficientnet_lite0 --fine-tune-epochs 2 --unfreeze 2
  cnnlab transfer --data pets/ --backbone vgg19 --weights vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
  cnnlab transfer --data pets/ --backbone vgg19 --weights ~/vgg19-dcbb9e9d.pth --epochs 3""",
    "predict": """examples:
  cnnlab predict eagle.jpg --model efficientnet_lite0
  cnnlab predict photos/ --model vgg19 --weights vgg19-dcbb9e9d.pth --top 5
  cnnlab predict cat.png dog.png --model runs/transfer-efficientnet_lite0 --json""",
    "report": """examples:
  cnnlab report runs/conv runs/pool-bn runs/dropout -o report.html
  cnnlab report runs/*/ -o all-runs.html""",
    "reproduce": """examples:
  cnnlab reproduce --data-root ../shared/data --backbone efficientnet_lite0
  cnnlab reproduce --data-root ../shared/data --backbone efficientnet_lite0 --quick
  cnnlab reproduce --backbone vgg19 --weights vgg19-dcbb9e9d.pth --data-root ~/data
  cnnlab reproduce          # on a connected machine: downloads CIFAR-10 and Oxford-IIIT Pet""",
    "presets": """examples:
  cnnlab presets""",
    "summary": """examples:
  cnnlab summary --preset dropout
  cnnlab summary --preset fast --image-size 32""",
    "study": """examples:
  cnnlab study cifar10 --data ../shared/data/cifar10/train
  cnnlab study cifar10 --data ../shared/data/cifar10/train --epochs-scale 0.1""",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, name, low=None, low_open=False, high_open=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"not '{text}'") from None
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{name} must be {'above' if low_open else 'at least'} {low:g}, "
                                             f"got {text}")
        if high_open is not None and value >= high_open:
            raise argparse.ArgumentTypeError(f"{name} must be below {high_open:g}, got {text}")
        return value
    return parse


def _add_data_options(p, required=True):
    p.add_argument("--data", required=required, metavar="PATH",
                   help="image folder (one subfolder per class; train/val/test subfolders honoured) "
                        "or 'cifar10' (torchvision's copy, downloaded into the cache when missing)")
    p.add_argument("--val-split", type=_number(float, "--val-split", 0, True, 1), metavar="F",
                   help="fraction of each class held out for validation (default 0.1)")
    p.add_argument("--test-split", type=_number(float, "--test-split", 0, True, 1), metavar="F",
                   help="fraction of each class held out for the final test (default 0.1)")
    p.add_argument("--seed", type=_number(int, "--seed", 0), metavar="S", help="seed of splits, init, order (default 0)")


def _add_precision(p, auto: str, default: str | None = "auto") -> None:
    """``--precision`` (train.PRECISIONS), ``auto`` described as ``auto``; ``default=None`` lets a
    config's own default apply."""
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=default, help=f"auto (default): {auto}")


def _add_train_options(p):
    p.add_argument("--epochs", type=_number(int, "--epochs", 1), metavar="N", help="epochs (default: the preset's)")
    p.add_argument("--batch-size", type=_number(int, "--batch-size", 1), metavar="B", help="batch size (default 128)")
    p.add_argument("--lr", type=_number(float, "--lr", 0, True), metavar="LR", help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="optimizer (default adam)")
    p.add_argument("--momentum", type=_number(float, "--momentum", 0), help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=_number(float, "--weight-decay", 0), metavar="WD")
    p.add_argument("--schedule", choices=["none", "onecycle", "cosine"], help="learning-rate schedule")
    p.add_argument("--label-smoothing", type=_number(float, "--label-smoothing", 0, False, 1), metavar="E")
    p.add_argument("--monitor", metavar="METRIC",
                   help="metric for the best epoch and early stopping: val_loss (default), val_accuracy, "
                        "val_precision, val_recall, val_f1, loss, accuracy")
    p.add_argument("--patience", type=_number(int, "--patience", 0), metavar="P",
                   help="stop after P epochs without improvement of --monitor (default: never)")
    p.add_argument("--min-delta", type=_number(float, "--min-delta", 0), metavar="D",
                   help="smallest change that counts as an improvement (default 0)")
    p.add_argument("--mode", choices=["auto", "min", "max"], help="whether --monitor should go down or up")
    p.add_argument("--start-from-epoch", type=_number(int, "--start-from-epoch", 0), metavar="E",
                   help="ignore the first E epochs for the best epoch and patience")
    p.add_argument("--restore-best-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the best epoch's weights (default) or the last epoch's")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (pad 4) and horizontal flip on each batch")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average predictions with the mirrored image when scoring")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T", help="CPU threads")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    _add_precision(p, "bfloat16 convolutions and matrix products where the device computes bfloat16 natively "
                      "(Ampere+ GPUs; CPUs with AVX512-BF16 or AMX), float32 elsewhere", default=None)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA, replay each training step as one CUDA graph (default; --no-cuda-graph "
                        "runs it op by op)")
    p.add_argument("--out", metavar="DIR", help="folder for run directories (default runs/)")


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
    p.add_argument("--backbone", default="vgg19", help="vgg19 (default), vgg16, efficientnet_lite0, or a torchvision "
                   "model name (resnet50, convnext_tiny, ...)")
    p.add_argument("--weights", metavar="FILE", help="weights file (.pth state dict, or Keras .h5 for VGG)")
    p.add_argument("--weights-kind", choices=["torchvision", "keras", "pypi"],
                   help="which weights (and so which preprocessing); default: the backbone's first")
    p.add_argument("--head", choices=["flatten", "gap"], help="flatten -> dense (the seed's, default) or "
                   "global average pooling -> dense")
    p.add_argument("--epochs", type=_number(int, "--epochs", 1), metavar="N", help="frozen-phase epochs (default 4)")
    p.add_argument("--fine-tune-epochs", type=_number(int, "--fine-tune-epochs", 0), metavar="M",
                   help="epochs of fine-tuning after the frozen phase (default 0)")
    p.add_argument("--unfreeze", type=_number(int, "--unfreeze", 1), metavar="K",
                   help="blocks of the base to unfreeze for fine-tuning, from the top (default 1)")
    p.add_argument("--batch-size", type=_number(int, "--batch-size", 1), metavar="B", help="batch size (default 32)")
    p.add_argument("--lr", type=_number(float, "--lr", 0, True), metavar="LR", help="head learning rate (default 1e-3)")
    p.add_argument("--fine-tune-lr", type=_number(float, "--fine-tune-lr", 0, True), metavar="LR",
                   help="fine-tuning learning rate (default: --lr / 10)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="flip/crop each batch (runs the base every step: no feature cache)")
    p.add_argument("--monitor", metavar="METRIC", help="metric for the best epoch (default val_loss)")
    p.add_argument("--patience", type=_number(int, "--patience", 0), metavar="P")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    _add_precision(p, "the base and the head in bfloat16 where the device computes it natively", default=None)
    p.add_argument("--out", metavar="DIR", help="folder for run directories (default runs/)")
    p.add_argument("--name", help="run directory name (default transfer-BACKBONE)")

    p = sub.add_parser("predict", help="top-k classes for images, from a backbone or a run", formatter_class=fmt,
                       epilog=EPILOGS["predict"], description="Print the top classes of each image with their "
                       "probabilities: ImageNet classes for a backbone, the run's classes for a run directory.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", required=True, help="a backbone name (efficientnet_lite0, vgg19, ...) or a run directory")
    p.add_argument("--weights", metavar="FILE", help="weights file for a backbone")
    p.add_argument("--top", type=_number(int, "--top", 1), default=3, metavar="K", help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

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
    p.add_argument("--backbone", default="vgg19", help="transfer backbone (default vgg19, as the original; "
                   "efficientnet_lite0 where VGG19 weights cannot be had)")
    p.add_argument("--weights", metavar="FILE", help="weights file for the backbone")
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
                   help="batch size for every run (default: the seed's 128)")
    p.add_argument("--threads", type=_number(int, "--threads", 1), metavar="T")
    _add_precision(p, "bfloat16 where the device computes it natively, float32 elsewhere")
    p.add_argument("--out", metavar="DIR", default="runs")
    return parser


TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov", "weight_decay", "schedule",
              "label_smoothing", "monitor", "patience", "min_delta", "mode", "start_from_epoch",
              "restore_best_weights", "augment", "tta", "threads", "device", "precision", "cuda_graph", "out", "name",
              "val_split", "test_split", "seed")


def _resume(run_dir: str):
    from .runs import load_run
    if load_run(run_dir)[0].get("kind") == "transfer":
        from .transfer import resume_transfer
        return resume_transfer(run_dir, log=_log)
    from .train import resume
    return resume(run_dir, log=_log)


def cmd_train(args) -> int:
    from .train import resolve_config, train
    if args.resume:
        print(_resume(args.resume))
        return 0
    for option in ("preset", "data"):
        if getattr(args, option) is None:
            raise CnnlabError(f"--{option} is required (or --resume RUN_DIR to continue a run)")
    cfg = resolve_config(args.preset, data=args.data, **{k: getattr(args, k) for k in TRAIN_KEYS})
    run_dir = train(cfg, log=_log)
    print(run_dir)
    return 0


def cmd_transfer(args) -> int:
    from dataclasses import fields
    from .train import MONITORS
    from .backbones import get_backbone
    from .transfer import TransferConfig, transfer
    keys = {f.name for f in fields(TransferConfig)}
    values = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    cfg = TransferConfig(**values)
    if cfg.monitor not in MONITORS:
        raise CnnlabError(f"unknown monitor metric '{cfg.monitor}'; choose one of: {', '.join(MONITORS)}")
    get_backbone(cfg.backbone)  # an unknown name fails here, before any work
    print(transfer(cfg, log=_log))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_predictions, predict
    results = predict(args.images, args.model, args.weights, args.top)
    print(json.dumps({"predictions": results}) if args.json else format_predictions(results))
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    print(build_report(args.run_dirs, args.output, args.title))
    return 0


def cmd_reproduce(args) -> int:
    import torch
    from .backbones import get_backbone
    from .study import reproduce
    get_backbone(args.backbone)  # an unknown name fails here, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    report, failures = reproduce(args.data_root, args.out, args.quick, args.backbone, args.weights, args.seed, _log,
                                 precision=args.precision)
    if failures:
        print(f"cnnlab reproduce: {len(failures)} part(s) failed (the report lists them): " + "; ".join(failures),
              file=sys.stderr)
    print(report)
    return 1 if failures else 0


def cmd_resume(args) -> int:
    print(_resume(args.run_dir))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run, format_report
    from .runs import load_run
    result = evaluate_run(args.run_dir, args.data)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result, load_run(args.run_dir)[0]["class_names"]))
    return 0


def cmd_presets(args) -> int:
    from .presets import PRESETS, build_model, count_parameters
    for name, preset in PRESETS.items():
        params = count_parameters(build_model(preset.layers, 10))
        print(f"{name:<11} {params:>10,} params  {preset.description}")
        print(f"{'':<11} layers: {' -> '.join(preset.layers)}")
        if preset.settings:
            print(f"{'':<11} settings: " + ", ".join(f"{k}={v}" for k, v in preset.settings.items()))
    return 0


def cmd_summary(args) -> int:
    from .presets import build_model, count_parameters, get_preset, summary_rows
    shape = (3, args.image_size, args.image_size)
    model = build_model(get_preset(args.preset).layers, args.classes, shape)
    rows = summary_rows(model, shape)
    width = max(len(r[0]) for r in rows) + 2
    print(f'Model: "{args.preset}" (input {shape}, {args.classes} classes)')
    print(f"{'Layer (type)':<{width}}{'Output Shape':<24}{'Param #':>10}")
    print("=" * (width + 34))
    for name, out_shape, params in rows:
        print(f"{name:<{width}}{out_shape:<24}{params:>10,}")
    print("=" * (width + 34))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_parameters(model)
    print(f"Total params: {total:,}\nTrainable params: {trainable:,}\nNon-trainable params: {total - trainable:,}")
    return 0


def cmd_study(args) -> int:
    import torch
    from .study import SEED_PRESETS, run_cifar10_study, write_study_table
    presets = tuple(p.strip() for p in args.presets.split(",")) if args.presets else SEED_PRESETS
    unknown = [p for p in presets if p not in SEED_PRESETS]
    if unknown:
        raise CnnlabError(f"--presets: '{unknown[0]}' is not in the seed study; choose from {','.join(SEED_PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = run_cifar10_study(args.data, args.out, args.epochs_scale, args.seed or 0, presets, log=_log,
                             val_split=args.val_split, test_split=args.test_split,
                             batch_size=args.batch_size, precision=args.precision)
    table, path = write_study_table(runs, args.out)
    print("\n" + table)
    print(f"\ntable saved to {path}")
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


def _warning(message, category, filename, lineno, file=None, line=None):
    return f"cnnlab: warning: {message}\n"


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "transfer": cmd_transfer, "predict": cmd_predict,
            "report": cmd_report, "reproduce": cmd_reproduce, "evaluate": cmd_evaluate, "presets": cmd_presets, "summary": cmd_summary,
            "study": cmd_study}


def main(argv: list[str] | None = None) -> int:
    """The ``cnnlab`` command."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning
    from .train import RunInterrupted, keep_freed_memory
    keep_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except RunInterrupted as exc:
        print(f"cnnlab {args.command}: stopped by {exc}", file=sys.stderr)
        return exc.exit_code
    except CnnlabError as exc:
        print(f"cnnlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnnlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
