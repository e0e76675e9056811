"""TensorBoard event files: read back with tensorboard's own EventAccumulator, equal to history.csv."""
import json
import os
import signal
import time

import pytest

from cnnlab.presets import resolve_config
from cnnlab.errors import RunInterrupted
from cnnlab.runs import read_history
from cnnlab.tensorboard_log import Board
from cnnlab.train import resume, train
from conftest import cnnlab, make_folder

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is not installed (pip install tensorboard)")


def events(run, part):
    acc = event_accumulator.EventAccumulator(str(run / part), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def tiny(folder, out, **kw):
    return resolve_config("pool-bn", **{**dict(data=str(folder), out=str(out), epochs=3, batch_size=8, val_split=0.2,
                                               test_split=0.2, lr=3e-3, threads=1), **kw})


def test_every_history_column_is_an_event_and_train_and_validation_share_each_chart(tiny_folder, tmp_path):
    run = train(tiny(tiny_folder, tmp_path), log=lambda m: None)
    history = read_history(run / "history.csv")
    trained, validated = events(run, "train"), events(run, "validation")
    steps = [s for s, _ in scalars(trained, "epoch_loss")]
    assert steps == [5, 10, 15]  # 36 training images in batches of 8: 5 steps an epoch
    for tag, column in (("epoch_loss", "loss"), ("epoch_accuracy", "accuracy"), ("epoch_lr", "lr"),
                        ("epoch_images_per_s", "images_per_s")):
        assert [v for _, v in scalars(trained, tag)] == pytest.approx([r[column] for r in history], rel=1e-6)
    for tag, column in (("epoch_loss", "val_loss"), ("epoch_accuracy", "val_accuracy"), ("epoch_f1", "val_f1"),
                        ("epoch_precision", "val_precision"), ("epoch_recall", "val_recall")):
        assert [v for _, v in scalars(validated, tag)] == pytest.approx([r[column] for r in history], rel=1e-6)
    lr = scalars(trained, "learning_rate")
    assert [s for s, _ in lr] == list(range(1, 16)) and all(v == pytest.approx(3e-3) for _, v in lr)
    metrics = json.loads((run / "metrics.json").read_text())
    assert scalars(trained, "test/accuracy") == [(15, pytest.approx(metrics["test_accuracy"]))]
    assert set(trained.Tags()["images"]) == {"loss", "accuracy", "confusion_matrix"}


def test_a_resumed_run_continues_its_curves_without_duplicated_points(tiny_folder, tmp_path):
    def stop_after_epoch_2(line):
        if line.startswith("epoch   2/3"):
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(RunInterrupted):
        train(tiny(tiny_folder, tmp_path, name="stopped"), log=stop_after_epoch_2)
    run = tmp_path / "stopped"
    resume(run, log=lambda m: None)
    trained = events(run, "train")
    assert [s for s, _ in scalars(trained, "epoch_loss")] == [5, 10, 15]
    assert [s for s, _ in scalars(trained, "learning_rate")] == list(range(1, 16))
    history = read_history(run / "history.csv")
    assert [v for _, v in scalars(events(run, "validation"), "epoch_loss")] == pytest.approx(
        [r["val_loss"] for r in history], rel=1e-6)


def test_a_run_resumed_within_the_second_is_still_read_after_the_interrupted_attempt(tmp_path, monkeypatch):
    # the CI flake made certain: both attempts open their files in one second, the first with writer
    # count 8 and the second with 10, and "10" sorts before "8"
    from tensorboard.summary.writer import event_file_writer
    clock = [1796239601.25]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(8))
    interrupted = Board(tmp_path, log=lambda m: None)
    for step in (5, 10):
        interrupted.epoch(step, {"epoch": step // 5, "loss": 1.0 / step, "val_loss": 2.0 / step})
    interrupted.close()
    resumed = Board(tmp_path, purge_step=11, log=lambda m: None)
    resumed.epoch(15, {"epoch": 3, "loss": 1.0 / 15, "val_loss": 2.0 / 15})
    resumed.close()
    assert clock[0] == pytest.approx(1796239602, abs=1e-6)  # it waited into the next second, no longer
    for part in ("train", "validation"):
        assert [s for s, _ in scalars(events(tmp_path, part), "epoch_loss")] == [5, 10, 15]


def test_no_tensorboard_writes_no_event_files(tiny_folder, tmp_path):
    result = cnnlab("train", "--preset", "pool-bn", "--data", tiny_folder, "--epochs", "1", "--batch-size", "8",
                    "--out", tmp_path, "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "pool-bn" / "train").exists() and not list((tmp_path / "pool-bn").rglob("events.*"))


def test_without_the_package_a_run_says_so_once_and_trains_on(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    lines = []
    run = train(tiny(tiny_folder, tmp_path, epochs=1), log=lines.append)
    assert sum("tensorboard package is not installed" in line for line in lines) == 1
    assert (run / "metrics.json").is_file() and not (run / "train").exists()


def test_a_transfer_runs_two_phases_make_one_curve(tmp_path):
    from cnnlab.config import TransferConfig
    from cnnlab.transfer import transfer
    pets = make_folder(tmp_path / "pets", classes=2, per_class=12, size=48)
    cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", head="gap", epochs=2, fine_tune_epochs=1,
                         batch_size=4, threads=1, device="cpu", out=str(tmp_path / "runs"))
    run = transfer(cfg, log=lambda m: None)
    history = read_history(run / "history.csv")
    trained = events(run, "train")
    steps = [s for s, _ in scalars(trained, "epoch_loss")]
    assert len(steps) == len(history) == 3 and steps == sorted(set(steps))  # one curve, no step twice
    assert [v for _, v in scalars(trained, "epoch")] == [1, 2, 3]
    assert [v for _, v in scalars(trained, "epoch_loss")] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    lr = scalars(trained, "learning_rate")
    assert [s for s, _ in lr] == list(range(1, steps[-1] + 1))
    assert lr[-1][1] == pytest.approx(cfg.fine_tune_lr)  # fine-tuning at its own rate


def test_a_run_without_validation_images_writes_no_validation_folder(tiny_folder, tmp_path):
    run = train(tiny(tiny_folder, tmp_path, val_split=0), log=lambda m: None)
    assert not (run / "validation").exists()
    history = read_history(run / "history.csv")
    assert [v for _, v in scalars(events(run, "train"), "epoch_loss")] == pytest.approx(
        [r["loss"] for r in history], rel=1e-6)
