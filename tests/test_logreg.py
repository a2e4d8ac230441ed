"""The ssl-transfer protocol's parts: C chosen on validation, refit on train + val, and each set's metric
(top-1, mean per-class accuracy, VOC 11-point mAP) against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from harness.core.logreg import GRID, ap11, logreg_transfer, map11, mean_per_class, top1


def blobs(n_per_class: int, classes: int, seed: int, noise_dims: int = 6, gap: float = 6.0):
    """Classes separated along their own axis by `gap` standard deviations, plus pure-noise dimensions."""
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.randn(len(y), classes + noise_dims)
    x[np.arange(len(y)), y] += gap
    return x, y


def test_the_grid_is_ssl_transfers():
    assert len(GRID) == 45 and GRID[0] == pytest.approx(1e6) and GRID[-1] == pytest.approx(1e-5)


def test_c_is_chosen_on_validation_and_the_first_best_c_wins():
    x, y = blobs(80, 3, 0)
    keep = (y == 0) | (np.arange(len(y)) % 80 < 20)  # 80 of class 0, 20 of each other class
    train, val, test = (x[keep], y[keep]), blobs(10, 3, 1), blobs(30, 3, 2)
    # Far too strong a penalty leaves only the (unpenalised) intercept: the majority class everywhere, a
    # third right on balanced sets; a mild one separates the blobs.
    out = logreg_transfer(train, val, test, "top1", grid=(1e-7, 1.0))
    assert out["C"] == 1.0 and out["val"] == 100.0 and out["score"] > 98
    crushed = logreg_transfer(train, val, test, "top1", grid=(1e-7,))
    assert crushed["val"] == pytest.approx(100 / 3) and crushed["score"] == pytest.approx(100 / 3)
    # Equal validation scores: the earlier C of the grid is kept.
    assert logreg_transfer(train, val, test, "top1", grid=(10.0, 1.0))["C"] == 10.0


def test_the_refit_uses_train_and_val():
    # Class 2 appears only in val: a classifier fitted on train alone could never predict it.
    x, y = blobs(30, 3, 0)
    train = (x[y < 2], y[y < 2])
    val = (x[y == 2][:10], y[y == 2][:10])
    test = (x[y == 2][10:], y[y == 2][10:])
    assert logreg_transfer(train, val, test, "top1", grid=(1.0,))["score"] == 100.0


def test_mean_per_class_and_top1_on_crafted_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 1])
    assert top1(pred, y) == pytest.approx(100 * 4 / 7)
    assert mean_per_class(pred, y) == pytest.approx(100 * (3 / 4 + 1 / 2 + 0) / 3)


def test_11_point_ap_by_hand_and_against_the_precision_recall_curve():
    # Ranks: hit, miss, hit, miss: precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1.
    assert ap11(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # Miss first: precision 0, 1/2 at recall 0, 1; recall 0 counts precision 1 (the curve's start).
    assert ap11(np.array([0.9, 0.8]), np.array([0, 1])) == pytest.approx((1 + 10 * 1 / 2) / 11)
    from sklearn.metrics import precision_recall_curve

    rng = np.random.RandomState(0)
    for _ in range(20):
        positive = rng.rand(40) < 0.3
        positive[0] = True
        scores = rng.randint(0, 8, 40).astype(float)  # many ties
        prec, rec, _ = precision_recall_curve(positive, scores)
        direct = np.mean([prec[rec >= t].max() if (rec >= t).any() else 0 for t in np.linspace(0, 1, 11)])
        assert ap11(scores, positive) == pytest.approx(direct)


def test_map11_leaves_difficult_entries_out():
    scores = np.array([[0.9, 0.1], [0.8, 0.9], [0.1, 0.8], [0.7, 0.2]])
    labels = np.array([[1, 0], [0, 1], [-1, 1], [1, -1]])
    expected = 100 * (ap11(scores[[0, 1, 3], 0], np.array([1, 0, 1]) == 1)
                      + ap11(scores[[0, 1, 2], 1], np.array([0, 1, 1]) == 1)) / 2
    assert map11(scores, labels) == pytest.approx(expected)
    out = logreg_transfer((np.eye(4) * 5, np.array([[1, 0], [0, 1], [1, 0], [0, 1]])),
                          (np.eye(4) * 5, np.array([[1, 0], [0, 1], [1, 0], [0, 1]])),
                          (np.eye(4) * 5, np.array([[1, 0], [0, 1], [1, 0], [0, 1]])), "map11", grid=(1.0,))
    assert out["score"] == 100.0
