"""The public Python calls: ``cnnlab.train``, ``cnnlab.transfer``, ``cnnlab.resume``, ``cnnlab.load``,
``cnnlab.report`` and the ``Run`` they return. A call takes the command line's settings under the
same names (``batch_size`` for ``--batch-size``), checked by the same parser, so the same settings
make the same run; bad values raise ``CnnlabError`` with the command line's one-line message."""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Callable

from torch import nn

from .cli_options import TRAIN_KEYS, TRANSFER_KEYS, given_settings
from .cli_parser import build_parser
from .config import TrainConfig, TransferConfig, validate
from .errors import CnnlabError
from .evaluate import evaluate_run
from .explain import explain as explain_images
from .export import export_run
from .predict import predict as predict_images
from .presets import resolve_config
from .report import build_report
from .runs import load_run, read_history
from .saved_model import load_model
from .train import resume as resume_run
from .train import train as train_run
from .transfer import resume_transfer
from .transfer import transfer as transfer_run

SHELL_ONLY = ("nproc", "resume", "resume_if_exists")  # relaunching or continuing is the shell's: see resume()


class Run:
    """A run directory, read lazily: ``history`` (a dict per epoch), ``metrics`` (test scores),
    ``config`` (every setting), ``classes``, ``model`` (the trained torch module, loaded on first
    use); ``predict``, ``evaluate``, ``export``, ``explain`` and ``report`` act on it."""

    def __init__(self, run_dir: str | Path, model: nn.Module | None = None):
        self.dir = Path(run_dir)
        self.config, metrics = load_run(self.dir)
        self.metrics = metrics or {}
        self._module, self._model = model, None

    @property
    def history(self) -> list[dict]:
        path = self.dir / "history.csv"
        return read_history(path) if path.is_file() else []

    @property
    def classes(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def model(self) -> nn.Module:
        """The trained model in evaluation mode (the weights the run kept)."""
        if self._model is None:
            self._model = load_model(self.dir, module=self._module)[0]
        return self._model

    def predict(self, images, top: int = 3) -> list[dict]:
        """Top-``top`` classes with probabilities for each image (paths or folders of images)."""
        return predict_images(_paths(images), str(self.dir), None, top)

    def evaluate(self, data: str | Path, labels: str | Path | None = None) -> dict:
        """Loss, accuracy, balanced accuracy, per-class scores and confusion matrix on a labelled
        folder, or on the images a ``labels`` file lists (``cnnlab evaluate --labels``)."""
        return evaluate_run(self.dir, data, labels)

    def export(self, output: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
        """The model as one ONNX file (default RUN/model.onnx), checked with onnxruntime."""
        return export_run(self.dir, output, "onnx", log=log)

    def explain(self, images, out: str | Path = "explanations", class_name: str | None = None) -> list[Path]:
        """One Grad-CAM PNG per image in ``out``: where the model looked for its top class (or ``class_name``)."""
        return explain_images(_paths(images), str(self.dir), None, class_name, out)

    def report(self, output: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
        """This run's HTML report (default RUN/report.html)."""
        return report([self], output or self.dir / "report.html", log=log)

    def __repr__(self) -> str:
        scores = ", ".join(f"{k} {self.metrics[k]:.4f}" for k in ("test_accuracy", "test_balanced_accuracy")
                           if isinstance(self.metrics.get(k), (int, float)))
        return f"Run('{self.dir}'{', ' + scores if scores else ', unfinished'})"


def _paths(images) -> list[str]:
    return [str(images)] if isinstance(images, (str, Path)) else [str(i) for i in images]


def _parse(command: str, settings: dict):
    """``settings`` through ``cnnlab COMMAND``'s parser: its names, defaults and one-line errors."""
    options, flags = _options(command)
    argv = [command]
    for key, value in settings.items():
        if key in SHELL_ONLY or key not in options:
            raise CnnlabError(f"cnnlab.{command}() has no setting {key!r}; its settings are `cnnlab {command}`'s "
                              "options with _ for - (see `cnnlab " + command + " --help`)")
        if value is not None:
            argv += _arguments(key, value, options[key], flags)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            line = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "bad settings"
            raise CnnlabError(line.split(": error: ", 1)[-1]) from None


def _arguments(key: str, value, action: argparse.Action, flags: set[str]) -> list[str]:
    """The command-line words for ``key=value``: True is the bare option (``--augment``), False its
    ``--no-`` form; anything else the option and the value as text."""
    flag = action.option_strings[0]
    if isinstance(value, bool):
        if value and (action.nargs == 0 or action.nargs == "?"):
            return [flag]
        if not value and f"--no-{flag[2:]}" in flags:
            return [f"--no-{flag[2:]}"]
        if action.nargs == 0:  # a store_true option left off
            return []
        raise CnnlabError(f"{key} takes a value, not {value!r} (see `{flag}` in the command's --help)")
    if action.nargs == 0:
        raise CnnlabError(f"{key} must be True or False (got {value!r})")
    return [flag, str(value)]


def _options(command: str) -> tuple[dict, set[str]]:
    """``cnnlab COMMAND``'s options by Python name (``--batch-size``: batch_size), and every flag it has."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names, flags = {}, set()
    for action in sub.choices[command]._actions:
        flags.update(action.option_strings)
        longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
        if longs and not isinstance(action, argparse._HelpAction):
            names.setdefault(longs[0][2:].replace("-", "_"), action)
    return names, flags


def train(data: str | Path, model: str | nn.Module = "pool-bn", callbacks: list | None = None,
          log: Callable[[str], None] = print, **settings) -> Run:
    """Trains a preset (see ``cnnlab presets``) or your own ``torch.nn.Module`` (N x 3 x H x W
    in, one score per class out) on ``data`` and returns the finished ``Run``. ``settings`` are
    ``cnnlab train``'s options; ``callbacks`` objects with ``cnnlab.Callback``'s methods."""
    own = isinstance(model, nn.Module)
    args = _parse("train", {"data": str(data), **({} if own else {"model": model}), **settings})
    chosen = given_settings(args, TRAIN_KEYS)
    if own:
        cfg = TrainConfig(**chosen)
        validate(cfg)
    else:
        cfg = resolve_config(args.preset, **chosen)
    return Run(train_run(cfg, log=log, module=model if own else None, callbacks=callbacks),
               model=model if own else None)


def transfer(data: str | Path, model: str = "efficientnet_lite0", callbacks: list | None = None,
             log: Callable[[str], None] = print, **settings) -> Run:
    """A new head on the pretrained backbone ``model``'s frozen base, then its top block fine-tuned
    (``fine_tune_epochs``, 5 by default; 0: none); ``settings`` are ``cnnlab transfer``'s options."""
    args = _parse("transfer", {"data": str(data), "model": model, **settings})
    return Run(transfer_run(TransferConfig(**given_settings(args, TRANSFER_KEYS)), log=log, callbacks=callbacks))


def resume(run_dir: str | Path, model: nn.Module | None = None, callbacks: list | None = None,
           log: Callable[[str], None] = print) -> Run:
    """Continues a stopped run from its last checkpoint (a transfer run from its start); ``model``:
    a fresh instance of your own model's class, where the run's saved one cannot be imported."""
    config = load_run(run_dir)[0]
    if config.get("kind") == "transfer":
        return Run(resume_transfer(run_dir, log=log, callbacks=callbacks))
    return Run(resume_run(run_dir, log=log, module=model, callbacks=callbacks), model=model)


def load(run_dir: str | Path, model: nn.Module | None = None) -> Run:
    """A run directory as a ``Run``; ``model`` as for ``resume``."""
    return Run(run_dir, model=model)


def report(runs, output: str | Path = "report.html", title: str = "cnnlab report",
           log: Callable[[str], None] = print) -> Path:
    """One self-contained HTML page comparing ``runs`` (``Run`` objects or run directories)."""
    dirs = [r.dir if isinstance(r, Run) else Path(r) for r in ([runs] if isinstance(runs, (str, Path, Run)) else runs)]
    return build_report(dirs, output, title, log=log)
