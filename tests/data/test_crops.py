"""Crop boxes follow torchvision's RandomResizedCrop; rare shares match a brute-force count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from oodfast.data.crops import rare_shares, sample_resized_crop_boxes


@pytest.mark.parametrize("height, width", [(720, 1280), (100, 100), (50, 400)])
def test_boxes_match_torchvision_distribution(height: int, width: int) -> None:
    n = 3000
    ours = sample_resized_crop_boxes(np.random.default_rng(0), n, height, width, (0.4, 1.0))
    assert ours.dtype == np.int64 and ours.shape == (n, 4)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    assert ((ours[:, 2] > ours[:, 0]) & (ours[:, 3] > ours[:, 1])).all()

    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, [0.4, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    # ref rows are (top, left, h, w)
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    ref_aspect = ref[:, 3] / ref[:, 2]
    ref_cx = (ref[:, 1] + ref[:, 3] / 2) / width
    our_area = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1]) / (height * width)
    our_aspect = (ours[:, 2] - ours[:, 0]) / (ours[:, 3] - ours[:, 1])
    our_cx = (ours[:, 0] + ours[:, 2]) / 2 / width
    for name, a, b in (("area", our_area, ref_area), ("aspect", our_aspect, ref_aspect), ("centre x", our_cx, ref_cx)):
        result = stats.ks_2samp(a, b)
        assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.3f} (p={result.pvalue:.2g})"


def test_rare_shares_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.choice(np.array([0, 5, 11, 13, 255], np.uint8), size=(37, 53), p=[0.5, 0.1, 0.1, 0.2, 0.1])
    boxes = sample_resized_crop_boxes(rng, 200, 37, 53, (0.05, 1.0))
    got = rare_shares(mask, boxes, rare_ids=(5, 11))
    for (x0, y0, x1, y1), share in zip(boxes, got):
        window = mask[y0:y1, x0:x1]
        assert share == pytest.approx(np.isin(window, [5, 11]).mean())


def test_rare_shares_rejects_empty_boxes() -> None:
    with pytest.raises(ValueError, match="positive area"):
        rare_shares(np.zeros((4, 4), np.uint8), np.array([[1, 1, 1, 3]]))


def test_fallback_is_centred_with_clamped_ratio() -> None:
    # scale > 1 can never fit, so every box takes torchvision's fallback: the centred crop.
    boxes = sample_resized_crop_boxes(np.random.default_rng(0), 5, 100, 400, scale=(2.0, 3.0))
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    assert (h == 100).all() and (w == round(100 * 4 / 3)).all()
    assert (boxes[:, 0] == (400 - w) // 2).all()
    assert math.isclose(float(w[0] / h[0]), 4 / 3, rel_tol=0.01)
