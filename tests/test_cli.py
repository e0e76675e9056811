"""The command line as a user meets it: real subprocesses, exit codes, one-line errors (refusals
run in the test process, as the same ``main``)."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import TRAINED_RUN_ARGS, assert_one_line_error, cnnlab, cnnlab_here, make_folder, snapshot


@pytest.mark.parametrize("args, fragment", [
    (["train", "--preset", "pool-bn", "--data", "{missing}"], "does not exist"),
    (["train", "--preset", "pool-bn", "--data", "{file}"], "is a file"),
    (["train", "--preset", "pool-bn", "--data", "{one}"], "only one class"),
    (["train", "--preset", "nope", "--data", "{tiny}"], "unknown model 'nope': not a preset"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--epochs", "two"], "--epochs must be an integer"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--lr", "-0.1"], "--lr must be above 0"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--batch-size", "-5"], "--batch-size must be at least 1"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--val-split", "1.5"], "--val-split must be below 1"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--val-split", "0.5", "--test-split", "0.5"],
     "must be below 1"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--monitor", "val_auc"], "unknown monitor metric"),
    (["train", "--preset", "pool-bn", "--data", "{tiny}", "--precision", "fp16"], "--precision"),
    (["train", "--data", "{tiny}"], "--model is required"),
    (["evaluate", "{tiny}", "--data", "{tiny}"], "not a run directory"),
    (["summary", "--preset", "nope"], "unknown preset"),
    (["study", "cifar10", "--data", "{tiny}", "--presets", "fast"], "not in the seed study"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "file.txt", "tiny": tmp_path / "tiny",
             "one": tmp_path / "one"}
    paths["file"].write_text("x")
    make_folder(paths["tiny"], per_class=6)
    make_folder(paths["one"], classes=1, per_class=2)
    result = cnnlab_here(capsys, *[a.format(**paths) for a in args], "--out", tmp_path / "runs") if args[0] == "train" \
        else cnnlab_here(capsys, *[a.format(**paths) for a in args])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_every_subcommand_has_help_with_examples():
    for command in ("train", "evaluate", "presets", "summary", "study", "resume", "transfer", "predict", "report",
                    "reproduce"):
        result = cnnlab(command, "--help")
        assert result.returncode == 0 and "examples:" in result.stdout, command


def test_python_dash_m_cnnlab_is_the_cnnlab_command():
    result = subprocess.run([sys.executable, "-m", "cnnlab", "presets"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == cnnlab("presets").stdout
    bad = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--preset", "x", "--data", "missing"],
                         capture_output=True, text=True, timeout=300)
    assert_one_line_error(bad, "unknown model 'x': not a preset")


def test_presets_and_summary_print_layers_and_parameters():
    listing = cnnlab("presets").stdout
    for name in ("conv", "pool-bn", "dropout", "early-stop", "fast"):
        assert f"\n{name} " in "\n" + listing
    assert "6,443,338 params" in listing
    summary = cnnlab("summary", "--preset", "pool-bn").stdout
    assert "(None, 64, 8, 8)" in summary and "Total params: 545,290" in summary


def test_train_then_evaluate_from_the_command_line(tmp_path):
    data = make_folder(tmp_path / "tiny", per_class=12)
    result = cnnlab("train", "--preset", "pool-bn", "--data", data, "--epochs", "2", "--batch-size", "8",
                    "--out", tmp_path / "runs", "--name", "demo")
    assert result.returncode == 0, result.stderr
    run_dir = result.stdout.strip().splitlines()[-1]
    assert run_dir.endswith("demo")
    again = cnnlab("train", "--preset", "pool-bn", "--data", data, "--epochs", "1", "--batch-size", "8",
                   "--out", tmp_path / "runs", "--name", "demo")
    assert again.stdout.strip().splitlines()[-1].endswith("demo-2")
    scored = cnnlab("evaluate", run_dir, "--data", data, "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["images"] == 36 and {"accuracy", "loss", "confusion_matrix", "per_class"} <= set(result)
    text = cnnlab("evaluate", run_dir, "--data", data).stdout
    assert "test accuracy" in text and "class_2" in text
    other = make_folder(tmp_path / "other", classes=2, per_class=3)
    (other / "class_1").rename(other / "dogs")
    assert_one_line_error(cnnlab("evaluate", run_dir, "--data", other), "differ from the expected classes")


def test_study_runs_the_four_seed_variants_and_prints_one_table(tmp_path):
    data = make_folder(tmp_path / "tiny", per_class=12)
    result = cnnlab("study", "cifar10", "--data", data, "--epochs-scale", "0.05", "--batch-size", "8", "--out", tmp_path / "runs",
                    "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("preset ")[-1]
    for preset in ("conv", "pool-bn", "dropout", "early-stop"):
        assert f"\n{preset} " in table
    assert "test acc" in result.stdout and (tmp_path / "runs" / "study-cifar10.csv").is_file()
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 4
    for config in (tmp_path / "runs").glob("*/config.json"):  # --precision reached every run
        assert json.loads(config.read_text())["environment"]["compute_dtype"] == "float32"


def _options(command: str) -> dict:
    """dest -> action of every option of ``cnnlab COMMAND``."""
    from cnnlab.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


def test_the_command_line_offers_every_setting_with_the_configs_choices():
    from dataclasses import fields
    from cnnlab import config
    train, transfer = _options("train"), _options("transfer")
    assert {f.name for f in fields(config.TrainConfig)} - set(train) == {"cache_dir", "channels_last", "preprocessing"}
    assert {f.name for f in fields(config.TransferConfig)} - set(transfer) == {"feature_cache"}
    for action, choices in ((train["optimizer"], config.OPTIMIZERS), (train["schedule"], config.SCHEDULES),
                            (train["mode"], config.MODES), (train["precision"], config.PRECISIONS),
                            (transfer["head"], config.HEADS), (transfer["weights_variant"], config.WEIGHTS_VARIANTS)):
        assert tuple(action.choices) == choices
    assert f"default {config.TrainConfig.batch_size}" in train["batch_size"].help
    assert f"default {config.TransferConfig.batch_size}" in transfer["batch_size"].help


def test_predicting_does_not_load_the_training_loop_and_help_does_not_load_torch():
    probe = ("import sys, cnnlab.predict, cnnlab.evaluate, cnnlab.report; "
             "print(sorted(m for m in sys.modules if m in ('cnnlab.train', 'cnnlab.step', 'cnnlab.early_stopping')))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    probe = "import sys, cnnlab.cli; cnnlab.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def _copy_run(trained_run, tmp_path, finished=True):
    run = tmp_path / "runs" / "pool-bn"
    shutil.copytree(trained_run.dir, run)
    if not finished:
        (run / "metrics.json").unlink()  # as if it had stopped
    return run


@pytest.mark.parametrize("finished", [False, True])
def test_options_beside_resume_that_would_change_the_run_are_refused(trained_run, tmp_path, capsys, finished):
    """Issue 44: `train --resume RUN --epochs 5 --lr 0.5` exited 0, having ignored both."""
    run = _copy_run(trained_run, tmp_path, finished)
    before = snapshot(run)
    same = [*TRAINED_RUN_ARGS, "--data", trained_run.data, "--out", tmp_path / "runs", "--name", "pool-bn"]
    for args in (["train", "--resume", run, "--epochs", "5", "--lr", "0.5"],
                 [*same, "--epochs", "5", "--lr", "0.5", "--resume-if-exists"]):
        result = cnnlab_here(capsys, *args)
        assert_one_line_error(result, "would change it")
        assert "--epochs 5 (the run's: 1)" in result.stderr and "--lr 0.5 (the run's: " in result.stderr
        assert "train a new run" in result.stderr
    assert snapshot(run) == before


def test_resume_if_exists_on_a_finished_run_says_so_and_changes_nothing(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path)
    before = snapshot(tmp_path / "runs")
    result = cnnlab_here(capsys, *TRAINED_RUN_ARGS, "--data", trained_run.data, "--out", tmp_path / "runs", "--name",
                         "pool-bn", "--resume-if-exists")
    assert result.returncode == 0 and "is finished" in result.stdout and result.stderr == "", result.stderr
    assert snapshot(tmp_path / "runs") == before
    assert cnnlab_here(capsys, "train", "--resume", run, "--epochs", 1, "--threads", 1).returncode == 0  # the run's own


@pytest.mark.parametrize("args, fragment", [
    (["train", "--resume", "{run}", "--resume-if-exists"], "give one"),
    (["train", "--model", "pool-bn", "--data", "{data}", "--out", "{out}", "--name", "odd", "--resume-if-exists"],
     "holds no run"),
    (["transfer", "--data", "{data}", "--out", "{out}", "--name", "odd", "--resume-if-exists"], "holds no run"),
    (["train", "--model", "pool-bn", "--data", "{data}", "--out", "{out}", "--name", "..", "--resume-if-exists"],
     "not a plain name"),
])
def test_resume_if_exists_refusals_are_one_line(trained_run, tmp_path, capsys, args, fragment):
    (tmp_path / "runs" / "odd").mkdir(parents=True)
    (tmp_path / "runs" / "odd" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    paths = {"run": trained_run.dir, "data": trained_run.data, "out": tmp_path / "runs"}
    assert_one_line_error(cnnlab_here(capsys, *[a.format(**paths) for a in args]), fragment)
    assert snapshot(tmp_path) == before
