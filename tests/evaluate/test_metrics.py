"""Detection metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodfast.evaluate.metrics import auroc, average_precision, binary_metrics, bootstrap_interval, fpr_at_tpr


def test_binary_metrics_hand_case():
    target = np.array([1, 1, 0, 0, 0, 1, 0, 0], bool)
    pred = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)  # tp=2 fp=1 fn=1 tn=4
    m = binary_metrics(pred, target)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["prevalence"] == pytest.approx(3 / 8) and m["flag_rate"] == pytest.approx(3 / 8)
    assert m["lift"] == pytest.approx((2 / 3) / (3 / 8))


def test_flagging_nothing_has_undefined_precision():
    m = binary_metrics(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert np.isnan(m["precision"]) and np.isnan(m["f1"]) and m["recall"] == 0.0


def test_random_detector_precision_equals_prevalence():
    rng = np.random.default_rng(0)
    target = rng.random(200_000) < 0.158  # the paper's BDD10K prevalence
    pred = rng.random(200_000) < 0.2
    m = binary_metrics(pred, target)
    assert m["precision"] == pytest.approx(0.158, abs=0.004)
    assert m["lift"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("seed", range(4))
def test_curves_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    target = rng.random(500) < 0.2
    scores = rng.normal(size=500) + target * (seed * 0.5)
    scores[::7] = np.round(scores[::7], 1)  # ties
    assert auroc(scores, target) == pytest.approx(roc_auc_score(target, scores))
    assert average_precision(scores, target) == pytest.approx(average_precision_score(target, scores))
    fpr, tpr, _ = roc_curve(target, scores)
    assert fpr_at_tpr(scores, target, 0.95) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)])


def test_curves_drop_nan_scores_and_handle_degenerate_targets():
    scores = np.array([0.9, np.nan, 0.1, 0.8])
    target = np.array([1, 1, 0, 0], bool)
    assert auroc(scores, target) == pytest.approx(1.0)
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0], bool)))


def test_bootstrap_interval_covers_the_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, 400)
    lo, hi = bootstrap_interval(lambda idx: float(x[idx].mean()), x.size, resamples=400)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.3)


# --------------------------------------------------------------------------------------------------
# Against brute force, and the image-level (cluster) bootstrap
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_curves_match_brute_force(seed):
    from oodfast.evaluate.metrics import pr_curve

    rng = np.random.default_rng(10 + seed)
    target = rng.random(120) < 0.3
    scores = np.round(rng.normal(size=120) + target * seed, 1)  # many ties
    pos, neg = scores[target], scores[~target]
    # AUROC = P(score_pos > score_neg) + P(tie) / 2, over all pairs
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(scores, target) == pytest.approx(pairs)
    # AP = sum over thresholds t (descending) of (recall(t) - recall(t_prev)) * precision(t)
    ts = np.unique(scores)[::-1]
    recall = np.array([(pos >= t).mean() for t in ts])
    precision = np.array([(pos >= t).sum() / (scores >= t).sum() for t in ts])
    assert average_precision(scores, target) == pytest.approx(np.sum(np.diff(np.r_[0, recall]) * precision))
    # FPR at the highest threshold whose TPR reaches 0.95
    t95 = max(t for t in ts if (pos >= t).mean() >= 0.95)
    assert fpr_at_tpr(scores, target, 0.95) == pytest.approx((neg >= t95).mean())
    r, p = pr_curve(scores, target)
    np.testing.assert_allclose(r, recall)
    np.testing.assert_allclose(p, precision)


def test_count_metrics_match_binary_metrics():
    from oodfast.evaluate.metrics import COUNT_METRICS, count_metrics

    rng = np.random.default_rng(3)
    pred, target = rng.random(50) < 0.3, rng.random(50) < 0.2
    counts = (pred & target).sum(), (pred & ~target).sum(), (~pred & target).sum(), (~pred & ~target).sum()
    m = binary_metrics(pred, target)
    np.testing.assert_allclose(count_metrics(*counts), [m[k] for k in COUNT_METRICS])
    # vectorised over resamples: [7, R]
    assert count_metrics(*(np.array([c, c]) for c in counts)).shape == (7, 2)


def test_cluster_bootstrap_resamples_images_not_crops():
    # 200 images, each with 4 crops of one value: the crops carry no more information than the images.
    # The image-level interval matches that of the 200 image values; resampling crops as if independent
    # gives an interval about sqrt(4) = 2 times too narrow.
    from oodfast.evaluate.metrics import cluster_interval

    rng = np.random.default_rng(4)
    per_image = rng.normal(size=200)
    x = np.repeat(per_image, 4)
    images = np.repeat(np.arange(200) * 7 + 3, 4)  # any ids, in any order
    order = rng.permutation(x.size)
    x, images = x[order], images[order]
    clustered = cluster_interval(lambda rows: x[rows].mean(), images, resamples=2000)[0]
    plain = bootstrap_interval(lambda idx: per_image[idx].mean(), 200, resamples=2000)
    crops = bootstrap_interval(lambda idx: x[idx].mean(), x.size, resamples=2000)
    assert clustered[1] - clustered[0] == pytest.approx(plain[1] - plain[0], rel=0.15)
    assert (crops[1] - crops[0]) < 0.65 * (clustered[1] - clustered[0])
    assert clustered[0] < x.mean() < clustered[1]


def test_count_interval_matches_the_cluster_interval():
    from oodfast.evaluate.metrics import cluster_interval, count_interval, count_metrics

    rng = np.random.default_rng(5)
    images = rng.integers(0, 150, 600)
    target = rng.random(600) < 0.2
    pred = rng.random(600) < np.where(target, 0.6, 0.2)
    cells = (pred & target, pred & ~target, ~pred & target, ~pred & ~target)
    per_image = np.stack([np.bincount(images, weights=c, minlength=150) for c in cells], 1)[np.unique(images)]
    fast = count_interval(lambda c: count_metrics(*np.moveaxis(c, -1, 0)), per_image, resamples=2000)
    slow = cluster_interval(lambda r: [binary_metrics(pred[r], target[r])["precision"]], images, resamples=2000)
    assert fast.shape == (7, 2)
    np.testing.assert_allclose(fast[1], slow[0], atol=0.02)  # precision: same interval up to resampling noise
    m = binary_metrics(pred, target)
    for j, key in enumerate(("accuracy", "precision", "recall", "f1")):
        assert fast[j, 0] < m[key] < fast[j, 1], key


def test_interval_skips_undefined_resamples_and_is_nan_for_one_image():
    from oodfast.evaluate.metrics import cluster_interval

    # precision of a resample that draws no flagged crop is undefined: the interval is over the others
    pred = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
    target = np.array([1, 0, 1, 0, 0, 0, 0, 0], bool)
    lo, hi = cluster_interval(lambda r: binary_metrics(pred[r], target[r])["precision"], np.arange(8),
                              resamples=200)[0]
    assert lo == hi == 1.0
    assert np.isnan(cluster_interval(lambda r: 1.0, np.zeros(5, int))).all()
