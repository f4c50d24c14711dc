"""DINO multi-crop augmentation: one config, one epoch plan, three backends (DALI, reference, torch).

DINO's recipe (Caron et al. 2021, facebookresearch/dino ``DataAugmentationDINO``), per image:

    view        crop (RandomResizedCrop, bicubic)   flip  jitter  gray  blur        solarize
    global 1    224 px, scale 0.4-1.0                0.5   0.8     0.2   1.0         -
    global 2    224 px, scale 0.4-1.0                0.5   0.8     0.2   0.1         0.2
    local x N   96 px,  scale 0.05-0.4               0.5   0.8     0.2   0.5         -

    aspect ratio 3/4-4/3; colour jitter brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1;
    blur sigma 0.1-2.0; then ToTensor + ImageNet normalisation.

Every setting lives in :class:`MultiCropConfig` (one :class:`ViewAug` per view kind), so no view can
silently ignore a user's setting. :func:`multicrop_loader` yields :class:`MultiCropBatch` es:

    views   list of 2 + N tensors [B, 3, H, W] (global views first), ImageNet-normalised
    index   [B] int64 positions in ``files``
    boxes   [B, 2, 4] int64 global-crop boxes (x0, y0, x1, y1), half-open, in source pixels

Backends (``backend=``):

- ``"dali"`` (default): one DALI pipeline. Each image is decoded once (``device="mixed"`` with the
  hardware JPEG decoder on a GPU, ``"cpu"`` with ``device="cpu"``), then every view is a resize of a
  region of interest of the decoded image followed by the photometric ops, behind coin flips under
  ``enable_conditionals=True``.
- ``"reference"``: the seed's PIL/torchvision ``DataAugmentationDINO`` in DataLoader workers
  (:mod:`oodfast.data.reference_multicrop`): the parity oracle and the benchmark baseline.
- ``"torch"``: torchvision.io decode plus batched tensor ops (:mod:`oodfast.data.torch_multicrop`),
  for users without DALI.

Randomness. The DALI and torch backends draw every random decision on the host with numpy, one
generator per batch seeded by ``(seed, epoch, shard, step)``, and feed the decisions to the device.
So the output is a pure function of (files, config, batch size, seed, shards): the same on CPU and
GPU, independent of thread counts and prefetching, and each decision can be returned for tests
(``debug=True``). The number of draws never depends on a probability, so switching one
augmentation off leaves every other decision, and every box, unchanged. Crop boxes are drawn with
exactly ``torchvision.transforms.RandomResizedCrop.get_params``'s algorithm (10 attempts, then the
clamped centre crop), which is how the loader knows each box in source pixels.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.data.discover import DatasetFiles
from oodfast.data.imageio import ImageFileError

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("dali", "paper", "torch")
#: Earlier spellings still accepted.
BACKEND_ALIASES = {"reference": "paper"}
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECK = "run `oodfast data check` on the dataset to write a clean file list that leaves it out"


class MultiCropDataError(ImageFileError):
    """An image the augmentation cannot read or decode; the message names the file."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewAug:
    """Photometric settings of one kind of view (probabilities in [0, 1]).

    Colour jitter follows ``torchvision.transforms.ColorJitter``: factors drawn per image uniformly
    in [1 - b, 1 + b] (brightness, contrast, saturation) and [-hue, hue] (a fraction of the colour
    circle, so 0.1 = 36 degrees).
    """

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ViewAug.{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewAug.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"ViewAug.hue must lie in [0, 0.5] (a fraction of the circle), got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"ViewAug.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")

    def off(self) -> ViewAug:
        """The same view with every random photometric augmentation and the flip switched off."""
        return replace(self, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class MultiCropConfig:
    """Every per-view setting of DINO's multi-crop (defaults: DINO's recipe, see the module doc).

    Attributes:
        global_size, local_size: output size, an int (square) or (height, width).
        global_scale, local_scale: RandomResizedCrop area range, as a share of the source image.
        local_crops_number: number of local views.
        ratio: RandomResizedCrop aspect-ratio (width / height) range, shared by all views.
        global1, global2, local: photometric settings of each kind of view.
        mean, std: normalisation, applied to [0, 1] pixels.
        dtype: ``"auto"`` (float16 on a GPU, float32 on the CPU), ``"float32"``, ``"float16"`` or
            ``"bfloat16"``.
    """

    global_size: int | tuple[int, int] = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_size: int | tuple[int, int] = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 6
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    global1: ViewAug = field(default_factory=lambda: ViewAug(blur_p=1.0))
    global2: ViewAug = field(default_factory=lambda: ViewAug(blur_p=0.1, solarize_p=0.2))
    local: ViewAug = field(default_factory=lambda: ViewAug(blur_p=0.5))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: str = "auto"

    n_global: int = field(default=2, init=False)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MultiCropConfig.{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"MultiCropConfig.ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("global_size", "local_size"):
            if min(_hw(getattr(self, name))) < 1:
                raise ValueError(f"MultiCropConfig.{name} must be positive, got {getattr(self, name)}")
        if self.local_crops_number < 0:
            raise ValueError(f"MultiCropConfig.local_crops_number must be >= 0, got {self.local_crops_number}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"MultiCropConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"MultiCropConfig.mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")

    @classmethod
    def dino(cls, **overrides: Any) -> MultiCropConfig:
        """DINO's recipe (the default), as in facebookresearch/dino with 6 local crops."""
        return cls(**overrides)

    @classmethod
    def bdd10k(cls, **overrides: Any) -> MultiCropConfig:
        """The paper's BDD10K variant (the seed's ``DataAugmentationDINO_BDD10K``).

        Global crops: 224 px, scale 0.3-1.0, no flip, jitter, grayscale, blur or solarisation (the
        seed comments all of them out for both global views). Local crops: 6 x 96 px, scale 0.1-0.3,
        DINO's flip/jitter/grayscale and blur p=0.5. Not reproduced: the seed draws global 2 and
        the locals as nested crops placed by ``random.seed(42)`` on every call (so identically
        placed in every image); here they are ordinary RandomResizedCrops of the source image.
        """
        plain = ViewAug().off()
        base: dict[str, Any] = dict(global_scale=(0.3, 1.0), local_scale=(0.1, 0.3), local_crops_number=6,
                                    global1=plain, global2=plain, local=ViewAug(blur_p=0.5))
        base.update(overrides)
        return cls(**base)

    @property
    def n_views(self) -> int:
        return self.n_global + self.local_crops_number

    def view_kinds(self) -> list[tuple[str, ViewAug, tuple[int, int], tuple[float, float]]]:
        """One (name, ViewAug, (height, width), scale) per output view, global views first."""
        g, lo = _hw(self.global_size), _hw(self.local_size)
        kinds = [("global1", self.global1, g, self.global_scale), ("global2", self.global2, g, self.global_scale)]
        kinds += [(f"local{i}", self.local, lo, self.local_scale) for i in range(self.local_crops_number)]
        return kinds

    def without_augmentation(self) -> MultiCropConfig:
        """Crops only: flip, jitter, grayscale, blur and solarisation all off (for box checks)."""
        return replace(self, global1=self.global1.off(), global2=self.global2.off(), local=self.local.off())

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The output dtype on ``device``: ``dtype``, or float16 on CUDA / float32 on CPU for "auto"."""
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


# --------------------------------------------------------------------------------------------------
# The batch, the epoch plan, the random decisions
# --------------------------------------------------------------------------------------------------


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
    """

    views: list[torch.Tensor]
    index: torch.Tensor
    boxes: torch.Tensor
    params: dict[str, np.ndarray] | None = None


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
_P = {name: i for i, name in enumerate(PARAM_FIELDS)}


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


def batch_rng(seed: int, epoch: int, shard_id: int, step: int) -> np.random.Generator:
    """The generator of every random decision of one batch."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, shard_id, step]))


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
    Coin flips follow the seed: ``u < p`` for torchvision's RandomApply / RandomHorizontalFlip /
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


def read_file_bytes(path: str | os.PathLike[str]) -> np.ndarray:
    """The file's bytes as uint8; a clear error naming the file if it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise MultiCropDataError(f"cannot read {path}: {e}; {_CHECK}") from None


def image_size(path: Path, data: bytes | np.ndarray) -> tuple[int, int]:
    """(height, width) from the encoded header, without decoding; raises naming the file.

    Also refuses, from the header alone, an image over the pixel limit and a pixel mode with no
    8-bit RGB value (:func:`oodfast.data.imageio.open_image`).
    """
    from oodfast.data.imageio import ImageFileError, open_image

    try:
        with open_image(data, path) as im:
            w, h = im.size
    except ImageFileError as e:
        raise MultiCropDataError(f"{e}; {_CHECK}") from None
    return h, w


# --------------------------------------------------------------------------------------------------
# DALI
# --------------------------------------------------------------------------------------------------


class _Feeder:
    """The external source: each call returns the next batch of (bytes, index, boxes, params).

    The stream is endless: global step ``g`` is epoch ``start_epoch + g // steps``, step
    ``g % steps`` of :func:`epoch_plan`; the loader reads exactly ``steps`` batches per epoch, so
    DALI's prefetching may run ahead into the next epoch without changing any batch. Every batch is
    a pure function of ``g`` (the plan and :func:`batch_rng` are seeded by (seed, epoch, shard,
    step)), so which thread calls, and how far ahead, changes nothing. DALI calls it from
    ``Pipeline.run`` (``schedule_run``), which :class:`_Prefetcher` runs on its own thread.
    """

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, seed: int,
                 shard_id: int, num_shards: int, epoch_length: int | None, start_epoch: int,
                 debug: bool) -> None:
        self.files, self.config, self.batch_size, self.seed = files, config, batch_size, seed
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.steps = steps_per_epoch(len(files), batch_size, num_shards, epoch_length)
        self.start_epoch, self.debug = start_epoch, debug
        self.fed = 0
        self._plan: tuple[int, np.ndarray] | None = None
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=8)
        # (height, width) per file position, parsed from the header on first read: later epochs
        # skip the PIL header parse (about a fifth of this callback's time). Only the prefetch
        # thread calls the feeder, so the cache needs no lock.
        self._sizes: dict[int, tuple[int, int]] = {}

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(len(self.files), self.batch_size, seed=self.seed, epoch=epoch,
                                            shard_id=self.shard_id, num_shards=self.num_shards,
                                            epoch_length=self.epoch_length))
        return self._plan[1]

    def __call__(self) -> tuple[Any, ...]:
        epoch, step = divmod(self.fed, self.steps)
        epoch += self.start_epoch
        self.fed += 1
        idx = self.plan(epoch)[step]
        self.recent.append(idx)
        data, hw = [], np.empty((len(idx), 2), np.int64)
        for k, i in enumerate(idx):
            path = self.files[i]
            raw = read_file_bytes(path)
            data.append(raw)
            size = self._sizes.get(int(i))
            if size is None:
                size = self._sizes[int(i)] = image_size(path, raw)
            hw[k] = size
        params = sample_view_params(batch_rng(self.seed, epoch, self.shard_id, step), hw[:, 0], hw[:, 1], self.config)
        boxes = np.ascontiguousarray(boxes_from_params(params[:, : self.config.n_global]))
        per_view = [np.ascontiguousarray(params[:, v]) for v in range(self.config.n_views)]
        return (data, np.ascontiguousarray(idx.reshape(-1, 1)), boxes, *per_view)


# Each photometric step takes the uint8 HWC view ``x`` and its parameter vector ``p`` (float32
# [len(PARAM_FIELDS)], CPU) and applies its op behind the coin flip drawn on the host. DALI's
# conditionals (enable_conditionals=True) run each branch on the samples that take it only.


def _brightness_contrast(x: Any, p: Any, gpu: bool) -> Any:
    """torchvision brightness (x * b) and contrast (c * x + (1 - c) * mean of the grayscale image).

    DALI's own contrast centres on 128 (half the uint8 range) by default, not on the image's mean,
    so the mean is computed here (rounded to an integer like PIL's ImageEnhance.Contrast) and both
    are fused into b * (mean + c * (x - mean)): contrast then brightness, and equally brightness then
    contrast, since the mean scales with b.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    if p[_P["jitter"]] > 0.5:
        ch = fn.reductions.mean(x, axes=[0, 1])
        m = dmath.floor(ch[0] * 0.299 + ch[1] * 0.587 + ch[2] * 0.114 + 0.5)
        b, c = p[_P["brightness"]], p[_P["contrast"]]
        if gpu:
            # On the GPU the mean is a GPU value, and argument inputs must live on the CPU: use
            # fused arithmetic instead (its operands must share the device).
            y = b.gpu() * (m + c.gpu() * (fn.cast(x, dtype=types.FLOAT) - m))
            x = fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)
        else:
            # brightness_contrast computes b * (center + c * (x - center)) in uint8, ~2x faster
            # on the CPU than the float arithmetic above.
            x = fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=m, dtype=types.UINT8)
    return x


def _saturation_hue_gray(x: Any, p: Any) -> Any:
    """Saturation, hue and grayscale in one linear op (DALI ``hsv``).

    DALI's hsv keeps the luma (0.299, 0.587, 0.114) and scales the chroma, which is exactly PIL's
    saturation blend with its "L" image; saturation 0 is PIL's ``convert("L")`` in 3 channels, so
    RandomGrayscale after the jitter is the jitter's hsv with saturation x 0 (hue then has no effect).
    Hue differs: torchvision (PIL) shifts H in HSV space by hue x 360 degrees; DALI rotates the
    chroma around the grey axis by that angle (a linear approximation of the HSV shift that keeps the
    luma where PIL keeps max(R, G, B)). DALI takes degrees where torchvision takes a fraction of the
    circle: the feeder converts. Order: torchvision applies the four jitter ops in a random order;
    here brightness and contrast come first, then saturation and hue. All four are linear maps that
    commute (contrast's mean scales with brightness; hsv keeps luma), so the order only matters
    through clipping to [0, 255] between steps.
    """
    from nvidia.dali import fn, types

    if p[_P["color"]] > 0.5:
        x = fn.hsv(x, saturation=p[_P["saturation"]], hue=p[_P["hue_deg"]], dtype=types.UINT8)
    return x


def _gaussian_blur(x: Any, p: Any) -> Any:
    """DINO's GaussianBlur: PIL ``ImageFilter.GaussianBlur(radius=sigma)``, sigma ~ U(0.1, 2.0).

    PIL approximates the Gaussian with three box blurs; DALI convolves with a sampled Gaussian of
    window 2 * ceil(3 sigma) + 1; both have standard deviation sigma.
    """
    from nvidia.dali import fn

    if p[_P["blur"]] > 0.5:
        x = fn.gaussian_blur(x, sigma=p[_P["sigma"]])
    return x


_SOLARIZE_KEYS = list(range(256))
_SOLARIZE_VALUES = [k if k < 128 else 255 - k for k in _SOLARIZE_KEYS]


def _solarize(x: Any, p: Any) -> Any:
    """PIL ``ImageOps.solarize(threshold=128)``: invert every value >= 128 (a uint8 lookup table)."""
    from nvidia.dali import fn, types

    if p[_P["solarize"]] > 0.5:
        x = fn.lookup_table(x, keys=_SOLARIZE_KEYS, values=_SOLARIZE_VALUES, dtype=types.UINT8)
    return x


def build_dali_pipeline(feeder: Any, config: MultiCropConfig, batch_size: int, *, device_id: int | None,
                        num_threads: int, out_dtype: torch.dtype, hw_decoder_load: float = 0.65,
                        prefetch_queue_depth: int = 2, debug: bool = False) -> Any:
    """The multi-crop DALI pipeline (built, not started).

    Outputs: index [B, 1] int64, boxes [B, 2, 4] int64, then one [B, 3, H, W] per view (CHW,
    normalised, :func:`pipeline_dtype`: float16 on GPU for a float16/bfloat16 ``out_dtype``, else
    float32), then with ``debug`` the per-view parameter vectors. ``device_id=None`` gives a
    CPU-only pipeline.

    The dynamic executor (``exec_dynamic=True``, DALI's default since 1.4x, asked for explicitly):
    every iteration's outputs own their memory (reference counted; ``release_outputs`` does not
    invalidate them), which is what lets :class:`_Prefetcher` run ahead while the consumer still
    holds earlier batches, and lets the loader hand out DLPack views without a copy.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    dali_dtype = types.FLOAT16 if pipeline_dtype(out_dtype, gpu) == torch.float16 else types.FLOAT
    mean = [255.0 * m for m in config.mean]
    std = [255.0 * s for s in config.std]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  enable_conditionals=True, prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True)
    def multicrop() -> tuple[Any, ...]:
        encoded, index, boxes, *params = fn.external_source(
            source=feeder, num_outputs=3 + config.n_views, batch=True)
        # adjust_orientation=False: boxes are in the stored pixel grid, like PIL's Image.open (the
        # seed) and like the BDD10K masks, which carry no EXIF orientation.
        if gpu:
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                      adjust_orientation=False, hw_decoder_load=hw_decoder_load)
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        views = []
        for v, (_, aug, size, _) in enumerate(config.view_kinds()):
            p = params[v]
            # RandomResizedCrop: the box is the resize's region of interest, in (y, x) tensor order
            # and pixel-edge coordinates (the ROI [y0, y1) x [x0, x1) of the integer box), so no
            # intermediate crop is copied. Cubic with antialiasing when shrinking, as PIL's BICUBIC
            # resize (DALI's cubic kernel and PIL's differ by at most a few levels on edges).
            x = fn.resize(image, roi_start=p[0:2], roi_end=p[2:4], roi_relative=False, size=list(size),
                          interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
            # The horizontal flip is done last, by crop_mirror_normalize: every op in between is
            # pixel-wise, uses a whole-image mean, or (blur) a symmetric kernel, so it commutes
            # with the mirror and the result equals torchvision's flip-first order.
            # Python-level ifs drop ops a view never uses; the DALI ifs inside are the coin flips.
            if aug.jitter_p > 0:
                x = _brightness_contrast(x, p, gpu)
            if aug.jitter_p > 0 or aug.grayscale_p > 0:
                x = _saturation_hue_gray(x, p)
            if aug.blur_p > 0:
                x = _gaussian_blur(x, p)
            if aug.solarize_p > 0:
                x = _solarize(x, p)
            views.append(fn.crop_mirror_normalize(
                x, mirror=fn.cast(p[_P["flip"]], dtype=types.INT32), mean=mean, std=std,
                dtype=dali_dtype, output_layout="CHW"))
        return (index, boxes, *views, *(params if debug else []))

    return multicrop()


def pipeline_dtype(out_dtype: torch.dtype, gpu: bool) -> torch.dtype:
    """The dtype the DALI pipeline writes its views in: float16 on a GPU for a float16/bfloat16
    ``out_dtype`` (DALI has no bfloat16), else float32."""
    return torch.float16 if gpu and out_dtype in (torch.float16, torch.bfloat16) else torch.float32


class _Prefetcher:
    """Runs a built DALI pipeline on a background thread, ``prefetch_queue_depth`` batches ahead.

    The thread owns every call into the pipeline (``run()``: the :class:`_Feeder` callback, the
    scheduling, the wait for the batch), so the consumer's thread only takes finished batches from
    a queue. With DALI prefetch depth D and the consumer holding batch i, batch i+1 is finished and
    waiting here and the feeder has been called up to batch i+D (a semaphore lets the thread start
    batch i+2's ``run()`` only once the consumer has taken i+1). A failure in the thread (a file
    the feeder cannot read, a DALI error) is queued after the batches before it and raised on the
    consumer's thread as is; a thread that ends without either is an error, not a hang.

    The thread references this object, never the loader, so a dropped loader is collected and its
    finalizer stops the thread.
    """

    _POLL_S = 0.05  # how often a waiting side looks at the stop flag / the thread's liveness

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe: Any = pipe
        self.device = device
        self._ready: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._space = threading.Semaphore(1)  # finished batches waiting for the consumer, at most 1
        self._stop = threading.Event()
        # Outputs handed to the consumer: the latest batch's, then earlier ones kept until the
        # consumer's work on them is done (see _hold()).
        self.handed: Any = None
        self._held: collections.deque[tuple[Any, Any]] = collections.deque()
        self.thread = threading.Thread(target=self._loop, name="oodfast-dali-prefetch", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._space.acquire(timeout=self._POLL_S):
                    continue
                if self._stop.is_set():
                    break
                self._ready.put((True, self.pipe.run()))  # host-synchronous: the batch is finished
        except BaseException as e:  # noqa: BLE001 - every failure is the consumer's to raise
            self._ready.put((False, e))

    def get(self) -> tuple[Any, ...]:
        """The next batch's outputs (DALI TensorLists); raises the thread's error in its place.

        Asking for the next batch ends the previous one's views (the loader's contract): its
        outputs go to :meth:`_hold`.
        """
        if self.handed is not None:
            self._hold(self.handed)
            self.handed = None
        while True:
            try:
                ok, value = self._ready.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the DALI prefetch thread ended without a batch or an error") from None
        self._space.release()
        if not ok:
            raise value
        self.handed = value
        return value

    def _hold(self, outputs: Any) -> None:
        """Keep ``outputs`` (the batch just handed out as views) alive until the consumer is done.

        Called when the consumer asks for the next batch, or stops. On CUDA an event recorded on the
        consumer's current stream marks the end of the work it has enqueued on them (e.g. the
        trainer's non-blocking staging copy); the outputs are released, back to DALI's memory pool,
        only once that event has completed, so DALI cannot reuse the memory under a pending read.
        On the CPU every torch op on them has finished when this is called.
        """
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._held.append((event, outputs))
        while self._held and (self._held[0][0] is None or self._held[0][0].query()
                              or len(self._held) > 8):  # 8: a consumer that never waits on the GPU
            ev, _ = self._held.popleft()
            if ev is not None:
                ev.synchronize()  # no-op unless the bound of 8 forced it

    def close(self) -> None:
        """Stop the thread (it finishes a run() in progress), drop queued batches and the pipeline.

        The last batch's outputs are released once the consumer's work enqueued on them is done.
        """
        if self.handed is not None:
            self._hold(self.handed)
            self.handed = None
        self._stop.set()
        self._space.release()  # wake a thread waiting for space
        if self.thread is not threading.current_thread():
            self.thread.join()
        while not self._ready.empty():
            self._ready.get_nowait()
        for event, _ in self._held:
            if event is not None:
                event.synchronize()
        self._held.clear()
        self.pipe = None


class DaliMultiCropLoader:
    """Iterator over multi-crop batches from a DALI pipeline (see :func:`multicrop_loader`).

    The pipeline runs on a background thread (:class:`_Prefetcher`), ``prefetch_queue_depth``
    batches ahead of the consumer: while the consumer works on batch i, the :class:`_Feeder`
    reads and plans batches up to i + depth and DALI decodes them. Every batch is the same as a
    synchronous ``pipe.run()`` loop would give (the plan is a pure function of seed, epoch, shard
    and step).

    Views. ``zero_copy=False`` (default): views in ``config`` 's dtype, the caller's to keep.
    ``zero_copy=True``: each view is DALI's own output buffer, as a DLPack view in the pipeline's
    dtype (:attr:`view_dtype`: float16 on a GPU for a float16/bfloat16 config, float32 on the CPU),
    with no torch-side copy or conversion; for a consumer that copies every batch into persistent
    tensors anyway, whose ``copy_`` then does the one conversion. Contract: such views are valid
    until the next batch is requested; copy (or enqueue the copy of) what you need before asking
    for the next batch. The loader keeps DALI's buffers alive until then, and on CUDA until the work
    the consumer enqueued on its current stream before that request has run (:meth:`_Prefetcher._hold`).

    Writes per crop byte (the normalised float view; DALI's internal uint8 stages not counted), a
    consumer that copies into persistent tensors (the trainer) included: zero_copy=True: 2 (DALI's
    crop_mirror_normalize, the consumer's copy_, which converts float16 -> bfloat16 on the GPU);
    zero_copy=False: 2 when the config's dtype is the pipeline's (float32 on the CPU, float16 on the
    GPU), 3 otherwise (a torch ``.to(dtype)`` in between). Before the prefetch thread, the CPU path
    also copied every view out of DALI (np.array) and the GPU bfloat16 path converted: 3 in both.
    """

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, *,
                 device: torch.device, seed: int, shard_id: int, num_shards: int,
                 epoch_length: int | None, num_threads: int | None = None,
                 hw_decoder_load: float = 0.65, prefetch_queue_depth: int = 2, debug: bool = False,
                 zero_copy: bool = False) -> None:
        self.files, self.config, self.batch_size = list(files), config, batch_size
        self.device, self.seed = device, seed
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.num_threads = num_threads or max(1, min(len(os.sched_getaffinity(0)), 16))
        self.hw_decoder_load, self.prefetch_queue_depth, self.debug = hw_decoder_load, prefetch_queue_depth, debug
        self.dtype = config.torch_dtype(device)
        self.pipeline_dtype = pipeline_dtype(self.dtype, device.type == "cuda")
        self.zero_copy = zero_copy
        self.epoch = 0
        self._pipe: Any = None
        self._feeder: _Feeder | None = None
        self._prefetch: _Prefetcher | None = None
        self._finalizer: Any = None
        self._consumed = 0  # batches read from the current pipeline

    @property
    def view_dtype(self) -> torch.dtype:
        """The dtype of ``batch.views``: the pipeline's with ``zero_copy``, else the config's."""
        return self.pipeline_dtype if self.zero_copy else self.dtype

    def __len__(self) -> int:
        return steps_per_epoch(len(self.files), self.batch_size, self.num_shards, self.epoch_length)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (e.g. when resuming from a checkpoint)."""
        self.epoch = epoch

    def _start(self) -> None:
        self._stop()
        device_id = None if self.device.type == "cpu" else (self.device.index or 0)
        self._feeder = _Feeder(self.files, self.config, self.batch_size, self.seed, self.shard_id,
                               self.num_shards, self.epoch_length, self.epoch, self.debug)
        self._pipe = build_dali_pipeline(
            self._feeder, self.config, self.batch_size, device_id=device_id, num_threads=self.num_threads,
            out_dtype=self.dtype, hw_decoder_load=self.hw_decoder_load,
            prefetch_queue_depth=self.prefetch_queue_depth, debug=self.debug)
        self._pipe.build()
        self._prefetch = _Prefetcher(self._pipe, self.device)
        self._finalizer = weakref.finalize(self, self._prefetch.close)
        self._consumed = 0
        self._start_epoch = self.epoch

    def _stop(self) -> None:
        """Stop the prefetch thread and drop the pipeline (the next iteration starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # _Prefetcher.close, once
        self._prefetch = self._finalizer = self._pipe = None

    def __iter__(self) -> Iterator[MultiCropBatch]:
        steps = len(self)
        if self._pipe is None or self._start_epoch + self._consumed // max(steps, 1) != self.epoch \
                or self._consumed % max(steps, 1):
            self._start()  # first use, set_epoch() jumped, or the last epoch was left unfinished
        epoch = self.epoch
        done = False
        try:
            for _ in range(steps):
                yield self._convert(self._run())
            done = True
        finally:
            if not done:  # left early (break, error): the next pass restarts, so stop the thread now
                self._stop()
        self.epoch = epoch + 1

    def _run(self) -> tuple[Any, ...]:
        try:
            outputs = self._prefetch.get()  # the previous batch's views expire here
        except MultiCropDataError:
            self._stop()
            raise
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses; find the file
            recent = list(self._feeder.recent) if self._feeder is not None else []  # the thread has ended
            self._stop()
            bad = find_undecodable([self.files[i] for batch in recent for i in batch])
            if bad is not None:
                raise MultiCropDataError(f"DALI failed to decode {bad}; {_CHECK}, then train on it "
                                         f"(DALI error: {str(e).strip().splitlines()[-1][:300]})") from e
            raise
        self._consumed += 1
        return outputs

    def _convert(self, outputs: tuple[Any, ...]) -> MultiCropBatch:
        n = self.config.n_views
        index = torch.from_numpy(np.array(outputs[0].as_tensor())).reshape(-1)
        boxes = torch.from_numpy(np.array(outputs[1].as_tensor()))
        views = [_to_torch(outputs[2 + v]) for v in range(n)]
        if not self.zero_copy:
            views = [v.to(self.dtype) for v in views]  # no-op (no copy) when the dtypes agree
        params = None
        if self.debug:
            params = params_dict(np.stack([np.array(outputs[2 + n + v].as_tensor()) for v in range(n)], axis=1))
        return MultiCropBatch(views=views, index=index, boxes=boxes, params=params)


def _to_torch(tl: Any) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor viewing the same memory (no copy), on its device.

    With the dynamic executor each output batch owns its memory, so DLPack hands it to torch as
    ``DALIGenericIterator`` does; called on the consumer's thread, torch's ``from_dlpack`` orders
    it on that thread's current stream (``pipe.run()`` without a stream has already waited for it).
    """
    return torch.from_dlpack(tl.as_tensor())


def find_undecodable(paths: Sequence[Path]) -> Path | None:
    """The first of ``paths`` that DALI's CPU decoder rejects (one small pipeline per attempt), or None."""
    from nvidia.dali import fn, pipeline_def, types

    pending = list(dict.fromkeys(paths))
    while pending:
        chunk: list[Path] = []

        def source() -> list[np.ndarray]:
            path = pending.pop(0)
            chunk.append(path)
            return [np.fromfile(path, dtype=np.uint8)]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def probe() -> Any:
            return fn.decoders.image(fn.external_source(source=source, batch=True), device="cpu",
                                     output_type=types.RGB, adjust_orientation=False)

        pipe = probe()
        pipe.build()
        try:
            while pending:
                pipe.run()
            return None
        except StopIteration:
            return None
        except Exception:  # noqa: BLE001 - any decoder failure marks the file just fed
            return chunk[-1] if chunk else None
    return None


# --------------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "cuda":
        if device is None and not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


ALTERNATIVE_BACKENDS = ("choose another backend: --aug torch (torchvision on the device) or --aug paper "
                        "(the seed's PIL path)")


def require_dali(alternative: str = ALTERNATIVE_BACKENDS) -> None:
    """Raise a ValueError that says what to do (install DALI, or ``alternative``) when DALI cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: an installed DALI whose shared libraries do not load
        raise ValueError(f"the DALI multi-crop backend needs NVIDIA DALI, which cannot be imported ({e}). "
                         f"Install it with `pip install nvidia-dali-cuda130` (Linux only), or {alternative}") from None


def multicrop_loader(
    files: DatasetFiles | Sequence[str | os.PathLike[str]],
    config: MultiCropConfig | None,
    batch_size: int,
    *,
    device: str | torch.device | None,
    seed: int,
    backend: str = "dali",
    shard_id: int | None = None,
    num_shards: int | None = None,
    epoch_length: int | None = None,
    num_workers: int | None = None,
    debug: bool = False,
    zero_copy: bool = False,
    **backend_options: Any,
) -> Any:
    """An iterable of :class:`MultiCropBatch` es: one pass = one epoch of ``len(loader)`` batches.

    Args:
        files: a :class:`DatasetFiles` (its ``images``) or image paths; ``index`` refers to them.
        config: the augmentation (None: :meth:`MultiCropConfig.dino`).
        batch_size: images per batch on this shard.
        device: ``"cpu"`` (DALI CPU pipeline with ``device_id=None``), ``"cuda"`` (the GPU of
            ``LOCAL_RANK``), ``"cuda:N"``, or None (CUDA when available, else CPU).
        seed: every shuffle and random decision derives from it; same seed, same batches.
        backend: ``"dali"``, ``"reference"`` (the seed's PIL pipeline in DataLoader workers) or
            ``"torch"`` (torchvision.io decode + batched tensor ops).
        shard_id, num_shards: this process's shard; default torchrun's ``RANK`` / ``WORLD_SIZE``.
        epoch_length: images per epoch over all shards (default ``len(files)``); the order
            repeats the files with fresh permutations when longer.
        num_workers: DALI threads / reference DataLoader workers (default: the CPU count).
        debug: DALI / torch only: also return the random decisions in ``batch.params``.
        zero_copy: for a consumer that copies every batch into its own tensors (the trainer's
            staging rows): DALI yields its output buffers as views in the pipeline's dtype
            (``loader.view_dtype``: float16 on a GPU for a float16/bfloat16 config, float32 on the
            CPU), valid until the next batch is requested, and the consumer's ``copy_`` does the one
            dtype conversion. The torch and reference backends build fresh tensors in the config's
            dtype for every batch, which already satisfies that contract, so they ignore it.
        backend_options: DALI: ``hw_decoder_load`` (share of JPEG decoding on the hardware
            decoder, default 0.65), ``prefetch_queue_depth`` (default 2: batches decoded ahead of
            the one the consumer holds, by a background thread; see :class:`DaliMultiCropLoader`).

    Each pass reshuffles (epoch e uses permutation (seed, e)); drop last: every shard yields
    ``epoch_length // (num_shards * batch_size)`` batches. ``set_epoch(e)`` jumps to epoch e.

    Raises:
        MultiCropDataError: an image cannot be read or decoded; the message names the file.
    """
    paths = [Path(p) for p in (files.images if isinstance(files, DatasetFiles) else files)]
    config = config or MultiCropConfig.dino()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    shard_id, num_shards = resolve_shard(shard_id, num_shards)
    dev = _resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA device; pass device='cpu' (DALI's "
                         f"CPU pipeline) or device=None to pick CUDA only when there is one")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or None, got {str(device)!r}")
    dali_options = {"hw_decoder_load", "prefetch_queue_depth"}
    unknown = set(backend_options) - (dali_options if backend == "dali" else set())
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} are not understood by backend={backend!r} "
                         f"(the DALI backend takes {', '.join(sorted(dali_options))})")
    if debug and backend == "paper":
        raise ValueError("debug=True needs backend='dali' or 'torch': the reference draws its decisions "
                         "inside torchvision and cannot return them")
    load = backend_options.get("hw_decoder_load", 0.65)
    if not 0.0 <= load <= 1.0:
        raise ValueError(f"hw_decoder_load is the share of JPEGs sent to the hardware decoder, in [0, 1]; got {load}")
    if backend_options.get("prefetch_queue_depth", 2) < 1:
        raise ValueError(f"prefetch_queue_depth must be >= 1, got {backend_options['prefetch_queue_depth']}")
    if steps_per_epoch(len(paths), batch_size, num_shards, epoch_length) == 0:
        raise ValueError(f"{len(paths) if epoch_length is None else epoch_length} images per epoch make no "
                         f"batch of {batch_size} on each of {num_shards} shard(s); lower batch_size or "
                         f"raise epoch_length")
    common = dict(device=dev, seed=seed, shard_id=shard_id, num_shards=num_shards, epoch_length=epoch_length)
    if backend == "dali":
        require_dali()
        return DaliMultiCropLoader(paths, config, batch_size, num_threads=num_workers, debug=debug,
                                   zero_copy=zero_copy, **common, **backend_options)
    if backend == "paper":
        from oodfast.data.reference_multicrop import ReferenceMultiCropLoader

        return ReferenceMultiCropLoader(paths, config, batch_size, num_workers=num_workers, **common)
    from oodfast.data.torch_multicrop import TorchMultiCropLoader

    return TorchMultiCropLoader(paths, config, batch_size, debug=debug, **common)
