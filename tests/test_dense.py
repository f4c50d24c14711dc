"""Dense rarity scoring: position views, the k-center coreset, DenseRareDetector against brute force."""

from __future__ import annotations

import pytest
import torch

from oodfast.buffer import RareRing
from oodfast.dense import DenseRareDetector, greedy_k_center, position_view
from oodfast.detect import DetectorConfig, RareDetector

METRICS = ["euclidean", "cosine", "mahalanobis", "knn"]
D = 12
SCALE = torch.linspace(0.5, 2.0, D)
OFFSET = torch.linspace(1.0, 3.0, D)  # away from the origin, so cosine has a direction to measure


def maps(n: int, h: int = 3, w: int = 4, seed: int = 0) -> torch.Tensor:
    """In-distribution channels_last maps [n, D, h, w]: every position drawn from one Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, D, generator=gen) * SCALE + OFFSET
    return x.permute(0, 3, 1, 2)  # a [n, D, h, w] view of [n, h, w, D] memory: channels_last


def detector(metric: str, **config) -> DenseRareDetector:
    return DenseRareDetector(D, DetectorConfig(metric=metric, knn_k=3, **config), coreset=300)


def brute_force(det: DenseRareDetector, fmap: torch.Tensor) -> torch.Tensor:
    """float64 per-position scores [P, B] from the detector's buffers, by the metric's definition."""
    x = fmap.permute(2, 3, 0, 1).reshape(-1, fmap.shape[0], D).double()  # [P, B, D]
    c = det.center.double()
    metric = det.config.metric
    if metric == "euclidean":
        return (x - c).norm(dim=-1)
    if metric == "cosine":
        return 1 - (x @ c) / x.norm(dim=-1)
    if metric == "mahalanobis":
        prec = det.alpha.double() * torch.eye(D, dtype=torch.float64) \
            + det.proj.double().T @ torch.diag(det.coef.double()) @ det.proj.double()
        d = x - c
        return torch.einsum("pbi,ij,pbj->pb", d, prec, d).clamp_min(0).sqrt()
    dist = torch.cdist(torch.nn.functional.normalize(x, dim=-1), det.bank.double())  # [P, B, N]
    return dist.sort(dim=-1).values[..., det.config.knn_k - 1]


def test_position_view_is_a_view_of_the_map_and_refuses_nchw():
    fmap = maps(2, 3, 5)
    v = position_view(fmap)
    assert v.shape == (15, 2, D) and v.stride(-1) == 1 and v.data_ptr() == fmap.data_ptr()
    assert torch.equal(v[1 * 5 + 3, 1], fmap[1, :, 1, 3])  # position p = i * w + j
    tokens = torch.randn(2, 7, D)[:, 1:]  # a ViT's patch tokens, [CLS] dropped
    assert position_view(tokens).shape == (6, 2, D) and position_view(tokens).data_ptr() == tokens.data_ptr()
    with pytest.raises(ValueError, match="not channels_last") as e:
        position_view(fmap.contiguous())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("metric", METRICS)
def test_scores_are_the_max_over_positions_of_brute_force_distances(metric):
    det = detector(metric)
    det.fit(maps(60))
    fmap = maps(5, seed=1)
    expected = brute_force(det, fmap)
    torch.testing.assert_close(det.position_scores(fmap).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.score(fmap).double(), expected.amax(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.score(position_view(fmap)), det.score(fmap))


@pytest.mark.parametrize("metric", METRICS)
def test_one_outlying_position_makes_its_image_rare(metric):
    det = detector(metric, percentile=0.99)
    det.fit(maps(60))
    fmap = maps(6, seed=2).clone(memory_format=torch.channels_last)
    fmap[4, :, 2, 1] = -3.0 * OFFSET  # one of 12 positions, pointing away from the data
    s = det.score(fmap)
    assert int(s.argmax()) == 4 and s[4] > det.threshold
    assert not det.flags(s[[0, 1, 2, 3, 5]]).all()


def test_greedy_k_center_is_the_farthest_point_sequence():
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 6.0], [1.0, 1.0], [9.0, 5.0], [4.0, 3.0], [5.0, 0.5]])
    for seed in range(4):
        got = greedy_k_center(pts, 5, seed=seed).tolist()
        seq = got[:1]  # the seeded start; then each next row is the farthest from those chosen
        for _ in range(4):
            d = torch.cdist(pts, pts[seq]).amin(1)
            seq.append(int(d.argmax()))
        assert got == seq and len(set(got)) == 5
    x = torch.randn(500, 300)  # D > 128: compared after a random projection; still distinct rows
    assert greedy_k_center(x, 64).unique().numel() == 64
    with pytest.raises(ValueError, match="1 <= m <= N"):
        greedy_k_center(pts, 8)


@pytest.mark.parametrize("metric", METRICS)
def test_threshold_flags_the_percentile_of_held_out_images(metric):
    det = detector(metric, percentile=0.9)
    calib = det.fit(maps(400))
    assert calib.shape == ((80,) if metric == "knn" else (400,))  # knn: the 20% held out from the bank
    rate = float(det.flags(det.score(maps(2000, seed=7))).float().mean())
    assert rate == pytest.approx(0.1, abs=0.05), rate


def test_knn_bank_is_a_normalised_coreset_of_positions():
    det = DenseRareDetector(D, DetectorConfig(metric="knn", knn_k=3), coreset=50)
    det.fit(maps(40))
    assert det.bank.shape == (50, D)
    torch.testing.assert_close(det.bank.norm(dim=1), torch.ones(50))


@pytest.mark.parametrize("metric", METRICS)
def test_enqueue_with_one_position_is_the_pooled_detectors(metric):
    """P = 1: the dense detector is the pooled one (same fit for all but knn, whose bank and split
    differ: it gets the pooled statistics), the same scores, slots and ring."""
    calib = maps(80, 1, 1).flatten(1)  # [n, D]
    pooled = RareDetector(D, DetectorConfig(metric=metric, percentile=0.8, knn_k=3))
    pooled.fit(calib)
    dense = detector(metric, percentile=0.8)
    if metric == "knn":
        dense.load_state_dict(pooled.state_dict())
    else:
        dense.fit(calib.unsqueeze(0))
        torch.testing.assert_close(dense.threshold, pooled.threshold)
    x = maps(16, 1, 1, seed=3).flatten(1)
    out = []
    for det, inp in ((pooled, x), (dense, x.unsqueeze(0))):
        ring = RareRing(4, [(1, (2,))], batch_size=16)
        ring.stage([torch.arange(32.0).view(16, 2)])
        scores, slots = det.enqueue(inp, ring, torch.arange(16) + 100, torch.tensor(5))
        ring.write(slots)
        out.append((scores, slots, ring.ring_ids.clone(), ring.state.clone()))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1:], out[0][1:]):
        assert torch.equal(a, b)
    flagged = (out[0][0] > pooled.threshold).nonzero().flatten() + 100
    assert set(out[1][2][out[1][2] >= 0].tolist()) == set(flagged.tolist()[-4:]) and flagged.numel() > 0


def test_enqueue_puts_the_image_with_a_rare_position_in_the_ring():
    det = detector("euclidean", percentile=0.95)
    det.fit(maps(60))
    fmap = maps(8, seed=4).clone(memory_format=torch.channels_last)
    fmap[6, :, 0, 3] += 40.0
    ring = RareRing(2, [(1, (1,))], batch_size=8)
    scores, slots = det.enqueue(fmap, ring, torch.arange(8) + 10, torch.tensor(1))
    assert slots[6] >= 0 and int(ring.ring_ids[int(slots[6])]) == 16
    torch.testing.assert_close(scores, det.score(fmap))


@pytest.mark.parametrize("metric", METRICS)
def test_state_dict_round_trip(metric):
    det = detector(metric)
    det.fit(maps(50))
    fresh = detector(metric)
    fresh.load_state_dict(det.state_dict())
    fmap = maps(4, seed=5)
    torch.testing.assert_close(fresh.score(fmap), det.score(fmap))
    assert torch.equal(fresh.threshold, det.threshold)


def test_bad_shapes_raise_one_line_errors():
    det = detector("euclidean")
    cases = [
        (lambda: det.fit(torch.randn(10, D)), "maps must be"),
        (lambda: det.fit(torch.randn(4, 10, D + 1)), f"D={D + 1}"),
        (lambda: det.fit(maps(4).contiguous()), "channels_last"),
        (lambda: det.score(maps(2)), "not calibrated"),
        (lambda: detector("knn").fit(maps(1)), "at least 2"),
        (lambda: DenseRareDetector(D, coreset=0), "coreset"),
        (lambda: DenseRareDetector(D, DetectorConfig(metric="knn", knn_k=50)).fit(maps(3, 2, 2)), "knn_k=50"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, RuntimeError), match=match) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)
