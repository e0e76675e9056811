import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from cnnlab import runtime
from cnnlab.checkpoint import portable
from cnnlab.config import TrainConfig
from cnnlab.presets import resolve_config
from cnnlab.early_stopping import EarlyStopping
from cnnlab.errors import CnnlabError
from cnnlab.runs import read_history
from cnnlab.runtime import compute_dtype
from cnnlab.step import graph_ready
from cnnlab.optimizer import lr_factor, make_optimizer
from cnnlab.train import train
from conftest import make_folder


def scripted(values, monitor="val_loss", **kwargs):
    """Feeds ``values`` to EarlyStopping; the model's weight is set to the epoch number each
    epoch, so the restored weight says which epoch was restored."""
    model = nn.Linear(1, 1, bias=False)
    stopper = EarlyStopping(monitor, **kwargs)
    stopped_at = None
    for epoch, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        if stopper.update(epoch, {monitor: value}, model):
            stopped_at = epoch
            break
    stopper.restore(model)
    return stopped_at, stopper, int(model.weight.item())


def test_stops_after_patience_epochs_without_improvement_and_restores_the_best():
    stopped, stopper, restored = scripted([1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9], patience=3)
    assert stopped == 6 and stopper.best_epoch == 3 and restored == 3


def test_seed_study_case_best_epoch_7_patience_5_stops_at_12():
    values = [2.0, 1.8, 1.6, 1.5, 1.4, 1.35, 1.3, 1.31, 1.32, 1.33, 1.34, 1.35, 1.2]
    stopped, stopper, restored = scripted(values, patience=5)
    assert (stopped, stopper.best_epoch, restored) == (12, 7, 7)


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    stopped, stopper, _ = scripted([1.0, 0.9, 0.95, 0.5], patience=0)
    assert stopped == 3 and stopper.best_epoch == 2


def test_min_delta_ignores_small_improvements():
    stopped, stopper, restored = scripted([1.0, 0.95, 0.93, 0.5], patience=2, min_delta=0.1)
    assert stopped == 3 and stopper.best_epoch == 1 and restored == 1
    stopped, stopper, _ = scripted([1.0, 0.85, 0.7, 0.69, 0.68], patience=2, min_delta=0.1)
    assert stopped == 5 and stopper.best_epoch == 3


def test_start_from_epoch_ignores_the_first_epochs():
    stopped, stopper, restored = scripted([0.1, 0.2, 1.0, 0.9, 0.95, 0.96, 0.97], patience=2, start_from_epoch=2)
    assert stopper.best_epoch == 4 and stopped == 6 and restored == 4


def test_mode_is_inferred_from_the_metric_name():
    stopped, stopper, restored = scripted([0.5, 0.7, 0.6, 0.65], monitor="val_accuracy", patience=2)
    assert stopper.mode == "max" and stopped == 4 and restored == 2
    assert EarlyStopping("val_f1").mode == "max" and EarlyStopping("loss").mode == "min"
    _, forced, _ = scripted([0.5, 0.7, 0.6], monitor="val_loss", mode="max")
    assert forced.best_epoch == 2


def test_best_epoch_is_recorded_when_stopping_never_triggers():
    stopped, stopper, restored = scripted([1.0, 0.6, 0.7, 0.8])
    assert stopped is None and stopper.best_epoch == 2 and restored == 2


def test_last_weights_are_kept_when_restore_is_off():
    _, stopper, restored = scripted([1.0, 0.6, 0.7, 0.8], restore_best_weights=False)
    assert stopper.best_epoch == 2 and restored == 4


def test_one_cycle_schedule_rises_then_falls_to_zero():
    assert lr_factor("onecycle", 0, 100) == pytest.approx(0.2)
    assert lr_factor("onecycle", 20, 100) == pytest.approx(1.0)
    assert lr_factor("onecycle", 100, 100) == pytest.approx(0.0)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("none", 70, 100) == 1.0


def test_preset_settings_sit_between_defaults_and_explicit_values():
    cfg = resolve_config("early-stop", data="x")
    assert (cfg.epochs, cfg.patience, cfg.lr, cfg.batch_size, cfg.optimizer) == (60, 5, 1e-3, 128, "adam")
    assert resolve_config("early-stop", data="x", patience=2, epochs=None).patience == 2


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"val_split": 0.6, "test_split": 0.5}, "must be below 1"),
    ({"monitor": "val_auc"}, "unknown monitor metric 'val_auc'"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
])
def test_out_of_range_settings_are_one_line_errors(overrides, message):
    with pytest.raises(CnnlabError, match=message):
        resolve_config("pool-bn", data="x", **overrides)


def tiny_config(folder, out, **kw):
    settings = dict(data=str(folder), out=str(out), epochs=4, batch_size=8, val_split=0.2, test_split=0.2,
                    lr=3e-3, threads=1)
    return resolve_config(kw.pop("preset", "pool-bn"), **{**settings, **kw})


def test_short_training_lowers_the_loss_and_writes_the_run_directory(tiny_folder, tmp_path):
    run = train(tiny_config(tiny_folder, tmp_path / "runs"), log=lambda m: None)
    history = read_history(run / "history.csv")
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    metrics = json.loads((run / "metrics.json").read_text())
    cm = metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == metrics["test_size"] == 12 and metrics["epochs_run"] == 4
    assert metrics["test_accuracy"] == sum(cm[i][i] for i in range(3)) / 12 > 0.5  # learnt, beyond chance
    for name in ("config.json", "loss.png", "accuracy.png", "confusion_matrix.png", "confusion_matrix.csv", "model.pt"):
        assert (run / name).stat().st_size > 0
    state = torch.load(run / "model.pt", weights_only=True)
    assert "0.weight" in state


def test_val_split_zero_trains_on_every_training_image_without_a_validation_pass(tiny_folder, tmp_path):
    from cnnlab.report import build_report
    from cnnlab.study import comparison_rows
    run = train(tiny_config(tiny_folder, tmp_path / "runs", val_split=0, epochs=2), log=lambda m: None)
    history = read_history(run / "history.csv")
    assert [sorted(k for k in row if k.startswith("val")) for row in history] == [[], []]
    config = json.loads((run / "config.json").read_text())
    assert config["data_info"]["val_size"] == 0 and config["data_info"]["train_size"] == 60 - 12
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_val_accuracy"] is None and metrics["weights"] == "last" and metrics["best_epoch"] == 2
    page = build_report([run], tmp_path / "report.html").read_text()
    assert "best val - (no validation images)" in page  # the seed-figure note beside the run
    assert comparison_rows([run])[0][5] == "-"


@pytest.mark.parametrize("preset, overrides, problem", [
    ("early-stop", {}, "for early stopping on val_loss"),               # the preset's patience on val_loss
    ("pool-bn", {"monitor": "val_f1"}, "to --monitor val_f1"),          # a validation metric asked for
    ("early-stop", {"monitor": "loss"}, None),                          # early stopping on the training loss
    ("fast", {}, None),                                                 # the preset's val_accuracy just rests
])
def test_val_split_zero_refuses_only_what_needs_validation_images(preset, overrides, problem):
    if problem is None:
        assert resolve_config(preset, data="x", val_split=0, **overrides).val_split == 0
    else:
        with pytest.raises(CnnlabError, match=f"--val-split 0 leaves no validation images {problem}"):
            resolve_config(preset, data="x", val_split=0, **overrides)


def test_seeded_runs_are_repeatable_on_cpu(tiny_folder, tmp_path):
    runs = [train(tiny_config(tiny_folder, tmp_path / "runs", epochs=2, augment=True), log=lambda m: None)
            for _ in range(2)]
    assert runs[0] != runs[1]  # a clashing name got a suffix
    h0, h1 = (read_history(r / "history.csv") for r in runs)
    assert [r["loss"] for r in h0] == [r["loss"] for r in h1]
    w0, w1 = (torch.load(r / "model.pt", weights_only=True) for r in runs)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_a_signal_after_the_last_batch_lets_the_run_write_its_results(tiny_folder, tmp_path):
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("epoch   1/1"):  # the last epoch is done: Ctrl-C while the results are written
            os.kill(os.getpid(), signal.SIGINT)
    try:
        run = train(tiny_config(tiny_folder, tmp_path / "runs", epochs=1), log=log)
    except KeyboardInterrupt:
        pytest.fail("the signal escaped the interrupt guard")
    assert (run / "metrics.json").is_file() and not (run / "checkpoint.pt").exists()
    assert any("came after training ended" in line for line in lines)


def test_early_stopping_run_records_its_stop(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, tmp_path / "runs", epochs=30, monitor="val_accuracy", patience=1, lr=1e-2)
    run = train(cfg, log=lambda m: None)
    metrics = json.loads((run / "metrics.json").read_text())
    history = read_history(run / "history.csv")
    assert metrics["stopped_early"] and metrics["epochs_run"] < 30
    assert metrics["epochs_run"] == len(history)
    best = max(history, key=lambda r: r["val_accuracy"])  # first epoch with the top value
    assert metrics["best_epoch"] == best["epoch"]


def test_batch_larger_than_training_set_trains_one_smaller_batch_with_a_notice(tiny_folder, tmp_path):
    said = []
    run = train(tiny_config(tiny_folder, tmp_path / "runs", batch_size=1000, epochs=2), log=said.append)
    assert "notice: --batch-size 1000 is more than the 36 training images: each epoch is one batch of them all" in said
    assert len(read_history(run / "history.csv")) == 2 and (run / "metrics.json").is_file()


FAULTS_SCRIPT = """
import resource, sys, torch
from cnnlab.runtime import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def step():  # 48 MB buffers: above the 32 MB that glibc's own adaptive threshold can reach
    a = torch.ones(12 << 20); b = a * 2
    return float(b[-1])
for _ in range(10):  # the heap takes a few steps to settle (seen: 3 to 8) before its holes fit
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_kept_freed_memory_stops_page_faults_on_every_step():
    def median_faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)
    default, kept = median_faults("default"), median_faults("kept")
    assert default > 12000  # each 48 MB buffer is 12,288 pages, faulted in afresh each step
    assert kept < 1000  # reused: the typical step faults nothing (the odd step still does)


def test_a_graph_ready_optimizer_follows_its_schedule_in_place_and_saves_plain_numbers():
    """A CUDA graph reads the learning rate from one tensor: the schedule must update that
    tensor in place, and a checkpoint must hold a plain number that resumes anywhere."""
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, nesterov=True), None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor("onecycle", s, 10))
    graph_ready(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["fused"]
    for s in range(1, 5):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] is lr
        assert float(lr) == pytest.approx(0.1 * lr_factor("onecycle", s, 10))
    saved = portable(opt.state_dict())["param_groups"][0]["lr"]
    assert isinstance(saved, float) and saved == pytest.approx(float(lr))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor


def test_precision_auto_is_bfloat16_where_the_device_computes_it_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("fp32", cpu) is None and compute_dtype("fp32", cuda) is None
    assert compute_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert compute_dtype("auto", cpu) == torch.bfloat16 and compute_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert compute_dtype("auto", cpu) is None  # emulated bfloat16 would be slower than float32
    assert compute_dtype("bf16", cpu) == torch.bfloat16  # asked for: given


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not runtime.native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.native_bf16(torch.device("cpu"))


def test_native_bf16_asks_a_gpu_without_counting_emulation(monkeypatch):
    asked = []

    def current(including_emulation=True):  # this PyTorch's signature: emulated bfloat16 counts by default
        asked.append(including_emulation)
        return including_emulation  # a pre-Ampere GPU: bfloat16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", current)
    assert not runtime.native_bf16(torch.device("cuda")) and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # an older PyTorch: no such argument
    assert runtime.native_bf16(torch.device("cuda"))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_cpu_run_computes_in_its_precision_and_records_it(tmp_path, precision, dtype):
    data = make_folder(tmp_path / "d", per_class=40)
    cfg = resolve_config("pool-bn", data=str(data), epochs=3, batch_size=16, out=str(tmp_path / "runs"),
                         device="cpu", precision=precision)
    seen = set()

    def first_conv(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            seen.add((module.training, output.dtype))
    hook = nn.modules.module.register_module_forward_hook(first_conv)  # PyTorch's hook on every module
    try:
        run = train(cfg, log=lambda line: None)
    finally:
        hook.remove()
    assert seen == {(True, dtype), (False, dtype)}  # training steps and scoring alike
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == precision
    assert config["environment"]["compute_dtype"] == str(dtype).removeprefix("torch.")
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.8
    assert read_history(run / "history.csv")[-1]["loss"] < read_history(run / "history.csv")[0]["loss"]


def test_early_stopping_state_round_trips_through_a_checkpoint(tmp_path):
    values = [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.77]
    whole, _, _ = scripted(values, patience=3)
    first = EarlyStopping("val_loss", patience=3)
    for epoch, value in enumerate(values[:4], start=1):
        first.update(epoch, {"val_loss": value})
    torch.save(first.state_dict(), tmp_path / "stopper.pt")
    second = EarlyStopping("val_loss", patience=3)
    second.load_state_dict(torch.load(tmp_path / "stopper.pt", weights_only=True))
    stopped = next((e for e, v in enumerate(values[4:], start=5) if second.update(e, {"val_loss": v})), None)
    assert (stopped, second.best_epoch, second.best, second.wait) == (whole, 5, 0.7, 3) == (8, 5, 0.7, 3)


def test_resume_rebuilds_the_model_the_run_recorded_not_todays_preset(tiny_folder, tmp_path, monkeypatch):
    from cnnlab import presets
    from cnnlab.errors import RunInterrupted
    from cnnlab.train import resume
    reference = train(tiny_config(tiny_folder, tmp_path / "runs", name="reference"), log=lambda m: None)

    def stop_after_epoch_2(line):
        if line.startswith("epoch   2/4"):
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(RunInterrupted):
        train(tiny_config(tiny_folder, tmp_path / "runs", name="stopped"), log=stop_after_epoch_2)
    run = tmp_path / "runs" / "stopped"
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()
    monkeypatch.setitem(presets.PRESETS, "pool-bn", presets.PRESETS["conv"])  # the preset changed since
    resume(run, log=lambda m: None)
    w0, w1 = (torch.load(r / "model.pt", weights_only=True) for r in (reference, run))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
