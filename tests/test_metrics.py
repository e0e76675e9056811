import warnings

import numpy as np
import pytest
import torch

from cnnlab.metrics import confusion_matrix, precision_recall_f1, summarize


def test_confusion_matrix_counts_true_rows_predicted_columns():
    y_true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]


def test_precision_recall_f1_match_hand_computed_values():
    cm = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 1, 2]])
    prf = precision_recall_f1(cm)
    # class 0: tp 2, predicted 3, actual 3; class 1: tp 2, predicted 4, actual 2; class 2: tp 2, predicted 2, actual 4
    assert torch.allclose(prf["precision"], torch.tensor([2 / 3, 2 / 4, 2 / 2], dtype=torch.double))
    assert torch.allclose(prf["recall"], torch.tensor([2 / 3, 2 / 2, 2 / 4], dtype=torch.double))
    f1_1 = 2 * 0.5 * 1.0 / 1.5
    assert torch.allclose(prf["f1"], torch.tensor([2 / 3, f1_1, f1_1], dtype=torch.double))
    assert prf["support"].tolist() == [3, 2, 4]


def test_undefined_ratios_are_zero_not_nan():
    cm = torch.tensor([[3, 0], [2, 0]])  # class 1 never predicted
    prf = precision_recall_f1(cm)
    assert prf["precision"][1] == 0 and prf["recall"][1] == 0 and prf["f1"][1] == 0


def test_summarize_gives_accuracy_macro_averages_and_per_class():
    cm = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 1, 2]])
    s = summarize(cm, ["a", "b", "c"])
    assert s["accuracy"] == 6 / 9
    assert abs(s["precision"] - (2 / 3 + 0.5 + 1) / 3) < 1e-12
    assert s["per_class"]["c"]["recall"] == 0.5 and s["per_class"]["c"]["support"] == 4
    assert s["confusion_matrix"] == cm.tolist()


# ---------------------------------------------------------------- against scikit-learn
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _reference(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict:
    """scikit-learn's scores of the same predictions, every class of ``range(k)`` counted."""
    labels = list(range(k))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true", "a single label": as meant
        warnings.simplefilter("ignore")
        p, r, f, s = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        macro = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro",
                                                                 zero_division=0)
        return {"precision": p, "recall": r, "f1": f, "support": s, "macro": macro[:3],
                "balanced": sklearn_metrics.balanced_accuracy_score(y_true, y_pred),
                "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
                "cm": sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels)}


def _adversarial_cases():
    rng = np.random.default_rng(0)
    cases = {
        "random, 10 classes": (rng.integers(0, 10, 500), rng.integers(0, 10, 500), 10),
        "P + R < 1 (the automobile case: P 0.5652, R 0.26)": (
            np.array([1] * 50 + [0] * 10 + [2] * 40), np.array([1] * 13 + [0] * 37 + [1] * 10 + [2] * 40), 3),
        "a class never predicted": (rng.integers(0, 4, 200), rng.integers(0, 3, 200), 4),
        "a class absent from the truth": (rng.integers(0, 3, 200), rng.integers(0, 4, 200), 4),
        "a class absent and never predicted": (rng.integers(0, 3, 200), rng.integers(0, 3, 200), 5),
        "one class": (np.zeros(30, int), np.zeros(30, int), 1),
        "one true class, others predicted": (np.zeros(30, int), rng.integers(0, 3, 30), 3),
        "all wrong": (np.array([0, 1, 2] * 10), np.array([1, 2, 0] * 10), 3),
        "all right": (np.arange(6).repeat(5), np.arange(6).repeat(5), 6),
        "two classes, heavily imbalanced": (np.array([0] * 95 + [1] * 5), np.array([0] * 90 + [1] * 10), 2),
        "one image": (np.array([2]), np.array([0]), 3),
    }
    for _ in range(20):  # small and skewed: every zero-division path, again and again
        k = int(rng.integers(2, 7))
        n = int(rng.integers(1, 25))
        weights = rng.dirichlet(np.full(k, 0.3))
        cases[f"skewed {k} classes, {n} images, seed {_}"] = (rng.choice(k, n, p=weights), rng.choice(k, n, p=weights), k)
    return cases


CASES = _adversarial_cases()


@pytest.mark.parametrize("name", list(CASES))
def test_every_score_equals_scikit_learns(name):
    y_true, y_pred, k = CASES[name]
    ours = summarize(confusion_matrix(torch.from_numpy(y_true), torch.from_numpy(y_pred), k), [str(i) for i in range(k)])
    ref = _reference(y_true, y_pred, k)
    assert ours["confusion_matrix"] == ref["cm"].tolist()
    assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert ours["balanced_accuracy"] == pytest.approx(ref["balanced"], abs=1e-9)
    for i in range(k):
        row = ours["per_class"][str(i)]
        for key in ("precision", "recall", "f1"):
            assert row[key] == pytest.approx(ref[key][i], abs=1e-9), (key, i)
        assert row["support"] == ref["support"][i]
    for key, value in zip(("precision", "recall", "f1"), ref["macro"]):
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_f1_is_the_harmonic_mean_where_precision_plus_recall_is_below_one():
    y_true, y_pred, k = CASES["P + R < 1 (the automobile case: P 0.5652, R 0.26)"]
    row = summarize(confusion_matrix(torch.from_numpy(y_true), torch.from_numpy(y_pred), k), list("abc"))["per_class"]["b"]
    assert (round(row["precision"], 4), row["recall"]) == (0.5652, 0.26)
    assert row["f1"] == pytest.approx(2 * 13 / (23 + 50))  # 0.356, where 2PR alone gave 0.294
    assert row["f1"] == pytest.approx(2 * row["precision"] * row["recall"] / (row["precision"] + row["recall"]))


@pytest.mark.parametrize("outputs", [1, 4], ids=["single sigmoid unit", "softmax over 4"])
def test_scores_of_logits_equal_scikit_learns_on_the_same_predictions(outputs):
    from cnnlab.inference import score_logits
    generator = torch.Generator().manual_seed(outputs)
    logits = torch.randn(300, outputs, generator=generator) * 2
    classes = 2 if outputs == 1 else outputs
    labels = torch.randint(0, classes, (300,), generator=generator)
    ours = score_logits(logits, labels, [f"c{i}" for i in range(classes)])
    y_pred = (logits[:, 0] > 0).long().numpy() if outputs == 1 else logits.argmax(1).numpy()
    ref = _reference(labels.numpy(), y_pred, classes)
    assert ours["confusion_matrix"] == ref["cm"].tolist()
    assert (ours["accuracy"], ours["balanced_accuracy"]) == pytest.approx((ref["accuracy"], ref["balanced"]), abs=1e-9)
    assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx(list(ref["macro"]), abs=1e-9)
    probs = torch.sigmoid(logits[:, 0].double()) if outputs == 1 else logits.double().softmax(1)
    reference_loss = sklearn_metrics.log_loss(labels.numpy(), probs.double().numpy(), labels=list(range(classes)))
    assert ours["loss"] == pytest.approx(reference_loss, rel=1e-5)


def _mislabelled_folder(root):
    """The trained run's kind of images, each class folder holding 3 of its own images and 9 of
    the previous class's: most predictions are wrong, and every class's P + R < 1."""
    from conftest import make_folder
    source = make_folder(root / "source", per_class=12, seed=7)
    target = root / "mislabelled"
    for c in range(3):
        (target / f"class_{c}").mkdir(parents=True)
    for c in range(3):
        for i, image in enumerate(sorted((source / f"class_{c}").iterdir())):
            image.rename(target / f"class_{c if i < 3 else (c + 1) % 3}" / f"{c}_{image.name}")
    return target


def test_evaluate_prints_scikit_learns_scores_of_its_own_predictions(trained_run, tmp_path):
    import json

    from conftest import cnnlab
    folder = _mislabelled_folder(tmp_path)
    done = cnnlab("evaluate", trained_run.dir, "--data", folder, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    cm = np.array(result["confusion_matrix"])
    assert cm.sum() == 36 and 0 < np.trace(cm) < 36, cm  # some right, most wrong
    y_true = np.repeat(np.arange(3), cm.sum(1))  # the predictions, rebuilt image by image from the counts
    y_pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
    ref = _reference(y_true, y_pred, 3)
    assert [result["precision"], result["recall"], result["f1"]] == pytest.approx(list(ref["macro"]), abs=1e-6)
    assert result["balanced_accuracy"] == pytest.approx(ref["balanced"], abs=1e-6)
    for i, name in enumerate(["class_0", "class_1", "class_2"]):
        row = result["per_class"][name]
        assert [row["precision"], row["recall"], row["f1"]] == pytest.approx(
            [ref["precision"][i], ref["recall"][i], ref["f1"][i]], abs=1e-6), name


def test_the_report_rescores_a_metrics_json_from_before_the_f1_fix_and_says_so(trained_run, tmp_path):
    import json
    import shutil

    from conftest import cnnlab
    run = shutil.copytree(trained_run.dir, tmp_path / "old-run")
    metrics = json.loads((run / "metrics.json").read_text())
    cm = [[5, 3, 2], [4, 1, 5], [0, 6, 4]]  # every class's P + R < 1
    old = {name: {"precision": 0.5, "recall": 0.25, "f1": 0.25, "support": 10} for name in ("class_0", "class_1",
                                                                                           "class_2")}
    metrics.update(confusion_matrix=cm, per_class=old, test_f1=0.25)
    del metrics["metrics_version"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    done = cnnlab("report", run, "-o", tmp_path / "report.html")
    assert done.returncode == 0, done.stderr
    assert sum("before cnnlab's F1 fix" in line for line in done.stdout.splitlines()) == 1
    page = (tmp_path / "report.html").read_text()
    y_true = np.repeat(np.arange(3), np.array(cm).sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
    ref = _reference(y_true, y_pred, 3)
    for i in range(3):  # the per-class table shows scikit-learn's F1, not the stored one
        assert f"<td>{ref['f1'][i]:.3f}</td>" in page
    assert "<td>0.250</td>" not in page and "before cnnlab&#x27;s F1 fix" in page
    current = cnnlab("report", trained_run.dir, "-o", tmp_path / "current.html")
    assert current.returncode == 0 and "F1 fix" not in current.stdout
