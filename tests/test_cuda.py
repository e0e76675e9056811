"""The CUDA path: bfloat16 autocast, no host-device syncs inside the training loop, runs that load
on the CPU. Skipped (visibly) on machines without a CUDA device, CI's among them."""
import json
import traceback
import warnings

import pytest
import torch

from torch import nn

from cnnlab import evaluate as evaluate_module
from cnnlab.config import TrainConfig
from cnnlab.early_stopping import EarlyStopping
from cnnlab.data import load_splits
from cnnlab.evaluate import evaluate_run
from cnnlab.layers import Dropout
from cnnlab.preprocessing import CIFAR10
from cnnlab.presets import PRESETS, build_model
from cnnlab.runtime import compute_dtype, pick_device, to_device
from cnnlab.step import TrainStep, graph_ready
from cnnlab.optimizer import make_optimizer
from cnnlab.run_state import RunContext, RunState, Schedule
from cnnlab.train import fit_model, train, train_one_epoch
from conftest import make_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CUDA = torch.device("cuda")


def test_preprocess_on_cuda_equals_the_cpu_result():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(CIFAR10(images, CUDA).cpu(), CIFAR10(images), atol=1e-6)
    assert to_device(torch.arange(3), CUDA).device.type == "cuda"


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_keeps_one_minus_p_on_cuda(p):
    layer = Dropout(p).train()
    x = torch.ones(64, 32, 16, 16, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def _count_syncs(run) -> list[str]:
    """Where each host-device sync made while ``run()`` runs was made (Python stacks)."""
    torch.cuda.synchronize()
    where = []

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message):
            where.append("".join(traceback.format_stack(limit=5)[:-1]))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return where


def _setup(tmp_path, preset="dropout", **settings):
    splits = load_splits(make_folder(tmp_path / "d", per_class=60), 32, 0.1, 0.1, 0)
    cfg = TrainConfig(preset=preset, data="-", batch_size=8, augment=True, **settings)
    model = build_model(PRESETS[preset].layers, 3).to(CUDA, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, compute_dtype(cfg.precision, CUDA))
    run = RunState(model, opt, Schedule(opt, "none", 1), EarlyStopping(), torch.Generator().manual_seed(0))
    return splits, cfg, model, opt, run


def test_an_eager_training_step_makes_no_host_device_sync(tmp_path):
    """A sync a step would stop the host from queuing kernels ahead of the GPU: the count of
    syncs in an epoch must not grow with its number of steps."""
    splits, cfg, model, opt, run = _setup(tmp_path, cuda_graph=False)

    def syncs(images: int) -> list[str]:
        data = splits.train.subset(torch.arange(images)).to(CUDA)
        return _count_syncs(lambda: train_one_epoch(TrainStep(model, opt, data, cfg, CUDA), run, data, cfg, 1,
                                                    RunContext(CUDA)))

    syncs(16)  # warm-up: cuDNN's first calls
    few, many = syncs(16), syncs(128)
    assert len(many) == len(few) <= 3, f"{len(few)} syncs in 2 steps, {len(many)} in 16:\n" + "\n".join(many)


def test_a_graphed_epoch_replays_one_graph_without_syncs(tmp_path):
    splits, cfg, model, opt, run = _setup(tmp_path)
    graph_ready(opt, CUDA)
    data = splits.train.subset(torch.arange(128)).to(CUDA)
    step = TrainStep(model, opt, data, cfg, CUDA)
    train_one_epoch(step, run, data, cfg, 1, RunContext(CUDA))  # 3 warm-up steps, capture
    assert step.graph is not None
    graph = step.graph
    where = _count_syncs(lambda: train_one_epoch(step, run, data, cfg, 2, RunContext(CUDA)))
    assert step.graph is graph  # captured once, replayed from epoch to epoch
    assert len(where) <= 3, f"{len(where)} syncs in 16 replayed steps:\n" + "\n".join(where)


@pytest.mark.parametrize("optimizer", [{"optimizer": "sgd", "lr": 0.05, "nesterov": True},
                                       {"optimizer": "muon", "lr": 0.05, "momentum": 0.85}], ids=["sgd", "muon"])
def test_replayed_steps_train_as_eager_steps_do(tmp_path, optimizer):
    """The graph must read each step's batch, augmentation and learning rate afresh: after 9
    steps (3 eager, 6 replayed) the weights match eager training's to float rounding, with
    SGD's fused update and with Muon's orthogonalized one (speedrun's)."""
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        results = []
        for graphed in (True, False):
            splits = load_splits(make_folder(tmp_path / "d", per_class=60), 32, 0.1, 0.1, 0)
            cfg = TrainConfig(preset="pool-bn", data="-", batch_size=16, augment=True, schedule="onecycle",
                              label_smoothing=0.1, cuda_graph=graphed, **optimizer)
            torch.manual_seed(0)
            model = build_model(PRESETS["pool-bn"].layers, 3).to(CUDA, memory_format=torch.channels_last)
            opt = make_optimizer(model, cfg, compute_dtype(cfg.precision, CUDA))
            schedule = Schedule(opt, "linear", 20)  # 1 - step / 20
            graph_ready(opt, CUDA)  # the same fused update in both runs
            first_lrs = [float(group["lr"]) for group in opt.param_groups]
            data = splits.train.to(CUDA)  # 144 images: 9 steps of 16
            step = TrainStep(model, opt, data, cfg, CUDA)
            run = RunState(model, opt, schedule, EarlyStopping(), torch.Generator().manual_seed(1))
            logs = train_one_epoch(step, run, data, cfg, 1, RunContext(CUDA))
            assert (step.graph is not None) == graphed
            results.append((logs, {k: v.float().clone() for k, v in model.state_dict().items()}))
        (graph_logs, graph_weights), (eager_logs, eager_weights) = results
        assert graph_logs["loss"] == pytest.approx(eager_logs["loss"], rel=1e-3)
        for key, value in eager_weights.items():
            assert torch.allclose(graph_weights[key], value, rtol=1e-3, atol=1e-4), key
        assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([lr * (1 - 9 / 20) for lr in first_lrs])
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False


def test_a_graphed_runs_checkpoint_resumes_on_the_cpu(tmp_path):
    splits = load_splits(make_folder(tmp_path / "d", per_class=60), 32, 0.1, 0.1, 0)
    cfg = TrainConfig(preset="pool-bn", data="-", epochs=2, batch_size=16, optimizer="sgd", schedule="onecycle")
    torch.manual_seed(0)
    model = build_model(PRESETS["pool-bn"].layers, 3).to(CUDA, memory_format=torch.channels_last)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg.epochs = 1
    fit_model(model, splits, cfg, RunContext(CUDA, run_dir, log=lambda line: None, checkpoints=True))
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    cfg.epochs = 2
    history = fit_model(model.cpu(), splits, cfg, RunContext(torch.device("cpu"), log=lambda line: None), state).history
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"] * 1.5


def test_a_cuda_run_trains_in_bfloat16_and_loads_on_the_cpu(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", per_class=40)
    cfg = TrainConfig(preset="pool-bn", data=str(data), epochs=4, batch_size=16, out=str(tmp_path / "runs"),
                      device="cuda")
    dtypes = set()

    def first_conv(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.training:
            dtypes.add(output.dtype)
    hook = nn.modules.module.register_module_forward_hook(first_conv)
    try:
        run = train(cfg, log=lambda line: None)
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}  # the convolutions ran under autocast
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert "cpu" not in config["environment"]["device"].lower()
    assert metrics["test_accuracy"] > 0.8
    on_gpu = evaluate_run(run, data)
    real_load = evaluate_module.load_model
    monkeypatch.setattr(evaluate_module, "load_model", lambda run_dir: real_load(run_dir, torch.device("cpu")))
    on_cpu = evaluate_run(run, data)
    assert on_cpu["images"] == on_gpu["images"] == 120
    assert abs(on_gpu["accuracy"] - on_cpu["accuracy"]) <= 0.05  # bfloat16 on the GPU, float32 on the CPU


def test_pick_device_on_a_cuda_machine():
    assert pick_device().type == "cuda"
    assert torch.backends.cudnn.benchmark
    with pytest.raises(Exception, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


def test_a_step_that_cannot_be_captured_trains_op_by_op(tmp_path, monkeypatch):
    """An operation that cannot be captured (here a host-device sync) must not end the run:
    it says so once and trains op by op."""
    real_run = TrainStep.run

    def syncing_run(self, index, draws):
        if torch.cuda.is_current_stream_capturing():
            float(self.total_loss)  # a sync: not allowed while capturing
        real_run(self, index, draws)
    monkeypatch.setattr(TrainStep, "run", syncing_run)
    data = make_folder(tmp_path / "d", per_class=40)
    cfg = TrainConfig(preset="pool-bn", data=str(data), epochs=4, batch_size=16, out=str(tmp_path / "runs"),
                      device="cuda")
    lines = []
    run = train(cfg, log=lines.append)
    notes = [line for line in lines if "could not be captured as a CUDA graph" in line]
    assert len(notes) == 1 and "--no-cuda-graph" in notes[0], lines
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 4  # header and every epoch
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.8
