"""Tiny generated image folders, batch norms with random statistics, the command line run as a user
runs it, one trained run shared by the modules that only read it, and a private image cache for every
test."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab.runs import read_history

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 220, 50)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> None:
    """Skips the calling test, visibly, where no Chromium is installed for Playwright to drive."""
    if not CHROMIUM:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")


def launch_chromium(playwright):
    """The installed Chromium, headless, as the browser tests drive it: no sandbox, GPU, background
    networking, component updates, sync or first-run page."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


def make_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 32, ext: str = "png",
                seed: int = 0) -> Path:
    """``root/class_i/img_j.ext``: each class a noisy image of its own colour with a bar whose
    position says the class, so a small CNN can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.normal(0, 25, (size, size, 3)) + np.array(COLORS[c % len(COLORS)])
            img[:, (c * size) // classes: (c * size) // classes + 3] = 255
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{j:03d}.{ext}")
    return root


def random_bn(channels: int, seed: int, momentum: float | None = 0.1, dtype=torch.float32) -> nn.BatchNorm2d:
    """A BatchNorm2d with random scales (about half negative), shifts and running mean."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
    return bn


def cnnlab(*args, cwd=None, env=None):
    """``cnnlab ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def cnnlab_here(capsys, *args):
    """The command run inside this process, for cases refused before any training (no interpreter
    to start: CI's time); the same exit code and output as ``cnnlab`` in a subprocess."""
    from types import SimpleNamespace

    from cnnlab.cli import main
    threads = torch.get_num_threads()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    finally:
        torch.set_num_threads(threads)  # a command sets the process's threads: the next test's are its own
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def snapshot(root: Path) -> dict:
    """Every file under ``root``, path -> bytes: equal snapshots, nothing written, nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# the shared run's settings (``--data``, ``--out`` and ``--name`` aside): the same command on the same
# data trains the same weights, so a test can train again and compare (test_robustness does)
# ---------------------------------------------------------------- runs stopped by a signal, and resumed

TIMING = {"seconds", "train_seconds", "images_per_s"}  # history columns that differ run to run


def train_args(data, out, name, epochs=12):
    """A small dropout run that a signal can stop mid-training (the interrupt and resume tests')."""
    # on the CPU: resumed runs are promised bit-for-bit equal there (on a GPU cuDNN may pick other kernels)
    return ["train", "--preset", "dropout", "--data", data, "--epochs", epochs, "--batch-size", "8", "--augment",
            "--threads", "1", "--device", "cpu", "--out", out, "--name", name]


def start(args, env=None):
    """``cnnlab ARGS`` started in the background, to be signalled."""
    return subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_epochs(run, n, proc, timeout=120):
    """Until ``run``'s history.csv has ``n`` epochs (the process still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "history.csv"
        if path.is_file() and len(path.read_text().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not progress")


def same_run(a, b):
    """The two runs' weights and histories (less timing) are bit for bit the same."""
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = ([{k: v for k, v in row.items() if k not in TIMING} for row in read_history(r / "history.csv")]
              for r in (a, b))
    assert ha == hb


TRAINED_RUN_ARGS = ("train", "--preset", "pool-bn", "--epochs", "1", "--batch-size", "8", "--threads", "1",
                    "--device", "cpu")


@dataclass(frozen=True)
class TrainedRun:
    dir: Path  # the finished run directory: read it, or copy it (shutil.copytree) before changing anything
    data: Path  # what it was trained on: 3 classes (class_0..class_2) of 20 32x32 PNGs
    cache: Path  # the image and kernel cache its training filled (copy it before use too)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One finished pool-bn run (``TRAINED_RUN_ARGS``), trained once per test process and shared by
    every module that only reads it (evaluates, exports, predicts, explains, reports): a test that
    changes a run works on its own copy, so no test sees another's changes."""
    root = tmp_path_factory.mktemp("trained-run")
    data = make_folder(root / "data", per_class=20)
    # its own cache (the autouse private_cache is per test, and monkeypatch is too): set for its process only
    env = {**os.environ, "CNNLAB_CACHE": str(root / "cache")}
    result = cnnlab(*TRAINED_RUN_ARGS, "--data", data, "--out", root / "runs", "--name", "pool-bn", env=env)
    assert result.returncode == 0, result.stderr
    return TrainedRun(dir=root / "runs" / "pool-bn", data=data, cache=root / "cache")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own image cache, so no test sees another's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "tiny")
