"""Slurm preemption: SIGUSR1 (`#SBATCH --signal=USR1@90`) stops a run at the end of a batch with its
checkpoint, rank 0 requeues the job (`scontrol requeue`, a fake one on the PATH here), and the same
command with --resume-if-exists continues the run to the weights and history of one never stopped."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import cnnlab, make_folder, same_run, snapshot, start, train_args, wait_for_epochs

EPOCHS = 12
FAKE_SCONTROL = '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nexit "${SCONTROL_EXIT:-0}"\n'


def _no_slurm() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _fake_slurm(tmp_path: Path, job: str = "4242", exit_code: int = 0) -> dict:
    """The environment of a Slurm job whose `scontrol` writes its arguments to scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(FAKE_SCONTROL)
    scontrol.chmod(0o755)
    return {**_no_slurm(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": job,
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "SCONTROL_EXIT": str(exit_code)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("slurm") / "tiny", per_class=40)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = cnnlab(*train_args(data, out, "ref", EPOCHS), env=_no_slurm())
    assert result.returncode == 0, result.stderr
    return out / "ref"


def test_sigusr1_under_slurm_requeues_and_the_same_command_ends_as_an_uninterrupted_run(data, reference, tmp_path):
    env = _fake_slurm(tmp_path)
    command = [*train_args(data, tmp_path, "run", EPOCHS), "--resume-if-exists"]
    run = tmp_path / "run"
    proc = start(command, env)
    wait_for_epochs(run, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 138, err  # 128 + SIGUSR1, requeued or not
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "stopped by SIGUSR1" in lines[0] and "Slurm job 4242 is requeued" in lines[0], lines[0]
    assert f"cnnlab resume {run}" in lines[0]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    marker = json.loads((run / "interrupted.json").read_text())
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert marker["checkpoint_epoch"] == state["epoch"] == marker["epoch"] - 1 >= 3
    assert marker["slurm_job"] == "4242" and marker["requeued"] is True
    assert not (run / "metrics.json").exists()

    again = cnnlab(*command, env=env)  # the requeued job: the same command
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} after epoch {state['epoch']}" in again.stdout
    same_run(reference, run)
    assert not (tmp_path / "run-2").exists()

    before = snapshot(run)
    done = cnnlab(*command, env=env)  # once more, the run finished: said, nothing changed, exit 0
    assert done.returncode == 0 and "is finished" in done.stdout, done.stderr
    assert snapshot(run) == before
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_sigusr1_outside_slurm_stops_as_sigterm_does(data, tmp_path):
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run", 200), _no_slurm())
    wait_for_epochs(run, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 138, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGUSR1" in lines[0] and f"continue with: cnnlab resume {run}" in lines[0]
    assert "Slurm" not in lines[0]
    marker = json.loads((run / "interrupted.json").read_text())
    assert marker["checkpoint_epoch"] == torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert "slurm_job" not in marker


def test_a_failed_requeue_says_so_and_how_to_continue(data, tmp_path):
    env = _fake_slurm(tmp_path, job="77", exit_code=3)
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run", 200), env)
    wait_for_epochs(run, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 138, err
    line = err.strip()
    assert "`scontrol requeue 77` failed (exit 3)" in line and f"continue with: cnnlab resume {run}" in line, line
    assert json.loads((run / "interrupted.json").read_text())["requeued"] is False


def test_the_job_id_is_slurms_and_only_with_scontrol_on_the_path(tmp_path, monkeypatch):
    from cnnlab.interrupts import slurm_job
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert slurm_job() is None
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path)["PATH"])
    assert slurm_job() == "12"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job() == "10_3"  # an array task is requeued as Slurm names it
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "12; rm -rf /")
    assert slurm_job() is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm_job() is None


def test_a_sigusr1_before_the_run_began_stops_it_at_its_first_batch():
    from cnnlab.interrupts import InterruptGuard, hold_requeue_signal
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        hold_requeue_signal()
        os.kill(os.getpid(), signal.SIGUSR1)  # while the data loads, say: held, not the end of the process
        with InterruptGuard() as guard:
            assert guard.signum == signal.SIGUSR1
        with InterruptGuard() as guard:
            assert guard.signum is None  # held once
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sigusr1_to_nproc_stops_every_rank_and_only_rank_0_requeues(data, tmp_path):
    env = {**_fake_slurm(tmp_path, job="99"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = ["train", "--preset", "pool-bn", "--data", data, "--epochs", 200, "--batch-size", 8, "--no-tensorboard",
               "--out", tmp_path, "--name", "run", "--nproc", 2, "--resume-if-exists"]
    run = tmp_path / "run"
    proc = start(command, env)
    wait_for_epochs(run, 1, proc, timeout=240)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, as Slurm signals it: it passes the signal on to the ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("cnnlab train")]
    assert len(said) == 1 and "stopped by SIGUSR1" in said[0] and "Slurm job 99 is requeued" in said[0], err[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 99\n"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert json.loads((run / "interrupted.json").read_text())["checkpoint_epoch"] == state["epoch"]
