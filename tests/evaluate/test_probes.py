"""DINO's weighted kNN and the linear probe (oodfast.evaluate.probes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodfast.evaluate.probe_metrics import binary_accuracy
from oodfast.evaluate.probes import knn_classify, knn_votes, linear_probe, linear_probe_logits


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------


def knn_brute_force(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, T: float, c: int) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sim = train @ row
        top = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(c)
        for j in top:
            votes[labels[j]] += math.exp(sim[j] / T)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("T", [0.07, 0.5, 5.0])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_knn_matches_brute_force(k: int, T: float) -> None:
    rng = np.random.default_rng(k * 100 + int(T * 100))
    train = rng.normal(size=(61, 13)).astype(np.float32)
    labels = rng.integers(0, 5, 61)
    test = rng.normal(size=(37, 13)).astype(np.float32)
    expected = knn_brute_force(train.astype(np.float64), labels, test.astype(np.float64), k, T, 5)
    got = knn_classify(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), k=k, T=T,
                       num_classes=5, chunk_size=8)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64 and got.shape == (37,)
    # numpy inputs and another chunking give the same answer
    np.testing.assert_array_equal(knn_classify(train, labels, test, k=k, T=T, num_classes=5), got)


def test_knn_temperature_weighting_decides_between_near_and_many() -> None:
    def unit(cos: float) -> list[float]:
        return [cos, math.sqrt(1.0 - cos * cos)]

    # One very close neighbour of class 1 against two farther ones of class 0.
    train = np.array([unit(0.99), unit(0.50), unit(0.45), unit(-0.9)], np.float32)
    labels = np.array([1, 0, 0, 2])
    test = np.array([[1.0, 0.0]], np.float32)
    # T = 0.07: exp(0.99 / 0.07) = 1.4e6 outweighs exp(0.5 / 0.07) + exp(0.45 / 0.07) = 1.9e3.
    assert knn_classify(train, labels, test, k=3, T=0.07)[0] == 1
    # T = 10: weights ~1 each, so the majority (class 0) wins.
    assert knn_classify(train, labels, test, k=3, T=10.0)[0] == 0
    # Scale does not matter: features are L2-normalised first.
    assert knn_classify(train * 100, labels, test * 0.01, k=3, T=0.07)[0] == 1


def test_knn_votes_are_weighted_shares_and_their_argmax_is_the_classifier() -> None:
    def unit(cos: float) -> list[float]:
        return [cos, math.sqrt(1.0 - cos * cos)]

    train = np.array([unit(0.9), unit(0.6), unit(0.3)], np.float32)
    labels = np.array([1, 0, 0])
    test = np.array([[1.0, 0.0]], np.float32)
    votes = knn_votes(train, labels, test, k=3, T=0.5, num_classes=3)
    w = np.exp(np.array([0.9, 0.6, 0.3]) / 0.5)
    np.testing.assert_allclose(votes[0], [(w[1] + w[2]) / w.sum(), w[0] / w.sum(), 0.0], rtol=1e-5)
    # A temperature that overflows exp(sim / T) in float32 still gives finite shares (all weight on the nearest).
    np.testing.assert_allclose(knn_votes(train, labels, test, k=3, T=1e-3)[0], [0.0, 1.0], atol=1e-6)
    rng = np.random.default_rng(3)
    x, y, q = rng.normal(size=(50, 6)), rng.integers(0, 4, 50), rng.normal(size=(30, 6))
    v = knn_votes(x, y, q, k=9, T=0.1, num_classes=4)
    assert v.shape == (30, 4)
    np.testing.assert_allclose(v.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v.argmax(axis=1), knn_classify(x, y, q, k=9, T=0.1, num_classes=4))


def test_knn_rejects_bad_arguments() -> None:
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k must lie"):
        knn_classify(x, np.zeros(4, np.int64), x, k=5)
    with pytest.raises(ValueError, match="T must be"):
        knn_classify(x, np.zeros(4, np.int64), x, k=2, T=0.0)
    with pytest.raises(ValueError, match="dim"):
        knn_classify(x, np.zeros(4, np.int64), np.ones((2, 4), np.float32), k=2)
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x, np.array([0, 1, -1, 0]), x, k=2)


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


def blobs(seed: int, n: int, d: int = 16, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=4.0, size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + rng.normal(size=(n, d))
    x[:, 0] = 5.0  # a constant dimension: standardisation must not divide by zero
    x[:, 1] *= 1000.0  # a badly scaled dimension
    return x.astype(np.float32), y


def test_linear_probe_separates_and_is_deterministic() -> None:
    x_tr, y_tr = blobs(0, 300)
    x_te, y_te = blobs(1, 200)
    pred = linear_probe(x_tr, y_tr, x_te, seed=0)
    assert pred.dtype == np.int64 and pred.shape == (200,)
    assert (pred == y_te).mean() >= 0.97
    again = linear_probe(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                         seed=0)
    np.testing.assert_array_equal(pred, again)


def test_linear_probe_standardises_features() -> None:
    # Standardisation makes the probe blind to a per-dimension shift and positive scale of the features.
    rng = np.random.default_rng(2)
    x_tr, y_tr = rng.normal(size=(150, 8)).astype(np.float32), rng.integers(0, 3, 150)
    x_te = rng.normal(size=(400, 8)).astype(np.float32)
    a = np.geomspace(1e-3, 1e3, 8).astype(np.float32)
    b = np.linspace(-50, 50, 8).astype(np.float32)
    plain = linear_probe(x_tr, y_tr, x_te, seed=0)
    moved = linear_probe(x_tr * a + b, y_tr, x_te * a + b, seed=0)
    assert (plain == moved).mean() >= 0.99  # equal up to float rounding near decision boundaries


def test_linear_probe_is_scikit_learns_logistic_regression() -> None:
    # The probe is LogisticRegression(lbfgs, multinomial) on standardised features: the same logits as
    # scikit-learn fitted by hand, and (a convex problem, a deterministic solver) the same for every seed.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    x_tr, y_tr = rng.normal(size=(200, 32)).astype(np.float32), rng.integers(0, 4, 200)
    x_te = rng.normal(size=(300, 32)).astype(np.float32)
    x_tr[:, :2] += y_tr[:, None]
    logits = linear_probe_logits(x_tr, y_tr, x_te, C=0.5)
    scaler = StandardScaler().fit(x_tr.astype(np.float64))
    ref = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(x_tr.astype(np.float64)), y_tr)
    np.testing.assert_allclose(logits, ref.decision_function(scaler.transform(x_te.astype(np.float64))),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(linear_probe(x_tr, y_tr, x_te, C=0.5, seed=0),
                                  linear_probe(x_tr, y_tr, x_te, C=0.5, seed=1))
    # A stronger penalty shrinks the logits: C is used.
    assert np.abs(linear_probe_logits(x_tr, y_tr, x_te, C=1e-3)).mean() < np.abs(logits).mean()


def test_linear_probe_binary_margin_and_absent_classes() -> None:
    # Two classes present out of num_classes=4: logits of the absent ones never win; the margin
    # logits[:, 3] - logits[:, 1] is scikit-learn's decision function.
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(6)
    y = np.where(rng.random(300) < 0.5, 1, 3)
    x = rng.normal(size=(300, 5))
    x[:, 0] += (y == 3)
    logits = linear_probe_logits(x, y, x, num_classes=4)
    assert logits.shape == (300, 4) and set(np.unique(logits.argmax(1))) <= {1, 3}
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression().fit(z, y).decision_function(z)
    np.testing.assert_allclose(logits[:, 3] - logits[:, 1], ref, rtol=1e-3, atol=1e-3)


def test_balanced_probe_finds_a_rare_class_the_plain_probe_ignores() -> None:
    # 5% positives with a weak signal: plain cross-entropy's best answer is "negative" almost
    # everywhere; the balanced loss trades accuracy for recall on the rare class.
    rng = np.random.default_rng(11)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.05).astype(np.int64)
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += 1.5 * y
        return x, y

    (x_tr, y_tr), (x_te, y_te) = sample(2000), sample(4000)
    kw = dict(seed=0)
    plain = binary_accuracy(linear_probe(x_tr, y_tr, x_te, **kw), y_te)
    logits = linear_probe_logits(x_tr, y_tr, x_te, class_weight="balanced", **kw)
    assert logits.shape == (4000, 2) and logits.dtype == np.float32
    balanced = binary_accuracy(logits.argmax(axis=1), y_te, scores=logits[:, 1] - logits[:, 0])
    assert plain["balanced_accuracy"] < 0.6
    assert balanced["balanced_accuracy"] > 0.7
    # The Bayes AUROC of a 1.5-sigma shift is Phi(1.5 / sqrt(2)) = 0.856.
    assert 0.8 < balanced["auroc"] < 0.9
    np.testing.assert_array_equal(linear_probe(x_tr, y_tr, x_te, class_weight="balanced", **kw),
                                  logits.argmax(axis=1))


def test_linear_probe_rejects_bad_arguments() -> None:
    x, y = blobs(0, 20)
    with pytest.raises(ValueError, match="max_iter"):
        linear_probe(x, y, x, max_iter=0)
    with pytest.raises(ValueError, match="C must be"):
        linear_probe(x, y, x, C=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, num_classes=2)
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe(np.full_like(x, np.nan), y, x)
    with pytest.raises(ValueError, match="class_weight"):
        linear_probe(x, y, x, class_weight="inverse")
