"""Rare object instances from the masks, and per-object recall of a detector.

A crop-level table says how often flagged crops hold rare pixels; it cannot say whether the detector
finds a bus but misses every pole. Here each rare object is an *instance*: a connected component
(8-connected, :func:`scipy.ndimage.label`) of one rare class in the full-image mask. An instance
*counts for* a crop when at least ``min_object_pixels`` of it lie inside the crop's box, measured in
the crop's resized pixels (source pixels inside the box x crop area / box area), so "16 pixels"
means what the encoder sees. Per-object recall of a class is the share of its (crop, instance)
pairs whose crop is flagged; its interval resamples images (:func:`oodfast.evaluate.metrics.count_interval`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from oodfast.evaluate.metrics import count_interval

__all__ = ["DEFAULT_MIN_OBJECT_PIXELS", "crop_instances", "object_recall", "rare_instances"]

#: An instance counts for a crop from 16 of its pixels inside the crop (a 4x4 patch at the crop's resolution).
DEFAULT_MIN_OBJECT_PIXELS = 16

_EIGHT = np.ones((3, 3), dtype=bool)


def rare_instances(mask: np.ndarray, rare_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Instances of the rare classes in a [H, W] train-ID mask.

    Returns:
        (labels int32 [H, W]: 0 = no rare instance, k = instance k; classes int64 [K]: the class of
        instance k at index k - 1).
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    classes: list[np.ndarray] = []
    for c in rare_ids:
        where = mask == c
        if not where.any():
            continue
        lab, n = ndimage.label(where, structure=_EIGHT)
        labels[where] = lab[where] + sum(len(k) for k in classes)
        classes.append(np.full(n, int(c), dtype=np.int64))
    return labels, (np.concatenate(classes) if classes else np.zeros(0, np.int64))


def crop_instances(labels: np.ndarray, classes: np.ndarray, boxes: np.ndarray, crop_hw: tuple[int, int],
                   min_object_pixels: int = DEFAULT_MIN_OBJECT_PIXELS) -> list[np.ndarray]:
    """The instances that count for each crop box.

    Args:
        labels, classes: :func:`rare_instances` of the image.
        boxes: int [n, 4] crop boxes (x0, y0, x1, y1), half-open, in source pixels.
        crop_hw: the (height, width) each box is resized to.
        min_object_pixels: resized pixels of an instance that must lie inside the box.

    Returns:
        per box, int64 [m] instance numbers (1-based, as in ``labels``) that count for it.
    """
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, np.int64):
        if classes.size == 0:
            out.append(np.zeros(0, np.int64))
            continue
        inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=classes.size + 1)[1:]
        resized = inside * (crop_hw[0] * crop_hw[1]) / max(1, (x1 - x0) * (y1 - y0))
        out.append(np.flatnonzero(resized >= min_object_pixels).astype(np.int64) + 1)
    return out


def object_recall(flagged: np.ndarray, pair_crop: np.ndarray, pair_class: np.ndarray, crop_image: np.ndarray,
                  class_names: dict[int, str], *, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, dict[str, object]]:
    """Per-object recall per rare class (and ``all`` classes together), with image-level intervals.

    Args:
        flagged: bool [N] per crop; pair_crop / pair_class: int [M] the crop row and class of each
            (crop, instance) pair; crop_image: int [N] the image of each crop (the bootstrap unit).
        class_names: class id -> name, in report order; classes without a pair are left out.

    Returns:
        name -> {recall, ci [low, high], pairs (count), images (with a pair)}.
    """
    present = [c for c in class_names if np.any(pair_class == c)]
    if not present:
        return {}
    ids, image_of_crop = np.unique(crop_image, return_inverse=True)
    img = image_of_crop[pair_crop]
    hit = np.asarray(flagged, bool)[pair_crop]
    k = len(present) + 1
    per_image = np.zeros((ids.size, 2 * k))  # [pairs of class 0..k-1 (k-1 = all), flagged pairs of ...]
    for j, c in enumerate(present):
        sel = pair_class == c
        per_image[:, j] = np.bincount(img[sel], minlength=ids.size)
        per_image[:, k + j] = np.bincount(img[sel], weights=hit[sel], minlength=ids.size)
    per_image[:, k - 1] = per_image[:, : k - 1].sum(1)
    per_image[:, 2 * k - 1] = per_image[:, k: 2 * k - 1].sum(1)

    def recall(counts: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.moveaxis(counts[..., k:] / counts[..., :k], -1, 0)

    point = recall(per_image.sum(0))
    ci = count_interval(recall, per_image, resamples=resamples, seed=seed, level=level)
    names = [class_names[c] for c in present] + ["all"]
    return {name: {"recall": float(point[j]), "ci": [float(ci[j, 0]), float(ci[j, 1])],
                   "pairs": int(per_image[:, j].sum()), "images": int((per_image[:, j] > 0).sum())}
            for j, name in enumerate(names)}
