"""Binary detection metrics, threshold-free curves and bootstrap intervals (numpy only).

Conventions: ``target`` is bool (True = rare by the mask ground truth), ``pred`` bool (flagged),
``scores`` float (higher = rarer). Precision of a detector that flags nothing is NaN (undefined), as
is F1 then; the tables print "-" for it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def binary_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1, prevalence, lift (precision / prevalence) and flag rate."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred and target must be non-empty 1-D arrays of one shape, got {pred.shape} and {target.shape}")
    tp = float(np.sum(pred & target))
    fp = float(np.sum(pred & ~target))
    fn = float(np.sum(~pred & target))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    prevalence = float(target.mean())
    return {
        "accuracy": float(np.mean(pred == target)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "prevalence": prevalence,
        "lift": precision / prevalence if prevalence > 0 else float("nan"),
        "flag_rate": float(pred.mean()),
    }


def _ranked(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP / FP counts at each distinct threshold (scores descending), ties grouped."""
    scores = np.asarray(scores, np.float64)
    target = np.asarray(target, bool)
    keep = ~np.isnan(scores)
    scores, target = scores[keep], target[keep]
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], target[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t)[last_of_tie].astype(np.float64)
    fps = (last_of_tie + 1 - tps).astype(np.float64)
    return tps, fps, s[last_of_tie]


def auroc(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, ties handled); NaN scores are dropped."""
    tps, fps, _ = _ranked(scores, target)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: sum over thresholds of
    (recall step) x precision, the step-wise definition scikit-learn uses."""
    tps, fps, _ = _ranked(scores, target)
    if tps.size == 0 or tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores: np.ndarray, target: np.ndarray, tpr_level: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr_level``."""
    tps, fps, _ = _ranked(scores, target)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    i = int(np.searchsorted(tps / tps[-1], tpr_level - 1e-12))
    return float(fps[min(i, fps.size - 1)] / fps[-1])


def pr_curve(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, for plots."""
    tps, fps, _ = _ranked(scores, target)
    if tps.size == 0 or tps[-1] == 0:
        return np.zeros(0), np.zeros(0)
    return tps / tps[-1], tps / (tps + fps)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` items resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
