"""Crop boxes and the rare-pixel ground truth of a crop, shared by synthdrive and evaluation.

A global crop is "rare" when the share of rare-class pixels inside its box reaches ``tau``. Shares,
not pixel counts, make the rule independent of the source resolution and of the crop's resize.
"""

from __future__ import annotations

import math

import numpy as np

from oodfast.data.classes import RARE_CLASS_IDS

#: Default share of rare-class pixels that makes a crop rare: 0.1% of the crop, about a 7x7-pixel
#: object in a 224x224 global crop. Smaller specks (a pedestrian 40 m away in a 1280x720 frame covers
#: ~0.04%) are not recognisable after the resize and would only add label noise.
DEFAULT_RARE_TAU: float = 1e-3

#: DINO's global crops (torchvision RandomResizedCrop defaults for the ratio).
GLOBAL_SCALE: tuple[float, float] = (0.4, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def sample_resized_crop_boxes(
    rng: np.random.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = GLOBAL_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """Sample ``n`` boxes exactly as ``torchvision.transforms.RandomResizedCrop.get_params`` does.

    Up to 10 attempts per box draw an area share in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; the first attempt that fits is placed uniformly; if none fits, the box is the centred
    crop with the aspect ratio clamped to ``ratio`` (torchvision's fallback).

    Returns:
        int64 array [n, 4] of (x0, y0, x1, y1) in source pixels, half-open.
    """
    area = float(height * width)
    attempts = 10
    target = area * rng.uniform(scale[0], scale[1], size=(n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    # torchvision rounds with Python's round() (banker's rounding), as does np.rint.
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    w = w[np.arange(n), first]
    h = h[np.arange(n), first]

    # Fallback: centre crop with the aspect ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    # Uniform placement (torch.randint(0, H - h + 1)); the fallback is centred.
    y0 = np.where(found, np.floor(rng.random(n) * (height - h + 1)).astype(np.int64), (height - h) // 2)
    x0 = np.where(found, np.floor(rng.random(n) * (width - w + 1)).astype(np.int64), (width - w) // 2)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def integral_image(binary: np.ndarray) -> np.ndarray:
    """Summed-area table of a [H, W] boolean/integer map, padded to [H + 1, W + 1] (int64)."""
    sat = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(binary, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
    return sat


def box_sums(sat: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Sums of the map behind ``sat`` inside each half-open box [N, 4] (x0, y0, x1, y1) -> int64 [N]."""
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]


def rare_shares(
    mask: np.ndarray, boxes: np.ndarray, rare_ids: tuple[int, ...] = RARE_CLASS_IDS
) -> np.ndarray:
    """Share of rare-class pixels inside each box.

    Args:
        mask: [H, W] uint8 train-ID mask (255 = ignore; ignored pixels count as not rare).
        boxes: [N, 4] int boxes (x0, y0, x1, y1), half-open, inside the mask.
        rare_ids: train IDs that count as rare.

    Returns:
        float64 [N] in [0, 1].
    """
    rare = np.isin(mask, np.asarray(rare_ids, dtype=mask.dtype))
    boxes = np.asarray(boxes, dtype=np.int64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if np.any(areas <= 0):
        raise ValueError(f"boxes must have positive area, got {boxes[areas <= 0][:3].tolist()}")
    return box_sums(integral_image(rare), boxes) / areas
