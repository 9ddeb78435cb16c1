"""Detection metrics in numpy: ROC AUC, ROC curve, F1-max, confusion rates at a threshold.

Convention everywhere in ngcal: label 1 = NG (defective), and a part is NG when
``score >= threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN if one class only."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for every distinct score, thresholds descending.

    A threshold t classifies ``score >= t`` as NG. The first point is (0, 0) at +inf.
    """
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos = max(int(y.sum()), 1)
    n_neg = max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thr = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thr


@dataclass(frozen=True)
class F1Max:
    """Best F1 over all thresholds, the threshold reaching it, and its precision/recall."""

    f1: float
    threshold: float
    precision: float
    recall: float


def f1_max(labels: np.ndarray, scores: np.ndarray) -> F1Max:
    """The oracle F1-max threshold (NG when ``score >= threshold``)."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct].astype(np.float64)
    predicted = (distinct + 1).astype(np.float64)
    n_pos = float(y.sum())
    if n_pos == 0:
        return F1Max(float("nan"), float("nan"), float("nan"), float("nan"))
    precision = tp / predicted
    recall = tp / n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    i = int(np.argmax(f1))
    return F1Max(float(f1[i]), float(s_sorted[distinct[i]]), float(precision[i]), float(recall[i]))


@dataclass(frozen=True)
class Rates:
    """Confusion rates of a threshold on labelled scores."""

    fpr: float
    fnr: float
    precision: float
    f1: float
    n_pos: int
    n_neg: int


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Rates:
    """FPR, miss rate (FNR), precision and F1 of ``score >= threshold``."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    fpr = fp / n_neg if n_neg else float("nan")
    fnr = fn / n_pos if n_pos else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return Rates(fpr, fnr, precision, f1, n_pos, n_neg)


def expected_cost(fpr: float, fnr: float, *, prevalence: float, cost_ratio: float) -> float:
    """Expected cost per part in units of one false reject: (1-p)*FPR + p*c*FNR."""
    return (1.0 - prevalence) * fpr + prevalence * cost_ratio * fnr


def min_expected_cost(
    labels: np.ndarray, scores: np.ndarray, *, prevalence: float, cost_ratio: float
) -> tuple[float, float]:
    """(oracle cost, oracle threshold): the lowest expected cost over all thresholds."""
    fpr, tpr, thr = roc_curve(labels, scores)
    # Add "reject nothing" (+inf, already first) and "reject everything" (lowest score).
    cost = (1.0 - prevalence) * fpr + prevalence * cost_ratio * (1.0 - tpr)
    i = int(np.argmin(cost))
    return float(cost[i]), float(thr[i])
