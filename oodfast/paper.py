"""The paper's OOD path, reproduced: the baseline that oodfast is tested and benchmarked against.

The paper's code (``ood_detection.py`` in Lake-Wang/OOD_Enhanced_Dino_Vision) embeds each image
with a ResNet-50 trunk, averages the feature map, and scores every embedding in a Python loop with
``scipy.spatial.distance.euclidean`` after a ``.cpu()`` copy of the row and of the mean; NaN
distances become 1e6 (and so are always flagged); ``detect`` returns the sorted unique batch
indices any of whose two global views is above the threshold. Its buffer is a
``collections.deque(maxlen=32)`` of per-image lists of views, mixed into the batch with
``torch.stack`` / ``view`` / ``torch.cat``.

This module behaves like that code on the same inputs, bugs included, so tests can show where
oodfast agrees and where it deliberately differs:

* ``PaperMemoryBuffer.concat_with_batch`` stacks the entries as [N, 2, ...] and reshapes to [2N, ...]
  without moving the view axis first, then gives the first 32 rows to global view 1 and the rest to
  view 2: row k of view 1 and row k of view 2 come from different images (so do the local views),
  and the constant 32 assumes a full buffer of 32.
* non-finite embeddings score 1e6 and are replayed.

It is written for this project (it is not the paper's file) and takes the encoder as an argument,
since the paper's default loads weights from torch.hub at run time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch
from scipy.spatial import distance
from torch import nn
from torchvision.transforms import functional as TF


def _euclidean(row: torch.Tensor, mean: torch.Tensor) -> float:
    """The paper's per-row ``distance.euclidean(row.cpu().flatten(), mean.cpu().flatten())``. Recent
    scipy refuses non-finite input where the paper's code got NaN, so NaN is returned here directly."""
    a, b = row.cpu().flatten(), mean.cpu().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return distance.euclidean(a, b)


class PaperOODDetector:
    """The paper's ``OODDetector`` with an explicit encoder (a module mapping [N, 3, H, W] to a feature
    map [N, C, h, w] or to embeddings [N, C])."""

    def __init__(self, encoder: nn.Module, device: torch.device | str = "cpu", threshold: float = 0.95) -> None:
        self.device = torch.device(device)
        self.threshold = threshold
        self.encoder = encoder.eval().to(self.device)
        self.mean_vector: torch.Tensor | None = None
        self.threshold_value: float | None = None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images)
        return out.mean(dim=(2, 3)) if out.dim() == 4 else out

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        return TF.resize(image, [224, 224])

    @torch.no_grad()
    def compute_dataset_stats(self, sampled_dataset: Iterable[torch.Tensor]) -> None:
        feats = [self._embed(self._resize(im).to(self.device).unsqueeze(0)).squeeze(0) for im in sampled_dataset]
        features = torch.stack(feats)
        self.mean_vector = features.mean(dim=0, keepdim=True)
        dists = [_euclidean(row, self.mean_vector) for row in features]
        self.threshold_value = torch.nanquantile(torch.Tensor(dists), self.threshold).item()

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        interleaved = [images[j][i] for i in range(len(images[0])) for j in (0, 1)]
        batch = torch.stack([self._resize(im).to(self.device) for im in interleaved])
        features = self._embed(batch)
        dists = [_euclidean(row, self.mean_vector) for row in features]
        dist_tensor = torch.nan_to_num(torch.Tensor(dists), nan=1e6)
        rare = (dist_tensor > self.threshold_value).nonzero(as_tuple=True)[0]
        return torch.unique(rare // 2)

    @torch.no_grad()
    def extract_features(self, image_tensor: torch.Tensor):
        return self._embed(image_tensor.unsqueeze(0).to(self.device)).squeeze(0).cpu().numpy()


class PaperMemoryBuffer:
    """The paper's ``MemoryBuffer``: a deque of per-image view lists, with its concatenation."""

    def __init__(self, max_size: int = 32) -> None:
        self.buffer: deque[list[torch.Tensor]] = deque(maxlen=max_size)

    def add(self, samples: list[torch.Tensor]) -> None:
        self.buffer.append(samples)

    def get(self) -> list[list[torch.Tensor]]:
        return list(self.buffer)

    def concat_with_batch(self, img_: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        g_shape, l_shape = tuple(img_[0].shape[1:]), tuple(img_[2].shape[1:])
        local_crops_number = len(img_) - 2
        buffer_global = torch.stack([torch.stack([e[0], e[1]], dim=0) for e in self.buffer], dim=0)
        buffer_local = torch.stack([torch.stack(e[2:], dim=0) for e in self.buffer], dim=0)
        buffer_global = buffer_global.view(-1, *g_shape)   # [2N, ...]: entry-major, the bug
        buffer_local = buffer_local.view(-1, *l_shape)
        out = [torch.cat([img_[0], buffer_global[:32]], dim=0), torch.cat([img_[1], buffer_global[32:]], dim=0)]
        for i in range(local_crops_number):
            out.append(torch.cat([img_[2 + i], buffer_local[32 * i: 32 * (i + 1)]], dim=0))
        return out

    def clear(self) -> None:
        self.buffer.clear()
