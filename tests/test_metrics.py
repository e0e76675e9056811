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
