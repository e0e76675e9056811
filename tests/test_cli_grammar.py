"""The command line's grammar, parsed only (no training): help on every option, argument groups,
no abbreviations, one spelling per idea (--model, --out DIR, -o/--output FILE) with the old
spellings still parsed alike, and a bare `cnnlab` that shows the help."""
import argparse
import subprocess
import sys

import pytest

from cnnlab import launch
from cnnlab.cli_options import TRAIN_KEYS, TRANSFER_KEYS, given_settings
from cnnlab.cli_parser import build_parser

COMMANDS = ("train", "resume", "evaluate", "transfer", "predict", "explain", "export", "report", "reproduce",
            "presets", "summary", "study", "lr-find", "serve")


def subparsers(parser=None) -> dict:
    parser = parser or build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def parse(*argv):
    return vars(build_parser().parse_args([str(a) for a in argv]))


def refused(capsys, *argv) -> str:
    """The one line a refused command line prints (exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([str(a) for a in argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_every_command_is_there():
    assert tuple(subparsers()) == COMMANDS


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = [f"cnnlab {a.option_strings or a.dest}" for a in parser._actions if not (a.help or "").strip()]
    for name, sub in subparsers(parser).items():
        assert (sub.description or "").strip(), f"cnnlab {name} has no description"
        assert "examples:" in (sub.epilog or ""), f"cnnlab {name} has no examples"
        missing += [f"cnnlab {name} {a.option_strings or a.dest}" for a in sub._actions if not (a.help or "").strip()]
    # each command's one line in `cnnlab --help`
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions
    missing += [f"cnnlab {c.dest} (its line in cnnlab --help)" for c in choices if not (c.help or "").strip()]
    assert not missing, missing


GROUPS = {  # group title -> some of its options
    "model": ["--model", "--resume"],
    "data": ["--data", "--val-split", "--augment", "--tta"],
    "optimization": ["--lr", "--optimizer", "--momentum", "--weight-decay"],
    "schedule": ["--epochs", "--schedule"],
    "recipe internals": ["--whiten-bias-epochs", "--bias-lr-scale", "--whiten-bias-scaled", "--head-lr-scale",
                         "--lookahead"],
    "early stopping": ["--monitor", "--patience", "--min-delta", "--mode", "--restore-best-weights"],
    "runtime": ["--threads", "--device", "--precision", "--cuda-graph", "--sync-bn", "--nproc"],
    "output": ["--out", "--name", "--tensorboard", "--resume-if-exists"],
}


def test_train_help_is_in_groups():
    train = subparsers()["train"]
    groups = {g.title: {s for a in g._group_actions for s in a.option_strings} for g in train._action_groups}
    for title, options in GROUPS.items():
        assert title in groups, title
        assert set(options) <= groups[title], (title, set(options) - groups[title])
    ungrouped = [a.option_strings for a in train._actions if a.option_strings and a.dest != "help"
                 and not any(set(a.option_strings) & groups[t] for t in GROUPS)]
    assert not ungrouped, ungrouped
    text = train.format_help()
    assert all(f"\n{title}:" in text for title in GROUPS)


def test_commands_with_many_options_have_groups_too():
    for name in ("transfer", "study", "reproduce"):
        titles = {g.title for g in subparsers()[name]._action_groups}
        assert {"runtime", "output"} <= titles, (name, titles)
    assert {"model", "data", "fine-tuning"} <= {g.title for g in subparsers()["transfer"]._action_groups}


def test_no_abbreviations(capsys):
    assert not build_parser().allow_abbrev
    assert not any(sub.allow_abbrev for sub in subparsers().values())
    line = refused(capsys, "train", "--model", "pool-bn", "--data", "d", "--epoch", "3")
    assert "unrecognized arguments: --epoch 3" in line and "cnnlab train --help" in line
    assert "unrecognized arguments: --vers" in refused(capsys, "--vers", "presets")
    assert "unrecognized arguments: --js " in refused(capsys, "evaluate", "runs/x", "--data", "d", "--js")


def test_bare_cnnlab_prints_the_help_with_examples_and_exits_0():
    """Like `pip` or `docker` with nothing to do: the full help on stdout and exit code 0 (it asked
    for nothing that failed); a wrong command line still exits 2 with one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "cnnlab"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: cnnlab") and "examples:" in done.stdout
    assert all(f"\n    {name}" in done.stdout for name in COMMANDS)
    assert "--model" in done.stdout.split("examples:")[1]


@pytest.mark.parametrize("new, old", [
    (["train", "--model", "pool-bn", "--data", "d"], ["train", "--preset", "pool-bn", "--data", "d"]),
    (["summary", "--model", "fast"], ["summary", "--preset", "fast"]),
    (["transfer", "--data", "d", "--model", "efficientnet_lite0"], ["transfer", "--data", "d", "--backbone",
                                                                   "efficientnet_lite0"]),
    (["evaluate", "--model", "runs/x", "--data", "d"], ["evaluate", "runs/x", "--data", "d"]),
    (["export", "--model", "runs/x", "-o", "x.onnx"], ["export", "runs/x", "--output", "x.onnx"]),
    (["resume", "--model", "runs/x"], ["resume", "runs/x"]),
    (["report", "runs/a", "runs/b", "-o", "r.html"], ["report", "runs/a", "runs/b", "--output", "r.html"]),
])
def test_model_and_output_are_one_spelling_parsed_as_the_old_ones(new, old):
    assert parse(*new) == parse(*old)


def test_model_fills_the_setting_it_always_did():
    assert parse("train", "--model", "pool-bn", "--data", "d")["preset"] == "pool-bn"
    assert parse("summary", "--model", "fast")["preset"] == "fast"
    assert parse("transfer", "--data", "d", "--model", "vgg16")["backbone"] == "vgg16"
    for command in ("evaluate", "export", "resume"):
        args = parse(command, "--model", "runs/x", *(["--data", "d"] if command == "evaluate" else []))
        assert args["run_dir"] == "runs/x" and "model" not in args
    for command in ("predict", "explain"):  # a backbone, a run or an .onnx file: as given
        assert parse(command, "a.png", "--model", "runs/x.onnx")["model"] == "runs/x.onnx"


def test_a_run_is_given_once(capsys):
    assert "RUN_DIR (or --model RUN_DIR)" in refused(capsys, "evaluate", "--data", "d")
    assert "not both" in refused(capsys, "export", "runs/a", "--model", "runs/b")
    assert "RUN_DIR" in refused(capsys, "resume")


def test_one_name_per_idea(capsys):
    """--out DIR is a folder, -o/--output FILE a file, everywhere; --weights-kind is gone
    (--weights-variant is its one name)."""
    outs = []
    for name, sub in subparsers().items():
        for action in sub._actions:
            if "--out" in action.option_strings:
                assert action.option_strings == ["--out"] and action.metavar == "DIR", name
                outs.append(name)
            if "--output" in action.option_strings:
                assert action.option_strings == ["-o", "--output"] and action.metavar == "FILE", name
    assert set(outs) == {"train", "transfer", "explain", "reproduce", "study", "lr-find"}
    assert "--weights-kind" in refused(capsys, "transfer", "--data", "d", "--weights-kind", "keras")
    assert parse("transfer", "--data", "d", "--weights-variant", "keras")["weights_variant"] == "keras"


def test_the_command_line_sets_only_what_was_given():
    """Every setting left out is None, so the config's (or the preset's) default applies: the
    same runs as before, whatever the spelling."""
    assert given_settings(argparse.Namespace(**parse("train", "--model", "p", "--data", "d")), TRAIN_KEYS) == {"data": "d"}
    transfer = parse("transfer", "--data", "d", "--model", "vgg16")
    assert given_settings(argparse.Namespace(**transfer), TRANSFER_KEYS) == {"data": "d", "backbone": "vgg16"}


def test_nproc_is_left_out_of_what_each_rank_runs():
    argv = ["train", "--model", "fast", "--nproc", "2", "--data", "d", "--nproc=3", "--name", "n"]
    assert launch.without_nproc(argv) == ["train", "--model", "fast", "--data", "d", "--name", "n"]


def test_the_parser_and_launch_load_neither_torch_nor_the_dispatch():
    probe = ("import sys, cnnlab.cli_parser, cnnlab.launch; cnnlab.cli_parser.build_parser(); "
             "print('torch' in sys.modules, 'cnnlab.cli' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_resume_takes_no_training_option(capsys):
    """Issue 44: an option beside a resume is refused, never ignored (`train --resume` checks its own:
    test_cli)."""
    line = refused(capsys, "resume", "runs/x", "--epochs", "5")
    assert "unrecognized arguments: --epochs 5" in line and "cnnlab resume --help" in line


def test_resume_if_exists_is_a_switch_of_train_and_transfer():
    assert parse("train", "--model", "fast", "--data", "d", "--resume-if-exists")["resume_if_exists"] is True
    assert parse("transfer", "--data", "d", "--resume-if-exists")["resume_if_exists"] is True
    assert parse("train", "--model", "fast", "--data", "d")["resume_if_exists"] is False
