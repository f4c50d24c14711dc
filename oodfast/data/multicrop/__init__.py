"""DINO multi-crop augmentation: one config, one epoch plan, three backends (DALI, paper, torch).

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

Two options serve the OOD replay. ``clean_view=True`` appends one more view (``batch.clean``): the
whole image resized to the global size with no flip and no photometric op, which the rarity detector
scores (so a score depends on the image alone). ``replay_ids`` (DALI and torch backends) makes every
batch B + C rows: the B new images, then the C images whose ids the replay ring held
``loader.replay_lag`` steps earlier, decoded and augmented afresh (new crops every step).

Backends (``backend=``):

- ``"dali"`` (default): one DALI pipeline. Each image is decoded once (``device="mixed"`` with the
  hardware JPEG decoder on a GPU, ``"cpu"`` with ``device="cpu"``), then every view is a resize of a
  region of interest of the decoded image followed by the photometric ops, behind coin flips under
  ``enable_conditionals=True``.
- ``"paper"`` (alias ``"reference"``): the paper's PIL/torchvision ``DataAugmentationDINO`` in
  DataLoader workers (:mod:`~oodfast.data.multicrop.paper_loader`): the parity oracle and the
  benchmark baseline.
- ``"torch"``: torchvision.io decode plus batched tensor ops
  (:mod:`~oodfast.data.multicrop.torch_loader`), for users without DALI.

Randomness. The DALI and torch backends draw every random decision on the host with numpy, one
generator per batch seeded by ``(seed, epoch, shard, step)``, and feed the decisions to the device.
So the output is a pure function of (files, config, batch size, seed, shards): the same on CPU and
GPU, independent of thread counts and prefetching, and each decision can be returned for tests
(``debug=True``). The number of draws never depends on a probability, so switching one
augmentation off leaves every other decision, and every box, unchanged. Crop boxes are drawn with
exactly ``torchvision.transforms.RandomResizedCrop.get_params``'s algorithm (10 attempts, then the
clamped centre crop), which is how the loader knows each box in source pixels.

Layout (each module imports only those above it; the factory imports the backends):

    config          ViewAug, MultiCropConfig: every per-view setting, DINO's defaults
    files           reading a batch's files: bytes, header size, MultiCropDataError
    plan            MultiCropBatch, the epoch plan, the host-drawn decisions (PARAM_FIELDS)
    dali_pipeline   the DALI graph: decode, resized ROI, photometric ops behind coin flips
    dali_prefetch   _Prefetcher: runs the pipeline on a thread, a bounded number of batches ahead
    dali_loader     DaliMultiCropLoader, its external source (_Feeder), require_dali
    torch_loader    TorchMultiCropLoader: torchvision.io decode + batched tensor ops on the device
    paper_loader    PaperMultiCropLoader: the paper's PIL + torchvision path in DataLoader workers
    factory         multicrop_loader: checks the arguments, builds the chosen backend

The torch and paper loaders import torchvision, so they load on first use (``backend=`` or
attribute access); DALI itself is imported only inside the functions that build pipelines.
"""

from __future__ import annotations

from typing import Any

from oodfast.data.multicrop.config import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig, ViewAug
from oodfast.data.multicrop.dali_loader import (
    ALTERNATIVE_BACKENDS,
    DaliMultiCropLoader,
    find_undecodable,
    require_dali,
)
from oodfast.data.multicrop.dali_pipeline import build_dali_pipeline, pipeline_dtype
from oodfast.data.multicrop.factory import BACKEND_ALIASES, BACKENDS, multicrop_loader
from oodfast.data.multicrop.files import CHECK_HINT, MultiCropDataError, image_size, read_file_bytes
from oodfast.data.multicrop.plan import (
    PARAM_FIELDS,
    PARAM_INDEX,
    REPLAY_LAG,
    MultiCropBatch,
    ReplayIds,
    batch_params,
    batch_rng,
    boxes_from_params,
    epoch_plan,
    params_dict,
    resized_crop_boxes,
    resolve_shard,
    sample_view_params,
    steps_per_epoch,
)

__all__ = [
    "ALTERNATIVE_BACKENDS",
    "BACKENDS",
    "BACKEND_ALIASES",
    "CHECK_HINT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARAM_FIELDS",
    "PARAM_INDEX",
    "REPLAY_LAG",
    "DaliMultiCropLoader",
    "MultiCropBatch",
    "MultiCropConfig",
    "MultiCropDataError",
    "PaperMultiCropLoader",
    "ReplayIds",
    "TorchMultiCropLoader",
    "ViewAug",
    "batch_params",
    "batch_rng",
    "boxes_from_params",
    "build_dali_pipeline",
    "epoch_plan",
    "find_undecodable",
    "image_size",
    "multicrop_loader",
    "params_dict",
    "pipeline_dtype",
    "read_file_bytes",
    "require_dali",
    "resized_crop_boxes",
    "resolve_shard",
    "sample_view_params",
    "steps_per_epoch",
]

_LAZY = {"PaperMultiCropLoader": "paper_loader", "TorchMultiCropLoader": "torch_loader"}


def __getattr__(name: str) -> Any:
    """The torchvision-backed loaders, imported on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
