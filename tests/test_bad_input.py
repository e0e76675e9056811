"""Every bad input: one line naming the problem and the fix, a non-zero exit, no traceback,
and the runs already written left byte-for-byte as they were."""
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab import cli
from conftest import assert_one_line_error, cnnlab, cnnlab_here, make_folder, snapshot


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run):
    """Bad data folders and broken copies of the shared finished run (``trained_run``)."""
    root = tmp_path_factory.mktemp("bad")
    good = trained_run.dir
    make_folder(root / "empty-class", classes=2, per_class=2)
    (root / "empty-class" / "class_2").mkdir()
    make_folder(root / "one-class", classes=1, per_class=3)
    (root / "empty").mkdir()
    (root / "a-file").write_text("x")
    other = make_folder(root / "other-classes", classes=3, per_class=2)
    (other / "class_2").rename(other / "zebra")
    unreadable = make_folder(root / "unreadable-class", classes=3, per_class=4)
    for image in (unreadable / "class_2").iterdir():  # images by name, none by content
        image.write_bytes(b"not an image")
    os.mkfifo(root / "pipe.jpg")  # reading one waits for a writer forever
    os.mkfifo(root / "pipe.onnx")
    broken = root / "broken"
    for name, content in [("wrong-arch", None), ("truncated", good.joinpath("model.pt").read_bytes()[:500]),
                          ("not-weights", b"hello, I am a text file"), ("crafted", None)]:
        shutil.copytree(good, broken / name)
        if content is not None:
            (broken / name / "model.pt").write_bytes(content)
    from cnnlab.presets import PRESETS, build_model
    torch.save(build_model(PRESETS["conv"].layers, 3).state_dict(), broken / "wrong-arch" / "model.pt")
    torch.save({"0.weight": Evil(root / "pwned")}, broken / "crafted" / "model.pt")
    shutil.copytree(good, broken / "pipe-weights")
    (broken / "pipe-weights" / "model.pt").unlink()
    os.mkfifo(broken / "pipe-weights" / "model.pt")
    return root


T = ["train", "--preset", "pool-bn", "--batch-size", "8", "--epochs", "1"]
TR = ["transfer", "--backbone", "efficientnet_lite0", "--epochs", "1"]
CASES = [
    (T + ["--data", "{root}/missing"], "does not exist"),
    (T + ["--data", "{root}/a-file"], "is a file"),
    (T + ["--data", "{root}/empty"], "no class subfolders"),
    (T + ["--data", "{root}/one-class"], "only one class"),
    (T + ["--data", "{root}/empty-class"], "class_2 has no images"),
    (T + ["--data", "{data}", "--epochs", "0"], "--epochs must be at least 1"),
    (T + ["--data", "{data}", "--epochs", "-3"], "--epochs must be at least 1"),
    (T + ["--data", "{data}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (T + ["--data", "{data}", "--val-split", "-0.1"], "--val-split must be at least 0"),
    (T + ["--data", "{data}", "--val-split", "0", "--patience", "3"], "--val-split 0 leaves no validation"),
    (T + ["--data", "{data}", "--test-split", "1"], "--test-split must be below 1"),
    (T + ["--data", "{data}", "--val-split", "0.5", "--test-split", "0.6"], "must be below 1"),
    (T + ["--data", "{data}", "--lr", "0"], "--lr must be above 0"),
    (T + ["--data", "{data}", "--lr", "fast"], "--lr must be a number"),
    (T + ["--data", "{data}", "--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
    (T + ["--data", "{data}", "--device", "meta"], "--device meta is not supported"),
    (T + ["--data", "{data}", "--device", "cuda:7"], "--device cuda:7"),  # no CUDA, or no 8th GPU
    (["train", "--preset", "resnet9000", "--data", "{data}"], "unknown model 'resnet9000': not a preset"),
    (T + ["--data", "{data}", "--monitor", "val_auc"], "unknown monitor metric 'val_auc'"),
    (T + ["--data", "{data}", "--out", "{root}/a-file/runs"], "cannot create output folder"),
    (["evaluate", "{run}", "--data", "{root}/other-classes"], "differ from the expected classes"),
    (["evaluate", "{run}", "--data", "{root}/missing"], "does not exist"),
    (["evaluate", "{data}", "--data", "{data}"], "not a run directory"),
    (["evaluate", "{root}/broken/wrong-arch", "--data", "{data}"], "missing keys"),
    (["evaluate", "{root}/broken/truncated", "--data", "{data}"], "not a readable weights file"),
    (["evaluate", "{root}/broken/not-weights", "--data", "{data}"], "not a readable weights file"),
    (["evaluate", "{root}/broken/crafted", "--data", "{data}"], "not a readable weights file"),
    (["resume", "{root}/missing-run"], "not a run directory"),
    # issue 44: inputs that are not what they seem
    (T + ["--data", "{root}/unreadable-class"], "class_2 has no readable image"),
    (["predict", "{root}/pipe.jpg", "--model", "{run}"], "pipe.jpg is a named pipe, not an image file"),
    (["explain", "{root}/pipe.jpg", "--model", "{run}", "--out", "{root}/explained"], "is a named pipe"),
    (["evaluate", "{run}", "--data", "{root}/pipe.jpg"], "is not a folder"),
    (["predict", "{root}/no\x1b[31mpe\nx.jpg", "--model", "{run}"], "no\\x1b[31mpe\\nx.jpg does not exist"),
    (["export", "{run}", "-o", "{run}/model.pt"], "is one of the run's own files"),
    (["export", "{run}", "--output", "{run}/config.json"], "is one of the run's own files"),
    (["export", "{run}", "-o", "{root}/model.pt"], "does not end in .onnx"),
    (["export", "{run}", "-o", "{root}/pipe.onnx"], "is not a plain file"),
    (["evaluate", "{root}/broken/pipe-weights", "--data", "{data}"], "model.pt is not a regular file"),
    (["predict", "{data}/class_0", "--model", "{root}/broken/pipe-weights"], "model.pt is not a regular file"),
    (["export", "{root}/broken/pipe-weights"], "model.pt is not a regular file"),
    # issue 44: numbers that ask for more than any machine has
    (T + ["--data", "{data}", "--threads", "10000"], "--threads must be at most 1,024"),
    (T + ["--data", "{data}", "--batch-size", "100000"], "--batch-size must be at most 65,536"),
    (T + ["--data", "{data}", "--epochs", "1000000"], "--epochs must be at most 100,000"),
    (T + ["--data", "{data}", "--seed", str(2 ** 64)], "--seed must be 0 to 4294967295"),
    (TR + ["--data", "{data}", "--image-size", "100000"], "--image-size must be at most 1,024"),
    (TR + ["--data", "{data}", "--feature-copies", "1000"], "--feature-copies must be at most 16"),
    (TR + ["--data", "{data}", "--fine-tune-epochs", "1000000"], "--fine-tune-epochs must be at most 100,000"),
    (["reproduce", "--threads", "10000", "--out", "{root}/reproduce"], "--threads must be at most 1,024"),
]


SUBPROCESS = {0, 22}  # these two through a real interpreter too; the rest in this process (CI's time)


@pytest.mark.parametrize("i, args, message", [(i, *c) for i, c in enumerate(CASES)],
                         ids=[f"{i:02d}-{c[1][:30]}" for i, c in enumerate(CASES)])
def test_bad_input_table(world, trained_run, capsys, i, args, message):
    before = snapshot(trained_run.dir)
    args = [a.format(root=world, data=trained_run.data, run=trained_run.dir) for a in args]
    result = cnnlab(*args) if i in SUBPROCESS else cnnlab_here(capsys, *args)
    assert_one_line_error(result, message)
    assert "\x1b" not in result.stderr  # a name's escape sequences are shown, never sent to the terminal
    assert snapshot(trained_run.dir) == before
    assert not (world / "pwned").exists()  # the crafted pickle ran no code


def test_resume_with_a_checkpoint_of_another_architecture(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    (run / "metrics.json").unlink()
    from cnnlab.presets import PRESETS, build_model
    torch.save({"model": build_model(PRESETS["conv"].layers, 3).state_dict(), "epoch": 1}, run / "checkpoint.pt")
    assert_one_line_error(cnnlab("resume", run), "does not fit this run's model (missing keys")


def test_disk_full_mid_run_keeps_the_previous_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    real = os.replace
    writes = {"checkpoint": 0}

    def fill_up(source, target):  # the disk fills up as the third checkpoint is written
        if Path(target).name == "checkpoint.pt":
            writes["checkpoint"] += 1
            if writes["checkpoint"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(source, target)
    monkeypatch.setattr(os, "replace", fill_up)
    code = cli.main(T[:-2] + ["--epochs", "5", "--data", str(trained_run.data), "--out", str(tmp_path),
                              "--name", "full", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "cnnlab resume" in err
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
