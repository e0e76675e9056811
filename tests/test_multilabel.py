"""Multi-label scores (multilabel.py) equal scikit-learn's on random and adversarial cases: labels
never present, never predicted, present everywhere, tied probabilities, one image, all wrong."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_recall_fscore_support

from cnnlab.multilabel import average_precision, best_thresholds, multilabel_loss, multilabel_scores


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for n, labels in [(50, 4), (7, 3), (200, 6), (1, 3), (30, 5)]:
        truth = (rng.random((n, labels)) < 0.3).astype(int)
        probs = np.clip(truth * 0.3 + rng.random((n, labels)) * 0.7, 0, 1)
        cases.append((probs, truth))
    truth = (rng.random((40, 4)) < 0.4).astype(int)
    truth[:, 0] = 0  # a label no image has
    truth[:, 1] = 1  # a label every image has
    probs = rng.random((40, 4))
    probs[:, 2] = 0.01  # a label never predicted
    cases.append((probs, truth))
    probs = np.round(rng.random((60, 3)), 1)  # many tied probabilities
    cases.append((probs, (rng.random((60, 3)) < 0.5).astype(int)))
    truth = (rng.random((20, 3)) < 0.5).astype(int)
    cases.append((1.0 - truth * 0.9, truth))  # all wrong, confidently
    return cases


@pytest.mark.parametrize("case", range(len(_cases())))
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_every_score_equals_scikit_learns(case, threshold):
    probs, truth = _cases()[case]
    names = [f"l{j}" for j in range(truth.shape[1])]
    got = multilabel_scores(torch.tensor(probs), torch.tensor(truth), names, threshold)
    predicted = (probs >= threshold).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
        micro = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
        ap = average_precision_score(truth, probs, average=None)
        micro_ap = average_precision_score(truth, probs, average="micro")
    ap = np.nan_to_num(np.atleast_1d(ap))
    for j, name in enumerate(names):
        row = got["per_label"][name]
        assert row["precision"] == pytest.approx(p[j], abs=1e-12) and row["recall"] == pytest.approx(r[j], abs=1e-12)
        assert row["f1"] == pytest.approx(f[j], abs=1e-12) and row["support"] == support[j]
        assert row["average_precision"] == pytest.approx(ap[j], abs=1e-12)
    assert got["precision"] == pytest.approx(p.mean()) and got["recall"] == pytest.approx(r.mean())
    assert got["f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert (got["micro_precision"], got["micro_recall"], got["micro_f1"]) == pytest.approx(micro[:3])
    assert got["map"] == pytest.approx(ap.mean()) and got["micro_ap"] == pytest.approx(np.nan_to_num(micro_ap))
    assert got["subset_accuracy"] == pytest.approx(accuracy_score(truth, predicted))


def test_per_label_thresholds_apply_to_their_own_label():
    probs = np.array([[0.9, 0.2], [0.4, 0.35], [0.2, 0.1]])
    truth = np.array([[1, 0], [1, 1], [0, 0]])
    got = multilabel_scores(probs, truth, ["a", "b"], [0.3, 0.3])
    assert got["per_label"]["a"]["recall"] == 1.0 and got["per_label"]["b"]["recall"] == 1.0
    assert got["per_label"]["a"]["threshold"] == 0.3


def test_the_chosen_thresholds_give_the_best_f1_scikit_learn_finds():
    for probs, truth in _cases():
        chosen = best_thresholds(probs, truth)
        for j, t in enumerate(chosen):
            if truth[:, j].sum() == 0:
                assert t == 0.5
                continue
            best = max(f1_score(truth[:, j], probs[:, j] >= c, zero_division=0) for c in np.unique(probs[:, j]))
            assert f1_score(truth[:, j], probs[:, j] >= t, zero_division=0) == pytest.approx(best)


def test_average_precision_of_one_label_matches_and_the_loss_is_pytorchs():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.8])
    truth = np.array([0, 0, 1, 1, 0])
    assert average_precision(scores, truth) == pytest.approx(average_precision_score(truth, scores))
    logits = torch.randn(6, 3)
    targets = (torch.rand(6, 3) > 0.5).long()
    expected = torch.nn.BCEWithLogitsLoss()(logits, targets.float())
    assert multilabel_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
