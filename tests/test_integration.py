"""End to end on the real CIFAR-10 images in ../shared/data (skipped, visibly, when absent)."""
import json
import os

import pytest

from cnnlab.runs import read_history
from conftest import SHARED_DATA, cnnlab

CIFAR = SHARED_DATA / "cifar10" / "train"
pytestmark = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 images not found at {CIFAR}")


@pytest.fixture
def cifar_subset(tmp_path):
    """100 real images per class, linked (not copied) into a temporary folder."""
    root = tmp_path / "cifar-subset"
    for class_dir in sorted(CIFAR.iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:100]:
            os.symlink(image, root / class_dir.name / image.name)
    return root


def test_pool_bn_on_real_cifar_subset_end_to_end(cifar_subset, tmp_path):
    result = cnnlab("train", "--preset", "pool-bn", "--data", cifar_subset, "--epochs", "3", "--out",
                    tmp_path / "runs", "--seed", "1")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "pool-bn"
    assert result.stdout.strip().splitlines()[-1] == str(run)
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["class_names"][:2] == ["airplane", "automobile"] and config["layers"][0] == "conv32"
    assert config["data_info"]["train_size"] == 800 and config["data_info"]["test_size"] == 100
    assert len(read_history(run / "history.csv")) == 3 == metrics["epochs_run"]
    assert metrics["test_accuracy"] > 0.15  # well above chance (0.10) after 3 short epochs
    assert len(metrics["confusion_matrix"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 100
    assert set(metrics["per_class"]) == set(config["class_names"])
    for name in ("loss.png", "accuracy.png", "confusion_matrix.png", "model.pt", "confusion_matrix.csv"):
        assert (run / name).stat().st_size > 1000 or name == "confusion_matrix.csv"
    scored = json.loads(cnnlab("evaluate", run, "--data", cifar_subset, "--json").stdout)
    cm = scored["confusion_matrix"]
    assert scored["images"] == 1000 == sum(map(sum, cm))
    assert scored["accuracy"] == sum(cm[i][i] for i in range(10)) / 1000 > 0.15  # above chance on every image
