"""engine/metrics.py against hand-computed examples and independent NumPy computations."""
import math

import numpy as np
import pytest
import torch

from engine.metrics import classification_metrics, confusion_matrix, mcc, per_class_table, topk_correct

# 3 classes: truth [0,0,1,1,2,2], prediction [0,1,1,1,2,0]
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = torch.tensor([0, 1, 1, 1, 2, 0])


def test_confusion_matrix_hand_example():
    cm = confusion_matrix(PREDS, TARGETS, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]] and cm.dtype == torch.int64


def test_metrics_hand_example():
    m = classification_metrics(confusion_matrix(PREDS, TARGETS, 3))
    # precision per class 1/2, 2/3, 1; recall 1/2, 1, 1/2; F1 1/2, 4/5, 2/3
    assert m["acc"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx(100 * (1 / 2 + 4 / 5 + 2 / 3) / 3)
    # MCC: s=6, c=4, p=(2,3,1), t=(2,2,2): (24 - 12) / sqrt((36 - 14) * (36 - 12))
    assert m["mcc"] == pytest.approx(100 * 12 / math.sqrt(22 * 24))
    assert m["num_samples"] == 6


def test_absent_classes_do_not_enter_macro_means():
    five = classification_metrics(confusion_matrix(PREDS, TARGETS, 5))
    three = classification_metrics(confusion_matrix(PREDS, TARGETS, 3))
    assert five == pytest.approx(three)


def test_class_only_predicted_counts_with_zero_recall():
    # class 2 never occurs but is predicted once: precision 0, recall 0/0 -> 0, it enters the macro mean
    m = classification_metrics(confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3))
    assert m["precision"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert m["recall"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_perfect_and_constant_predictions():
    perfect = classification_metrics(confusion_matrix(TARGETS, TARGETS, 3))
    assert all(perfect[k] == pytest.approx(100.0) for k in ("acc", "precision", "recall", "f1", "mcc"))
    constant = classification_metrics(confusion_matrix(torch.zeros(6, dtype=torch.long), TARGETS, 3))
    assert constant["mcc"] == 0.0 and constant["acc"] == pytest.approx(100 / 3)  # undefined MCC -> 0


def _mcc_as_correlation(y, p, k):
    """Gorodkin's R_K as the correlation of the one-hot truth and prediction matrices (independent formula)."""
    x, z = np.eye(k)[y], np.eye(k)[p]
    xc, zc = x - x.mean(0), z - z.mean(0)
    cov = lambda a, b: (a * b).sum()  # noqa: E731
    return cov(xc, zc) / math.sqrt(cov(xc, xc) * cov(zc, zc))


@pytest.mark.parametrize("seed", range(5))
def test_random_confusions_against_numpy(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    y = rng.integers(0, k, 200)
    p = np.where(rng.random(200) < 0.5, y, rng.integers(0, k, 200))
    cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), k)
    ref = np.zeros((k, k), dtype=np.int64)
    for t, q in zip(y, p):
        ref[t, q] += 1
    assert np.array_equal(cm.numpy(), ref)
    m = classification_metrics(cm)
    assert m["mcc"] / 100 == pytest.approx(_mcc_as_correlation(y, p, k), abs=1e-12)
    # per-class harmonic mean <= arithmetic mean, so macro F1 <= (macro P + macro R) / 2
    # (the MAE-on-GastroVision report's F1 87.37 with P 74.47 / R 75.69 cannot hold)
    assert m["f1"] <= (m["precision"] + m["recall"]) / 2 + 1e-9
    assert m["acc"] == pytest.approx(100 * (y == p).mean())


def test_binary_mcc_is_the_classic_formula():
    tp, fn, fp, tn = 30, 10, 5, 55
    cm = torch.tensor([[tn, fp], [fn, tp]])  # class 1 = positive
    classic = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc(cm) == pytest.approx(classic)


def test_topk_correct_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    hits = topk_correct(logits, targets, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        ranks = [(logits[i] > logits[i, targets[i]]).sum().item() for i in range(50)]  # 0 = highest
        assert int(hits[k]) == sum(r < min(k, 7) for r in ranks)
    assert int(hits[10]) == 50  # k capped at the number of classes


def test_per_class_table_lists_every_class():
    table = per_class_table(confusion_matrix(PREDS, TARGETS, 3), ["cat", "dog", "eel"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].split() == ["dog", "66.67", "100.00", "80.00", "2"]


def test_bad_indices_raise():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
