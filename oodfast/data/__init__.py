"""Datasets and augmentation: finding the files, checking them, generating synthdrive, multi-crop.

Layout (a module imports only modules listed above it, so there is no import cycle):

    classes      the 19 BDD train IDs, their names, the rare classes
    cache        cache_dir: where generated datasets and clean file lists live
    errors       DatasetError, the base of every bad-input error about a dataset
    crops        RandomResizedCrop boxes, rare-pixel shares of crops, reading masks
    imageio      opening images: 8-bit RGB out, the pixel limit, the file named in each error
    synthdrive/  the embedded street-scene dataset: config, canvas, sprites, grading, scene, dataset
    discover     discover(kind, root, split): BDD100K / BDD10K / folder / synthetic files, clean file lists
    check        check_dataset: decode every file once, write the clean file list
    multicrop/   DINO multi-crop: config, files, plan, dali_pipeline, dali_prefetch, dali_loader,
                 torch_loader, paper_loader, factory (multicrop_loader)
"""

from __future__ import annotations

from oodfast.data.cache import cache_dir
from oodfast.data.check import BadFile, CheckReport, check_dataset
from oodfast.data.discover import DatasetFiles, default_file_list_path, discover
from oodfast.data.errors import DatasetError

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
