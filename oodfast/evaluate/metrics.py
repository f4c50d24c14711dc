"""Binary detection metrics, threshold-free curves and image-level (cluster) bootstrap intervals.

The curves are scikit-learn's (:func:`sklearn.metrics.roc_auc_score`, ``average_precision_score``,
``roc_curve``, ``precision_recall_curve``) and the intervals scipy's (:func:`scipy.stats.bootstrap`,
percentile or BCa); this module only adapts them to detection: NaN scores are dropped, a target
with one class gives NaN instead of an exception, and the resampled unit is an *image*.

Why images: both global crops of an image (and its crops under several crop seeds) share the
scene, so they are not independent draws; an interval that resamples crops is too narrow. The
cluster bootstrap here resamples image ids with replacement and takes all of a drawn image's crops
(:func:`cluster_interval`, :func:`count_interval`).

Conventions: ``target`` is bool (True = rare by the mask ground truth), ``pred`` bool (flagged),
``scores`` float (higher = rarer). Precision of a detector that flags nothing is NaN (undefined), as
is F1 then; the tables print "-" for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

__all__ = ["COUNT_METRICS", "auroc", "average_precision", "binary_metrics", "bootstrap_interval", "cluster_interval",
           "count_interval", "count_metrics", "fpr_at_tpr", "image_groups", "pr_curve"]

#: The metrics :func:`count_metrics` derives from confusion counts, in its output order.
COUNT_METRICS = ("accuracy", "precision", "recall", "f1", "prevalence", "lift", "flag_rate")


def count_metrics(tp, fp, fn, tn) -> np.ndarray:  # noqa: ANN001 - scalars or arrays alike
    """:data:`COUNT_METRICS` from confusion counts (numbers or arrays of one shape) -> [7, ...] float64.
    Undefined ratios (0 / 0) are NaN."""
    tp, fp, fn, tn = (np.asarray(v, np.float64) for v in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), np.nan)
        prevalence = (tp + fn) / n
        lift = np.where(prevalence > 0, precision / prevalence, np.nan)
        return np.stack([(tp + tn) / n, precision, recall, f1, prevalence, lift, (tp + fp) / n])


def binary_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1, prevalence, lift (precision / prevalence) and flag rate."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred and target must be non-empty 1-D arrays of one shape, got {pred.shape} and {target.shape}")
    counts = (np.sum(pred & target), np.sum(pred & ~target), np.sum(~pred & target), np.sum(~pred & ~target))
    return {name: float(v) for name, v in zip(COUNT_METRICS, count_metrics(*counts))}


def _clean(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(finite-or-inf scores, their targets) with NaN scores dropped; None when one class is left."""
    scores = np.asarray(scores, np.float64)
    target = np.asarray(target, bool)
    keep = ~np.isnan(scores)
    scores, target = scores[keep], target[keep]
    if target.size == 0 or target.all() or not target.any():
        return None
    return scores, target


def auroc(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`; ties count one half); NaN scores
    are dropped; NaN when only one class is left."""
    data = _clean(scores, target)
    return float("nan") if data is None else float(roc_auc_score(data[1], data[0]))


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Average precision, the step-wise area under the PR curve (:func:`sklearn.metrics.average_precision_score`)."""
    data = _clean(scores, target)
    return float("nan") if data is None else float(average_precision_score(data[1], data[0]))


def fpr_at_tpr(scores: np.ndarray, target: np.ndarray, tpr_level: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr_level``
    (on :func:`sklearn.metrics.roc_curve` with every threshold kept)."""
    data = _clean(scores, target)
    if data is None:
        return float("nan")
    fpr, tpr, _ = roc_curve(data[1], data[0], drop_intermediate=False)
    i = int(np.searchsorted(tpr, tpr_level - 1e-12))
    return float(fpr[min(i, fpr.size - 1)])


def pr_curve(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold from the highest down (recall ascending), for
    plots: :func:`sklearn.metrics.precision_recall_curve` without its appended (recall 0, precision 1)."""
    scores = np.asarray(scores, np.float64)
    target = np.asarray(target, bool)
    keep = ~np.isnan(scores)
    if not target[keep].any():
        return np.zeros(0), np.zeros(0)
    precision, recall, _ = precision_recall_curve(target[keep], scores[keep])
    return recall[-2::-1].copy(), precision[-2::-1].copy()


def _interval(res, level: float) -> np.ndarray:  # noqa: ANN001 - scipy's BootstrapResult
    """[k, 2] (low, high) of a scipy bootstrap result. Where the distribution holds NaN resamples (a
    precision of a resample that flags nothing) scipy's interval is NaN: the percentile interval of
    the finite resamples is used there instead; all NaN stays NaN."""
    ci = np.stack([np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)], 1)
    dist = np.atleast_2d(res.bootstrap_distribution)
    for k in np.flatnonzero(np.isnan(ci).any(1)):
        finite = dist[k][~np.isnan(dist[k])]
        if finite.size:
            ci[k] = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return ci


def image_groups(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by image id: (image ids [G], the rows of each group in CSR form: order [N], starts [G + 1])."""
    images = np.asarray(images)
    ids, inverse = np.unique(images, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse, minlength=ids.size))]
    return ids, order, starts


def cluster_interval(statistic: Callable[[np.ndarray], np.ndarray | float], images: np.ndarray, *,
                     resamples: int = 1000, seed: int = 0, level: float = 0.95,
                     method: str = "percentile") -> np.ndarray:
    """Bootstrap interval of ``statistic(rows)`` that resamples *images*: each resample draws the
    distinct ids of ``images`` [N] with replacement and passes the rows of every drawn image (all its
    crops, repeated as often as it was drawn) to ``statistic``, which returns a number or a vector.

    Returns:
        float64 [k, 2] (low, high) per output of ``statistic`` (NaN where undefined).
    """
    _, order, starts = image_groups(images)
    groups = np.arange(starts.size - 1)
    sizes = np.diff(starts)

    def on_images(drawn: np.ndarray) -> np.ndarray:
        lens = sizes[drawn]
        first = np.repeat(starts[drawn] - (np.cumsum(lens) - lens), lens)  # row r of the draw: order[first + r]
        rows = order[first + np.arange(first.size)]
        return np.atleast_1d(np.asarray(statistic(rows), np.float64))

    if groups.size < 2:
        k = on_images(groups).size
        return np.full((k, 2), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about degenerate (constant / NaN) resample distributions
        res = bootstrap((groups,), on_images, n_resamples=resamples, confidence_level=level, method=method,
                        vectorized=False, rng=np.random.default_rng(seed))
    return _interval(res, level)


def count_interval(statistic: Callable[[np.ndarray], np.ndarray], per_image: np.ndarray, *, resamples: int = 1000,
                   seed: int = 0, level: float = 0.95, method: str = "percentile") -> np.ndarray:
    """Cluster-bootstrap interval of a statistic of summed per-image counts, vectorised.

    Args:
        statistic: counts summed over the drawn images, [..., C] -> [k, ...] (e.g. :func:`count_metrics`
            of tp, fp, fn, tn).
        per_image: [G, C] counts of each image (its crops' tp, fp, ...).

    Returns:
        float64 [k, 2] (low, high) per output of ``statistic``.
    """
    per_image = np.asarray(per_image, np.float64)
    k = np.atleast_1d(statistic(per_image.sum(0))).shape[0]
    if per_image.shape[0] < 2:
        return np.full((k, 2), np.nan)

    def on_images(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(per_image[drawn].sum(axis=-2)), np.float64).reshape(k, *drawn.shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((np.arange(per_image.shape[0]),), on_images, n_resamples=resamples, confidence_level=level,
                        method=method, vectorized=True, batch=256, rng=np.random.default_rng(seed))
    return _interval(res, level)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` independent items resampled
    with replacement (:func:`scipy.stats.bootstrap`); for crops of images use :func:`cluster_interval`."""
    lo, hi = cluster_interval(statistic, np.arange(n), resamples=resamples, seed=seed, level=level)[0]
    return float(lo), float(hi)
