"""eval.metrics against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from eval import metrics

Y_TRUE = np.array([0, 0, 1, 2, 2, 2])
Y_PRED = np.array([0, 1, 1, 2, 2, 0])


def test_confusion_accuracy_recall():
    assert metrics.confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    np.testing.assert_allclose(metrics.per_class_recall(Y_TRUE, Y_PRED, 3), [0.5, 1.0, 2 / 3])
    # A class that never occurs gets NaN recall, not 0.
    assert np.isnan(metrics.per_class_recall(Y_TRUE, Y_PRED, 4)[3])


def test_macro_f1():
    # F1 per class = 2 tp / (predicted + actual): 2/4, 2/3, 4/5.
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    # Classes absent from both truth and prediction do not dilute the mean.
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 8) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert metrics.macro_f1(Y_TRUE, Y_TRUE, 3) == 1.0


def test_ccc_and_rmse():
    # t=[1,2,3], p=[2,4,6]: var t=2/3, var p=8/3, cov=4/3, mean gap 2 -> 2*(4/3) / (2/3+8/3+4) = 8/22.
    assert metrics.ccc([1, 2, 3], [2, 4, 6]) == pytest.approx(8 / 22)
    assert metrics.ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert metrics.ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.rmse([0, 0], [3, 4]) == pytest.approx(np.sqrt(12.5))


def test_nn_identity_accuracy():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    probe = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.1]])
    # Nearest gallery ids: a, b, a against truth a, a, b -> 1 of 3.
    acc = metrics.nn_identity_accuracy(gallery, np.array(["a", "b"]), probe, np.array(["a", "a", "b"]))
    assert acc == pytest.approx(1 / 3)


def test_roc_auc_and_eer():
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.1])
    # Positive-negative pairs ranked correctly: (0.9,0.5) (0.9,0.1) (0.4,0.1), wrong: (0.4,0.5) -> 3/4.
    assert metrics.roc_auc(labels, scores) == pytest.approx(0.75)
    assert metrics.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    # ROC (fpr, fnr): (0,1) (0,.5) (.5,.5) (.5,0) (1,0): they cross at 0.5.
    assert metrics.equal_error_rate(labels, scores) == pytest.approx(0.5)
    assert metrics.equal_error_rate([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    assert metrics.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(1.0)
