"""Drop-in replacements for the paper's ``OODDetector`` and ``MemoryBuffer`` (``ood_detection.py``).

Same constructor arguments, methods and return values as the paper's code; the scoring runs through
the fused kernels (:class:`oodfast.detect.RareDetector`) on whole batches instead of a Python loop of
scipy distances with a host copy per row, and the buffer is a preallocated ring instead of a deque
of tensor lists. Two deliberate differences, both fixes:

1. ``MemoryBuffer.concat_with_batch`` puts buffer entry k's view v at row ``B + k`` of view v, for
   any buffer size. The paper's code reshapes its stacked [N, 2, ...] entries without moving the view axis,
   so row k of global view 1 and row k of global view 2 came from different images (the local views
   likewise): every buffer row broke DINO's positive pairs. It also assumed exactly 32 entries.
2. Non-finite embeddings are never flagged. The paper's code mapped NaN distances to 1e6, which is always
   above the threshold, and replayed the broken image for the rest of training.

Usage is unchanged::

    ood = OODDetector(device, weights_path="dino_resnet50_pretrain.pth", threshold=0.95)
    ood.compute_dataset_stats(calibration_images)
    idx = ood.detect([images[0], images[1]])
    for i in idx:
        memory_buffer.add([v[i] for v in images])
    images = memory_buffer.concat_with_batch(images)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import functional as TF

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, RareDetector
from oodfast import encoders

log = logging.getLogger(__name__)

DINO_WEIGHTS_HELP = (
    "download DINO's ResNet-50 weights (dino_resnet50_pretrain.pth, linked from the "
    "facebookresearch/dino README: https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/"
    "dino_resnet50_pretrain.pth) and pass weights_path=PATH, or pass encoder=<your nn.Module>; "
    "oodfast never downloads weights at run time"
)


def load_resnet50_trunk(weights_path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen torchvision ResNet-50 without its classifier (outputs [N, 2048]) from ``weights_path``.

    Exactly ``oodfast.encoders.load_encoder(weights_path, "resnet50", device)`` (the one encoder
    entry point) for a file; this wrapper only refuses a path with no file (``"random"`` included) with
    :class:`FileNotFoundError` and adds where to get DINO's weights to every error. Accepts a plain
    torchvision/DINO ResNet-50 state dict (e.g. ``dino_resnet50_pretrain.pth``) or a DINO training
    checkpoint, whose ``teacher`` backbone is used. Loaded with ``torch.load(weights_only=True)``:
    a file that would execute code is refused.

    Raises:
        FileNotFoundError: no file at ``weights_path`` (the message says where to get one).
        ValueError: the file is unsafe or holds no ResNet-50 weights.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; {DINO_WEIGHTS_HELP}")
    try:
        return encoders.load_encoder(path, "resnet50", device)
    except ValueError as e:
        raise ValueError(f"{e}; {DINO_WEIGHTS_HELP}") from None


class OODDetector:
    """The paper's ``OODDetector``, scoring with the fused kernels.

    Args:
        device: where the encoder runs.
        weights_path: DINO ResNet-50 weights (a state dict or a DINO checkpoint with ``teacher``).
        threshold: the percentile of calibration distances used as the threshold (0.80 - 0.99).
        encoder: any module mapping [N, 3, 224, 224] to a feature map [N, C, h, w] or embeddings [N, C];
            used instead of ``weights_path``.
        metric: ``euclidean`` (the paper's), ``cosine``, ``mahalanobis`` or ``knn``.
    """

    def __init__(self, device: torch.device | str, weights_path: str | Path | None = None, threshold: float = 0.95,
                 *, encoder: nn.Module | None = None, metric: str = "euclidean", batch_size: int = 64) -> None:
        self.device = torch.device(device)
        self.threshold = threshold
        if encoder is None and weights_path is None:
            raise ValueError(f"OODDetector needs an encoder: {DINO_WEIGHTS_HELP}")
        self.encoder = (encoder if encoder is not None else load_resnet50_trunk(weights_path)).eval().to(self.device)
        self.metric = metric
        self.batch_size = batch_size
        self.detector: RareDetector | None = None
        self._config = DetectorConfig(metric=metric, percentile=threshold)

    # The paper's detector exposed these after compute_dataset_stats.
    @property
    def mean_vector(self) -> torch.Tensor | None:
        return None if self.detector is None else self.detector.center.unsqueeze(0)

    @property
    def threshold_value(self) -> float | None:
        return None if self.detector is None else float(self.detector.threshold)

    @torch.no_grad()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(TF.resize(images.to(self.device), [224, 224]))
        return (out.mean(dim=(2, 3)) if out.dim() == 4 else out).float()

    @torch.no_grad()
    def compute_dataset_stats(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the mean (and the metric's statistics) and the threshold on calibration images.

        Args:
            images: an iterable of [3, H, W] tensors (sizes may differ: each is resized to 224x224).
        """
        feats, chunk = [], []
        for im in images:
            chunk.append(TF.resize(im, [224, 224]))
            if len(chunk) == self.batch_size:
                feats.append(self._embed(torch.stack(chunk)))
                chunk = []
        if chunk:
            feats.append(self._embed(torch.stack(chunk)))
        if not feats:
            raise ValueError("compute_dataset_stats got no images")
        features = torch.cat(feats)
        self.detector = RareDetector(features.shape[1], self._config, device=self.device)
        self.detector.fit(features)
        log.info("computed threshold: %s", self.threshold_value)

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sorted unique batch indices (CPU int64) of images any of whose two global views is rare.

        Args:
            images: ``[global_views_1, global_views_2]``, each [B, 3, H, W].
        """
        if self.detector is None:
            raise RuntimeError("call compute_dataset_stats(calibration_images) before detect()")
        if len(images) < 2 or images[0].shape[0] != images[1].shape[0]:
            raise ValueError("detect expects [global_views_1, global_views_2] with the same batch size")
        B = images[0].shape[0]
        features = self._embed(torch.cat([images[0], images[1]])).view(2, B, -1)
        scores = self.detector.score(features)
        return self.detector.flags(scores).nonzero().flatten().cpu()

    @torch.no_grad()
    def extract_features(self, image_tensor: torch.Tensor):
        """Embedding of one [3, H, W] image as a numpy array [C] (as the paper's code)."""
        return self._embed(image_tensor.unsqueeze(0)).squeeze(0).cpu().numpy()


class _Entries(Sequence):
    """The buffer's entries oldest first, each a list of views: what the paper's deque held."""

    def __init__(self, owner: MemoryBuffer) -> None:
        self._owner = owner

    def __len__(self) -> int:
        ring = self._owner._ring
        return 0 if ring is None else int(ring.count)

    def __getitem__(self, k: int) -> list[torch.Tensor]:
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"buffer index {k} out of range for {n} entries")
        return self._owner._ring.entry(k % n)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        return (self[k] for k in range(len(self)))


class MemoryBuffer:
    """The paper's ``MemoryBuffer`` on a preallocated :class:`RareRing` (``max_size`` images x all views).

    ``buffer`` is a read-only sequence of entries (``len()`` works, oldest first).
    """

    def __init__(self, max_size: int = 32) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._ring: RareRing | None = None  # allocated on the first add, when the view shapes are known
        self.buffer = _Entries(self)

    def _ensure_ring(self, views: Sequence[torch.Tensor]) -> RareRing:
        if self._ring is None:
            groups: list[tuple[int, tuple[int, ...]]] = []
            for shape in (tuple(v.shape) for v in views):
                if groups and groups[-1][1] == shape:
                    groups[-1] = (groups[-1][0] + 1, shape)
                else:
                    groups.append((1, shape))
            if len(groups) > 2:
                raise ValueError(f"views must come in at most two resolutions (global, local), got "
                                 f"{[list(v.shape) for v in views]}")
            self._ring = RareRing(self.max_size, groups, dtype=views[0].dtype, device=views[0].device)
        return self._ring

    def add(self, samples: Sequence[torch.Tensor]) -> None:
        """Append one image: its views [global1, global2, local1, ...], each [3, H, W]."""
        self._ensure_ring(samples).append(samples)

    def get(self) -> list[list[torch.Tensor]]:
        """The entries, oldest first, each a list of views."""
        return list(self.buffer)

    def concat_with_batch(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per view v: ``views[v]`` [B, ...] followed by every entry's view v, oldest first.

        Unlike the paper's code, entry k's views all sit at row ``B + k`` (DINO's positive pairs hold) and any
        buffer size works; an empty buffer returns the views unchanged.
        """
        if self._ring is None:
            return list(views)
        return self._ring.mixed(views)

    def clear(self) -> None:
        if self._ring is not None:
            self._ring.reset()
