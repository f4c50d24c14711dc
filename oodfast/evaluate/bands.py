"""Head / middle / tail frequency bands of the 19 classes, from per-class pixel shares.

:func:`frequency_bands` cuts the bands (the rule is :data:`BAND_RULE`, and why it is that rule is
in its docstring); :func:`share_array` validates a share table given by class name, train ID or as
an array. Accuracy per band is :func:`oodfast.evaluate.probe_metrics.per_band_accuracy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from oodfast.data.classes import CLASS_IDS, CLASS_NAMES, NUM_CLASSES

__all__ = ["BANDS", "BAND_RULE", "HEAD_CUMULATIVE_SHARE", "TAIL_CLASS_SHARE", "frequency_bands", "share_array"]

#: The frequency bands, most frequent classes first.
BANDS: tuple[str, ...] = ("head", "middle", "tail")
#: Head classes: the most frequent classes that together cover the first 80% of labelled pixels.
HEAD_CUMULATIVE_SHARE: float = 0.80
#: Tail classes: each covers less than 1% of labelled pixels (and is not head).
TAIL_CLASS_SHARE: float = 0.01
#: The band rule in words, as the report states it.
BAND_RULE = (f"head: the most frequent classes that together cover the first "
             f"{HEAD_CUMULATIVE_SHARE:.0%} of labelled training pixels (the class crossing "
             f"{HEAD_CUMULATIVE_SHARE:.0%} included); tail: the other classes each below "
             f"{TAIL_CLASS_SHARE:.0%} of pixels; middle: the rest")


def share_array(
    class_pixel_share: Mapping[str, float] | Mapping[int, float] | Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Per-class shares (dict by name or ID, or array [19]) -> validated float64 [19] summing to 1."""
    share = np.zeros(NUM_CLASSES, dtype=np.float64)
    if isinstance(class_pixel_share, Mapping):
        for key, value in class_pixel_share.items():
            if isinstance(key, str):
                if key not in CLASS_IDS:
                    raise ValueError(f"class_pixel_share: unknown class name {key!r}; valid: {', '.join(CLASS_NAMES)}")
                share[CLASS_IDS[key]] = float(value)
            else:
                if not 0 <= int(key) < NUM_CLASSES:
                    raise ValueError(f"class_pixel_share: train ID {key} outside [0, {NUM_CLASSES})")
                share[int(key)] = float(value)
    else:
        arr = np.asarray(class_pixel_share, dtype=np.float64)
        if arr.shape != (NUM_CLASSES,):
            raise ValueError(f"class_pixel_share must have {NUM_CLASSES} entries (one per train ID), "
                             f"got shape {arr.shape}")
        share[:] = arr
    if not np.all(np.isfinite(share)) or np.any(share < 0) or share.sum() <= 0:
        raise ValueError(f"class_pixel_share must be finite, non-negative and not all zero, got {share.tolist()}")
    return share / share.sum()


def frequency_bands(
    class_pixel_share: Mapping[str, float] | Mapping[int, float] | Sequence[float] | np.ndarray,
    *,
    head_cumulative: float = HEAD_CUMULATIVE_SHARE,
    tail_share: float = TAIL_CLASS_SHARE,
) -> dict[int, str]:
    """Head / middle / tail band of each of the 19 classes by pixel frequency.

    Rule: sort the classes by pixel share, most frequent first (ties by train ID). **Head** = the
    shortest prefix whose cumulative share reaches ``head_cumulative`` (80%): the classes that make
    up most of what the encoder sees. **Tail** = the remaining classes whose own share is below
    ``tail_share`` (1%), absent classes included. **Middle** = everything else.

    Why: a cumulative cut for the head adapts to how concentrated the data is (on BDD and
    synthdrive 4-5 classes, road / building / sky / vegetation (/ car), cover 80%); an absolute cut
    for the tail matches how long-tail benchmarks define rare classes and does not depend on how many
    classes there are, and on BDD it puts the project's rare classes (person, rider, bicycle,
    motorcycle, sign, light, train) in the tail. Head takes precedence if both cuts apply.

    Args:
        class_pixel_share: per-class share, as a dict keyed by class name (synthdrive's manifest
            ``class_pixel_share``) or train ID, or an array [19] indexed by train ID. Missing classes
            count as 0. Shares need not sum to 1 (they are renormalised).

    Returns:
        train ID -> ``"head"`` | ``"middle"`` | ``"tail"`` for all 19 classes.

    Raises:
        ValueError: unknown class names or IDs, a wrong length, negative or non-finite shares, or
            all zero.
    """
    share = share_array(class_pixel_share)
    if not 0.0 < head_cumulative <= 1.0:
        raise ValueError(f"head_cumulative must lie in (0, 1], got {head_cumulative}")
    if not 0.0 <= tail_share < 1.0:
        raise ValueError(f"tail_share must lie in [0, 1), got {tail_share}")
    order = np.lexsort((np.arange(NUM_CLASSES), -share))  # descending share, ties by ID
    cumulative = np.cumsum(share[order])
    # The first position whose cumulative share reaches the cut closes the head (tolerance for rounding).
    n_head = int(np.searchsorted(cumulative, head_cumulative - 1e-12, side="left")) + 1
    bands: dict[int, str] = {}
    for rank, cid in enumerate(order.tolist()):
        if rank < n_head:
            bands[cid] = "head"
        elif share[cid] < tail_share:
            bands[cid] = "tail"
        else:
            bands[cid] = "middle"
    return dict(sorted(bands.items()))
