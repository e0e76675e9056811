"""The grammar of the ``cnnlab`` command: every parser, its argument groups and help texts. One spelling
per idea: ``--model`` names the model (a preset, a backbone, a run or an .onnx file), ``--out DIR`` a
folder to write into, ``-o/--output FILE`` a file to write. Nothing here imports torch."""
from __future__ import annotations

import argparse

from .cli_deploy import add_int8 as _add_int8, add_serve as _serve
from .cli_examples import EPILOGS
from .cli_parsing import CommandParser, Parser
from .cli_options import balance as _add_balance, labels as _add_labels, number as _num, switch as _switch
from .cli_options import multi_label as _add_multi_label, positional_or_model
from .cli_options import model_size as _add_model_size, photo_augment as _add_photo_augment
from .config import (AUTO, FLIPS, HEADS, MAX_IMAGE_SIZE, MODES, MONITORS, OPTIMIZERS, PRECISIONS, SCHEDULES,
                     TTA_LEVELS, WEIGHTS_VARIANTS, ReproduceConfig, TrainConfig, TransferConfig)
from .version import __version__

PRESET = "; a preset may set its own"
NATIVE_BF16 = "bfloat16 where the device computes it natively, float32 elsewhere"


def _one_run(parser, args) -> None:
    """A command on one run takes it as RUN_DIR or as --model RUN_DIR: ``args.run_dir`` either way."""
    positional_or_model(parser, args, "run_dir", "model", "run", "RUN_DIR")


def _add_run(p, what: str) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help=f"the run directory {what} (or --model RUN_DIR)")
    p.add_argument("--model", metavar="RUN_DIR", help="the run directory, given as an option (the same as RUN_DIR)")
    p.finish = _one_run


def _add_data(g, required=True) -> None:
    g.add_argument("--data", required=required, metavar="PATH",
                   help="image folder (one subfolder per class), or a folder with train/ (and val/, valid/ or "
                        "validation/, and test/) subfolders of that kind: a given test/ is the test set, scored once; "
                        "or 'cifar10' (torchvision's copy, downloaded into the cache when missing); with --labels, "
                        "the folder its image paths start from")
    _num(g, "--val-split", float, 0, "F", below=1,
         help=f"fraction of each class held out for validation (default {TrainConfig.val_split}); 0 trains on every "
              "training image with no validation pass (train only; no early stopping on a val_ metric then)")
    _num(g, "--test-split", float, 0, "F", above=True, below=1,
         help=f"fraction of each class held out for the final test (default {TrainConfig.test_split})")
    _num(g, "--seed", int, 0, "S", help=f"seed of splits, init, order (default {TrainConfig.seed})")


def _add_runtime(g, precision: str, device=False, precision_default: str | None = "auto") -> None:
    """--threads, --device (if ``device``), --precision: ``auto`` is ``precision``; a None default, the config's."""
    _num(g, "--threads", int, 1, "T", help="CPU threads (default: PyTorch's own choice)")
    if device:
        g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    g.add_argument("--precision", choices=PRECISIONS, default=precision_default, help=f"auto (default): {precision}")


def _add_tta(g, default: str) -> None:
    g.add_argument("--tta", type=int, nargs="?", const=1, choices=TTA_LEVELS, metavar="LEVEL",
                   help="test-time augmentation when scoring: 1 (--tta alone) averages with the mirror image, 2 "
                        f"also with both mirrored 1-pixel shifts, 0 none (default {default})")
    g.add_argument("--no-tta", dest="tta", action="store_const", const=0, help="the same as --tta 0")


def _add_run_output(g, default_out: str, default_name: str) -> None:
    g.add_argument("--out", metavar="DIR", help=f"folder for run directories (default {default_out}/)")
    g.add_argument("--name", help=f"run directory name (default {default_name}; a clash gets a suffix)")
    g.add_argument("--resume-if-exists", action="store_true",
                   help="the run --out/--name names: resume it if it is there unfinished (its options must be "
                        "the ones it started with), say so if finished, else start it there; a Slurm job requeued "
                        "on SIGUSR1 reruns its command with this (docs/scale-out.md)")
    _switch(g, "--tensorboard", "write TensorBoard event files into the run directory as it trains (default; see "
                                "them with `tensorboard --logdir runs`)")
    g.add_argument("--mlflow", nargs="?", const="mlruns", metavar="URI",
                   help="log the run to MLflow: settings, every epoch, test scores, files (--mlflow alone: the "
                        "file store mlruns/; or a folder, sqlite:///mlflow.db, http://host:5000); needs mlflow")


def _train_augment(g) -> None:
    _add_photo_augment(g)
    _num(g, "--translate", int, 0, "PX",
         help=f"augmenting: pixels a random crop may shift by (default {TrainConfig.translate}{PRESET})")
    g.add_argument("--flip", choices=FLIPS, help="augmenting: random flips, or alternate: each image's orientation "
                   f"drawn once and all mirrored every other epoch (default {TrainConfig.flip}{PRESET})")
    _add_tta(g, "0" + PRESET)


def _train_optimization(g) -> None:
    _num(g, "--batch-size", int, 1, "B", help=f"batch size (default {TrainConfig.batch_size}{PRESET})")
    _num(g, "--lr", float, 0, "LR", above=True, words=(AUTO,), help=f"learning rate, or auto: the suggestion of the "
         f"learning-rate finder (`cnnlab lr-find`), recorded in config.json (default {TrainConfig.lr:g}{PRESET})")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"optimizer (default {TrainConfig.optimizer}{PRESET}); muon: Muon on the conv filters (--lr), "
                        "SGD-Nesterov with --momentum on the rest")
    _num(g, "--momentum", float, 0, "M", help=f"SGD momentum (default {TrainConfig.momentum}{PRESET})")
    _switch(g, "--nesterov", f"Nesterov momentum (default {'on' if TrainConfig.nesterov else 'off'}{PRESET})")
    _num(g, "--weight-decay", float, 0, "WD", help=f"weight decay (default {TrainConfig.weight_decay:g}{PRESET})")
    _num(g, "--label-smoothing", float, 0, "E", below=1,
         help=f"label smoothing (default {TrainConfig.label_smoothing:g}{PRESET})")


def _train_recipe(g) -> None:
    _num(g, "--whiten-bias-epochs", int, 0, "E",
         help="epochs the whitening layer's bias trains before it freezes (a preset with one sets it)")
    _num(g, "--bias-lr-scale", float, 0, "S", above=True,
         help="batch-norm biases' learning rate is S times --lr, their decay per step unchanged (default "
              f"{TrainConfig.bias_lr_scale:g}{PRESET})")
    _switch(g, "--whiten-bias-scaled", "the whitening layer's bias trains at --bias-lr-scale too, as in "
                                       "airbench94_muon (default off: at --lr, as in airbench94; a preset may set it)")
    _num(g, "--head-lr-scale", float, 0, "S", above=True,
         help="the output layer's learning rate is S times --lr, its decay per step unchanged (default "
              f"{TrainConfig.head_lr_scale:g}{PRESET})")
    _switch(g, "--lookahead", "airbench's Lookahead: a moving average of the weights folded back into them every 5 "
                              "steps, the weights at the end (default off; a preset may set it)")


def _train_early_stopping(g) -> None:
    g.add_argument("--monitor", metavar="METRIC", help="metric for the best epoch and early stopping: "
                   f"{', '.join(MONITORS)} (default {TrainConfig.monitor})")
    _num(g, "--patience", int, 0, "P", help="stop after P epochs without improvement of --monitor (default: never)")
    _num(g, "--min-delta", float, 0, "D",
         help=f"smallest change that counts as an improvement (default {TrainConfig.min_delta:g})")
    g.add_argument("--mode", choices=MODES, help="whether --monitor should go down or up (default: from its name)")
    _num(g, "--start-from-epoch", int, 0, "E", help="ignore the first E epochs for the best epoch and patience")
    _switch(g, "--restore-best-weights", "keep the best epoch's weights (default) or the last epoch's")


def _train_runtime(g) -> None:
    _add_runtime(g, "bfloat16 convolutions and matrix products where the device computes bfloat16 natively "
                    "(Ampere+ GPUs; CPUs with AVX512-BF16 or AMX), float32 elsewhere", True, None)
    _switch(g, "--cuda-graph", "on CUDA, replay each training step as one CUDA graph (default; --no-cuda-graph "
                               "runs it op by op; not under torchrun)")
    _switch(g, "--sync-bn", "under torchrun, batch norm computes its statistics over the whole global batch "
                            "(SyncBatchNorm) instead of each rank's part (default: off, each rank its own part, "
                            "as DDP does)")
    _num(g, "--nproc", int, 1, "N", help="run on N processes of this machine: the same as `torchrun --standalone "
                                         "--nproc-per-node N -m cnnlab train ...` (README: Scale out)")


def _train(sub) -> None:
    p = sub.add_parser("train", help="train a preset or an architecture from scratch and write a run directory",
                       epilog=EPILOGS["train"], description="Train a preset, or a torchvision architecture from "
                       "scratch, on an image folder; prints the run directory's path last.")
    model = p.add_argument_group("model")
    model.add_argument("--model", "--preset", dest="preset", metavar="MODEL", help="a preset (see `cnnlab presets`), "
                       "or any torchvision classification architecture (resnet18, convnext_tiny, ...; timm's too "
                       "once installed) trained from scratch; required unless --resume")
    _add_model_size(model)
    model.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run (same as `cnnlab resume`); an "
                       "option beside it that would change the run is refused; --threads, --device, --nproc and "
                       "--data (holding the same images) are honoured")
    data = p.add_argument_group("data", "the images, their splits and their augmentation")
    _add_data(data, required=False)
    _add_labels(data)
    _add_balance(data, TrainConfig)
    _add_multi_label(data, TrainConfig)
    _train_augment(data)
    _train_optimization(p.add_argument_group("optimization"))
    schedule = p.add_argument_group("schedule")
    _num(schedule, "--epochs", int, 1, "N", help="epochs (default: the preset's)")
    schedule.add_argument("--schedule", choices=SCHEDULES,
                          help=f"learning-rate schedule (default {TrainConfig.schedule}{PRESET})")
    _train_recipe(p.add_argument_group("recipe internals", "airbench's knobs; the presets that need them set them"))
    _train_early_stopping(p.add_argument_group("early stopping", "and which epoch's weights the run keeps"))
    _train_runtime(p.add_argument_group("runtime"))
    _add_run_output(p.add_argument_group("output"), TrainConfig.out, "the preset")


def _resume(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped run from its last checkpoint", epilog=EPILOGS["resume"],
                       description="Continue a run stopped by Ctrl-C, SIGTERM, SIGUSR1 or a crash from its last "
                       "epoch's checkpoint, on exactly the data and split it started with; a finished run is left "
                       "unchanged.")
    _add_run(p, "to continue")


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a finished run on a labelled image folder", epilog=EPILOGS["evaluate"],
                       description="Score a run on every image of a folder with the same class subfolders (its "
                       "test/ subfolder when present).")
    _add_run(p, "to score")
    p.add_argument("--data", required=True, metavar="PATH", help="labelled image folder (with --labels: the folder "
                   "its image paths start from)")
    _add_labels(p, ", each one of the run's classes: its test rows when it has a split column, else every row")
    p.add_argument("--multi-label", action="store_true", help="the run has several labels per image (read from the "
                   "run: a one-line error if it has not); its labels file's label column holds names separated by ';'")
    _num(p, "--threshold", float, 0, "P", above=True, below=1, help="a multi-label run: score every label at this "
         "probability instead of the run's saved thresholds")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _transfer_model(g) -> None:
    g.add_argument("--model", "--backbone", dest="backbone", metavar="BACKBONE",
                   help="vgg19, vgg16, efficientnet_lite0 (or _lite1, _lite2: larger), or a torchvision model name "
                        f"(resnet50, convnext_tiny, ...); default {TransferConfig.backbone}")
    g.add_argument("--weights", dest="weights_file", metavar="FILE",
                   help="weights file (.pth state dict, or Keras .h5 for VGG)")
    g.add_argument("--weights-variant", choices=WEIGHTS_VARIANTS,
                   help="which weights (and so which preprocessing); default: the backbone's first")
    _num(g, "--image-size", int, 32, "PX",
         help="input size the base sees, photos resized to PX x PX (default: efficientnet_lite0 260, _lite1 280, "
              "_lite2 300, about 1.16x the size their weights were trained at; any other backbone its weights' "
              "size, 224 for most)")
    g.add_argument("--head", choices=HEADS, help=f"flatten -> dense (the seed's) or global average pooling -> dense "
                   f"(default {TransferConfig.head})")


def _transfer_data(g) -> None:
    _add_data(g)
    _add_labels(g)
    _add_balance(g, TransferConfig)
    _add_multi_label(g, TransferConfig)
    _switch(g, "--augment", "flip/crop each batch (runs the base every step: no feature cache)")
    _num(g, "--feature-copies", int, 0, "N",
         help="N altered copies of each training photo (crop, mirror, JPEG re-encoding) join the feature cache: the "
              f"frozen head learns photos as they come (default {TransferConfig.feature_copies})")
    _add_tta(g, f"{TransferConfig.tta}: the mirror image too")


def _transfer_training(g) -> None:
    _num(g, "--epochs", int, 1, "N", help=f"frozen-phase epochs (default {TransferConfig.epochs})")
    _num(g, "--batch-size", int, 1, "B", help=f"batch size (default {TransferConfig.batch_size})")
    _num(g, "--lr", float, 0, "LR", above=True, words=(AUTO,),
         help=f"head learning rate, or auto: the learning-rate finder's (default {TransferConfig.lr:g})")
    g.add_argument("--monitor", metavar="METRIC", help=f"metric for the best epoch: {', '.join(MONITORS)} "
                   f"(default {TransferConfig.monitor})")
    _num(g, "--patience", int, 0, "P",
         help="end a phase after P epochs without improvement of --monitor (default: never)")


def _transfer_fine_tuning(g) -> None:
    _num(g, "--fine-tune-epochs", int, 0, "M",
         help=f"epochs of fine-tuning after the frozen phase (default {TransferConfig.fine_tune_epochs})")
    _num(g, "--unfreeze", int, 1, "K",
         help=f"blocks of the base to unfreeze for fine-tuning, from the top (default {TransferConfig.unfreeze})")
    _num(g, "--fine-tune-lr", float, 0, "LR", above=True,
         help=f"fine-tuning learning rate (default {TransferConfig.fine_tune_lr:g})")
    _switch(g, "--fine-tune-cached", "train the unfrozen blocks on cached maps of the frozen ones below them, which run "
            "once (default; --no-fine-tune-cached runs the whole base every step, as before)")


def _transfer(sub) -> None:
    p = sub.add_parser("transfer", help="train a new head on a pretrained conv base, then fine-tune",
                       epilog=EPILOGS["transfer"], description="Transfer learning: images resized to the backbone's "
                       "input size and preprocessed as its weights require; the conv base frozen and a new head "
                       "trained on cached features; then, with --fine-tune-epochs, the last --unfreeze blocks trained "
                       "at a lower learning rate.")
    _transfer_model(p.add_argument_group("model"))
    _transfer_data(p.add_argument_group("data", "the images, their splits and their augmentation"))
    _transfer_training(p.add_argument_group("training", "the frozen phase: a new head on the frozen base"))
    _transfer_fine_tuning(p.add_argument_group("fine-tuning", "after the frozen phase: the top blocks of the base "
                                               "trained with the head"))
    _add_runtime(p.add_argument_group("runtime"), "the base and the head in bfloat16 where the device computes it "
                 "natively", True, None)
    _add_run_output(p.add_argument_group("output"), TransferConfig.out, "transfer-BACKBONE")


def _add_images(p, model: str) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders of them")
    p.add_argument("--model", required=True, help=f"a backbone name (efficientnet_lite0, vgg19, ...){model}")
    p.add_argument("--weights", dest="weights_file", metavar="FILE", help="weights file for a backbone")


def _predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes for images, from a backbone or a run", epilog=EPILOGS["predict"],
                       description="Print the top classes of each image with their probabilities: ImageNet classes "
                       "for a backbone, the run's classes for a run directory.")
    _add_images(p, ", a run directory, or a .onnx file made by `cnnlab export` (run by onnxruntime)")
    _num(p, "--top", int, 1, "K", default=3, help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM: where the model looked, one PNG per image", epilog=EPILOGS["explain"],
                       description="Write, per image, the photo with the Grad-CAM heat map of its top-1 class (or "
                       "--class) overlaid, titled with the class and its probability.")
    _add_images(p, " or a run directory")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class instead of the top-1")
    p.add_argument("--out", metavar="DIR", default="explanations", help="where the PNGs go (default explanations/)")


def _export(sub) -> None:
    p = sub.add_parser("export", help="a finished run as one ONNX file, checked with onnxruntime",
                       epilog=EPILOGS["export"], description="Write the run's model with its preprocessing inside "
                       "(input: RGB pixels 0-255, float32, N x 3 x H x W) and class probabilities out; check it with "
                       "onnxruntime against PyTorch on the run's test images.")
    _add_run(p, "to export")
    p.add_argument("--format", default="onnx", help="onnx (default), the only one so far")
    p.add_argument("-o", "--output", metavar="FILE", help="the file to write (default RUN_DIR/model.onnx)")
    _add_int8(p)


def _report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page comparing runs", epilog=EPILOGS["report"],
                       description="Write one HTML file (images and charts embedded; opens from disk with no "
                       "network) comparing the given run directories.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the run directories to compare")
    p.add_argument("-o", "--output", metavar="FILE", default="report.html",
                   help="the HTML file to write (default report.html)")
    p.add_argument("--title", default="cnnlab report", help="the page's title (default 'cnnlab report')")


def _reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run the whole seed study and write its report (the main job)",
                       epilog=EPILOGS["reproduce"], description="Run the four CIFAR-10 experiments and the transfer "
                       "experiment of the seed study (docs/seed-study.md), then write report.html and print its path.")
    g = p.add_argument_group("study")
    g.add_argument("--data-root", metavar="DIR", help="folder holding cifar10/ and cats-vs-dogs/ (default: "
                   "$CNNLAB_DATA, else download CIFAR-10 and Oxford-IIIT Pet)")
    g.add_argument("--quick", action="store_true", help="subsets and few epochs: the whole pipeline in minutes")
    g.add_argument("--model", "--backbone", dest="backbone", metavar="BACKBONE", default=ReproduceConfig.backbone,
                   help="the transfer experiment's backbone (default vgg19, as the original; efficientnet_lite0 "
                   "where VGG19 weights cannot be had)")
    g.add_argument("--weights", dest="weights_file", metavar="FILE", help="weights file for the backbone")
    _num(g, "--seed", int, 0, "S", default=0, help="seed of every run's splits, init and order (default 0)")
    _add_runtime(p.add_argument_group("runtime"), NATIVE_BF16)
    p.add_argument_group("output").add_argument("--out", metavar="DIR", default="runs/reproduce",
                                                help="where the runs and report.html go (default runs/reproduce/)")


def _presets(sub) -> None:
    sub.add_parser("presets", help="list the presets with their layers and parameter counts", epilog=EPILOGS["presets"],
                   description="List every model preset: its layers, parameter count and the settings it brings.")


def _summary(sub) -> None:
    p = sub.add_parser("summary", help="print a preset's layer table", epilog=EPILOGS["summary"],
                       description="Layer, output shape (C, H, W) and parameters.")
    p.add_argument("--model", "--preset", dest="preset", metavar="PRESET", required=True,
                   help="the model preset (see `cnnlab presets`)")
    _num(p, "--image-size", int, 8, "PX", default=32, below=MAX_IMAGE_SIZE + 1,
         help=f"input images of PX x PX pixels, 8 to {MAX_IMAGE_SIZE} (default 32)")
    _num(p, "--classes", int, 2, "N", default=10, below=100_001, help="classes of the output layer, 2 to 100,000 "
         "(default 10)")


def _study(sub) -> None:
    p = sub.add_parser("study", help="run the seed study and print one comparison table", epilog=EPILOGS["study"],
                       description="Trains conv, pool-bn, dropout and early-stop with the seed study's settings on "
                       "one shared split.")
    p.add_argument("which", choices=["cifar10"], help="the study to run")
    data = p.add_argument_group("data")
    _add_data(data)
    _add_labels(data)
    g = p.add_argument_group("runs")
    _num(g, "--epochs-scale", float, 0, "F", above=True, default=1.0,
         help="multiply every preset's epochs by F (e.g. 0.1 for a quick look)")
    g.add_argument("--presets", help="comma-separated subset of conv,pool-bn,dropout,early-stop")
    _num(g, "--batch-size", int, 1, "B",
         help=f"batch size for every run (default: the seed's {TrainConfig.batch_size})")
    _add_runtime(p.add_argument_group("runtime"), NATIVE_BF16)
    p.add_argument_group("output").add_argument("--out", metavar="DIR", default="runs", help="folder for the run "
                                                "directories and study-cifar10.csv (default runs/)")


def _lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="suggest a learning rate: fastai's range test on a copy of the model",
                       epilog=EPILOGS["lr-find"], description="Train a copy of the model for up to 100 steps at "
                       "rates from 1e-7 to 10 until the loss diverges, at most 4% of the run's batches; plot it; "
                       "print the suggested rate last.")
    p.add_argument("--model", required=True, metavar="PRESET_OR_BACKBONE", help="a preset, or a backbone (its head)")
    data = p.add_argument_group("data")
    _add_data(data)
    _add_labels(data)
    _add_multi_label(data, TrainConfig, thresholds=False)
    g = p.add_argument_group("training", "as the run would train (default: the preset's or the backbone's)")
    _num(g, "--epochs", int, 1, "N", help="the run's epochs: the sweep takes at most 4%% of its batches")
    _num(g, "--batch-size", int, 1, "B", help="batch size")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (presets only)")
    _num(g, "--image-size", int, 32, "PX", help="input size the base sees (backbones only; default: as transfer's)")
    _add_runtime(g, NATIVE_BF16, True, None)
    g.add_argument("--out", metavar="DIR", help="folder for the plot lr_find-MODEL.png (default runs/)")
    g.add_argument("-o", "--output", metavar="FILE", help="the plot (a .png) instead")


SUBCOMMANDS = (_train, _resume, _evaluate, _transfer, _predict, _explain, _export, _report, _reproduce, _presets,
               _summary, _study, _lr_find, _serve)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cnnlab", epilog=EPILOGS["cnnlab"], description="Image classification on PyTorch: "
                    "train, evaluate, export and explain classifiers of your own image folders, from scratch or "
                    "from ImageNet weights, and rerun the classic CIFAR-10 study.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser, metavar="COMMAND",
                                help="what to do (`cnnlab COMMAND --help`: its options and examples)")
    for add in SUBCOMMANDS:
        add(sub)
    return parser
