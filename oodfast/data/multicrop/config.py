"""The multi-crop configuration: :class:`ViewAug` (one kind of view) and :class:`MultiCropConfig` (all views).

Defaults reproduce DINO's recipe (see :mod:`oodfast.data.multicrop`); every backend reads every
setting from here, so no view can silently ignore one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        """The paper's BDD10K variant (its code's ``DataAugmentationDINO_BDD10K``).

        Global crops: 224 px, scale 0.3-1.0, no flip, jitter, grayscale, blur or solarisation (the
        paper's code comments all of them out for both global views). Local crops: 6 x 96 px, scale 0.1-0.3,
        DINO's flip/jitter/grayscale and blur p=0.5. Not reproduced: that code draws global 2 and
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
