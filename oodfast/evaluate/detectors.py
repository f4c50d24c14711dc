"""The detectors ``oodfast evaluate detect`` compares, calibrated on train crops and scored on val crops.

Pooled (one embedding per crop; :class:`oodfast.detect.RareDetector`):
    ``random`` (uniform scores: flags 1 - percentile of crops), ``euclidean`` (the paper's),
    ``cosine``, ``mahalanobis`` (Ledoit-Wolf shrinkage), ``knn`` (Sun et al. 2022).
Dense (one score per position of a feature map, the crop's score their max;
:class:`oodfast.dense.DenseRareDetector` on :func:`oodfast.encoders.feature_map`):
    ``dense-euclidean``, ``dense-cosine``, ``dense-mahalanobis``, ``dense-knn`` (PatchCore-style:
    distance to the nearest positions of a greedy k-center coreset of the calibration positions).

Each detector is fitted once per calibration size; the threshold of each percentile is
``torch.nanquantile`` of its calibration scores (the rule :meth:`RareDetector.fit` applies), so the
scores of the evaluation crops do not depend on the percentile.

Memory: the calibration crops' dense maps are kept in fp16 on the device (1024 crops of resnet50's
layer3, 14x14x1024 at 224 px: 411 MB instead of 822 MB in fp32) and widened to fp32 one calibration
size at a time for ``fit``; evaluation crops are scored batch by batch against every fitted detector
and never stored (pooled embeddings are not stored either).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from oodfast.data.discover import DatasetFiles
from oodfast.detect import DetectorConfig, RareDetector
from oodfast.evaluate.crop_pass import CropBatch, CropLabels, global_crop_batches, join_labels

__all__ = ["DENSE_DETECTORS", "DETECTORS", "POOLED_DETECTORS", "Fitted", "calibrate", "score_split"]

POOLED_DETECTORS = ("random", "euclidean", "cosine", "mahalanobis", "knn")
DENSE_DETECTORS = ("dense-euclidean", "dense-cosine", "dense-mahalanobis", "dense-knn")
DETECTORS = POOLED_DETECTORS + DENSE_DETECTORS


def is_dense(name: str) -> bool:
    return name.startswith("dense-")


@dataclass
class Fitted:
    """One calibrated detector: ``thresholds`` maps each percentile to its threshold; ``detector`` is
    None for ``random``."""

    name: str
    size: int
    thresholds: dict[float, float]
    detector: nn.Module | None

    def score(self, batch: CropBatch, rng: np.random.Generator) -> np.ndarray:
        """float64 [2B] scores of a batch's crops (higher = rarer)."""
        n = len(batch.labels.image)
        if self.detector is None:
            return rng.random(n)
        if is_dense(self.name):
            from oodfast.dense import position_view

            out = self.detector.score(position_view(batch.maps))
        else:
            out = self.detector.score(batch.pooled.contiguous())
        return out.float().cpu().numpy().astype(np.float64)


def _stack_maps(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    maps = torch.cat(parts)
    return maps.contiguous(memory_format=torch.channels_last) if maps.dim() == 4 else maps.contiguous()


def _fit_one(name: str, pooled: torch.Tensor | None, maps: torch.Tensor | None, size: int,
             percentiles: Sequence[float], *, knn_k: int, dense_knn_k: int, coreset: int,
             device: torch.device) -> Fitted:
    if name == "random":
        return Fitted(name, size, {p: p for p in percentiles}, None)
    metric = name.removeprefix("dense-")
    if is_dense(name):
        from oodfast.dense import DenseRareDetector, position_view

        view = position_view(maps[:size].float())  # [P, n, D]; the fp32 copy lives for this fit only
        positions = view.shape[0] * view.shape[1]
        k = max(1, min(dense_knn_k, min(coreset, positions) - 1))
        det = DenseRareDetector(view.shape[2], DetectorConfig(metric=metric, percentile=percentiles[0], knn_k=k),
                                coreset=coreset, device=device)
        calib_scores = det.fit(view)
        del view
    else:
        c = pooled[:size]
        k = max(1, min(knn_k, c.shape[0] - 1))
        det = RareDetector(c.shape[1], DetectorConfig(metric=metric, percentile=percentiles[0], knn_k=k), device=device)
        calib_scores = det.fit(c)
    q = torch.nanquantile(calib_scores.float(), torch.tensor(list(percentiles), device=calib_scores.device))
    return Fitted(name, size, {p: float(t) for p, t in zip(percentiles, q.tolist())}, det)


def calibrate(encoder: nn.Module, files: DatasetFiles, *, detectors: Sequence[str], calib_sizes: Sequence[int],
              percentiles: Sequence[float], seed: int, crop_size: int, batch_size: int, device: torch.device,
              layer: str, knn_k: int, dense_knn_k: int, coreset: int, tau: float,
              rare_ids: Sequence[int]) -> list[Fitted]:
    """Fit every detector on the first ``size`` calibration crops, for each size of ``calib_sizes``.

    The calibration crops are the global crops of ``(max(calib_sizes) + 1) // 2`` train images (both
    crops of each, as the paper's "training set size" counts crops).
    """
    dense = any(is_dense(d) for d in detectors)
    pooled_needed = any(not is_dense(d) and d != "random" for d in detectors)
    pooled, maps = [], []
    for batch in global_crop_batches(encoder, files, n_images=(max(calib_sizes) + 1) // 2, seed=seed,
                                     crop_size=crop_size, batch_size=batch_size, device=device, tau=tau,
                                     rare_ids=rare_ids, pooled=pooled_needed, layer=layer if dense else None):
        if batch.pooled is not None:
            pooled.append(batch.pooled)
        if batch.maps is not None:
            maps.append(batch.maps.to(torch.float16))
    pooled_all = torch.cat(pooled) if pooled else None
    maps_all = _stack_maps(maps) if maps else None
    del maps
    return [_fit_one(name, pooled_all, maps_all, size, percentiles, knn_k=knn_k, dense_knn_k=dense_knn_k,
                     coreset=coreset, device=device)
            for name in detectors for size in calib_sizes]


def score_split(encoder: nn.Module, files: DatasetFiles, fitted: Sequence[Fitted], *, n_images: int | None,
                seed: int, crop_size: int, batch_size: int, device: torch.device, layer: str, tau: float,
                rare_ids: Sequence[int], min_object_pixels: int) -> tuple[dict[tuple[str, int], np.ndarray], CropLabels]:
    """Score the global crops of ``files`` with every fitted detector, batch by batch.

    Returns:
        ({(detector, calibration size): float64 scores [N]}, the crops' labels).
    """
    dense = any(is_dense(f.name) for f in fitted)
    pooled_needed = any(not is_dense(f.name) and f.detector is not None for f in fitted)
    rng = np.random.default_rng(seed)
    scores: dict[tuple[str, int], list[np.ndarray]] = {(f.name, f.size): [] for f in fitted}
    labels = []
    for batch in global_crop_batches(encoder, files, n_images=n_images, seed=seed, crop_size=crop_size,
                                     batch_size=batch_size, device=device, tau=tau, rare_ids=rare_ids,
                                     pooled=pooled_needed, layer=layer if dense else None,
                                     min_object_pixels=min_object_pixels):
        labels.append(batch.labels)
        for f in fitted:
            scores[(f.name, f.size)].append(f.score(batch, rng))
    return {key: np.concatenate(v) for key, v in scores.items()}, join_labels(labels)
