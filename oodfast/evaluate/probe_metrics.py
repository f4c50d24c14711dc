"""Scores of probe predictions: accuracy by frequency band, binary accuracy / balanced accuracy /
AUROC of rare presence, and the mean and Student-t interval over probe seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from oodfast.evaluate.bands import BANDS

__all__ = ["binary_accuracy", "mean_interval", "per_band_accuracy"]


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def per_band_accuracy(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, bands: Mapping[int, str]
) -> dict[str, dict[str, Any]]:
    """Accuracy overall and per frequency band of the target class.

    Args:
        pred, target: int [N] class IDs (rows with target < 0 must be dropped by the caller).
        bands: train ID -> ``"head"`` | ``"middle"`` | ``"tail"`` (:func:`frequency_bands`).

    Returns:
        For ``overall``, ``head``, ``middle``, ``tail``: ``accuracy`` (share of correct rows whose
        target is in the band), ``mean_class_accuracy`` (mean over the band's classes present in
        ``target`` of each class's accuracy: every class counts once, however rare), ``n`` (rows)
        and ``classes`` (distinct target classes). Accuracies are None when the band has no rows.
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64).ravel()
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same length, got {p.shape[0]} and {t.shape[0]}")
    if t.size and t.min() < 0:
        raise ValueError("target holds negative (unlabelled) entries; drop those rows first")
    unknown = sorted(set(bands.values()) - set(BANDS))
    if unknown:
        raise ValueError(f"bands: unknown band names {unknown}; valid: {', '.join(BANDS)}")
    missing = sorted(set(np.unique(t).tolist()) - set(int(c) for c in bands))
    if missing:
        raise ValueError(f"bands has no entry for target class(es) {missing}")
    correct = p == t
    band_of = np.array([bands[int(c)] for c in t], dtype=object) if t.size else np.zeros(0, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for band in ("overall", *BANDS):
        sel = np.ones(t.shape, bool) if band == "overall" else band_of == band
        classes = np.unique(t[sel])
        per_class = np.array([correct[sel & (t == c)].mean() for c in classes])
        out[band] = {
            "accuracy": _mean_or_none(correct[sel]),
            "mean_class_accuracy": _mean_or_none(per_class),
            "n": int(sel.sum()),
            "classes": int(classes.size),
        }
    return out


def binary_accuracy(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy and balanced accuracy of a binary task (rare presence), and AUROC of a score.

    Balanced accuracy is the mean of the recalls of the classes present in ``target``
    ((TPR + TNR) / 2 when both are present; scikit-learn's definition). A constant predictor scores
    0.5 whatever the prevalence. ``scores`` (higher = more likely positive; e.g. the kNN vote share
    or the probe's logit margin) adds ``auroc``: threshold-free, so it measures how well the
    features rank positives above negatives even where the argmax predicts one class everywhere.

    Returns:
        ``accuracy``, ``balanced_accuracy`` (None for empty input), ``n``, ``prevalence`` (share of
        positive targets, None for empty input), and with ``scores`` ``auroc`` (None unless both
        classes are present).
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(bool).ravel()
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same length, got {p.shape[0]} and {t.shape[0]}")
    recalls = [float((p[t == c] == c).mean()) for c in (False, True) if np.any(t == c)]
    out: dict[str, Any] = {
        "accuracy": _mean_or_none(p == t),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "n": int(t.size),
        "prevalence": _mean_or_none(t.astype(np.float64)),
    }
    if scores is not None:
        from oodfast.evaluate.metrics import auroc

        s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
        if s.shape != t.shape:
            raise ValueError(f"scores must have one entry per target, got {s.shape[0]} and {t.shape[0]}")
        out["auroc"] = float(auroc(s, t)) if 0 < t.sum() < t.size else None
    return out


def mean_interval(
    values: Sequence[float | None], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Mean and two-sided Student-t interval over seeds: ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)``.

    ``bounds`` clips the interval to the metric's range (accuracies: (0, 1)); with few seeds the
    t-interval is wide (t = 12.7 for two seeds) and would otherwise leave it.

    Returns:
        ``mean``, ``low``, ``high`` (None with fewer than two values), ``values`` (the inputs),
        ``n``. None inputs (a band without test rows) are left out; all None gives mean None.
    """
    from scipy import stats

    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "low": None, "high": None,
                           "values": [None if v is None else float(v) for v in values], "n": int(vals.size)}
    if vals.size == 0:
        return out
    mean = float(vals.mean())
    out["mean"] = mean
    if vals.size >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size))
        low, high = mean - half, mean + half
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        out["low"], out["high"] = low, high
    return out
