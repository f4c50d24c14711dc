"""The global crops ``oodfast evaluate detect`` scores: decoded by the DALI multi-crop loader,
labelled from the masks, embedded batch by batch.

Each image of a split contributes its two global crops (the paper's BDD10K augmentation: scale
0.3-1.0, no photometric changes, :meth:`MultiCropConfig.bdd10k`), ``crop_size`` pixels square. A batch
carries, for its 2B crops (view-major, as ``torch.cat(views)``):

* ``pooled``: the encoder's output [2B, D] fp32 (a ResNet map is average-pooled, a ViT gives its
  [CLS] embedding) when pooled detectors are evaluated;
* ``maps``: the dense feature map of ``layer`` (:func:`oodfast.encoders.feature_map`: a ResNet stage as
  channels_last [2B, D, h, w], or a ViT's patch tokens [2B, N, D]) when dense detectors are;
* the labels (:class:`CropLabels`): image position in the split, box, rare-pixel share, and the
  (crop, instance) pairs of :mod:`oodfast.evaluate.objects`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from oodfast.data.crops import rare_shares
from oodfast.data.discover import DatasetFiles
from oodfast.data.multicrop import MultiCropConfig, multicrop_loader
from oodfast.evaluate.objects import crop_instances, rare_instances

__all__ = ["CropBatch", "CropLabels", "global_crop_batches", "join_labels"]


@dataclass
class CropLabels:
    """Ground truth of N crops. ``pair_crop`` / ``pair_class`` [M]: one entry per (crop, rare instance)
    pair, the crop's row and the instance's class (:func:`oodfast.evaluate.objects.crop_instances`)."""

    image: np.ndarray  # int64 [N]: position of the crop's image in the split
    boxes: np.ndarray  # int64 [N, 4]: x0, y0, x1, y1 in source pixels
    shares: np.ndarray  # float64 [N]: rare-class pixel share inside the box
    rare: np.ndarray  # bool [N]: shares >= tau
    pair_crop: np.ndarray  # int64 [M]
    pair_class: np.ndarray  # int64 [M]


@dataclass
class CropBatch:
    """One loader batch: encoder outputs of its 2B crops (None where not asked for) and their labels."""

    pooled: torch.Tensor | None
    maps: torch.Tensor | None
    labels: CropLabels


def join_labels(parts: Sequence[CropLabels]) -> CropLabels:
    """Labels of consecutive batches as one (pair rows shifted to the joined crop rows)."""
    offsets = np.cumsum([0] + [len(p.image) for p in parts[:-1]])
    return CropLabels(
        image=np.concatenate([p.image for p in parts]), boxes=np.concatenate([p.boxes for p in parts]),
        shares=np.concatenate([p.shares for p in parts]), rare=np.concatenate([p.rare for p in parts]),
        pair_crop=np.concatenate([p.pair_crop + o for p, o in zip(parts, offsets)]).astype(np.int64),
        pair_class=np.concatenate([p.pair_class for p in parts]).astype(np.int64))


def _labels(masks: Sequence, pick: np.ndarray, index: np.ndarray, boxes: np.ndarray, *, crop_size: int, tau: float,
            rare_ids: tuple[int, ...], min_object_pixels: int) -> CropLabels:
    """Labels of a batch's crops, view-major (crop row v * B + b is view v of image b)."""
    n_img = len(index)
    shares = np.empty((2, n_img))
    pair_crop, pair_class = [], []
    for b, i in enumerate(index):
        mask = np.asarray(Image.open(masks[int(i)]))
        shares[:, b] = rare_shares(mask, boxes[b], rare_ids)
        labels, classes = rare_instances(mask, rare_ids)
        for v, hits in enumerate(crop_instances(labels, classes, boxes[b], (crop_size, crop_size), min_object_pixels)):
            pair_crop.append(np.full(hits.size, v * n_img + b, np.int64))
            pair_class.append(classes[hits - 1])
    s = shares.reshape(-1)
    return CropLabels(image=np.tile(pick[index], 2).astype(np.int64), boxes=boxes.transpose(1, 0, 2).reshape(-1, 4),
                      shares=s, rare=s >= tau, pair_crop=np.concatenate(pair_crop) if pair_crop else np.zeros(0, np.int64),
                      pair_class=np.concatenate(pair_class) if pair_class else np.zeros(0, np.int64))


def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's embedding [B, D] fp32 of crops [B, 3, H, W] (a [B, D, h, w] output is average-pooled)."""
    out = encoder(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return (out.mean(dim=(2, 3)) if out.dim() == 4 else out).float()


@torch.no_grad()
def global_crop_batches(encoder: nn.Module, files: DatasetFiles, *, n_images: int | None, seed: int, crop_size: int,
                        batch_size: int, device: torch.device, tau: float, rare_ids: Sequence[int],
                        pooled: bool = True, layer: str | None = None,
                        min_object_pixels: int = 16) -> Iterator[CropBatch]:
    """Both global crops of ``n_images`` images of ``files`` (drawn by ``seed``; None: all), batch by batch.

    Args:
        pooled: compute the pooled embedding; layer: compute this dense map too (None: no map).

    Yields:
        :class:`CropBatch` es of ``batch_size`` images (2 x batch_size crops); a short last batch is
        dropped, as the training loader does.

    Raises:
        ValueError: a split without masks, or fewer images than one batch.
    """
    if files.masks is None:
        raise ValueError(f"{files.kind} split {files.split} has no masks; evaluation needs BDD10K-layout masks")
    n = len(files) if n_images is None else min(n_images, len(files))
    pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:n])
    images = [files.images[i] for i in pick]
    masks = [files.masks[i] for i in pick]
    cfg = MultiCropConfig.bdd10k(local_crops_number=0, global_size=crop_size)
    bs = max(1, min(batch_size, n))
    loader = multicrop_loader(images, cfg, bs, device=device, seed=seed, backend="dali", num_shards=1, shard_id=0)
    any_batch = False
    for batch in loader:
        any_batch = True
        x = torch.cat([v.to(device) for v in batch.views[:2]]).float()
        fmap = None
        if layer is not None:
            from oodfast.encoders import feature_map

            fmap = feature_map(encoder, x, layer)
        yield CropBatch(pooled=pooled_features(encoder, x) if pooled else None, maps=fmap,
                        labels=_labels(masks, pick, batch.index.numpy(), batch.boxes.numpy(), crop_size=crop_size,
                                       tau=tau, rare_ids=tuple(rare_ids), min_object_pixels=min_object_pixels))
    if not any_batch:
        raise ValueError(f"no full batch of {bs} images to evaluate; lower --batch-size")
