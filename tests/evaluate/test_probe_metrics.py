"""Accuracy by band, binary accuracy and the interval over seeds (oodfast.evaluate.probe_metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oodfast.evaluate.probe_metrics import binary_accuracy, mean_interval, per_band_accuracy


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_per_band_accuracy_hand_computed() -> None:
    bands = {0: "head", 1: "head", 2: "middle", 3: "tail", 4: "tail"}
    target = np.array([0, 0, 1, 2, 2, 3])
    pred = np.array([0, 1, 1, 2, 0, 0])
    out = per_band_accuracy(pred, target, bands)
    assert out["overall"] == {"accuracy": pytest.approx(3 / 6), "mean_class_accuracy": pytest.approx((0.5 + 1 + 0.5 + 0) / 4),
                              "n": 6, "classes": 4}
    assert out["head"]["accuracy"] == pytest.approx(2 / 3)
    assert out["head"]["mean_class_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert (out["head"]["n"], out["head"]["classes"]) == (3, 2)
    assert out["middle"]["accuracy"] == pytest.approx(0.5) and out["middle"]["n"] == 2
    assert out["tail"] == {"accuracy": 0.0, "mean_class_accuracy": 0.0, "n": 1, "classes": 1}
    # A band without rows reports None, never NaN.
    empty_tail = per_band_accuracy(pred[:5], target[:5], bands)
    assert empty_tail["tail"] == {"accuracy": None, "mean_class_accuracy": None, "n": 0, "classes": 0}
    with pytest.raises(ValueError, match="no entry for target class"):
        per_band_accuracy(pred, target, {0: "head"})
    with pytest.raises(ValueError, match="same length"):
        per_band_accuracy(pred[:2], target, bands)


def test_binary_accuracy_hand_computed() -> None:
    out = binary_accuracy(np.array([1, 0, 0, 1]), np.array([1, 1, 0, 0]))
    assert out == {"accuracy": 0.5, "balanced_accuracy": 0.5, "n": 4, "prevalence": 0.5}
    # A constant "never rare" predictor: high accuracy at low prevalence, balanced accuracy 0.5.
    out = binary_accuracy(np.zeros(8, bool), np.array([1, 0, 0, 0, 0, 0, 0, 0], bool))
    assert out["accuracy"] == pytest.approx(7 / 8) and out["balanced_accuracy"] == pytest.approx(0.5)
    # TPR 1/2, TNR 2/3.
    out = binary_accuracy(np.array([1, 0, 1, 0, 0]), np.array([1, 1, 0, 0, 0]))
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["prevalence"] == pytest.approx(0.4)
    # AUROC of a score: positives {0.9, 0.3} against negatives {0.1, 0.8} win 3 of 4 pairs.
    out = binary_accuracy(np.zeros(4), np.array([1, 0, 0, 1]), scores=np.array([0.9, 0.1, 0.8, 0.3]))
    assert out["auroc"] == pytest.approx(0.75) and out["balanced_accuracy"] == pytest.approx(0.5)
    assert binary_accuracy(np.zeros(3), np.zeros(3), scores=np.arange(3.0))["auroc"] is None
    with pytest.raises(ValueError, match="one entry per target"):
        binary_accuracy(np.zeros(3), np.zeros(3), scores=np.arange(2.0))


def test_mean_interval_student_t() -> None:
    out = mean_interval([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert out["mean"] == pytest.approx(0.6)
    assert out["low"] == pytest.approx(0.6 - half) and out["high"] == pytest.approx(0.6 + half)
    assert mean_interval([0.1, 0.9], bounds=(0.0, 1.0))["low"] == 0.0
    single = mean_interval([0.4])
    assert single["mean"] == pytest.approx(0.4) and single["low"] is None and single["high"] is None
    assert mean_interval([None, None])["mean"] is None
