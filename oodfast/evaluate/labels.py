"""Per-crop labels from train-ID masks: the dominant class, rare presence, pixel counts and shares.

:func:`crop_labels` counts the pixels of each class inside every box with one summed-area table
per class (vectorised over boxes); :func:`class_pixel_share` is the pixel frequency of each class
over a split's masks, from which :mod:`oodfast.evaluate.bands` cuts the head / middle / tail bands.
The rare-presence ground truth (rare-class pixel share >= tau) is the one ``oodfast evaluate
detect`` uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from oodfast.data.classes import IGNORE_ID, NUM_CLASSES, RARE_CLASS_IDS
from oodfast.data.crops import DEFAULT_RARE_TAU

__all__ = ["class_pixel_share", "crop_labels", "read_mask"]


def crop_labels(
    mask: np.ndarray,
    boxes: np.ndarray,
    rare_ids: Iterable[int] = RARE_CLASS_IDS,
    *,
    tau: float = DEFAULT_RARE_TAU,
) -> dict[str, np.ndarray]:
    """Per-crop labels from a train-ID mask.

    Pixel counts per class inside every box come from one summed-area table per class present in
    the mask (vectorised over boxes; no loop over pixels or boxes).

    Args:
        mask: [H, W] integer train-ID mask; ``IGNORE_ID`` (255) pixels belong to no class.
        boxes: [N, 4] int boxes (x0, y0, x1, y1), half-open, inside the mask, positive area.
        rare_ids: train IDs that count as rare.
        tau: a crop is rare-present when its rare-class pixel share is >= ``tau`` (shares are over
            all pixels of the box, ignore pixels included, as :func:`oodfast.data.crops.rare_shares`).

    Returns:
        ``dominant``: int64 [N], the most frequent train ID in the box ignoring 255 (ties: the lowest
        ID); -1 when every pixel of the box is ignored.
        ``rare_share``: float64 [N] in [0, 1].
        ``rare_present``: bool [N], ``rare_share >= tau``.
        ``counts``: int64 [N, NUM_CLASSES] labelled pixels per class in each box.

    Raises:
        ValueError: ``mask`` is not 2-D or holds IDs other than 0-18 and 255; ``boxes`` is not
            [N, 4], lies outside the mask or has an empty box; ``tau`` outside (0, 1].
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D [H, W] train-ID array, got shape {mask.shape}")
    boxes = np.asarray(boxes, dtype=np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {boxes.shape}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    h, w = mask.shape
    x0, y0, x1, y1 = boxes.T
    if np.any(x0 < 0) or np.any(y0 < 0) or np.any(x1 > w) or np.any(y1 > h):
        raise ValueError(f"boxes must lie inside the {w}x{h} mask, got e.g. "
                         f"{boxes[(x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h)][:3].tolist()}")
    areas = (x1 - x0) * (y1 - y0)
    if np.any((x1 <= x0) | (y1 <= y0)):
        raise ValueError(f"boxes must have positive area, got {boxes[(x1 <= x0) | (y1 <= y0)][:3].tolist()}")
    present = np.unique(mask)
    bad = present[(present >= NUM_CLASSES) & (present != IGNORE_ID)]
    if bad.size or np.any(present < 0):
        raise ValueError(f"mask holds values {sorted(set(bad.tolist()) | set(present[present < 0].tolist()))} "
                         f"that are neither train IDs 0-{NUM_CLASSES - 1} nor the ignore ID {IGNORE_ID}")
    classes = present[present < NUM_CLASSES].astype(np.int64)

    counts = np.zeros((len(boxes), NUM_CLASSES), dtype=np.int64)
    if classes.size and len(boxes):
        # One summed-area table per present class, [C, H + 1, W + 1]; int32 holds any mask below 2^31 pixels.
        dtype = np.int32 if h * w < 2**31 else np.int64
        sat = np.zeros((classes.size, h + 1, w + 1), dtype=dtype)
        onehot = mask[None, :, :] == classes[:, None, None]
        np.cumsum(np.cumsum(onehot, axis=1, dtype=dtype), axis=2, out=sat[:, 1:, 1:])
        sums = sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]  # [C, N]
        counts[:, classes] = sums.T
    labelled = counts.sum(axis=1)
    dominant = np.where(labelled > 0, counts.argmax(axis=1), -1).astype(np.int64)
    rare = np.asarray(sorted(set(int(i) for i in rare_ids)), dtype=np.int64)
    if rare.size and (rare.min() < 0 or rare.max() >= NUM_CLASSES):
        raise ValueError(f"rare_ids must be train IDs in [0, {NUM_CLASSES}), got {rare.tolist()}")
    rare_share = counts[:, rare].sum(axis=1) / areas if rare.size else np.zeros(len(boxes))
    return {
        "dominant": dominant,
        "rare_share": rare_share.astype(np.float64),
        "rare_present": rare_share >= tau,
        "counts": counts,
    }


def class_pixel_share(masks: Sequence[str | os.PathLike[str]] | Iterable[np.ndarray]) -> np.ndarray:
    """Share of labelled pixels per train ID over masks (paths or [H, W] arrays): float64 [NUM_CLASSES].

    Ignore pixels (255) are left out of the denominator. Raises ValueError when no pixel is labelled.
    """
    total = np.zeros(NUM_CLASSES, dtype=np.int64)
    for m in masks:
        arr = read_mask(m) if isinstance(m, (str, os.PathLike)) else np.asarray(m)
        total += np.bincount(arr.ravel(), minlength=256)[:NUM_CLASSES]
    if total.sum() == 0:
        raise ValueError("masks hold no labelled pixel (all ignore); class pixel shares are undefined")
    return total / total.sum()


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A one-channel train-ID mask PNG as an [H, W] array; ValueError naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as e:
        raise ValueError(f"cannot read mask {path}: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"mask {path} must be a one-channel train-ID PNG, got shape {arr.shape}")
    return arr
