"""The public Python calls (api.py): the same settings, checks and runs as the command line; a
Run to read and act on; your own nn.Module trained, resumed and exported; callbacks; MLflow."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import cnnlab
from conftest import cnnlab as cnnlab_cli
from conftest import make_folder, same_run, snapshot

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python.md"
FAST = {"epochs": 2, "batch_size": 16, "threads": 1, "device": "cpu"}


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_folder(tmp_path / "photos", classes=3, per_class=16)


class Net(nn.Module):
    """A small model of the user's own (importable: this test module is on the path)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(8, classes))

    def forward(self, x):
        return self.body(x)


class Recorder(cnnlab.Callback):
    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = [], stop_after

    def on_train_begin(self, run):
        self.calls.append(("begin", run.epoch, run.model))

    def on_epoch_end(self, epoch, logs):
        self.calls.append(("epoch", epoch, sorted(logs)))
        return self.stop_after is not None and epoch >= self.stop_after

    def on_train_end(self, logs):
        self.calls.append(("end", logs.get("epoch")))

    def on_run_end(self, run_dir, metrics):
        self.calls.append(("run", Path(run_dir).name, metrics["test_accuracy"]))


def test_the_public_names_are_the_calls_even_after_their_modules_are_imported():
    import importlib
    importlib.import_module("cnnlab.train")
    importlib.import_module("cnnlab.report")
    from cnnlab import report, train, transfer
    assert callable(train) and train.__module__ == "cnnlab.api" and cnnlab.train is train
    assert transfer.__module__ == "cnnlab.api" and report.__module__ == "cnnlab.api"
    assert cnnlab.Run.__name__ == "Run" and issubclass(cnnlab.CnnlabError, Exception)
    assert {"train", "transfer", "resume", "load", "report", "lr_find", "Run", "Callback"} <= set(dir(cnnlab))
    with pytest.raises(AttributeError):
        cnnlab.no_such_call  # noqa: B018


def test_python_and_the_command_line_default_to_the_same_backbone():
    import inspect

    from cnnlab.cli_parser import build_parser
    from cnnlab.config import TransferConfig
    parser = build_parser()
    transfer_default = parser.parse_args(["transfer", "--data", "d"]).backbone
    # an option left unset (None) takes the config dataclass's default
    assert inspect.signature(cnnlab.transfer).parameters["model"].default == (transfer_default
                                                                              or TransferConfig.backbone)
    assert TransferConfig.backbone == "efficientnet_lite0"  # offline: its weights install with cnnlab


def test_python_and_the_command_line_train_the_same_run_bit_for_bit(photos, tmp_path):
    run = cnnlab.train(photos, model="pool-bn", out=tmp_path / "py", name="same", label_smoothing=0.1,
                       schedule="onecycle", augment=True, **FAST)
    result = cnnlab_cli("train", "--model", "pool-bn", "--data", photos, "--epochs", "2", "--batch-size", "16",
                        "--threads", "1", "--device", "cpu", "--label-smoothing", "0.1", "--schedule", "onecycle",
                        "--augment", "--out", tmp_path / "cli", "--name", "same")
    assert result.returncode == 0, result.stderr
    same_run(run.dir, tmp_path / "cli" / "same")
    cli_config = json.loads((tmp_path / "cli" / "same" / "config.json").read_text())
    skip = {"out", "command", "environment", "data_info"}
    assert {k: v for k, v in run.config.items() if k not in skip} == {k: v for k, v in cli_config.items() if k not in skip}


def test_a_run_reads_and_acts_on_its_folder(photos, tmp_path):
    run = cnnlab.train(photos, model="conv", out=tmp_path / "runs", **FAST)
    assert [row["epoch"] for row in run.history] == [1, 2]
    assert run.classes == ["class_0", "class_1", "class_2"] and run.config["epochs"] == 2
    assert run.metrics["test_accuracy"] == json.loads((run.dir / "metrics.json").read_text())["test_accuracy"]
    assert isinstance(run.model, nn.Module) and not run.model.training
    image = photos / "class_1" / "img_000.png"
    (prediction,) = run.predict([image], top=2)
    assert prediction["image"] == str(image) and len(prediction["top"]) == 2
    scores = run.evaluate(photos)
    assert len(scores["confusion_matrix"]) == 3 and sum(map(sum, scores["confusion_matrix"])) == 48
    onnx_file = run.export(tmp_path / "net.onnx")
    assert onnx_file.is_file()
    assert [p.suffix for p in run.explain([image], out=tmp_path / "cams")] == [".png"]
    page = cnnlab.report([run, run.dir], tmp_path / "page.html")
    assert "conv" in page.read_text()
    again = cnnlab.load(run.dir)
    assert again.metrics == run.metrics and "test_accuracy" in repr(again)


@pytest.mark.parametrize("settings, fragment", [
    ({"epochs": 0}, "--epochs must be at least 1, got 0"),
    ({"optimizer": "adamm"}, "invalid choice: 'adamm'"),
    ({"lr": -1}, "--lr must be above 0"),
    ({"restore_best_weights": "yes"}, "restore_best_weights must be True or False"),
    ({"epoch": 3}, "has no setting 'epoch'"),
    ({"nproc": 2}, "has no setting 'nproc'"),
    ({"val_split": 0, "monitor": "val_loss", "patience": 2}, "--val-split 0 leaves no validation images"),
])
def test_bad_settings_raise_the_command_lines_one_line_error_and_write_nothing(photos, tmp_path, settings, fragment):
    before = snapshot(tmp_path)
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.train(photos, model="pool-bn", out=tmp_path / "runs", **settings)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(tmp_path) == before


def test_a_bad_setting_gives_the_same_message_in_python_as_on_the_command_line(photos, tmp_path):
    result = cnnlab_cli("train", "--model", "pool-bn", "--data", photos, "--batch-size", "0")
    with pytest.raises(cnnlab.CnnlabError) as caught:
        cnnlab.train(photos, model="pool-bn", batch_size=0)
    assert str(caught.value) in result.stderr
    with pytest.raises(cnnlab.CnnlabError, match="argument --head: invalid choice: 'big'"):
        cnnlab.transfer(photos, head="big")


def test_your_own_model_trains_resumes_bit_for_bit_and_exports(photos, tmp_path):
    torch.manual_seed(5)
    whole = cnnlab.train(photos, model=Net(), out=tmp_path / "runs", name="whole", epochs=3, batch_size=16,
                         threads=1, device="cpu")
    assert whole.config["module"] == f"{Net.__module__}.Net" and (whole.dir / "module.pt").is_file()

    class Crash(cnnlab.Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 2:
                raise KeyboardInterrupt  # a kill after epoch 2's training: its checkpoint is epoch 1's
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        cnnlab.train(photos, model=Net(), out=tmp_path / "runs", name="stopped", epochs=3, batch_size=16,
                     threads=1, device="cpu", callbacks=[Crash()])
    stopped = tmp_path / "runs" / "stopped"
    assert torch.load(stopped / "checkpoint.pt", weights_only=False)["epoch"] == 1
    resumed = cnnlab.resume(stopped)  # the run's module.pt: Net imports from this test module
    same_run(whole.dir, resumed.dir)
    assert isinstance(resumed.model, Net)
    assert resumed.export().is_file()


def test_a_run_of_a_class_that_cannot_be_imported_says_how_to_load_it(tmp_path):
    script = tmp_path / "notebook.py"
    make_folder(tmp_path / "photos", classes=2, per_class=12)
    script.write_text(textwrap.dedent("""
        import cnnlab
        from torch import nn

        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))

            def forward(self, x):
                return self.net(x)

        run = cnnlab.train("photos", model=Local(), epochs=1, batch_size=8, threads=1, out="runs")
        print(run.dir)
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / done.stdout.strip().splitlines()[-1]
    result = cnnlab_cli("export", run_dir)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "__main__.Local" in result.stderr and "cnnlab.load(run, model=...)" in result.stderr
    assert not (run_dir / "model.onnx").exists()


def test_a_model_that_does_not_fit_the_data_is_refused_before_a_run_is_written(photos, tmp_path):
    with pytest.raises(cnnlab.CnnlabError, match=r"returns \(2, 5\) for 2 images; the data has 3 classes"):
        cnnlab.train(photos, model=Net(classes=5), out=tmp_path / "runs", **FAST)
    with pytest.raises(cnnlab.CnnlabError, match="must take N x 3 x H x W"):
        cnnlab.train(photos, model=nn.Linear(5, 3), out=tmp_path / "runs", **FAST)
    assert not (tmp_path / "runs").exists()


def test_callbacks_hear_every_moment_and_can_stop_training(photos, tmp_path):
    seen = Recorder(stop_after=2)
    run = cnnlab.train(photos, model="pool-bn", out=tmp_path / "runs", callbacks=[seen], epochs=5, batch_size=16,
                       threads=1, device="cpu", patience=10)
    assert seen.calls[0][:2] == ("begin", 0)
    assert [c[1] for c in seen.calls if c[0] == "epoch"] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(seen.calls[1][2])
    assert seen.calls[3] == ("end", 2)
    assert seen.calls[4] == ("run", run.dir.name, run.metrics["test_accuracy"])
    assert len(run.history) == 2 and run.metrics["epochs_run"] == 2


def test_early_stopping_and_tensorboard_are_callbacks_of_the_loop():
    from cnnlab.callbacks import Callback, CallbackList
    from cnnlab.early_stopping import EarlyStopping
    from cnnlab.tensorboard_log import Board
    assert issubclass(EarlyStopping, Callback) and issubclass(Board, Callback)
    stopping = EarlyStopping("val_loss", patience=1)
    model = nn.Linear(2, 2)
    callbacks = CallbackList([stopping, object()])  # an object without the methods is skipped
    callbacks.on_train_begin(type("Run", (), {"model": model})())
    assert callbacks.on_epoch_end(1, {"val_loss": 1.0}) is False
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1)
    assert callbacks.on_epoch_end(2, {"val_loss": 2.0}) is True  # patience 1: stop
    callbacks.on_train_end({"epoch": 2})
    assert stopping.restored and torch.equal(model.weight, best["weight"])


def test_a_transfer_run_from_python_hears_both_phases(tmp_path):
    photos = make_folder(tmp_path / "photos", classes=2, per_class=12, size=40)
    seen = Recorder()
    run = cnnlab.transfer(photos, model="efficientnet_lite0", epochs=1, fine_tune_epochs=1, batch_size=8,
                          image_size=64, threads=1, device="cpu", out=tmp_path / "runs", callbacks=[seen])
    assert [c[0] for c in seen.calls] == ["begin", "epoch", "end", "begin", "epoch", "end", "run"]
    assert run.config["kind"] == "transfer" and [r["phase"] for r in run.history] == ["frozen", "fine-tune"]


def _mlflow_client(uri: Path):
    pytest.importorskip("mlflow")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri.as_uri())


def test_mlflow_holds_the_settings_every_epoch_the_scores_and_the_files(photos, tmp_path):
    client = _mlflow_client(tmp_path / "mlruns")
    run = cnnlab.train(photos, model="pool-bn", out=tmp_path / "runs", mlflow=str(tmp_path / "mlruns"), epochs=3,
                       batch_size=16, threads=1, device="cpu")
    run_id = json.loads((run.dir / "mlflow.json").read_text())["run_id"]
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == run.dir.name
    assert logged.data.params["lr"] == "0.001" and logged.data.params["epochs"] == "3"
    losses = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [m.value for m in losses] == [row["val_loss"] for row in run.history]
    assert logged.data.metrics["test_accuracy"] == run.metrics["test_accuracy"]
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "metrics.json", "config.json", "loss.png", "confusion_matrix.png"} <= files
    assert "model.onnx" not in files
    result = cnnlab_cli("export", run.dir)  # later, from the shell: the file joins the same MLflow run
    assert result.returncode == 0, result.stderr
    assert "model.onnx" in {a.path for a in client.list_artifacts(run_id)}


def test_mlflow_from_the_command_line_defaults_to_mlruns_and_a_resumed_run_logs_to_the_same_mlflow_run(
        photos, tmp_path, monkeypatch):
    client = _mlflow_client(tmp_path / "mlruns")

    class Crash(cnnlab.Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 3:
                raise KeyboardInterrupt  # killed after epoch 3's training: epoch 2 checkpointed and logged
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cnnlab.train(photos, model="pool-bn", out="runs", name="r", mlflow="mlruns", epochs=4, batch_size=16,
                     threads=1, device="cpu", callbacks=[Crash()])
    result = cnnlab_cli("resume", tmp_path / "runs" / "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_id = json.loads((tmp_path / "runs" / "r" / "mlflow.json").read_text())["run_id"]
    experiment = client.get_experiment_by_name("cnnlab").experiment_id
    assert len(client.search_runs([experiment])) == 1
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and client.get_run(run_id).info.status == "FINISHED"
    cli = cnnlab_cli("train", "--model", "conv", "--data", photos, "--epochs", "1", "--threads", "1", "--out", "runs",
                     "--mlflow", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert len(client.search_runs([experiment])) == 2


def test_mlflow_missing_is_one_line_before_anything_is_written(photos, tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "mlflow.py").write_text("raise ImportError('no mlflow here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = cnnlab_cli("train", "--model", "conv", "--data", photos, "--epochs", "1", "--out", tmp_path / "runs",
                        "--mlflow", env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pip install mlflow" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_progress_bars_come_from_tqdm_auto_on_a_terminal_or_in_a_notebook(monkeypatch):
    from cnnlab import progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress.in_notebook() and progress.bar(10, "x", "batch") is None
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    shown = progress.bar(10, "epoch 1/2", "batch")
    from tqdm.auto import tqdm
    assert isinstance(shown, tqdm) and shown.total == 10
    shown.close()
    assert progress.bar(10, "x", "batch", enabled=False) is None


def test_the_python_page_runs_as_a_notebook_would(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 6
    make_folder(tmp_path / "photos", classes=3, per_class=16)
    monkeypatch.chdir(tmp_path)
    notebook = types.ModuleType("__main__")  # as in Jupyter, the cells run in the __main__ module
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    namespace = notebook.__dict__
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102 - the page's own examples
    assert namespace["run"].metrics["test_accuracy"] >= 0 and namespace["onnx_file"].is_file()
    assert namespace["page"].is_file() and len(namespace["pictures"]) == 1
    assert len(namespace["quick"].history) < 20 and namespace["sweep"].suggestion > 0
    assert (tmp_path / "runs" / "tracked" / "mlflow.json").is_file()
