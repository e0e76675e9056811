"""Runs of several labels per image (``--multi-label``), end to end on tiny generated images: a labels
file of "red;blue" rows trains with binary cross-entropy, its metrics.json carries per-label scores
equal to scikit-learn's on the run's own test predictions, its thresholds are tuned, saved and used
by evaluate, predict and export, early stopping watches val_map, the report shows it, a transfer run
trains a sigmoid per label, and bad input is one line."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import load_multilabel_splits
from cnnlab.inference import predict_logits
from cnnlab.runs import read_history
from cnnlab.saved_model import load_model
from conftest import assert_one_line_error, cnnlab, cnnlab_here, make_folder

sklearn_metrics = pytest.importorskip("sklearn.metrics")

LABELS = ("red", "green", "blue")  # each a bar of its colour at its own place in the image


def make_multilabel(root: Path, images: int = 90, size: int = 32, labels=LABELS, seed: int = 0) -> Path:
    """``root/img_i.png`` on a grey noise, a coloured bar for each of its labels, and
    ``root/labels.csv`` naming them ("red;blue"); every image has at least one label."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,label"]
    for i in range(images):
        have = [name for name in labels if rng.random() < 0.45] or [labels[i % len(labels)]]
        img = rng.normal(128, 20, (size, size, 3))
        for j, name in enumerate(labels):
            if name in have:
                img[:, j * size // 3:j * size // 3 + 4] = 0
                img[:, j * size // 3:j * size // 3 + 4, LABELS.index(name)] = 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"img_{i:03d}.png")
        rows.append(f"img_{i:03d}.png,{';'.join(have)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


RUN_ARGS = ("train", "--model", "pool-bn", "--multi-label", "--epochs", "6", "--batch-size", "16", "--monitor",
            "val_map", "--patience", "1", "--val-split", "0.2", "--test-split", "0.25", "--threads", "1",
            "--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished multi-label pool-bn run (its data, labels file and cache beside it), shared by
    the tests that only read it."""
    root = tmp_path_factory.mktemp("multilabel")
    data = make_multilabel(root / "data")
    env = {**os.environ, "CNNLAB_CACHE": str(root / "cache")}
    done = cnnlab(*RUN_ARGS, "--data", data, "--labels", data / "labels.csv", "--out", root / "runs", "--name", "ml",
                  env=env)
    assert done.returncode == 0, done.stderr
    return {"dir": root / "runs" / "ml", "data": data, "labels": data / "labels.csv", "env": env, "out": done.stdout,
            "cache": root / "cache"}


@pytest.fixture
def here(run, capsys, monkeypatch):
    """``cnnlab ARGS`` run in this process (no interpreter to start), with the run's cache."""
    monkeypatch.setenv("CNNLAB_CACHE", str(run["cache"]))
    return lambda *args: cnnlab_here(capsys, *args)


def _test_probabilities(run_dir: Path, data: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split drawn again, and its model's probabilities on it (one thread: as it ran)."""
    model, config, preprocessing = load_model(run_dir, torch.device("cpu"))
    splits = load_multilabel_splits(str(data), str(labels), preprocessing.size, config["val_split"],
                                    config["test_split"], config["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logits = predict_logits(model, splits.test.images, preprocessing, torch.device("cpu"), tta=config["tta"],
                                precision=config["precision"])
    finally:
        torch.set_num_threads(threads)
    return torch.sigmoid(logits).numpy(), splits.test.labels.numpy().astype(int)


def test_metrics_json_per_label_f1_and_ap_and_map_equal_scikit_learns_on_the_runs_test_predictions(run):
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    config = json.loads((run["dir"] / "config.json").read_text())
    names = config["class_names"]
    assert names == sorted(LABELS) and config["multi_label"] is True and metrics["multi_label"] is True
    probs, truth = _test_probabilities(run["dir"], run["data"], run["labels"])
    assert len(truth) == metrics["test_size"] and (truth.sum(0) > 0).all()  # every label has test images
    cut = np.array([metrics["thresholds"][n] for n in names])
    predicted = (probs >= cut).astype(int)
    for j, name in enumerate(names):
        ours = metrics["per_label"][name]
        assert ours["f1"] == pytest.approx(sklearn_metrics.f1_score(truth[:, j], predicted[:, j], zero_division=0))
        assert ours["precision"] == pytest.approx(sklearn_metrics.precision_score(truth[:, j], predicted[:, j],
                                                                                  zero_division=0))
        assert ours["recall"] == pytest.approx(sklearn_metrics.recall_score(truth[:, j], predicted[:, j]))
        assert ours["average_precision"] == pytest.approx(sklearn_metrics.average_precision_score(truth[:, j],
                                                                                                  probs[:, j]))
        assert ours["support"] == truth[:, j].sum() and ours["threshold"] == metrics["thresholds"][name]
    assert metrics["test_map"] == pytest.approx(sklearn_metrics.average_precision_score(truth, probs, average="macro"))
    assert metrics["test_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="macro",
                                                                        zero_division=0))
    assert metrics["test_micro_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="micro"))
    assert metrics["test_accuracy"] == metrics["test_subset_accuracy"] == pytest.approx(
        sklearn_metrics.accuracy_score(truth, predicted))
    assert metrics["test_loss"] == pytest.approx(sklearn_metrics.log_loss(truth.ravel(), probs.ravel()), rel=1e-4)
    at_half = (probs >= 0.5).astype(int)
    assert metrics["test_at_threshold"]["f1"] == pytest.approx(sklearn_metrics.f1_score(
        truth, at_half, average="macro", zero_division=0))


def test_the_saved_test_predictions_give_metrics_json_exactly(run):
    """test_predictions.csv holds the very probabilities metrics.json was computed from."""
    import csv
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    with open(run["dir"] / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted(LABELS)
    probs = np.array([[float(r[n]) for n in names] for r in rows])
    truth = np.array([[int(n in r["labels"].split(";")) for n in names] for r in rows])
    predicted = (probs >= np.array([metrics["thresholds"][n] for n in names])).astype(int)
    assert [r["predicted"] for r in rows] == [";".join(n for n, p in zip(names, row) if p) for row in predicted]
    assert len(rows) == metrics["test_size"] and all(r["image"].startswith("img_") for r in rows)
    for j, name in enumerate(names):
        assert metrics["per_label"][name]["f1"] == sklearn_metrics.f1_score(truth[:, j], predicted[:, j])
        assert metrics["per_label"][name]["average_precision"] == pytest.approx(
            sklearn_metrics.average_precision_score(truth[:, j], probs[:, j]), abs=1e-15)
    assert metrics["test_map"] == pytest.approx(sklearn_metrics.average_precision_score(truth, probs), abs=1e-15)


def test_a_multi_label_run_has_its_files_and_no_confusion_matrix(run):
    run_dir = run["dir"]
    for name in ("config.json", "history.csv", "metrics.json", "model.pt", "loss.png", "accuracy.png", "samples.png",
                 "mistakes.png", "test_predictions.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "confusion_matrix.csv").exists() and not (run_dir / "confusion_matrix.png").exists()
    header = (run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert {"val_map", "val_f1", "val_micro_f1", "val_accuracy", "val_loss"} <= set(header)
    assert "val_balanced_accuracy" not in header
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "confusion_matrix" not in metrics and "per_class" not in metrics and metrics["thresholds_tuned"] is True
    assert all(0 < t < 1 for t in metrics["thresholds"].values()) and metrics["threshold"] == 0.5
    assert "test mAP" in run["out"] and "val_map" in run["out"]


def test_early_stopping_watches_val_map_going_up(run):
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    maps = [row["val_map"] for row in read_history(run["dir"] / "history.csv")]
    assert metrics["monitor"] == "val_map" and metrics["best_value"] == pytest.approx(max(maps))
    assert metrics["best_epoch"] == maps.index(max(maps)) + 1 and metrics["best_val_map"] == pytest.approx(max(maps))
    assert metrics["stopped_early"] and metrics["epochs_run"] == metrics["best_epoch"] + 1 < 6  # --patience 1


def test_evaluate_scores_with_the_runs_thresholds_or_the_one_given(run, here):
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    done = here("evaluate", run["dir"], "--data", run["data"], "--labels", run["labels"], "--multi-label", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["images"] == 90 and 0 <= result["map"] <= 1
    assert {n: v["threshold"] for n, v in result["per_label"].items()} == pytest.approx(metrics["thresholds"])
    fixed = json.loads(here("evaluate", run["dir"], "--data", run["data"], "--labels", run["labels"], "--threshold",
                            "0.3", "--json").stdout)
    assert all(v["threshold"] == 0.3 for v in fixed["per_label"].values()) and fixed["map"] == result["map"]
    text = here("evaluate", run["dir"], "--data", run["data"], "--labels", run["labels"]).stdout
    assert "mAP" in text and all(name in text for name in LABELS)


def test_predict_and_its_onnx_export_print_every_label_above_its_threshold(run, here, tmp_path):
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    images = [run["data"] / f"img_{i:03d}.png" for i in range(6)]
    by_run = here("predict", *images, "--model", run["dir"], "--json")
    assert by_run.returncode == 0, by_run.stderr
    model, config, preprocessing = load_model(run["dir"], torch.device("cpu"))
    from cnnlab.images import image_batches
    batch, _ = next(iter(image_batches(images, preprocessing.size)))
    probs = torch.sigmoid(predict_logits(model, batch, preprocessing, torch.device("cpu"), precision="fp32"))
    for result, row in zip(json.loads(by_run.stdout)["predictions"], probs):
        expected = [n for j, n in enumerate(config["class_names"]) if row[j] >= metrics["thresholds"][n]]
        assert sorted(t["class"] for t in result["labels"]) == expected
    onnx = tmp_path / "ml.onnx"
    exported = here("export", run["dir"], "-o", onnx)
    assert exported.returncode == 0, exported.stderr
    import onnx as onnx_package
    meta = {p.key: p.value for p in onnx_package.load(str(onnx)).metadata_props}
    assert meta["multi_label"] == "true" and json.loads(meta["thresholds"]) == pytest.approx(
        [metrics["thresholds"][n] for n in config["class_names"]])
    from cnnlab.saved_model import OnnxModel
    assert np.allclose(OnnxModel(onnx).probabilities(batch), probs.numpy(), atol=1e-5)  # sigmoids, not a softmax
    by_file = here("predict", *images, "--model", onnx, "--json")
    assert [[t["class"] for t in r["labels"]] for r in json.loads(by_file.stdout)["predictions"]] == \
        [[t["class"] for t in r["labels"]] for r in json.loads(by_run.stdout)["predictions"]]
    lines = here("predict", *images[:2], "--model", onnx).stdout.splitlines()
    assert len(lines) == 2 and all("%" in line or "no label above" in line for line in lines)


def test_an_int8_export_is_checked_by_map_and_predicts_labels_above_their_thresholds(run, here, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    int8 = tmp_path / "ml-int8.onnx"
    exported = here("export", run["dir"], "--int8", "--max-drop", "100", "-o", int8)
    assert exported.returncode == 0, exported.stderr
    line = next(x for x in exported.stdout.splitlines() if x.startswith("on the run's"))
    assert "float32 mAP" in line and "label agreement" in line, line
    import onnx as onnx_package
    meta = {p.key: p.value for p in onnx_package.load(str(int8)).metadata_props}
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert meta["multi_label"] == "true" and json.loads(meta["thresholds"]) == pytest.approx(
        [metrics["thresholds"][n] for n in json.loads(meta["class_names"])])
    images = [run["data"] / f"img_{i:03d}.png" for i in range(4)]
    by_file = here("predict", *images, "--model", int8, "--json")
    assert by_file.returncode == 0, by_file.stderr
    assert len(json.loads(by_file.stdout)["predictions"]) == 4


def test_int8_comparison_of_several_labels_is_scikit_learns_map_and_agreement():
    from cnnlab.quantize import compare
    rng = np.random.default_rng(3)
    truth = rng.random((40, 4)) < 0.4
    truth[:, 3] = False  # a rare label: one positive image
    truth[0, 3] = True
    a = np.clip(truth * 0.6 + rng.random((40, 4)) * 0.5, 0, 1)
    b = np.clip(a + rng.normal(0, 0.08, a.shape), 0, 1)
    b[:5] = a[:5]  # ties between the files
    cut = [0.5, 0.3, 0.7, 0.5]
    scores = compare(a, b, torch.tensor(truth, dtype=torch.float32), cut)
    sk = [sklearn_metrics.average_precision_score(truth, p, average="macro") for p in (a, b)]
    assert scores["measure"] == "mAP" and scores["float_score"] == pytest.approx(sk[0], abs=1e-12)
    assert scores["int8_score"] == pytest.approx(sk[1], abs=1e-12)
    assert scores["drop_points"] == pytest.approx(100 * (sk[0] - sk[1]), abs=1e-9)
    assert scores["agreement"] == pytest.approx(((a >= cut) == (b >= cut)).mean())


def test_the_report_shows_map_and_the_per_label_table(run, here, tmp_path):
    done = here("report", run["dir"], "-o", tmp_path / "report.html")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report.html").read_text()
    assert "per label (test)" in page and "mAP (several labels per image)" in page and "macro F1" in page
    assert "confusion matrix (test)" not in page


def test_resume_checks_the_labels_it_started_with(run, tmp_path, capsys):
    copy = tmp_path / "ml"
    shutil.copytree(run["dir"], copy)
    (copy / "metrics.json").unlink()  # unfinished again: a resume starts it over on exactly its split
    changed = tmp_path / "labels.csv"
    text = run["labels"].read_text().splitlines()
    first = text[1].split(",")
    text[1] = f"{first[0]},{'red' if first[1] != 'red' else 'green'}"
    changed.write_text("\n".join(text) + "\n")
    refused = cnnlab_here(capsys, "train", "--resume", copy, "--labels", changed)
    assert_one_line_error(refused, "the data changed since")
    resumed = cnnlab("resume", copy, env=run["env"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((copy / "metrics.json").read_text())["multi_label"] is True


def test_a_transfer_run_trains_a_sigmoid_per_label_even_for_two(tmp_path):
    import cnnlab as api
    data = make_multilabel(tmp_path / "two", images=40, labels=("red", "green"))
    threads = torch.get_num_threads()
    try:  # the Python call takes the command line's options: --multi-label is multi_label=True
        run = api.transfer(data, model="efficientnet_lite0", labels=data / "labels.csv", multi_label=True,
                           image_size=32, epochs=2, val_split=0.25, test_split=0.25, threads=1, out=tmp_path / "runs", name="t",
                           log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    head = torch.load(run.dir / "model.pt", weights_only=True)["head.linear.weight"]
    assert head.shape[0] == 2  # one sigmoid per label, where one class per image would take one unit for two
    assert set(run.metrics["per_label"]) == {"green", "red"} and run.metrics["feature_cache"] == "written"
    assert run.config["multi_label"] is True and "labels" in run.predict([data / "img_000.png"])[0]


def _labels_file(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(["image,label", *rows]) + "\n")
    return path


def test_bad_input_is_one_line(run, tmp_path, capsys):
    folder = make_folder(tmp_path / "folder", classes=2, per_class=4)
    assert_one_line_error(cnnlab_here(capsys, "train", "--model", "pool-bn", "--data", folder, "--multi-label"),
                          "pass --labels FILE")
    assert_one_line_error(cnnlab_here(capsys, "transfer", "--data", folder, "--multi-label"), "pass --labels FILE")
    empty = _labels_file(tmp_path / "empty.csv", ["img_000.png,red", "img_001.png, ; "])
    assert_one_line_error(cnnlab_here(capsys, "train", "--model", "pool-bn", "--data", run["data"], "--labels", empty,
                                      "--multi-label"), "empty.csv:3: label")
    unknown = _labels_file(tmp_path / "unknown.csv", ["img_000.png,red", "img_001.png,red;purple"])
    assert_one_line_error(cnnlab_here(capsys, "evaluate", run["dir"], "--data", run["data"], "--labels", unknown),
                          "unknown.csv:3: label purple is not one of the run's classes")
    assert_one_line_error(cnnlab_here(capsys, "evaluate", run["dir"], "--data", run["data"]), "pass --labels FILE")
    assert_one_line_error(cnnlab_here(capsys, "train", "--model", "pool-bn", "--data", folder, "--monitor", "val_map"),
                          "add --multi-label")
    assert_one_line_error(cnnlab_here(capsys, "train", "--model", "pool-bn", "--data", run["data"], "--labels",
                                      run["labels"], "--multi-label", "--class-weights", "balanced"),
                          "--class-weights balanced")
    assert cnnlab_here(capsys, "train", "--model", "pool-bn", "--data", folder, "--threshold", "1").returncode == 2
