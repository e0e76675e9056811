"""The learning-rate finder (lr_sweep.py, lr_finder.py): fastai's exponential sweep, its smoothing and
its stop on divergence; the sweep sized to the run; the suggestion (a third of the rate at which the
loss's running median over a decade of rates is lowest) on curves whose answer is known; a copy trains, so the model,
the random streams, runs and caches stay as they were; `cnnlab lr-find`; `train --lr auto`."""
from __future__ import annotations

import json
import math
import random
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, cnnlab, cnnlab_here, make_folder, snapshot
from torch import nn

import cnnlab as package
from cnnlab.config import TrainConfig
from cnnlab.data import ImageSet, load_splits
from cnnlab.lr_sweep import (BATCHES, END, MIN_STEPS, SHARE, START, STEPS, Plan, plan, rates, run_plan, smooth,
                             suggest, sweep, valley)
from cnnlab.presets import get_preset, resolve_config
from cnnlab.train import _start, train


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data", classes=3, per_class=16, size=16)


def test_rates_grow_exponentially_from_start_to_end():
    lrs = rates()
    assert len(lrs) == 100 and lrs[0] == pytest.approx(START) and lrs[-1] == pytest.approx(END)
    ratios = [b / a for a, b in pairwise(lrs)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) and ratios[0] > 1


def test_smooth_is_fastais_debiased_moving_average():
    assert smooth([2.0] * 10, 0.98) == pytest.approx([2.0] * 10)  # debiased: no pull towards 0 at the start
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def bowl(minimum: float, steps: int = STEPS, noise: float = 0.0, seed: int = 0) -> tuple[list, list]:
    """A sweep's losses with a known lowest point: 2.3 up to a decade and a half below ``minimum``,
    then a parabola in log(lr), lowest (1.9) at ``minimum``; with Gaussian noise of ``noise``."""
    rng = random.Random(seed)
    lrs = rates(steps=steps)
    return lrs, [min(2.3, 1.9 + 0.18 * math.log10(lr / minimum) ** 2) + rng.gauss(0, noise) for lr in lrs]


@pytest.mark.parametrize("minimum", [3e-3, 1e-2, 0.3])
def test_suggestion_is_a_third_of_the_rate_at_the_lowest_loss(minimum):
    lrs, losses = bowl(minimum)
    suggestion, lowest, median = suggest(lrs, losses, STEPS)
    step = lrs[1] / lrs[0]
    assert minimum / step <= lrs[lowest] <= minimum * step and median[lowest] == min(median[10:95])
    assert suggestion == pytest.approx(lrs[lowest] / 3)


def test_suggestion_is_not_dragged_by_lag_noise_or_one_bad_batch():
    lrs, clean = bowl(1e-2)
    lagged = smooth(clean, 0.98)  # fastai's curve bottoms out well after the loss does (a fifth of the sweep)
    assert lrs[lagged.index(min(lagged))] > 10 * 1e-2
    spiked = list(clean)
    for i in range(40, 70, 4):  # batches whose loss shoots up, every fourth step around the minimum
        spiked[i] += 5.0
    assert suggest(lrs, spiked, STEPS)[0] == suggest(lrs, clean, STEPS)[0]
    for seed in range(5):  # noise of an eighth of the fall, each step
        assert 1e-2 / 3 / 2 <= suggest(*bowl(1e-2, noise=0.05, seed=seed), STEPS)[0] <= 1e-2 / 3 * 2


def test_suggestion_on_a_short_sweep():
    lrs, losses = bowl(0.1, steps=25, noise=0.02)
    suggestion, _, median = suggest(lrs, losses, 25)
    assert 0.1 / 3 / 2 <= suggestion <= 0.1 / 3 * 2 and len(median) == 25


def test_valley_picks_a_rate_down_the_longest_fall():
    lrs = rates(1e-4, 1, 20)
    losses = [2.0] * 5 + [2.0 - 0.1 * i for i in range(1, 11)] + [3, 5, 8, 13, 21]
    assert lrs[5] <= valley(lrs, losses) <= lrs[14]  # inside the fall, before its bottom


@pytest.mark.parametrize("run_batches, expected", [
    (20 * 313, Plan(STEPS, BATCHES)),  # conv, pool-bn: 20 epochs of 128 on 40,000 images
    (60 * 313, Plan(STEPS, BATCHES)),  # dropout, early-stop
    (8 * 80, Plan(25, 1)),  # fast: 8 epochs of 500
    (3000, Plan(STEPS, 1)),
    (30, Plan(MIN_STEPS, 1)),  # a tiny run: the fewest steps, more than its share
])
def test_the_sweep_is_sized_to_the_run(run_batches, expected):
    assert plan(run_batches) == expected
    if expected.steps > MIN_STEPS:
        assert expected.steps * expected.batches <= SHARE * run_batches


def test_run_plan_counts_the_runs_batches():
    cfg = TrainConfig(epochs=8, batch_size=500)
    assert run_plan(cfg, 40_000) == plan(640) and run_plan(cfg, 40_001) == plan(648)


class Counting(nn.Module):
    """A linear classifier that counts its forward passes and their batch sizes (on the class: the
    sweep trains a copy)."""
    calls, sizes = 0, []

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        Counting.calls += 1
        Counting.sizes.append(len(x))
        return self.linear(x.flatten(1))


def test_each_step_averages_its_batches_at_its_rate():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    data = ImageSet(images, (images[:, 0].float().mean((1, 2)) > 128).long())
    cfg = TrainConfig(batch_size=8, channels_last=False, precision="fp32")
    Counting.calls = 0
    result = sweep(Counting(), data, cfg, torch.device("cpu"), Plan(10, 3), span=(1e-4, 1e-2))
    assert Counting.calls == 30 and len(result.lrs) == 10 and result.plan == Plan(10, 3)
    assert result.lrs == pytest.approx(rates(1e-4, 1e-2, 10))
    assert len(result.raw) == len(result.losses) == len(result.median) == 10


def test_a_set_smaller_than_the_batch_sweeps_with_one_batch_of_every_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    data = ImageSet(images, (images[:, 0].float().mean((1, 2)) > 128).long())
    cfg = TrainConfig(batch_size=128, channels_last=False, precision="fp32")
    Counting.calls, Counting.sizes = 0, []
    result = sweep(Counting(), data, cfg, torch.device("cpu"), Plan(10, 2), span=(1e-4, 1e-2))
    assert len(result.lrs) == 10 and Counting.sizes == [12] * 20  # every step's two batches hold all 12 images
    assert math.isfinite(result.suggestion)


def test_sweep_stops_on_divergence_and_leaves_model_and_random_streams_alone(folder):
    cfg = resolve_config("pool-bn", data=str(folder), batch_size=8, threads=1, device="cpu")
    _, splits, model = _start(cfg, list(get_preset("pool-bn").layers), None, print)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    result = sweep(model, splits.train, cfg, torch.device("cpu"), Plan(STEPS, 1))
    assert len(result.lrs) < 100 and ("4x its minimum" in result.stopped or "non-finite" in result.stopped)
    assert result.lrs == rates()[:len(result.lrs)]
    assert math.isfinite(result.suggestion) and START <= result.suggestion <= result.lrs[-1]
    assert result.lowest >= 10 and result.suggestion == pytest.approx(result.lrs[result.lowest] / 3)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_lr_find_writes_its_plot_alone_and_no_run_or_cache(folder, tmp_path, private_cache):
    load_splits(str(folder), 32, 0.1, 0.1, 0)  # what loading the data writes (the decoded images), beforehand
    before, state = snapshot(tmp_path), torch.get_rng_state()
    result = package.lr_find("pool-bn", str(folder), tmp_path / "out" / "curve.png", batch_size=8, threads=1,
                             device="cpu", log=lambda m: None)
    after = snapshot(tmp_path)
    assert set(after) - set(before) == {"out/curve.png"} and after[str(Path("out/curve.png"))][:4] == b"\x89PNG"
    assert {k: v for k, v in after.items() if k in before} == before
    assert result.plot == tmp_path / "out" / "curve.png" and result.plan == Plan(MIN_STEPS, 1)
    assert torch.equal(torch.get_rng_state(), state)  # building the model seeded them: given back


def test_cli_lr_find_prints_the_value_last_and_writes_the_png(folder, tmp_path):
    result = cnnlab("lr-find", "--model", "pool-bn", "--data", folder, "--batch-size", "8", "--threads", "1",
                    "--device", "cpu", "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.strip().splitlines()[-1])
    assert START <= value <= END and "20 steps of a batch of 8 (the run: 20 epochs)" in result.stdout
    assert (tmp_path / "plots" / "lr_find-pool-bn.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "runs").exists()


def test_train_lr_auto_records_and_trains_with_the_value_found(folder, tmp_path):
    common = {"data": str(folder), "epochs": 1, "batch_size": 8, "threads": 1, "device": "cpu",
              "tensorboard": False, "out": str(tmp_path / "runs")}
    auto = train(resolve_config("pool-bn", lr="auto", name="auto", **common), log=lambda m: None)
    config = json.loads((auto / "config.json").read_text())
    assert config["lr_auto"] is True and config["lr"] == config["lr_found"] and START <= config["lr"] <= END
    assert (auto / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    same = train(resolve_config("pool-bn", lr=config["lr"], name="fixed", **common), log=lambda m: None)
    a, b = torch.load(auto / "model.pt"), torch.load(same / "model.pt")  # the sweep changed nothing the run uses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "lr_found" not in json.loads((same / "config.json").read_text())


@pytest.mark.parametrize("args, message", [
    (("train", "--model", "pool-bn", "--data", "{data}", "--lr", "often"), "--lr must be a number or auto"),
    (("lr-find", "--model", "pool-bn", "--data", "{data}", "-o", "{tmp}/curve.txt"), "must name a .png file"),
])
def test_bad_input_is_one_line(args, message, folder, tmp_path, capsys):
    args = [a.format(data=folder, tmp=tmp_path) for a in args]
    assert_one_line_error(cnnlab_here(capsys, *args, "--threads", "1", "--device", "cpu"), message)


def test_transfer_lr_auto_sweeps_the_head_on_its_features_and_records_it(tmp_path):
    from cnnlab.config import TransferConfig
    from cnnlab.transfer import transfer
    pets = make_folder(tmp_path / "pets", classes=2, per_class=8, size=48)
    cfg = TransferConfig(data=str(pets), backbone="efficientnet_lite0", epochs=1, batch_size=4, val_split=0.25,
                         test_split=0.25, out=str(tmp_path / "runs"), lr="auto", tensorboard=False, threads=1)
    run = transfer(cfg, log=lambda m: None)
    config = json.loads((run / "config.json").read_text())
    assert config["lr_auto"] is True and config["lr"] == config["lr_found"] and START <= config["lr"] <= END
    assert (run / "lr_find.png").exists() and (run / "metrics.json").exists()


def test_lr_find_on_a_backbone_writes_no_feature_cache(tmp_path, private_cache):
    pets = make_folder(tmp_path / "pets", classes=2, per_class=8, size=48)
    result = package.lr_find("efficientnet_lite0", str(pets), None, batch_size=4, val_split=0.25, test_split=0.25,
                             threads=1, log=lambda m: None)
    assert START <= result.suggestion <= END and result.plot is None
    assert not [p for p in private_cache.rglob("*") if "feature" in p.name.lower()]


@pytest.mark.parametrize("model", ["pool-bn", "efficientnet_lite0"])
def test_lr_find_sweeps_with_the_runs_labels_file_and_several_labels_per_image(model, folder, tmp_path, monkeypatch):
    from cnnlab import lr_finder
    labels = tmp_path / "labels.csv"  # every image of class_2 also carries class_0
    rows = [f"{p.relative_to(folder).as_posix()},{p.parent.name}{';class_0' if p.parent.name == 'class_2' else ''}"
            for p in sorted(folder.rglob("*.png"))]
    labels.write_text("image,label\n" + "\n".join(rows) + "\n")
    seen, real = [], lr_finder.sweep
    monkeypatch.setattr(lr_finder, "sweep", lambda net, train, cfg, *a, **k: seen.append((train, cfg)) or
                        real(net, train, cfg, *a, **k))
    result = package.lr_find(model, str(folder), None, labels=str(labels), multi_label=True, batch_size=8,
                             threads=1, device="cpu", log=lambda m: None)
    (train, cfg), = seen
    assert cfg.multi_label and train.labels.shape == (len(train), 3)  # multi-hot: the sweep's loss is BCE
    assert train.labels[:, 0].sum() > train.labels[:, 2].sum() > 0 and math.isfinite(result.suggestion)
    done = cnnlab("lr-find", "--model", model, "--data", folder, "--labels", labels, "--multi-label", "--batch-size",
                  "8", "--threads", "1", "--device", "cpu", "--out", tmp_path / "plots")
    assert done.returncode == 0, done.stderr
    assert START <= float(done.stdout.strip().splitlines()[-1]) <= END
