"""Datasets: discovery of BDD100K / BDD10K / folder / synthdrive files and the pre-training check."""

from __future__ import annotations

from oodfast.data.check import BadFile, CheckReport, check_dataset
from oodfast.data.cache import cache_dir
from oodfast.data.discover import DatasetError, DatasetFiles, default_file_list_path, discover

__all__ = [
    "BadFile",
    "CheckReport",
    "DatasetError",
    "DatasetFiles",
    "cache_dir",
    "check_dataset",
    "default_file_list_path",
    "discover",
]

# Multi-crop augmentation: imports torch; DALI and torchvision load lazily inside the loaders.
from oodfast.data.multicrop import (  # noqa: E402
    MultiCropBatch,
    MultiCropConfig,
    MultiCropDataError,
    ViewAug,
    multicrop_loader,
)

__all__ += ["MultiCropBatch", "MultiCropConfig", "MultiCropDataError", "ViewAug", "multicrop_loader"]
