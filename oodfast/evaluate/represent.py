"""Representation quality of a frozen encoder: DINO's weighted kNN and a linear probe on crop labels.

The paper never evaluated whether replaying rare images improves the learned representation. This
module measures it on any BDD10K-layout dataset with segmentation masks (synthdrive or real):

1. Crops. Each image gets ``crops_per_image`` boxes drawn with torchvision's RandomResizedCrop
   algorithm (:func:`oodfast.data.crops.sample_resized_crop_boxes`) from a generator seeded by
   ``(crop_seed, image position)``, so the crops are a pure function of the file list and the seed.
   Each box is cut and resized (bicubic) with PIL and ImageNet-normalised: no flip, no colour
   augmentation.
2. Labels per crop from the mask (:func:`crop_labels`): the dominant class (most frequent train ID
   in the box, ignore pixels excluded) and rare presence (rare-class pixel share >= tau, the same
   ground truth as ``oodfast evaluate detect``).
3. Frozen features (:func:`extract_features`): the encoder in eval mode under ``torch.inference_mode``.
4. Probes: DINO's weighted kNN (:func:`knn_votes` / :func:`knn_classify`, k = 20, T = 0.07, as
   ``eval_knn.py``) and a linear probe (:func:`linear_probe_logits`) trained on standardised
   train-split features, evaluated on the test split, for both tasks. The dominant-class probe is
   plain cross-entropy (DINO's linear evaluation); the rare-presence probe is class-balanced, since
   at a prevalence near 12% an unweighted probe answers "absent" everywhere.
5. Accuracy overall and for head / middle / tail classes by pixel frequency
   (:func:`frequency_bands`, :func:`per_band_accuracy`); for rare presence accuracy, balanced
   accuracy and the threshold-free AUROC of the kNN vote share and of the probe's logit margin
   (:func:`binary_accuracy`); means and 95% t-intervals over the linear probe's seeds
   (:func:`evaluate_representation`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodfast.data.classes import CLASS_IDS, CLASS_NAMES, IGNORE_ID, NUM_CLASSES, RARE_CLASS_IDS
from oodfast.data.crops import CROP_RATIO, DEFAULT_RARE_TAU, sample_resized_crop_boxes
from oodfast.data.discover import DatasetFiles

log = logging.getLogger(__name__)

__all__ = [
    "BANDS",
    "HEAD_CUMULATIVE_SHARE",
    "TAIL_CLASS_SHARE",
    "binary_accuracy",
    "class_pixel_share",
    "crop_labels",
    "evaluate_representation",
    "extract_features",
    "frequency_bands",
    "knn_classify",
    "knn_votes",
    "linear_probe",
    "linear_probe_logits",
    "mean_interval",
    "per_band_accuracy",
]

BANDS: tuple[str, ...] = ("head", "middle", "tail")
#: Head classes: the most frequent classes that together cover the first 80% of labelled pixels.
HEAD_CUMULATIVE_SHARE: float = 0.80
#: Tail classes: each covers less than 1% of labelled pixels (and is not head).
TAIL_CLASS_SHARE: float = 0.01
#: Default crop scale of the evaluation crops: DINO's local (0.05-0.4) and global (0.4-1.0) ranges
#: together, so crops range from object-sized (a pole, a person) to whole-scene context.
EVAL_CROP_SCALE: tuple[float, float] = (0.05, 1.0)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_BAND_RULE = (f"head: the most frequent classes that together cover the first "
              f"{HEAD_CUMULATIVE_SHARE:.0%} of labelled training pixels (the class crossing "
              f"{HEAD_CUMULATIVE_SHARE:.0%} included); tail: the other classes each below "
              f"{TAIL_CLASS_SHARE:.0%} of pixels; middle: the rest")


# --------------------------------------------------------------------------------------------------
# Labels and bands
# --------------------------------------------------------------------------------------------------


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
        arr = _read_mask(m) if isinstance(m, (str, os.PathLike)) else np.asarray(m)
        total += np.bincount(arr.ravel(), minlength=256)[:NUM_CLASSES]
    if total.sum() == 0:
        raise ValueError("masks hold no labelled pixel (all ignore); class pixel shares are undefined")
    return total / total.sum()


def _share_array(
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
    share = _share_array(class_pixel_share)
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


# --------------------------------------------------------------------------------------------------
# Crops and features
# --------------------------------------------------------------------------------------------------


def _read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as e:
        raise ValueError(f"cannot read mask {path}: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"mask {path} must be a one-channel train-ID PNG, got shape {arr.shape}")
    return arr


def _image_crops(
    position: int, image_path: Path, mask_path: Path, *, crops_per_image: int, size: int,
    scale: tuple[float, float], seed: int, rare_ids: tuple[int, ...], tau: float,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Crops [n, 3, size, size] uint8, their labels and boxes [n, 4] of one image."""
    from PIL import Image

    mask = _read_mask(mask_path)
    try:
        with Image.open(image_path) as im:
            img = im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {image_path}: {e}") from None
    if (img.height, img.width) != mask.shape:
        raise ValueError(f"image {image_path} is {img.width}x{img.height} but its mask {mask_path} is "
                         f"{mask.shape[1]}x{mask.shape[0]}; masks must match their images")
    rng = np.random.default_rng(np.random.SeedSequence([seed, position, 0xC209]))
    boxes = sample_resized_crop_boxes(rng, crops_per_image, img.height, img.width, scale, CROP_RATIO)
    crops = np.stack([
        np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=tuple(float(v) for v in b)))
        for b in boxes
    ]).transpose(0, 3, 1, 2)
    labels = crop_labels(mask, boxes, rare_ids, tau=tau)
    return np.ascontiguousarray(crops), labels, boxes


def _encode(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = encoder(x)
    if isinstance(out, (tuple, list)):  # as DINO: some backbones return (features, extras)
        out = out[0]
    if out.dim() != 2:
        raise ValueError(f"encoder must map [B, 3, H, W] to features [B, D], got output shape {tuple(out.shape)}; "
                         "pass a backbone without its classifier/pooling removed (fc = Identity)")
    return out.float()


def extract_features(
    encoder: nn.Module,
    files: DatasetFiles,
    *,
    crops_per_image: int = 8,
    size: int = 224,
    scale: tuple[float, float] = EVAL_CROP_SCALE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    rare_ids: Iterable[int] = RARE_CLASS_IDS,
    tau: float = DEFAULT_RARE_TAU,
    num_workers: int | None = None,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Frozen encoder features and mask labels of deterministic crops of every image.

    Crop ``j`` of image ``i`` is the ``j``-th RandomResizedCrop box (``scale``, aspect 3/4-4/3)
    drawn from a generator seeded by ``(seed, i)``, resized to ``size`` x ``size`` (bicubic, PIL)
    and ImageNet-normalised; no flip or colour augmentation. Same files and seed, same crops,
    whatever the batch size, device or worker count. Images are decoded in a thread pool.

    Args:
        encoder: maps [B, 3, size, size] float32 to [B, D]; run in eval mode without gradients
            (its training flag is restored afterwards).
        files: a split with masks (``discover(..., require_masks=True)``).
        crops_per_image: crops per image (>= 1).
        size: side of the square crops in pixels.
        scale: RandomResizedCrop area range as a share of the image.
        seed: crop seed.
        device: where the crops go; the encoder must already be there (``oodfast.encoders.load_encoder(..., device)``).
        batch_size: crops per encoder call.
        rare_ids, tau: the rare-presence ground truth (see :func:`crop_labels`).
        num_workers: decoding threads (default: the CPU count, at most 8).

    Returns:
        features: float32 [N, D] on the CPU, N = len(files) * crops_per_image, image-major.
        labels: numpy arrays [N]: ``dominant`` (int64, -1 = all ignore), ``rare_present`` (bool),
            ``rare_share`` (float64), ``image`` (int64 position in ``files``); and ``boxes`` int64
            [N, 4] (x0, y0, x1, y1) in source pixels.

    Raises:
        ValueError: no masks, no images, or a bad argument (named).
    """
    if files.masks is None:
        raise ValueError(f"files: {files.kind} split {files.split} at {files.root} has no masks; representation "
                         "labels need them (discover(..., require_masks=True), --data bdd10k or synthetic)")
    if len(files) == 0:
        raise ValueError(f"files: {files.kind} split {files.split} at {files.root} holds no image")
    for name, value in (("crops_per_image", crops_per_image), ("size", size), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    rare = tuple(int(i) for i in rare_ids)
    device = torch.device(device)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0

    def work(i: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        return _image_crops(i, files.images[i], files.masks[i], crops_per_image=crops_per_image,  # type: ignore[index]
                            size=size, scale=scale, seed=seed, rare_ids=rare, tau=tau)

    feats: list[torch.Tensor] = []
    label_parts: list[dict[str, np.ndarray]] = []
    box_parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    n_pending = 0

    def flush(final: bool) -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        block = np.concatenate(pending)
        cut = len(block) if final else (len(block) // batch_size) * batch_size
        for start in range(0, cut, batch_size):
            x = torch.from_numpy(block[start:start + batch_size]).to(device, non_blocking=True)
            x = (x.float() - mean) / std
            feats.append(_encode(encoder, x).cpu())
        rest = block[cut:]
        pending, n_pending = ([rest] if len(rest) else []), len(rest)

    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Decode a few images per thread ahead of the encoder, never the whole split (memory).
            chunk = max(1, workers) * 4
            for first in range(0, len(files), chunk):
                positions = range(first, min(first + chunk, len(files)))
                for i, (crops, labels, boxes) in zip(positions, pool.map(work, positions)):
                    pending.append(crops)
                    n_pending += len(crops)
                    labels["image"] = np.full(len(crops), i, dtype=np.int64)
                    label_parts.append(labels)
                    box_parts.append(boxes)
                    if n_pending >= batch_size:
                        flush(final=False)
            flush(final=True)
    finally:
        encoder.train(was_training)
    features = torch.cat(feats)
    out = {key: np.concatenate([p[key] for p in label_parts])
           for key in ("dominant", "rare_present", "rare_share", "image")}
    out["boxes"] = np.concatenate(box_parts).astype(np.int64)
    log.info("extracted %d crop features of dim %d from %d images (%s %s)", features.shape[0],
             features.shape[1], len(files), files.kind, files.split)
    return features, out


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def _as_tensor(x: torch.Tensor | np.ndarray, name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values")
    return t.to(dtype)


def _check_labels(labels: torch.Tensor, n: int, name: str, num_classes: int | None) -> int:
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries, features have {n} rows")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class IDs >= 0 (drop unlabelled rows first), got min {int(labels.min())}")
    needed = int(labels.max()) + 1 if n else 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but {name} holds class {needed - 1}")
    return num_classes


@torch.no_grad()
def knn_votes(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """DINO's weighted k-nearest-neighbour votes (facebookresearch/dino ``eval_knn.py``), as shares.

    Features are L2-normalised; for each test row the ``k`` train rows of highest cosine similarity
    vote for their class with weight ``exp(sim / T)``. The votes of each row are divided by their
    sum, so row ``i``'s entry ``c`` is the weighted share of neighbours of class ``c``: a score in
    [0, 1] for threshold-free metrics (AUROC of a binary task). :func:`knn_classify` is its argmax.

    Args:
        train_feats: [N, D] float features.
        train_labels: [N] int class IDs >= 0.
        test_feats: [M, D] float features (same D).
        k: neighbours, 1 <= k <= N.
        T: temperature > 0.
        num_classes: number of classes (default: max train label + 1).
        chunk_size: test rows per similarity block (bounds memory at chunk_size x N).
        device: where to compute (default: the device of ``train_feats``, CPU for numpy).
        normalize: divide each row by its sum (False: the summed weights, scaled so that the
            nearest neighbour's weight is 1).

    Returns:
        float32 [M, num_classes] vote shares; each row sums to 1 (with ``normalize``).
    """
    train = _as_tensor(train_feats, "train_feats", torch.float32, 2)
    train = train.to(torch.device(device) if device is not None else train.device)
    test = _as_tensor(test_feats, "test_feats", torch.float32, 2).to(train.device)
    labels = _as_tensor(train_labels, "train_labels", torch.int64, 1).to(train.device)
    n_classes = _check_labels(labels, train.shape[0], "train_labels", num_classes)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_feats have dim {train.shape[1]} but test_feats have dim {test.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k must lie in [1, number of train rows = {train.shape[0]}], got {k}")
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    train = F.normalize(train, dim=1, p=2)
    test = F.normalize(test, dim=1, p=2)
    shares = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        # exp((sim - max) / T): the largest weight is 1, so no T overflows float32, and every ratio
        # (hence DINO's argmax and the shares) is that of exp(sim / T).
        weights = ((top_sim - top_sim[:, :1]) / T).exp()
        votes = torch.zeros(top_idx.shape[0], n_classes, dtype=torch.float32, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        shares.append(votes / votes.sum(dim=1, keepdim=True) if normalize else votes)
    if not shares:
        return np.zeros((0, n_classes), dtype=np.float32)
    return torch.cat(shares).cpu().numpy()


def knn_classify(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """DINO's weighted k-nearest-neighbour classifier: the class with the largest summed vote of
    :func:`knn_votes` (ties: the lowest class ID; DINO's unstable sort leaves ties unspecified).

    Returns:
        int64 [M] predicted class IDs.
    """
    votes = knn_votes(train_feats, train_labels, test_feats, k, T, num_classes, chunk_size=chunk_size, device=device,
                      normalize=False)
    return votes.argmax(axis=1).astype(np.int64)


def linear_probe_logits(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """A multinomial logistic regression on frozen, standardised features, trained with AdamW;
    returns the test rows' logits (:func:`linear_probe` takes their argmax).

    Features are standardised with the train split's per-dimension mean and standard deviation
    (dimensions with zero spread are centred only). One ``nn.Linear(D, C)`` is trained with
    cross-entropy, AdamW (``lr``, ``weight_decay``) and a cosine learning-rate decay to 0 over
    ``epochs`` passes of shuffled mini-batches of ``batch_size`` rows. The initialisation and the
    shuffles draw from a generator seeded by ``seed``: same inputs and seed, same predictions.

    ``class_weight="balanced"`` weights each class's loss by ``N / (C_present * N_c)`` (scikit-learn's
    "balanced"), so every class present in the train labels carries the same total weight. Use it
    for imbalanced tasks: at a prevalence of 12% the unweighted probe's best constant answer is
    "absent", and its argmax then says nothing about the features.

    Args:
        train_feats: [N, D] float features; train_labels: [N] int class IDs >= 0.
        test_feats: [M, D] float features.
        num_classes: number of classes (default: max train label + 1).
        class_weight: None (plain cross-entropy, DINO's linear evaluation) or ``"balanced"``.
        device: where to train (default: the device of ``train_feats``, CPU for numpy).

    Returns:
        float32 [M, num_classes] logits of the test rows.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    train = _as_tensor(train_feats, "train_feats", torch.float32, 2)
    dev = torch.device(device) if device is not None else train.device
    train = train.to(dev)
    test = _as_tensor(test_feats, "test_feats", torch.float32, 2).to(dev)
    labels = _as_tensor(train_labels, "train_labels", torch.int64, 1).to(dev)
    n_classes = _check_labels(labels, train.shape[0], "train_labels", num_classes)
    if train.shape[0] == 0:
        raise ValueError("train_feats has no rows; a linear probe needs training data")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_feats have dim {train.shape[1]} but test_feats have dim {test.shape[1]}")

    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    x_train = (train - mean) / std
    x_test = (test - mean) / std

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layer = nn.Linear(train.shape[1], n_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(train.shape[1])  # nn.Linear's default init, from our generator
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
        layer.bias.zero_()
    layer = layer.to(dev)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    weight = None
    if class_weight == "balanced":
        counts = torch.bincount(labels, minlength=n_classes).to(torch.float32)
        present = counts > 0
        weight = torch.where(present, labels.numel() / (present.sum() * counts.clamp_min(1.0)),
                             torch.zeros_like(counts))
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(layer(x_train[idx]), labels[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    if not math.isfinite(float(loss.detach())):
        raise ValueError(f"linear probe diverged (loss {float(loss)}); lower lr (got {lr})")
    with torch.no_grad():
        return layer(x_test).float().cpu().numpy()


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The linear probe's predicted classes: int64 [M], the argmax of :func:`linear_probe_logits`
    (same arguments)."""
    logits = linear_probe_logits(train_feats, train_labels, test_feats, epochs=epochs, lr=lr,
                                 weight_decay=weight_decay, seed=seed, batch_size=batch_size,
                                 num_classes=num_classes, class_weight=class_weight, device=device)
    return logits.argmax(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def per_band_accuracy(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, bands: Mapping[int, str]
) -> dict[str, dict[str, Any]]:
    """Accuracy overall and per frequency band of the target class.

    Args:
        pred, target: int [N] class IDs (rows with target < 0 must be dropped by the caller).
        bands: train ID -> ``"head"`` | ``"middle"`` | ``"tail"`` (:func:`frequency_bands`).

    Returns:
        For ``overall``, ``head``, ``middle``, ``tail``: ``accuracy`` (share of correct rows whose
        target is in the band), ``mean_class_accuracy`` (mean over the band's classes present in
        ``target`` of each class's accuracy: every class counts once, however rare), ``n`` (rows)
        and ``classes`` (distinct target classes). Accuracies are None when the band has no rows.
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64).ravel()
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same length, got {p.shape[0]} and {t.shape[0]}")
    if t.size and t.min() < 0:
        raise ValueError("target holds negative (unlabelled) entries; drop those rows first")
    unknown = sorted(set(bands.values()) - set(BANDS))
    if unknown:
        raise ValueError(f"bands: unknown band names {unknown}; valid: {', '.join(BANDS)}")
    missing = sorted(set(np.unique(t).tolist()) - set(int(c) for c in bands))
    if missing:
        raise ValueError(f"bands has no entry for target class(es) {missing}")
    correct = p == t
    band_of = np.array([bands[int(c)] for c in t], dtype=object) if t.size else np.zeros(0, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for band in ("overall", *BANDS):
        sel = np.ones(t.shape, bool) if band == "overall" else band_of == band
        classes = np.unique(t[sel])
        per_class = np.array([correct[sel & (t == c)].mean() for c in classes])
        out[band] = {
            "accuracy": _mean_or_none(correct[sel]),
            "mean_class_accuracy": _mean_or_none(per_class),
            "n": int(sel.sum()),
            "classes": int(classes.size),
        }
    return out


def binary_accuracy(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy and balanced accuracy of a binary task (rare presence), and AUROC of a score.

    Balanced accuracy is the mean of the recalls of the classes present in ``target``
    ((TPR + TNR) / 2 when both are present; scikit-learn's definition). A constant predictor scores
    0.5 whatever the prevalence. ``scores`` (higher = more likely positive; e.g. the kNN vote share
    or the probe's logit margin) adds ``auroc``: threshold-free, so it measures how well the
    features rank positives above negatives even where the argmax predicts one class everywhere.

    Returns:
        ``accuracy``, ``balanced_accuracy`` (None for empty input), ``n``, ``prevalence`` (share of
        positive targets, None for empty input), and with ``scores`` ``auroc`` (None unless both
        classes are present).
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(bool).ravel()
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same length, got {p.shape[0]} and {t.shape[0]}")
    recalls = [float((p[t == c] == c).mean()) for c in (False, True) if np.any(t == c)]
    out: dict[str, Any] = {
        "accuracy": _mean_or_none(p == t),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "n": int(t.size),
        "prevalence": _mean_or_none(t.astype(np.float64)),
    }
    if scores is not None:
        from oodfast.evaluate.metrics import auroc

        s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
        if s.shape != t.shape:
            raise ValueError(f"scores must have one entry per target, got {s.shape[0]} and {t.shape[0]}")
        out["auroc"] = float(auroc(s, t)) if 0 < t.sum() < t.size else None
    return out


def mean_interval(
    values: Sequence[float | None], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Mean and two-sided Student-t interval over seeds: ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)``.

    ``bounds`` clips the interval to the metric's range (accuracies: (0, 1)); with few seeds the
    t-interval is wide (t = 12.7 for two seeds) and would otherwise leave it.

    Returns:
        ``mean``, ``low``, ``high`` (None with fewer than two values), ``values`` (the inputs),
        ``n``. None inputs (a band without test rows) are left out; all None gives mean None.
    """
    from scipy import stats

    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "low": None, "high": None,
                           "values": [None if v is None else float(v) for v in values], "n": int(vals.size)}
    if vals.size == 0:
        return out
    mean = float(vals.mean())
    out["mean"] = mean
    if vals.size >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size))
        low, high = mean - half, mean + half
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        out["low"], out["high"] = low, high
    return out


# --------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _summarise(runs: Sequence[Mapping[str, Any]], confidence: float) -> dict[str, Any]:
    """Metric dicts of several seeds -> one dict of {mean, low, high, values, n} per float metric."""
    flats = [_flatten(r) for r in runs]
    summary: dict[str, Any] = {}
    for key in flats[0]:
        if key.endswith((".n", ".classes")) or key in ("n", "prevalence"):
            summary[key] = flats[0][key]  # counts: the same for every seed
        else:
            summary[key] = mean_interval([f[key] for f in flats], confidence, bounds=(0.0, 1.0))
    return summary


def evaluate_representation(
    encoder: nn.Module,
    train_files: DatasetFiles,
    test_files: DatasetFiles,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    crops_per_image: int = 8,
    size: int = 224,
    scale: tuple[float, float] = EVAL_CROP_SCALE,
    crop_seed: int = 0,
    rare_ids: Iterable[int] = RARE_CLASS_IDS,
    tau: float = DEFAULT_RARE_TAU,
    class_share: Mapping[str, float] | Sequence[float] | np.ndarray | None = None,
    k: int = 20,
    T: float = 0.07,
    probe_epochs: int = 100,
    probe_lr: float = 1e-2,
    probe_weight_decay: float = 1e-4,
    probe_batch_size: int = 1024,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | None = None,
    confidence: float = 0.95,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of a frozen encoder on crop labels, by frequency band.

    Features of the train and test splits are extracted once (:func:`extract_features`, crop seed
    ``crop_seed``). Two tasks: ``dominant`` (19-way dominant class; crops whose pixels are all
    ignore are dropped) and ``rare_present`` (binary; the probe is class-balanced and AUROC is
    reported beside the accuracies). For each task: DINO's weighted kNN (k, T;
    deterministic: one value, no interval) and the linear probe once per seed in ``seeds``,
    summarised as mean and a two-sided Student-t ``confidence`` interval over the seeds
    (:func:`mean_interval`, clipped to [0, 1]; None with a single seed). The interval covers the probe's optimisation
    randomness (initialisation, batch order) only, not the crop sampling or the pretraining seed:
    compare checkpoints of several training seeds for that.

    Bands come from ``class_share`` (per-class pixel shares, e.g. synthdrive's manifest) or, when
    None, from the train split's masks (:func:`class_pixel_share`), by :func:`frequency_bands`.

    Returns:
        ``config`` (the arguments), ``band_rule`` (text), ``bands`` (class name -> band),
        ``class_pixel_share`` (class name -> share), ``n_train`` / ``n_test`` (crops),
        ``rare_prevalence`` (``train`` / ``test``: share of rare-present crops), and for each task
        ``dominant`` / ``rare_present``: ``knn`` (a metric dict: :func:`per_band_accuracy` for
        ``dominant``, :func:`binary_accuracy` for ``rare_present``) and ``linear`` (the same metric
        names flattened with dots, e.g. ``"tail.accuracy"``, each ``{mean, low, high, values, n}``;
        counts stay plain ints), with ``knn_k`` (the k used: min(k, train rows)) and
        ``linear_class_weight`` (None or ``"balanced"``).
    """
    if not seeds:
        raise ValueError("seeds must name at least one linear-probe seed")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rare = tuple(sorted({int(i) for i in rare_ids}))
    say = progress or (lambda msg: log.info("%s", msg))
    common = dict(crops_per_image=crops_per_image, size=size, scale=scale, seed=crop_seed, device=device,
                  batch_size=batch_size, rare_ids=rare, tau=tau, num_workers=num_workers)
    # Bands first: a bad share table fails before any feature is extracted.
    share = _share_array(class_pixel_share(train_files.masks or ()) if class_share is None else class_share)
    bands = frequency_bands(share)
    say(f"extracting train features ({len(train_files)} images x {crops_per_image} crops)")
    train_x, train_y = extract_features(encoder, train_files, **common)  # type: ignore[arg-type]
    say(f"extracting test features ({len(test_files)} images x {crops_per_image} crops)")
    test_x, test_y = extract_features(encoder, test_files, **common)  # type: ignore[arg-type]


    results: dict[str, Any] = {
        "config": {"seeds": [int(s) for s in seeds], "crops_per_image": crops_per_image, "size": size,
                   "scale": list(scale), "crop_seed": crop_seed, "rare_classes": [CLASS_NAMES[i] for i in rare],
                   "tau": tau, "k": k, "T": T, "probe_epochs": probe_epochs, "probe_lr": probe_lr,
                   "probe_weight_decay": probe_weight_decay, "probe_batch_size": probe_batch_size,
                   "confidence": confidence, "interval": "student-t over linear-probe seeds",
                   "probe_class_weight": {"dominant": None, "rare_present": "balanced"}},
        "band_rule": _BAND_RULE,
        "bands": {CLASS_NAMES[c]: b for c, b in bands.items()},
        "class_pixel_share": {CLASS_NAMES[c]: float(share[c]) for c in range(NUM_CLASSES)},
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "rare_prevalence": {"train": float(train_y["rare_present"].mean()),
                            "test": float(test_y["rare_present"].mean())},
    }

    probe = dict(epochs=probe_epochs, lr=probe_lr, weight_decay=probe_weight_decay, batch_size=probe_batch_size,
                 device=device)
    tasks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = {}
    keep_tr, keep_te = train_y["dominant"] >= 0, test_y["dominant"] >= 0
    tasks["dominant"] = (keep_tr, train_y["dominant"], keep_te, test_y["dominant"], NUM_CLASSES)
    all_tr, all_te = np.ones(len(keep_tr), bool), np.ones(len(keep_te), bool)
    tasks["rare_present"] = (all_tr, train_y["rare_present"].astype(np.int64), all_te,
                             test_y["rare_present"].astype(np.int64), 2)

    for task, (sel_tr, y_tr, sel_te, y_te, n_classes) in tasks.items():
        x_tr, x_te = train_x[torch.from_numpy(sel_tr)], test_x[torch.from_numpy(sel_te)]
        y_tr, y_te = y_tr[sel_tr], y_te[sel_te]
        if len(y_tr) == 0 or len(y_te) == 0:
            raise ValueError(f"task {task}: no labelled crops in the {'train' if len(y_tr) == 0 else 'test'} "
                             "split (every crop is ignore pixels); check the masks")

        def score(out: np.ndarray, task: str = task, y_te: np.ndarray = y_te) -> dict[str, Any]:
            """kNN vote shares or probe logits [M, C] -> the task's metrics."""
            pred = out.argmax(axis=1)
            if task == "dominant":
                return per_band_accuracy(pred, y_te, bands)
            return binary_accuracy(pred, y_te, scores=out[:, 1] - out[:, 0])

        k_used = min(k, len(y_tr))
        if k_used < k:
            log.warning("task %s: only %d train crops, kNN uses k=%d instead of %d", task, len(y_tr), k_used, k)
        say(f"{task}: kNN (k={k_used}, T={T}) and linear probe x {len(seeds)} seeds")
        knn = knn_votes(x_tr, y_tr, x_te, k=k_used, T=T, num_classes=n_classes, device=device)
        weighting = None if task == "dominant" else "balanced"
        runs = [score(linear_probe_logits(x_tr, y_tr, x_te, seed=int(s), num_classes=n_classes,  # type: ignore[arg-type]
                                          class_weight=weighting, **probe))
                for s in seeds]
        results[task] = {"knn": score(knn), "knn_k": k_used, "linear": _summarise(runs, confidence),
                         "linear_class_weight": weighting}
    return results


def representation_markdown(report: dict[str, Any], title: str = "Representation quality") -> str:
    """The report as markdown: per task, kNN and the linear probe (mean [95% interval] over seeds)."""
    from oodfast.report import markdown_table

    def fmt(entry: Any) -> str:
        if entry is None:
            return "-"
        if isinstance(entry, dict) and "mean" in entry:
            if entry["mean"] is None:
                return "-"
            if entry.get("low") is None:
                return f"{entry['mean']:.4f}"
            return f"{entry['mean']:.4f} [{entry['low']:.3f}, {entry['high']:.3f}]"
        return f"{entry:.4f}" if isinstance(entry, float) else str(entry)

    text = f"# {title}\n\nBands: {report.get('band_rule', '')}\n"
    for task in ("dominant", "rare_present"):
        if task not in report:
            continue
        res = report[task]
        rows = []
        for key, value in sorted(res["linear"].items()):
            group, _, metric = key.partition(".")
            knn_value = res["knn"].get(group, {}).get(metric) if isinstance(res["knn"].get(group), dict) \
                else res["knn"].get(key, res["knn"].get(metric))
            rows.append((key, fmt(knn_value), fmt(value)))
        if res.get("linear_class_weight"):
            text += f"\n## {task}\n\nLinear probe trained with {res['linear_class_weight']} class weights.\n\n"
        else:
            text += f"\n## {task}\n\n"
        text += markdown_table(["metric", f"kNN (k={res['knn_k']})", "linear probe"], rows)
    return text
