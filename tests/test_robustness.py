"""Nothing a user can break: damaged caches heal with one warning, a run's name stays inside --out,
numbers must be finite, a diverging run stops with its last good checkpoint. Each case asserts the
exit code, the one line, and that the runs written before are unchanged, byte for byte."""
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from cnnlab import cache
from conftest import TRAINED_RUN_ARGS, assert_one_line_error, cnnlab, cnnlab_here, make_folder, snapshot

# the shared trained_run's own command: trained again on its data, it must give the same metrics
TRAIN = list(TRAINED_RUN_ARGS)
TRANSFER = ["transfer", "--backbone", "efficientnet_lite0", "--head", "gap", "--epochs", "1", "--batch-size", "4",
            "--threads", "1", "--device", "cpu"]


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbled":  # same size, 64 bytes flipped in the middle: only a checksum sees it
        middle = bytearray(data)
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
            middle[i] ^= 0xFF
        path.write_bytes(bytes(middle))
    else:
        path.write_bytes(b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data (3 classes of 10 images: 24 to train on), and a transfer run with the cache it filled; the
    train run and its cache are the shared ``trained_run``'s."""
    root = tmp_path_factory.mktemp("robust")
    make_folder(root / "data", per_class=10)
    pets = make_folder(root / "pets", classes=2, per_class=10, size=48)
    env = {**os.environ, "CNNLAB_CACHE": str(root / "cache-transfer")}
    done = cnnlab(*TRANSFER, "--data", pets, "--out", root / "runs", "--name", "transfer", env=env)
    assert done.returncode == 0, done.stderr
    return root


def runs_written_before(world, trained_run):
    """The runs the fixtures wrote, byte for byte: no case may change them."""
    return snapshot(world / "runs"), snapshot(trained_run.dir)


def source(kind, world, trained_run):
    """(cache, data, run) of the train or the transfer run."""
    if kind == "train":
        return trained_run.cache, trained_run.data, trained_run.dir
    return world / "cache-transfer", world / "pets", world / "runs" / "transfer"


FEATURES = "features-" + "?" * 24 + ".pt"  # the photos' features; the test split's mirror images have their own
ENTRIES = [("train", "images-*.npy"), ("train", "images-*.npy.json"), ("train", "kernels/cnnlab_kernels_*.so"),
           ("train", "kernels/cnnlab_kernels_*.so.json"), ("transfer", FEATURES), ("transfer", FEATURES + ".json"),
           ("transfer", "features-*-test-mirror.pt")]
# every entry and every kind of damage, not every pair (each case is a run: CI's time)
DAMAGES = {"images-*.npy": ("truncated", "garbled"), "images-*.npy.json": ("zero-length",),
           "kernels/cnnlab_kernels_*.so": ("truncated", "garbled"), "kernels/cnnlab_kernels_*.so.json": ("garbled",),
           FEATURES: ("garbled", "zero-length"), FEATURES + ".json": ("truncated",),
           "features-*-test-mirror.pt": ("garbled",)}
CASES = [(kind, pattern, how) for kind, pattern in ENTRIES for how in DAMAGES[pattern]]


@pytest.mark.parametrize("kind, pattern, how", CASES, ids=[f"{p.split('/')[-1]}-{h}" for _, p, h in CASES])
def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(world, trained_run, tmp_path, monkeypatch, kind, pattern,
                                                           how):
    cache_dir, data, run = source(kind, world, trained_run)
    own = tmp_path / "cache"
    shutil.copytree(cache_dir, own)
    monkeypatch.setenv("CNNLAB_CACHE", str(own))
    (target,) = own.glob(pattern)
    damage(target, how)
    before = runs_written_before(world, trained_run)
    args = TRAIN + ["--data", data] if kind == "train" else TRANSFER + ["--data", data]
    result = cnnlab(*args, "--out", tmp_path / "runs", "--name", "again")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is damaged" in lines[0] and "rebuilding it" in lines[0], result.stderr
    assert runs_written_before(world, trained_run) == before
    entry = target.with_name(target.name.removesuffix(".json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: the entry now matches its manifest, with no warning
        assert cache.check(entry) is not None
    metrics = json.loads((tmp_path / "runs" / "again" / "metrics.json").read_text())
    assert metrics == {**json.loads((run / "metrics.json").read_text()),
                       **{k: metrics[k] for k in ("train_time_s", "images_per_s", "feature_extraction_s",
                                                  "feature_cache", "run_time_s") if k in metrics}}


def test_two_processes_filling_an_empty_cache_both_end_with_a_good_entry(world, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *TRAIN, "--data", str(world / "data"),
                               "--out", str(tmp_path / "runs"), "--name", f"twin{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    for entry in [*(tmp_path / "cache").glob("images-*.npy"), *(tmp_path / "cache").glob("kernels/*.so")]:
        assert cache.check(entry) is not None
    third = cnnlab(*TRAIN, "--data", world / "data", "--out", tmp_path / "runs", "--name", "third")
    assert third.returncode == 0 and third.stderr == ""
    assert json.loads((tmp_path / "runs" / "third" / "config.json").read_text())["data_info"]["cache_hit"]


NAMES = ["../../somewhere", "/tmp/elsewhere", "", "  ", "a/b", "..", ".", "~user", "sub\\dir"]


@pytest.mark.parametrize("command", ["train", "transfer"])
@pytest.mark.parametrize("name", NAMES)
def test_a_run_name_is_a_plain_folder_name_inside_out(world, trained_run, tmp_path, capsys, command, name):
    out = tmp_path / "deep" / "out"
    args = (TRAIN + ["--data", world / "data"]) if command == "train" else (TRANSFER + ["--data", world / "pets"])
    before = runs_written_before(world, trained_run)
    assert_one_line_error(cnnlab_here(capsys, *args, "--out", out, "--name", name), "--name")
    assert list(tmp_path.rglob("*")) == [] and runs_written_before(world, trained_run) == before


FLOATS = {"train": ["--lr", "--momentum", "--weight-decay", "--label-smoothing", "--val-split", "--test-split",
                    "--min-delta"],
          "transfer": ["--lr", "--fine-tune-lr", "--val-split", "--test-split"],
          "study": ["--epochs-scale", "--val-split", "--test-split"]}
# nan for every option (each its own check), the infinities for one option of each command
FLOAT_CASES = [(c, o, v) for c, options in FLOATS.items() for o in options
               for v in (("nan", "inf", "-inf") if o == options[0] else ("nan",))]


@pytest.mark.parametrize("command, option, value", FLOAT_CASES, ids=[f"{c}{o}={v}" for c, o, v in FLOAT_CASES])
def test_every_float_option_refuses_nan_and_inf(world, trained_run, tmp_path, capsys, command, option, value):
    base = {"train": TRAIN, "transfer": TRANSFER, "study": ["study", "cifar10"]}[command]
    before = runs_written_before(world, trained_run)
    result = cnnlab_here(capsys, *base, "--data", world / "data", "--out", tmp_path / "runs", f"{option}={value}")
    assert_one_line_error(result, f"{option} must be a finite number")
    assert not (tmp_path / "runs").exists() and runs_written_before(world, trained_run) == before


def test_settings_given_in_code_refuse_non_finite_numbers_too():
    from cnnlab.config import TransferConfig, validate_transfer
    from cnnlab.presets import resolve_config
    from cnnlab.errors import CnnlabError
    with pytest.raises(CnnlabError, match="--weight-decay must be a finite number"):
        resolve_config("pool-bn", data="x", weight_decay=math.nan)
    with pytest.raises(CnnlabError, match="--fine-tune-lr must be a finite number"):
        validate_transfer(TransferConfig(fine_tune_lr=math.inf))


def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(world, tmp_path, monkeypatch):
    import importlib
    from cnnlab import run_state
    train_module = importlib.import_module("cnnlab.train")  # the module: cnnlab.train is the public call
    from cnnlab.presets import resolve_config
    from cnnlab.errors import CnnlabError
    steps_per_epoch = 3  # 24 training images in batches of 8
    monkeypatch.setattr(run_state, "lr_factor", lambda schedule, step, total: 1.0 if step < steps_per_epoch else 1e30)
    cfg = resolve_config("pool-bn", data=str(world / "data"), epochs=4, batch_size=8, optimizer="sgd", lr=0.01,
                         out=str(tmp_path / "runs"), name="diverges", threads=1, device="cpu")
    lines = []
    with pytest.raises(CnnlabError, match=r"diverged: the loss became non-finite in epoch 2, batch \d/3.*"
                                          r"epoch 1's checkpoint is kept.*lower --lr than 0.01"):
        train_module.train(cfg, log=lines.append)
    run = tmp_path / "runs" / "diverges"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "metrics.json").exists() and len((run / "history.csv").read_text().splitlines()) == 2


def test_a_diverging_run_on_the_command_line_is_one_line_and_exit_2(world, trained_run, tmp_path):
    before = runs_written_before(world, trained_run)
    result = cnnlab(*TRAIN, "--data", world / "data", "--optimizer", "sgd", "--lr", "1e30", "--out", tmp_path / "runs")
    assert_one_line_error(result, "training diverged")
    assert "lower --lr than 1e+30" in result.stderr and runs_written_before(world, trained_run) == before
    assert not (tmp_path / "runs" / "pool-bn" / "metrics.json").exists()


DAMAGED_RUN_FILES = [("config.json", b"{not json", "config.json is damaged"),
                     ("config.json", b"[1, 2]", "config.json is damaged"),
                     ("metrics.json", b"", "metrics.json is damaged"),
                     ("model.pt", b"\x00" * 10, "not a readable weights file"),
                     ("history.csv", b"epoch,loss\n1,0.5\n", "history.csv row 1: accuracy")]
READERS = {"evaluate": ("config.json", "metrics.json", "model.pt"), "predict": ("config.json", "metrics.json", "model.pt"),
           "report": ("config.json", "metrics.json", "history.csv"), "resume": ("config.json", "metrics.json")}
RUN_FILE_CASES = [(command, *case) for command, files in READERS.items() for case in DAMAGED_RUN_FILES
                  if case[0] in files]


@pytest.mark.parametrize("command, name, content, message", RUN_FILE_CASES,
                         ids=[f"{c}-{n}-{i}" for i, (c, n, _, _) in enumerate(RUN_FILE_CASES)])
def test_a_damaged_run_file_is_one_line_for_every_command_that_reads_it(world, trained_run, tmp_path, capsys, command,
                                                                       name, content, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    (run / name).write_bytes(content)
    before = runs_written_before(world, trained_run)
    args = {"evaluate": ["evaluate", run, "--data", trained_run.data], "report": ["report", run, "-o", tmp_path / "r.html"],
            "predict": ["predict", trained_run.data / "class_0", "--model", run], "resume": ["resume", run]}[command]
    assert_one_line_error(cnnlab_here(capsys, *args), message)
    assert not (tmp_path / "r.html").exists() and runs_written_before(world, trained_run) == before


@pytest.mark.parametrize("state, message", [({"epoch": 1}, "does not fit this run's model"),
                                            ("not a dict", "checkpoint.pt is damaged"),
                                            (None, "checkpoint.pt is damaged")])
def test_a_damaged_checkpoint_is_one_line(world, trained_run, tmp_path, capsys, state, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    (run / "metrics.json").unlink()
    if state is None:  # a checkpoint whose weights fit but whose optimizer state is gone
        good = torch.load(run / "model.pt", weights_only=True)
        state = {"epoch": 1, "model": good}
    torch.save(state, run / "checkpoint.pt")
    before = runs_written_before(world, trained_run)
    assert_one_line_error(cnnlab_here(capsys, "resume", run), message)
    assert runs_written_before(world, trained_run) == before and (run / "checkpoint.pt").is_file()


@pytest.mark.parametrize("output, message", [("{tmp}", "is a folder"), ("{tmp}/a-file/report.html", "cannot write the report")])
def test_an_unwritable_report_path_is_one_line(trained_run, tmp_path, capsys, output, message):
    (tmp_path / "a-file").write_text("x")
    result = cnnlab_here(capsys, "report", trained_run.dir, "-o", output.format(tmp=tmp_path))
    assert_one_line_error(result, message)


# ---------------------------------------------------------------- issue 44: names, temporary files, bounds

def test_a_name_is_shown_on_one_line_with_its_escapes():
    from cnnlab.text import shown
    assert shown("cat") == "cat" and shown("chat noir é 猫") == "chat noir é 猫"
    assert shown("red\x1b[31mcat\nx\t") == "red\\x1b[31mcat\\nx\\t"
    assert shown(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"  # a Latin-1 name: its byte, not a surrogate
    assert shown("evil\u202egpj.exe") == "evil\\u202egpj.exe"  # a direction override shows what it hides
    assert shown(b"a\xffb") == "a\\xffb"
    shown(os.fsdecode(b"\xff\x1b")).encode("utf-8")  # always encodable


def test_a_name_made_from_a_long_one_fits_the_file_system():
    from cnnlab.text import NAME_MAX, fit_name
    assert fit_name("photo", "-gradcam.png") == "photo-gradcam.png"
    long = ["é" * 200 + "a", "é" * 200 + "b", "x" * 300]
    names = [fit_name(n, "-gradcam.png") for n in long]
    assert all(len(n.encode()) <= NAME_MAX and n.endswith("-gradcam.png") for n in names)
    assert len(set(names)) == 3  # cut alike, still distinct


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    from cnnlab.atomic import WriteError, atomic_write_bytes
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteError, match="No space left"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _temporaries(tmp_path) == []


def test_a_long_file_name_is_written_atomically(tmp_path):
    from cnnlab.atomic import atomic_write_bytes
    target = tmp_path / ("é" * 120 + ".png")  # 244 bytes: a temporary name longer than it would not fit
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and _temporaries(tmp_path) == []


WRITER = """
import os, signal, sys, time
from pathlib import Path
from cnnlab.atomic import atomic_path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts it (a background job ignores SIGINT)
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half")
    print("writing", flush=True)
    if sys.argv[2] == "raise":
        raise KeyboardInterrupt
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    time.sleep(30)
"""


@pytest.mark.parametrize("how, code", [("SIGTERM", -15), ("SIGINT", -2), ("raise", -2), ("SIGKILL", -9)])
def test_a_signal_mid_write_leaves_no_temporary_file_but_sigkill_can(tmp_path, how, code):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    done = subprocess.run([sys.executable, "-c", WRITER, str(target), how], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert target.read_bytes() == b"old"
    left = _temporaries(tmp_path)
    assert left == [] if how != "SIGKILL" else len(left) == 1 and left[0].startswith(".model.onnx.")
    assert not any(p.suffix == ".onnx" and p != target for p in tmp_path.iterdir())  # never taken for a result
    if how == "SIGKILL":  # the next write there removes what the killed one left
        from cnnlab.atomic import atomic_write_bytes
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new" and _temporaries(tmp_path) == []


def test_a_running_writers_temporary_file_is_left_alone(tmp_path):
    from cnnlab.atomic import atomic_write_bytes
    alive = tmp_path / f".model.onnx.{os.getppid()}.abc123.tmp"  # our parent runs: its write goes on
    other = tmp_path / ".model.onnx.5.1234.abc123.tmp"  # model.onnx.5's, not model.onnx's
    alive.write_bytes(b"")
    other.write_bytes(b"")
    atomic_write_bytes(tmp_path / "model.onnx", b"new")
    assert alive.exists() and other.exists()


def test_the_confusion_matrix_of_1000_classes_is_a_bounded_picture(tmp_path):
    import numpy as np
    from PIL import Image

    from cnnlab.plots import confusion_heatmap
    n = 1000
    cm = np.diag(np.full(n, 5)) + 1
    names = [f"class\x1b[31m-{i}-" + "x" * 300 for i in range(n)]
    confusion_heatmap(cm.tolist(), names, tmp_path / "cm.png", "run $x^$: confusion matrix")
    with Image.open(tmp_path / "cm.png") as im:
        assert max(im.size) < 2000
    for n in (12, 45):  # labelled cells; named ticks, no counts
        confusion_heatmap((np.eye(n, dtype=int) * 3).tolist(), [f"c{i}$" * 40 for i in range(n)],
                          tmp_path / f"cm{n}.png")
        with Image.open(tmp_path / f"cm{n}.png") as im:
            assert max(im.size) < 2500


def test_a_run_name_that_looks_like_a_formula_is_drawn_as_text(tmp_path):
    from cnnlab.plots import curve
    history = [{"epoch": 1, "loss": 1.0, "val_loss": 1.2}, {"epoch": 2, "loss": 0.5, "val_loss": 0.9}]
    curve(history, "loss", 2, "$\\frac$\x1b: loss", tmp_path / "loss.png")  # as a formula: a ValueError
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_evaluate_prints_escaped_names_and_no_matrix_past_20_classes():
    from cnnlab.evaluate import format_report
    names = [f"c\x1b[2J{i}" for i in range(25)]
    row = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    result = {"run": "runs/x\n", "data": "d", "images": 25, "loss": 0.1, "accuracy": 1.0, "balanced_accuracy": 1.0,
              "precision": 1.0, "recall": 1.0, "f1": 1.0, "per_class": {n: row for n in names},
              "confusion_matrix": [[int(i == j) for j in range(25)] for i in range(25)]}
    text = format_report(result, names)
    assert "\x1b" not in text and "c\\x1b[2J24" in text and "runs/x\\n on d" in text
    assert "25 classes, too many to print" in text and len(text.splitlines()) == 5 + 25 + 2
    assert "confusion matrix (rows true" in format_report({**result, "per_class": {n: row for n in names[:3]},
                                                           "confusion_matrix": [[1, 0, 0]] * 3}, names[:3])


def test_upper_limits_hold_in_code_as_on_the_command_line():
    from cnnlab.config import ReproduceConfig, TrainConfig, TransferConfig, validate, validate_transfer
    from cnnlab.errors import CnnlabError
    from cnnlab.preprocessing import Preprocessing
    with pytest.raises(CnnlabError, match="--image-size must be at most 1,024"):
        validate_transfer(TransferConfig(data="d", image_size=100_000))
    with pytest.raises(CnnlabError, match="--threads must be at most 1,024"):
        validate(TrainConfig(preset="conv", data="d", threads=10_000))
    with pytest.raises(CnnlabError, match="the input size must be 8 to 1024"):
        validate(TrainConfig(preset="conv", data="d", preprocessing=Preprocessing(size=100_000)))
    with pytest.raises(CnnlabError, match="--threads must be at most"):
        ReproduceConfig(threads=10_000)
    with pytest.raises(CnnlabError, match="--seed must be 0 to"):
        ReproduceConfig(seed=-1)
    validate_transfer(TransferConfig(data="d", image_size=1024, feature_copies=16, threads=1024))
