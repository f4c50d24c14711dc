"""The per-batch plan: which files each batch takes (:func:`epoch_plan`) and every random decision.

All randomness is drawn on the host with numpy, one generator per batch seeded by
``(seed, epoch, shard, step)`` (:func:`batch_rng`), so a batch is a pure function of those numbers.
:func:`sample_view_params` packs a batch's decisions into float32 vectors (:data:`PARAM_FIELDS`)
that the DALI and torch backends apply on the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from oodfast.data.multicrop.config import MultiCropConfig


@dataclass
class MultiCropBatch:
    """One batch of multi-crop views.

    Attributes:
        views: ``config.n_views`` tensors [B, 3, H, W] (global views first), normalised, on the device
            (with the DALI loader's ``zero_copy``: views of DALI's buffers, valid until the next batch).
        index: [B] int64 positions of the images in ``files`` (CPU).
        boxes: [B, 2, 4] int64 boxes (x0, y0, x1, y1) of the global crops, half-open, in source
            pixels (CPU).
        params: with ``debug=True`` (DALI / torch), the host-drawn decisions: a dict of numpy arrays
            [B, n_views, ...] (see :data:`PARAM_FIELDS`); else None.
        has_clean: the loader was built with ``clean_view=True``: ``views`` ends with one more tensor,
            the clean view [B, 3, G, G] (:attr:`clean`). Riding in ``views``, it reaches whatever a
            consumer copies the views into.

    With ``replay_ids`` (the re-augmenting replay), every field holds B + C rows: the B new images,
    then C buffered ones, decoded and augmented afresh (their ``index`` from the ring).
    """

    views: list[torch.Tensor]
    index: torch.Tensor
    boxes: torch.Tensor
    params: dict[str, np.ndarray] | None = None
    has_clean: bool = False

    @property
    def clean(self) -> torch.Tensor | None:
        """The clean view [B, 3, G, G]: the whole image resized to the global crop size, with no flip and
        no photometric op (what a detector scores, so a score depends on the image alone), or None."""
        return self.views[-1] if self.has_clean else None

    @property
    def crops(self) -> list[torch.Tensor]:
        """The multi-crop views alone (global first), without the clean view."""
        return self.views[:-1] if self.has_clean else self.views


class ReplayIds(Protocol):
    """Where a loader reads the ids of the buffered images it re-augments (the ``ids`` replay store):
    ``capacity`` C and ``at(step)``, int64 [C] ring ids as published after training step ``step``
    (-1: an empty slot), from any thread, never waiting for the device."""

    capacity: int

    def at(self, step: int) -> np.ndarray: ...


#: A batch of global step g re-augments the ring ids published after step ``g - (prefetch depth +
#: REPLAY_LAG)``: the trainer reads step t - 1's scalars once step t is enqueued, so that step's copy of
#: the ids (enqueued before its scalars) has completed when the loader is asked for batch t + 1, and
#: the batch is the same on the CPU and the GPU, whatever the timing.
REPLAY_LAG = 2


def buffered_ids(source: ReplayIds, step: int, lag: int, new: Sequence[int]) -> np.ndarray:
    """The C ids a batch of global step ``step`` re-augments: ``source.at(step - lag)``, an empty slot
    (-1) taking a new image of the batch (``new`` [B]) instead, so every row is an image."""
    ids = np.asarray(source.at(step - lag), np.int64).reshape(-1)
    if len(ids) != source.capacity:
        raise ValueError(f"replay ids: expected {source.capacity} ring ids, got {len(ids)}")
    empty = ids < 0
    if empty.any():
        ids = ids.copy()
        ids[empty] = np.asarray(new, np.int64)[np.flatnonzero(empty) % len(new)]
    return ids


#: Columns of the per-view parameter vector fed to the DALI pipeline (float32 [len(PARAM_FIELDS)]).
PARAM_FIELDS: tuple[str, ...] = (
    "y0", "x0", "y1", "x1",          # crop box, source pixels (the resize ROI, tensor order)
    "flip",                          # 1: mirror horizontally
    "jitter",                        # 1: colour jitter applied
    "brightness", "contrast",        # jitter factors (1 when not jittered)
    "saturation",                    # effective saturation: jitter factor, times 0 when grayscale
    "hue_deg",                       # hue rotation in degrees (torchvision's fraction x 360)
    "gray", "color",                 # grayscale applied; 1 when jitter or gray (hsv op runs)
    "blur", "sigma",                 # gaussian blur applied and its sigma
    "solarize",                      # solarisation applied
)
#: Column of each field in a parameter vector.
PARAM_INDEX: dict[str, int] = {name: i for i, name in enumerate(PARAM_FIELDS)}
_P = PARAM_INDEX


def resolve_shard(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard_id, num_shards): explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
    if shard_id is None:
        shard_id = int(os.environ.get("RANK", "0")) if num_shards > 1 else 0
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must lie in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
    return shard_id, num_shards


def steps_per_epoch(n_files: int, batch_size: int, num_shards: int, epoch_length: int | None) -> int:
    """Batches per shard per epoch: ``epoch_length (default n_files) // (num_shards * batch_size)``."""
    images = n_files if epoch_length is None else epoch_length
    return images // (num_shards * batch_size)


def epoch_plan(n_files: int, batch_size: int, *, seed: int, epoch: int, shard_id: int = 0,
               num_shards: int = 1, epoch_length: int | None = None) -> np.ndarray:
    """The file positions of one shard's batches in one epoch: int64 [steps, batch_size].

    One global order per (seed, epoch) (a permutation of all files, concatenated with further
    permutations when ``epoch_length`` exceeds the file count), cut to whole global batches (drop
    last) and dealt out round-robin: shard ``s`` takes rows ``s, s + S, ...`` of the global order's
    [steps * S, B] view, so the shards never overlap within an epoch.
    """
    steps = steps_per_epoch(n_files, batch_size, num_shards, epoch_length)
    need = steps * num_shards * batch_size
    ss = np.random.SeedSequence([seed, epoch, 0x5EED])
    orders = [np.random.default_rng(child).permutation(n_files)
              for child in ss.spawn(max(1, -(-need // max(n_files, 1))))]
    order = np.concatenate(orders)[:need] if need else np.zeros(0, np.int64)
    return order.reshape(steps * num_shards, batch_size)[shard_id::num_shards].astype(np.int64)


def batch_rng(seed: int, epoch: int, shard_id: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of every random decision of one batch; ``stream`` 1 draws the buffered rows' of
    the re-augmenting replay (so the new images' decisions are those of a batch without them)."""
    key = [seed, epoch, shard_id, step] + ([stream] if stream else [])
    return np.random.default_rng(np.random.SeedSequence(key))


def resized_crop_boxes(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                       scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params``, vectorised over images of different sizes.

    Up to 10 attempts draw an area share in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    the first that fits is placed uniformly; else the centre crop with the ratio clamped.

    Args:
        heights, widths: int [n] source sizes.

    Returns:
        int64 [n, 4] boxes (x0, y0, x1, y1), half-open, in source pixels.
    """
    H = np.asarray(heights, np.int64)[:, None]
    W = np.asarray(widths, np.int64)[:, None]
    n = H.shape[0]
    target = (H * W) * rng.uniform(scale[0], scale[1], size=(n, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, 10)))
    u = rng.random((n, 2))  # drawn before any branch: fixed consumption
    # torchvision rounds with Python's round() (banker's rounding), as does np.rint.
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    rows = np.arange(n)
    first = np.argmax(ok, axis=1)
    found = ok[rows, first]
    w, h = w[rows, first], h[rows, first]
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H
    lo, hi = min(ratio), max(ratio)
    fw = np.where(in_ratio < lo, W, np.where(in_ratio > hi, np.rint(H * hi).astype(np.int64), W))
    fh = np.where(in_ratio < lo, np.rint(W / lo).astype(np.int64), H)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    y0 = np.where(found, np.floor(u[:, 0] * (H - h + 1)).astype(np.int64), (H - h) // 2)
    x0 = np.where(found, np.floor(u[:, 1] * (W - w + 1)).astype(np.int64), (W - w) // 2)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def sample_view_params(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                       config: MultiCropConfig) -> np.ndarray:
    """Every random decision of a batch: float32 [B, n_views, len(PARAM_FIELDS)].

    The draws per view are fixed (crop, then one uniform each for flip, jitter, the four jitter
    factors, gray, blur, sigma, solarize), so a probability of 0 or 1 changes no other decision.
    Coin flips follow the paper's code: ``u < p`` for torchvision's RandomApply / RandomHorizontalFlip /
    RandomGrayscale and DINO's Solarization, ``u <= p`` for DINO's GaussianBlur.
    """
    n = len(heights)
    out = np.zeros((n, config.n_views, len(PARAM_FIELDS)), np.float32)
    for v, (_, aug, _, scale) in enumerate(config.view_kinds()):
        box = resized_crop_boxes(rng, heights, widths, scale, config.ratio)
        u = rng.random((n, 9))
        jitter = u[:, 1] < aug.jitter_p
        b = np.where(jitter, 1 + aug.brightness * (2 * u[:, 2] - 1), 1.0)
        c = np.where(jitter, 1 + aug.contrast * (2 * u[:, 3] - 1), 1.0)
        s = np.where(jitter, 1 + aug.saturation * (2 * u[:, 4] - 1), 1.0)
        hue = np.where(jitter, aug.hue * (2 * u[:, 5] - 1), 0.0)
        gray = u[:, 6] < aug.grayscale_p
        blur = u[:, 7] <= aug.blur_p if aug.blur_p > 0 else np.zeros(n, bool)
        sigma = aug.blur_sigma[0] + (aug.blur_sigma[1] - aug.blur_sigma[0]) * u[:, 8]
        solar = rng.random(n) < aug.solarize_p
        p = out[:, v]
        p[:, _P["y0"]], p[:, _P["x0"]], p[:, _P["y1"]], p[:, _P["x1"]] = box[:, 1], box[:, 0], box[:, 3], box[:, 2]
        p[:, _P["flip"]] = u[:, 0] < aug.flip_p
        p[:, _P["jitter"]] = jitter
        p[:, _P["brightness"]], p[:, _P["contrast"]] = b, c
        p[:, _P["saturation"]] = np.where(gray, 0.0, s)
        p[:, _P["hue_deg"]] = hue * 360.0
        p[:, _P["gray"]] = gray
        p[:, _P["color"]] = jitter | gray
        p[:, _P["blur"]] = blur
        p[:, _P["sigma"]] = sigma
        p[:, _P["solarize"]] = solar
    return out


def boxes_from_params(params: np.ndarray) -> np.ndarray:
    """int64 [..., 4] boxes (x0, y0, x1, y1) from parameter vectors [..., len(PARAM_FIELDS)]."""
    cols = [_P["x0"], _P["y0"], _P["x1"], _P["y1"]]
    return params[..., cols].astype(np.int64)


def params_dict(params: np.ndarray) -> dict[str, np.ndarray]:
    """Named view of parameter vectors [B, V, F]: field -> [B, V]."""
    return {name: params[..., i] for i, name in enumerate(PARAM_FIELDS)}



def batch_params(seed: int, epoch: int, shard_id: int, step: int, heights: np.ndarray, widths: np.ndarray,
                 config: MultiCropConfig, new: int) -> np.ndarray:
    """:func:`sample_view_params` of one batch whose first ``new`` rows are its new images and the rest
    (if any) buffered ones: those draw from their own stream, so the new rows' decisions do not depend
    on whether buffered rows ride along. float32 [rows, n_views, len(PARAM_FIELDS)]."""
    params = sample_view_params(batch_rng(seed, epoch, shard_id, step), heights[:new], widths[:new], config)
    if len(heights) == new:
        return params
    extra = sample_view_params(batch_rng(seed, epoch, shard_id, step, stream=1), heights[new:], widths[new:], config)
    return np.concatenate([params, extra])
