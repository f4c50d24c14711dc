"""Crop boxes and the rare-pixel ground truth of a crop, shared by synthdrive and evaluation.

A global crop is "rare" when the share of rare-class pixels inside its box reaches ``tau``. Shares,
not pixel counts, make the rule independent of the source resolution and of the crop's resize.

Masks follow the BDD10K label spec: one 8-bit channel (mode L, or P read as its indices) of train
IDs 0..18, with 255 for ignored pixels, the size of the image. :func:`read_mask` refuses anything
else with a one-line :class:`MaskError` that names the file (``oodfast data check`` leaves such
images out of the clean file list, with the same reasons).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from oodfast.data.classes import IGNORE_ID, NUM_CLASSES, RARE_CLASS_IDS
from oodfast.data.errors import DatasetError

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


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

#: True for the stored values a mask may not hold (anything but 0..18 and 255).
_INVALID = np.ones(256, dtype=bool)
_INVALID[:NUM_CLASSES] = False
_INVALID[IGNORE_ID] = False
_MASK_FIX = ("run `oodfast data check` on the dataset (it leaves out images whose mask is bad), or fix "
             f"the mask: one 8-bit channel of BDD10K train IDs 0..{NUM_CLASSES - 1} and {IGNORE_ID} "
             "(ignore), the size of its image")


class MaskError(DatasetError):
    """A segmentation mask that is unreadable or breaks the label spec; the message names the file."""


def mask_header_problem(mask: Image.Image, image_size: tuple[int, int] | None) -> str | None:
    """What is wrong with a mask before decoding it (mode, size), or None.

    Args:
        mask: the opened (not necessarily loaded) mask.
        image_size: the image's (width, height), as PIL reports it, or None to skip the size check.
    """
    if mask.mode not in ("L", "P"):
        return f"mode {mask.mode}, expected single-channel 8-bit (L or P)"
    if image_size is not None and mask.size != tuple(image_size):
        return (f"size {mask.width}x{mask.height} differs from the image's "
                f"{image_size[0]}x{image_size[1]}")
    return None


def mask_values_problem(values: np.ndarray) -> str | None:
    """What is wrong with a decoded mask's values (uint8 [H, W]), or None: only 0..18 and 255 are valid."""
    present = np.bincount(values.ravel(), minlength=256).astype(bool)
    invalid = np.flatnonzero(present & _INVALID)
    if invalid.size == 0:
        return None
    shown = ", ".join(map(str, invalid[:5].tolist())) + (", ..." if invalid.size > 5 else "")
    return f"values outside 0..{NUM_CLASSES - 1} and {IGNORE_ID}: {shown}"


def read_mask(path: str | os.PathLike[str], image: str | os.PathLike[str] | None = None, *,
              image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read and validate a train-ID mask: uint8 [H, W] (P masks give their palette indices).

    Args:
        path: the mask file.
        image: its image file; the mask must have the image's size (read from the image's header,
            nothing is decoded). Or give ``image_size`` (width, height) directly.

    Raises:
        MaskError: unreadable, truncated or undecodable; not single-channel 8-bit; not the image's
            size; values other than 0..18 and 255. One line, naming the mask file.
    """
    from oodfast.data.imageio import ImageFileError, open_image, strict_decoding

    if image is not None and image_size is None:
        try:
            with open_image(image) as im:
                image_size = im.size
        except ImageFileError as e:
            raise MaskError(f"mask {path}: its image cannot be read ({e}); {_MASK_FIX}") from None
    try:
        with strict_decoding(), open(path, "rb") as f, Image.open(f) as mk:
            why = mask_header_problem(mk, image_size)
            values = None if why is not None else np.asarray(mk)
    except (OSError, ValueError, SyntaxError) as e:  # includes PIL's UnidentifiedImageError
        raise MaskError(f"mask {path}: cannot decode it ({type(e).__name__}: {e}); {_MASK_FIX}") from None
    if values is not None:
        why = mask_values_problem(values)
    if why is not None:
        raise MaskError(f"mask {path}: {why}; {_MASK_FIX}")
    return values
