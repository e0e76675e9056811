"""The learning-rate finder (lr_sweep.py, lr_finder.py): fastai's exponential sweep, its stop on
divergence and its valley suggestion; a copy trains, so the model, the random streams, runs and
caches stay as they were; `cnnlab lr-find`; `train --lr auto`."""
from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, cnnlab, cnnlab_here, make_folder, snapshot

import cnnlab as package
from cnnlab.data import load_splits
from cnnlab.lr_sweep import END, START, rates, sweep, valley
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


def test_valley_picks_a_rate_down_the_longest_fall():
    lrs = rates(1e-4, 1, 20)
    losses = [2.0] * 5 + [2.0 - 0.1 * i for i in range(1, 11)] + [3, 5, 8, 13, 21]
    suggestion = valley(lrs, losses)
    assert lrs[5] <= suggestion <= lrs[14]  # inside the fall, before its bottom


def test_sweep_stops_on_divergence_and_leaves_model_and_random_streams_alone(folder):
    cfg = resolve_config("pool-bn", data=str(folder), batch_size=8, threads=1, device="cpu")
    _, splits, model = _start(cfg, list(get_preset("pool-bn").layers), None, print)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    result = sweep(model, splits.train, cfg, torch.device("cpu"))
    assert len(result.lrs) < 100 and ("4x its minimum" in result.stopped or "non-finite" in result.stopped)
    assert result.lrs == rates()[:len(result.lrs)]
    assert math.isfinite(result.suggestion) and START <= result.suggestion <= result.lrs[-1]
    assert result.lrs.index(result.suggestion) >= 10  # the first tenth is not suggested from, as fastai
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
    assert result.plot == tmp_path / "out" / "curve.png"
    assert torch.equal(torch.get_rng_state(), state)  # building the model seeded them: given back


def test_cli_lr_find_prints_the_value_last_and_writes_the_png(folder, tmp_path):
    result = cnnlab("lr-find", "--model", "pool-bn", "--data", folder, "--batch-size", "8", "--threads", "1",
                    "--device", "cpu", "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.strip().splitlines()[-1])
    assert START <= value <= END
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
    (("lr-find", "--model", "pool-bn", "--data", "{data}", "--batch-size", "1000"), "larger than the training set"),
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
