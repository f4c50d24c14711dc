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
