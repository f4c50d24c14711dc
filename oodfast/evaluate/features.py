"""Frozen-encoder features of deterministic, labelled crops of a split's images.

Each image gets ``crops_per_image`` boxes drawn with torchvision's RandomResizedCrop algorithm
(:func:`oodfast.data.crops.sample_resized_crop_boxes`) from a generator seeded by ``(crop_seed,
image position)``, so the crops are a pure function of the file list and the seed. Each box is cut
and resized (bicubic) with PIL and ImageNet-normalised (no flip, no colour augmentation), labelled
from its mask (:func:`oodfast.evaluate.labels.crop_labels`) and embedded by the encoder in eval
mode under ``torch.inference_mode`` (:func:`extract_features`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oodfast.data.classes import RARE_CLASS_IDS
from oodfast.data.crops import CROP_RATIO, DEFAULT_RARE_TAU, sample_resized_crop_boxes
from oodfast.data.discover import DatasetFiles
from oodfast.evaluate.labels import crop_labels, read_mask

log = logging.getLogger(__name__)

__all__ = ["EVAL_CROP_SCALE", "check_patch_multiple", "extract_features"]

#: Default crop scale of the evaluation crops: DINO's local (0.05-0.4) and global (0.4-1.0) ranges
#: together, so crops range from object-sized (a pole, a person) to whole-scene context.
EVAL_CROP_SCALE: tuple[float, float] = (0.05, 1.0)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_crops(
    position: int, image_path: Path, mask_path: Path, *, crops_per_image: int, size: int,
    scale: tuple[float, float], seed: int, rare_ids: tuple[int, ...], tau: float,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Crops [n, 3, size, size] uint8, their labels and boxes [n, 4] of one image."""
    from PIL import Image

    mask = read_mask(mask_path)
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
    """Features [B, D] float32 of a batch [B, 3, H, W]; ValueError when the encoder gives another shape."""
    out = encoder(x)
    if isinstance(out, (tuple, list)):  # as DINO: some backbones return (features, extras)
        out = out[0]
    if out.dim() != 2:
        raise ValueError(f"encoder must map [B, 3, H, W] to features [B, D], got output shape {tuple(out.shape)}; "
                         "pass a backbone without its classifier/pooling removed (fc = Identity)")
    return out.float()


def _check_split(files: DatasetFiles, *, crops_per_image: int, size: int, batch_size: int,
                 scale: tuple[float, float]) -> None:
    """ValueError naming the argument: a split without masks or images, a count below 1, a bad scale."""
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


def check_patch_multiple(encoder: nn.Module, size: int, what: str = "size") -> None:
    """ValueError (naming ``what``) when a ViT encoder (one with ``patch_embed.patch_size``) gets crops of
    ``size`` pixels that are not a whole number of patches; other encoders take any size."""
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int) and size % patch:
        lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
        raise ValueError(f"{what} {size} is not a multiple of the ViT's patch size {patch}; use a crop size that is "
                         f"(e.g. {lower} or {upper})")


class _EncoderBatches:
    """uint8 crops arriving image by image -> ImageNet-normalised encoder calls of ``batch_size`` crops.

    Crops wait until a full batch is there (the last call of a split may be short), so the encoder
    sees the same batches whatever the images' crop counts or the decoding threads.
    """

    def __init__(self, encoder: nn.Module, batch_size: int, device: torch.device) -> None:
        self.encoder, self.batch_size, self.device = encoder, batch_size, device
        self.mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        self.features: list[torch.Tensor] = []  # float32 [batch, D] on the CPU, in crop order
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, crops: np.ndarray) -> None:
        """Queue crops [n, 3, size, size] uint8; encode every full batch."""
        self._pending.append(crops)
        self._n_pending += len(crops)
        if self._n_pending >= self.batch_size:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Encode the full batches queued (``final``: and the short rest)."""
        if not self._pending:
            return
        block = np.concatenate(self._pending)
        cut = len(block) if final else (len(block) // self.batch_size) * self.batch_size
        for start in range(0, cut, self.batch_size):
            x = torch.from_numpy(block[start:start + self.batch_size]).to(self.device, non_blocking=True)
            x = (x.float() - self.mean) / self.std
            self.features.append(_encode(self.encoder, x).cpu())
        rest = block[cut:]
        self._pending, self._n_pending = ([rest] if len(rest) else []), len(rest)


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
        encoder: maps [B, 3, size, size] float32 to [B, D] (a ResNet's pooled features, a ViT's
            [CLS] embedding); run in eval mode without gradients (its training flag is restored
            afterwards).
        files: a split with masks (``discover(..., require_masks=True)``).
        crops_per_image: crops per image (>= 1).
        size: side of the square crops in pixels (for a ViT, a multiple of its patch size).
        scale: RandomResizedCrop area range as a share of the image.
        seed: crop seed.
        device: where the crops go; the encoder must already be there
            (``oodfast.encoders.load_encoder(..., device)``).
        batch_size: crops per encoder call.
        rare_ids, tau: the rare-presence ground truth (see :func:`oodfast.evaluate.labels.crop_labels`).
        num_workers: decoding threads (default: the CPU count, at most 8).

    Returns:
        features: float32 [N, D] on the CPU, N = len(files) * crops_per_image, image-major.
        labels: numpy arrays [N]: ``dominant`` (int64, -1 = all ignore), ``rare_present`` (bool),
            ``rare_share`` (float64), ``image`` (int64 position in ``files``); and ``boxes`` int64
            [N, 4] (x0, y0, x1, y1) in source pixels.

    Raises:
        ValueError: no masks, no images, a ``size`` that is not a whole number of a ViT's patches,
            or a bad argument (named).
    """
    _check_split(files, crops_per_image=crops_per_image, size=size, batch_size=batch_size, scale=scale)
    check_patch_multiple(encoder, size)
    rare = tuple(int(i) for i in rare_ids)
    workers = max(1, num_workers if num_workers is not None else min(8, os.cpu_count() or 1))

    def work(i: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        return _image_crops(i, files.images[i], files.masks[i], crops_per_image=crops_per_image,  # type: ignore[index]
                            size=size, scale=scale, seed=seed, rare_ids=rare, tau=tau)

    batches = _EncoderBatches(encoder, batch_size, torch.device(device))
    label_parts: list[dict[str, np.ndarray]] = []
    box_parts: list[np.ndarray] = []
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=workers) as pool:
            # Decode a few images per thread ahead of the encoder, never the whole split (memory).
            chunk = workers * 4
            for first in range(0, len(files), chunk):
                positions = range(first, min(first + chunk, len(files)))
                for i, (crops, labels, boxes) in zip(positions, pool.map(work, positions)):
                    labels["image"] = np.full(len(crops), i, dtype=np.int64)
                    label_parts.append(labels)
                    box_parts.append(boxes)
                    batches.add(crops)
            batches.flush(final=True)
    finally:
        encoder.train(was_training)
    features = torch.cat(batches.features)
    out = {key: np.concatenate([p[key] for p in label_parts])
           for key in ("dominant", "rare_present", "rare_share", "image")}
    out["boxes"] = np.concatenate(box_parts).astype(np.int64)
    log.info("extracted %d crop features of dim %d from %d images (%s %s)", features.shape[0],
             features.shape[1], len(files), files.kind, files.split)
    return features, out
