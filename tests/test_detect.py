"""RareDetector: calibration statistics, thresholds, online adaptation, state_dict, the fused enqueue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, RareDetector, ledoit_wolf


@pytest.mark.parametrize("n, d", [(256, 64), (40, 300), (500, 3)])
def test_ledoit_wolf_matches_sklearn_and_inverts_the_shrunk_covariance(n, d):
    gen = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    mean, alpha, proj, coef, shrink = ledoit_wolf(x)
    shrunk, sk_shrink = sk_ledoit_wolf(x.numpy())
    assert shrink == pytest.approx(sk_shrink, rel=1e-9, abs=1e-12)
    precision = alpha * torch.eye(d, dtype=torch.float64) + proj.T @ torch.diag(coef) @ proj
    identity = precision @ torch.from_numpy(shrunk)
    torch.testing.assert_close(identity, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(mean, x.mean(0))


def calibration(n=300, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.linspace(0.5, 2.0, d)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis", "knn"])
@pytest.mark.parametrize("percentile", [0.8, 0.95])
def test_fit_sets_the_threshold_at_the_calibration_percentile(metric, percentile):
    feats = calibration() + 3.0  # off-origin, so cosine is meaningful
    det = RareDetector(24, DetectorConfig(metric=metric, percentile=percentile, knn_k=5))
    scores = det.fit(feats)
    assert float(det.threshold) == pytest.approx(float(torch.quantile(scores, percentile)))
    assert float(det.flags(scores).float().mean()) == pytest.approx(1 - percentile, abs=0.01)
    # Scores of the calibration set agree with scoring it again, except where calibration is
    # deliberately out of sample.
    again = det.score(feats)
    if metric == "knn":  # the bank holds the set: a re-score counts each point as its own neighbour
        assert (again <= scores + 1e-5).all()
    elif metric == "mahalanobis":  # calibration scores are out-of-fold; in-sample ones are lower
        assert again.mean() < scores.mean()
    else:
        torch.testing.assert_close(again, scores)


def test_euclidean_is_the_seeds_distance_to_the_mean():
    feats = calibration()
    det = RareDetector(24)
    det.fit(feats)
    x = torch.randn(10, 24)
    torch.testing.assert_close(det.score(x), (x - feats.mean(0)).norm(dim=1))


def test_far_points_score_higher_for_every_metric():
    feats = calibration() + 3.0
    inlier = feats.mean(0, keepdim=True)
    outlier = inlier + 40.0 * torch.linspace(-1, 1, 24)
    for metric in ("euclidean", "cosine", "mahalanobis", "knn"):
        det = RareDetector(24, DetectorConfig(metric=metric, knn_k=5))
        det.fit(feats)
        s = det.score(torch.cat([inlier, outlier]))
        assert s[1] > det.threshold > s[0], metric


def test_fit_drops_non_finite_rows_and_checks_shapes():
    feats = calibration()
    feats[3, 2] = float("nan")
    det = RareDetector(24)
    assert det.fit(feats).shape == (299,)
    with pytest.raises(ValueError, match=r"shape \[n, 24\]"):
        det.fit(torch.zeros(5, 23))
    with pytest.raises(ValueError, match="at least 51 finite embeddings"):
        RareDetector(24, DetectorConfig(metric="knn")).fit(feats[:40])
    with pytest.raises(RuntimeError, match="not calibrated"):
        RareDetector(24).score(feats)


def test_online_threshold_tracks_the_target_rate_under_drift():
    torch.manual_seed(0)
    # A fast drift (60% over 400 steps) needs a larger step than the default, tuned for epochs of drift.
    det = RareDetector(24, DetectorConfig(percentile=0.9, online=True, online_lr=0.5))
    det.fit(calibration())
    fixed = RareDetector(24, DetectorConfig(percentile=0.9))
    fixed.load_state_dict(det.state_dict())
    ring = RareRing(4, [(1, (1,))])
    step = torch.tensor(0)
    rates = []
    for t in range(400):  # the encoder drifts: embeddings spread out by 60% over the run
        x = torch.randn(64, 24) * torch.linspace(0.5, 2.0, 24) * (1 + 0.6 * t / 400)
        ids = torch.arange(64)
        threshold = det.threshold.clone()
        scores, _ = det.enqueue(x, ring, ids, step)
        rates.append(float((scores > threshold).float().mean()))
        fixed.enqueue(x, RareRing(4, [(1, (1,))]), ids, step)
    assert np.mean(rates[-100:]) == pytest.approx(0.1, abs=0.03)
    assert float(det.flag_rate) == pytest.approx(0.1, abs=0.03)
    assert float(fixed.flag_rate) > 0.5  # a fixed threshold flags far more than 10% after the drift


@pytest.mark.parametrize("metric", ["euclidean", "mahalanobis", "knn"])
def test_state_dict_round_trip(metric):
    det = RareDetector(24, DetectorConfig(metric=metric, knn_k=5))
    det.fit(calibration())
    fresh = RareDetector(24, DetectorConfig(metric=metric, knn_k=5))
    fresh.load_state_dict(det.state_dict())
    x = torch.randn(7, 24)
    torch.testing.assert_close(fresh.score(x), det.score(x))


@pytest.mark.parametrize("metric", ["euclidean", "knn"])
def test_enqueue_fills_the_ring_with_flagged_images(metric):
    det = RareDetector(24, DetectorConfig(metric=metric, percentile=0.9, knn_k=5))
    det.fit(calibration())
    ring = RareRing(3, [(2, (4,))], batch_size=6)
    x = calibration(n=6, seed=9).unsqueeze(0).repeat(2, 1, 1)
    x[1, 4] += 100.0  # image 4 is far off in its second view
    crops = [torch.arange(24, dtype=torch.float32).view(6, 4) + 100 * v for v in range(2)]
    ring.stage(crops)
    scores, slots = det.enqueue(x, ring, torch.arange(6) + 50, torch.tensor(11))
    assert slots[4] >= 0
    slot = int(slots[4])
    ring.write(slots)
    assert int(ring.ring_ids[slot]) == 54 and int(ring.ring_steps[slot]) == 11
    assert torch.equal(ring.ring_rows(0)[:, slot], torch.stack([c[4] for c in crops]))


@pytest.mark.parametrize("metric", ["euclidean", "mahalanobis", "knn"])
def test_threshold_holds_its_rate_out_of_sample_with_fewer_images_than_dimensions(metric):
    """n = 64 calibration embeddings in D = 256: in-sample Mahalanobis scores are biased low (the
    calibration set spans its own principal axes), so the threshold comes from out-of-fold scores."""
    gen = torch.Generator().manual_seed(3)
    scale = torch.linspace(0.2, 3.0, 256)
    det = RareDetector(256, DetectorConfig(metric=metric, percentile=0.8, knn_k=5))
    det.fit(torch.randn(64, 256, generator=gen) * scale)
    fresh = torch.randn(4000, 256, generator=gen) * scale
    rate = float(det.flags(det.score(fresh)).float().mean())
    assert rate == pytest.approx(0.2, abs=0.12), rate


def test_knn_bank_dtype_bfloat16_scores_close_to_float32():
    torch.manual_seed(0)
    calib, x = torch.randn(512, 64), torch.randn(32, 64)
    exact = RareDetector(64, DetectorConfig(metric="knn", knn_k=5))
    fast = RareDetector(64, DetectorConfig(metric="knn", knn_k=5, knn_bank_dtype="bfloat16"))
    exact.fit(calib)
    fast.fit(calib)
    assert exact.bank.dtype == torch.float32 and fast.bank.dtype == torch.bfloat16  # auto: fp32 on the CPU
    assert torch.allclose(fast.score(x), exact.score(x), atol=2e-2)
    with pytest.raises(ValueError, match="knn_bank_dtype"):
        DetectorConfig(metric="knn", knn_bank_dtype="half")


def test_fit_drops_rows_whose_distances_overflow_and_refuses_a_threshold_that_is_not_finite(caplog):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    x[3] = 3e38  # finite in fp32, but every squared distance to it (and to a mean it drags) overflows
    det = RareDetector(8, DetectorConfig(metric="euclidean", percentile=0.9))
    with caplog.at_level("WARNING"):
        det.fit(x)
    assert torch.isfinite(det.threshold) and "norm > 1e+18" in caplog.text
    clean = RareDetector(8, DetectorConfig(metric="euclidean", percentile=0.9))
    clean.fit(torch.cat([x[:3], x[4:]]))
    torch.testing.assert_close(det.threshold, clean.threshold)
    with pytest.raises(ValueError, match="no finite score"):
        RareDetector(8, DetectorConfig(metric="cosine")).fit(torch.zeros(16, 8))
