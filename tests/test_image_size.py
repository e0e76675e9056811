"""Any image size, any architecture (issue 43, point 4): `train --image-size` with a CIFAR preset (its
dense layer sized for the image, or a global-pooling head) and `train --model resnet18` (a torchvision
architecture from scratch) run with the photo augmentations, resume bit for bit on a CPU after a signal,
and export, evaluate and predict from what config.json recorded; bad names and sizes are one line."""
import json
import os
import signal
import sys
import types

import pytest
import torch
from conftest import assert_one_line_error, cnnlab_here, make_folder, same_run

from cnnlab import architectures
from cnnlab.config import TrainConfig, from_record
from cnnlab.errors import RunInterrupted
from cnnlab.presets import (
    build_network,
    count_parameters,
    model_spec,
    preset_layers,
    resolve_config,
)
from cnnlab.train import train

RUNS = {  # a small run at 64 px: a preset adapting, and an architecture with every augmentation
    "pool-bn": {"image_size": 64, "augment": "crop"},
    "resnet18": {"image_size": 64, "augment": "crop,trivial", "mixup": 0.2, "cutmix": 1.0},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("sizes") / "photos", classes=3, per_class=8, size=48)


@pytest.fixture
def threads():
    """train sets this process's threads (to the run's one): the next test's are its own again."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def stop_after_epoch_1(line):
    if line.startswith("epoch   1/3"):  # SIGINT, as Ctrl-C: the run stops at the end of a batch of epoch 2
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("which", list(RUNS))
def test_a_run_at_64_px_stopped_by_a_signal_resumes_to_the_same_weights_and_exports(which, data, tmp_path, capsys,
                                                                                    threads):
    # on the CPU, one thread: resumed runs are promised bit-for-bit equal there
    settings = dict(RUNS[which], data=str(data), epochs=3, batch_size=6, threads=1, device="cpu", tensorboard=False,
                    out=str(tmp_path))
    reference = train(resolve_config(which, name="ref", **settings), log=lambda m: None)
    with pytest.raises(RunInterrupted):
        train(resolve_config(which, name="run", **settings), log=stop_after_epoch_1)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists()
    resumed = cnnlab_here(capsys, "resume", run)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    same_run(reference, run)

    config = json.loads((run / "config.json").read_text())
    assert config["input_shape"] == [3, 64, 64] and config["image_size"] == 64
    assert config["preprocessing"]["size"] == 64
    if which == "resnet18":
        assert config["architecture"] == "torchvision:resnet18" and config["augment"] == "crop,trivial"
    else:  # the dense layer sized for 64 px: two poolings leave 16 x 16 x 64
        assert config["layers"][8] == "flatten" and config["parameters"] == 896 + 64 + 18496 + 128 + (
            16 * 16 * 64 * 128 + 128) + (128 * 3 + 3)
    exported = cnnlab_here(capsys, "export", run)  # checked against PyTorch on the run's own test images
    assert exported.returncode == 0 and "top-1 agreement 100.00%" in exported.stdout, exported.stderr


def test_presets_adapt_their_head_to_the_image_size():
    flat32, flat64 = (count_parameters(build_network(preset_layers("pool-bn"), 10, (3, s, s))) for s in (32, 64))
    assert flat64 - flat32 == (16 * 16 - 8 * 8) * 64 * 128  # the dense layer sized for the image
    gap = resolve_config("pool-bn", data="d", image_size=96, head="gap")
    assert model_spec(gap)["layers"][8] == "gap"
    assert count_parameters(build_network(model_spec(gap), 10, (3, 96, 96))) == 896 + 64 + 18496 + 128 + (
        64 * 128 + 128) + (128 * 10 + 10)
    speedrun = resolve_config("speedrun", data="d", image_size=64)  # the airbench nets say gap: the same head at any size
    assert speedrun.head == "gap" and speedrun.preprocessing.size == 64 and speedrun.preprocessing.mean[0] == 0.4914
    nets = [build_network(model_spec(speedrun), 10, (3, s, s)).eval() for s in (32, 64)]
    assert count_parameters(nets[0]) == count_parameters(nets[1])
    assert nets[1](torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_an_architecture_takes_its_own_defaults_and_records_how_to_rebuild_it():
    cfg = resolve_config("resnet18", data="d")
    assert cfg.image_size == architectures.DEFAULT_SIZE == cfg.preprocessing.size and cfg.augment == "crop"
    assert model_spec(cfg) == {"architecture": "torchvision:resnet18"}
    assert resolve_config("resnet18", data="d", image_size=48, augment=False).preprocessing.size == 48
    net = build_network(model_spec(cfg), 5, (3, 48, 48))
    assert net(torch.zeros(2, 3, 48, 48)).shape == (2, 5)


def test_a_run_recorded_before_these_settings_still_loads():
    record = {k: v for k, v in vars(TrainConfig(preset="pool-bn", data="d", augment=True)).items()
              if k not in ("crop_scale", "mixup", "cutmix", "image_size", "head")}
    record["preprocessing"] = vars(record["preprocessing"])
    cfg = from_record(TrainConfig, record)
    assert cfg.augment is True and cfg.mixup == 0 and cfg.head == "flatten" and cfg.image_size is None


def test_timm_models_are_built_when_timm_is_installed(monkeypatch):
    made = []
    fake = types.ModuleType("timm")
    fake.list_models = lambda: ["tiny_net"]

    def create_model(name, pretrained, num_classes):
        made.append((name, pretrained, num_classes))
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, num_classes))
    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    assert architectures.find("tiny_net") == architectures.find("timm:tiny_net") == "timm:tiny_net"
    assert architectures.find("timm:resnet18") is None and architectures.find("torchvision:resnet18")
    net = architectures.build("timm:tiny_net", 7, 32)
    assert made == [("tiny_net", False, 7)] and net(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("args, fragment", [
    (["--model", "resnet1"], "unknown model 'resnet1': not a preset (`cnnlab presets` lists them) nor a torchvision"),
    (["--model", "squeezenet1_1", "--image-size", "8"], "squeezenet1_1 cannot take 8x8 images"),
    (["--model", "resnet18", "--head", "gap"], "--head shapes a preset's head"),
    (["--model", "pool-bn", "--augment", "crop,shift"], "exclude each other"),
    (["--model", "pool-bn", "--augment", "warp"], "unknown --augment 'warp'"),
    (["--model", "pool-bn", "--image-size", "2000"], "--image-size must be below 1025"),
    (["--model", "pool-bn", "--crop-scale", "1.5"], "--crop-scale must be above 0 and at most 1"),
])
def test_bad_models_sizes_and_augmentations_are_one_line(capsys, tmp_path, args, fragment):
    data = make_folder(tmp_path / "d", classes=2, per_class=10)
    result = cnnlab_here(capsys, "train", *args, "--data", data, "--out", tmp_path / "runs")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()
