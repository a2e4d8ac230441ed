"""The ssl-transfer linear protocol on frozen features: L-BFGS logistic regression (scikit-learn),
the inverse regularisation C chosen on a validation split from a log grid, then refit on
train + val and scored on test with the set's metric.

- ``top1``: accuracy, %.
- ``mean_per_class``: the mean over classes of each class's recall (the mean of the confusion
  matrix's normalised diagonal), %.
- ``map11``: multi-label sets (VOC2007): one binary classifier per class, scored by PASCAL VOC
  2007's 11-point interpolated average precision (the mean over recall levels 0, 0.1, ..., 1 of the
  best precision at that recall or more), averaged over classes, %. Labels -1 (difficult only)
  are trained on as present and left out of the score.

The grid is ssl-transfer's: weight decays 10^-6 ... 10^5 (45 values, log-spaced), C = 1 / wd, tried
in that order with warm starts; the first best C wins (a tie keeps the earlier, larger C).
"""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("top1", "mean_per_class", "map11")
GRID = tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45))


def top1(pred: np.ndarray, y: np.ndarray) -> float:
    return float(100.0 * np.mean(pred == y))


def mean_per_class(pred: np.ndarray, y: np.ndarray) -> float:
    """The mean over the classes present in `y` of the share of their images predicted right, %."""
    return float(100.0 * np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def ap11(scores: np.ndarray, positive: np.ndarray) -> float:
    """PASCAL VOC 2007's 11-point average precision of `scores` for the boolean `positive`, in [0, 1].

    Precision and recall are taken at each distinct score (tied scores enter together), as
    scikit-learn's precision_recall_curve takes them."""
    order = np.argsort(-scores, kind="stable")
    s, hit = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each group of equal scores
    tp = np.cumsum(hit)[last]
    # The curve starts at (recall 0, precision 1), as scikit-learn's precision_recall_curve (which
    # ssl-transfer's numbers were computed with) ends: the t = 0 point always counts 1.
    precision = np.r_[tp / (last + 1), 1.0]
    recall = np.r_[tp / max(hit.sum(), 1), 0.0]
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def map11(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of ap11, %; entries labelled -1 (difficult only) are left out."""
    aps = []
    for c in range(labels.shape[1]):
        keep = labels[:, c] != -1
        aps.append(ap11(scores[keep, c], labels[keep, c] == 1))
    return float(100.0 * np.mean(aps))


def _classifier(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, warm_start=True)


def _fit(clf, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():  # the protocol's iteration cap is part of it: no warning per C
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


class Scorer:
    """Fits at a C and scores with `metric`; keeps one warm-started classifier (per class for map11)."""

    def __init__(self, metric: str, max_iter: int = 100):
        self.metric, self.max_iter, self.models = metric, max_iter, None

    def fit(self, c: float, x: np.ndarray, y: np.ndarray) -> None:
        if self.metric == "map11":
            self.models = self.models or [_classifier(c, self.max_iter) for _ in range(y.shape[1])]
            for k, m in enumerate(self.models):
                m.set_params(C=c)
                _fit(m, x, (y[:, k] != 0).astype(np.int64))  # difficult-only counts as present
        else:
            self.models = self.models or [_classifier(c, self.max_iter)]
            self.models[0].set_params(C=c)
            _fit(self.models[0], x, y)

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        if self.metric == "map11":
            return map11(np.stack([m.decision_function(x) for m in self.models], axis=1), y)
        pred = self.models[0].predict(x)
        return top1(pred, y) if self.metric == "top1" else mean_per_class(pred, y)


def logreg_transfer(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                    test: tuple[np.ndarray, np.ndarray], metric: str, grid: tuple[float, ...] = GRID,
                    max_iter: int = 100) -> dict[str, float]:
    """C chosen on `val` (fitted on `train`), refit on train + val, scored on `test`, all with `metric`.

    Returns {"score": test %, "C": the chosen C, "val": its validation %}."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    scorer = Scorer(metric, max_iter)
    best_c, best = grid[0], -1.0
    for c in grid:
        scorer.fit(c, *train)
        s = scorer.score(*val)
        if s > best:
            best_c, best = c, s
    final = Scorer(metric, max_iter)
    final.fit(best_c, np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    return {"score": final.score(*test), "C": best_c, "val": best}
