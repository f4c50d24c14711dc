"""TrainConfig: every setting of a run, with DINO's names where DINO has one, and named presets.

``TrainConfig.paper()`` is the paper's recipe (ResNet-50, 2 x 224 + 6 x 96 crops, AdamW lr 5e-4 with
the linear scaling rule, cosine schedules, buffer 32, 100 epochs) for a GPU; ``TrainConfig.cpu()`` a
small run that finishes in minutes on two CPU cores (resnet18, 64/32 px crops), so the whole pipeline
can be exercised anywhere. ``preset_for(device)`` picks one.

Every training argument of facebookresearch/dino's ``main_dino.py`` that changes what is trained is a
field of the same name (``optimizer``, ``patch_size``, ``drop_path_rate``, ``use_bn_in_head``, ...);
DINO's ``--use_fp16`` is ``bf16`` (mixed precision: bf16 where the GPU has it, else fp16 with a loss
scaler; see :func:`oodfast.train.dino.choose_precision`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DETECTOR_MODES = ("teacher", "frozen")
REPLAY_MODES = ("ood", "random", "oracle", "oracle-matched", "none")
THRESHOLD_MODES = ("fixed", "online")
#: What the ring keeps of an image (oodfast.replay.REPLAY_STORES): its crops (the paper's) or its id.
REPLAY_STORES = ("crops", "ids")
#: The feature maps a dense detector scores (oodfast.encoders.DENSE_LAYERS): a ResNet stage, or a ViT's
#: patch tokens; None (the default) scores pooled embeddings, as the paper does.
DENSE_LAYERS = ("layer2", "layer3", "layer4", "tokens")
#: torchvision families with the stages layer2..layer4 (oodfast.encoders' dense maps).
RESNET_FAMILIES = ("resnet", "resnext", "wide_resnet")
AUG_BACKENDS = ("dali", "paper", "torch")
#: Earlier spellings still accepted, mapped to their name in AUG_BACKENDS.
AUG_ALIASES = {"reference": "paper"}
METRICS = ("euclidean", "cosine", "mahalanobis", "knn")
#: DINO's ``--optimizer`` choices (adamw for ViTs; sgd and lars for convnets and large batches).
OPTIMIZERS = ("adamw", "sgd", "lars")
#: Multi-crop recipes: DINO's (``MultiCropConfig.dino``) or the paper's BDD10K one (``MultiCropConfig.bdd10k``).
CROP_RECIPES = ("dino", "paper")
#: Each recipe's default crop scales, used where ``global_crops_scale`` / ``local_crops_scale`` are not given.
CROP_SCALES = {"dino": ((0.4, 1.0), (0.05, 0.4)), "paper": ((0.3, 1.0), (0.1, 0.3))}
#: The crops of the paper's code on BDD100K (its main_dino.py's DataAugmentationDINO): the ``paper-code`` preset.
PAPER_CODE_CROPS: dict[str, Any] = dict(global_size=(512, 1024), local_size=(224, 448), crop_ratio=(1.5, 2.5))
#: DINO's ViTs (oodfast.vit.VIT_ARCHS; named here so that this module stays free of torch) and the
#: patch sizes of DINO's released ViTs.
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
PATCH_SIZES = (8, 16)


class ConfigError(ValueError):
    """A :class:`TrainConfig` value out of range. ``fields`` names the field (first) and any field it
    conflicts with; :meth:`render` words the message with other names for them (the CLI's flags), so
    the API and the command line refuse the same values with the same words."""

    def __init__(self, template: str, fields: tuple[str, ...], **values: Any) -> None:
        self.template, self.fields, self.values = template, fields, values
        super().__init__(self.render())

    @property
    def field(self) -> str:
        return self.fields[0]

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each field called ``names[field]`` (default: the field's own name)."""
        names = names or {}
        return self.template.format(**{f: names.get(f, f) for f in self.fields}, **self.values)


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``kind`` int or float (floats must be finite), bounds
    ``low`` / ``high`` (inclusive unless ``*_open``), and ``optional``: None is allowed too."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        low, high = _num(self.low), _num(self.high)
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                return False
        elif not (_is_real(value) and math.isfinite(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _multiples(side: int, p: int, paired: bool) -> str:
    """The multiples of ``p`` nearest ``side`` (a ViT's crop side), e.g. "96 or 112"."""
    low, high = side // p * p, (side // p + 1) * p
    if not side % p:
        return str(side)
    if low < p:
        return str(high)
    return f"({low} or {high})" if paired else f"{low} or {high}"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: The one table of numeric limits: ``TrainConfig.__post_init__`` and the CLI's parse-time checks of
#: ``oodfast train``'s options both read it. Crop sizes of at least 8 px (ResNet's stride is 32, but
#: smaller crops still pool to one feature); seeds below 2**31 (numpy's seed is 32-bit and each rank adds
#: its rank).
FIELD_RANGES: dict[str, Range] = {
    "epoch_length": Range(int, 1, optional=True),
    "num_workers": Range(int, 0, optional=True),
    "out_dim": Range(int, 1),
    "patch_size": Range(int, 1),
    "drop_path_rate": Range(float, 0, 1, high_open=True),
    "global_size": Range(int, 8),
    "local_size": Range(int, 8),
    "local_crops_number": Range(int, 0),
    "batch_size_per_gpu": Range(int, 1),
    "epochs": Range(int, 1),
    "lr": Range(float, 0),
    "min_lr": Range(float, 0),
    "warmup_epochs": Range(int, 0),
    "weight_decay": Range(float, 0),
    "weight_decay_end": Range(float, 0),
    "momentum_teacher": Range(float, 0, 1),
    "teacher_temp": Range(float, 0, low_open=True),
    "warmup_teacher_temp": Range(float, 0, low_open=True),
    "warmup_teacher_temp_epochs": Range(int, 0),
    "clip_grad": Range(float, 0),
    "freeze_last_layer": Range(int, 0),
    "buffer_size": Range(int, 1),
    "calib_size": Range(int, 1),
    "calib_frac": Range(float, 0, 1, low_open=True, optional=True),
    "ood_percentile": Range(float, 0, 1, low_open=True, high_open=True),
    "seed": Range(int, 0, 2**31 - 1),
    "saveckp_freq": Range(int, 0),
    "log_every": Range(int, 1),
    "max_steps": Range(int, 1, optional=True),
    "max_bad_steps": Range(int, 1),
}


#: Crop sizes: an int (square) or [height, width], each side in the field's range.
SIZE_FIELDS = ("global_size", "local_size")
#: DINO's RandomResizedCrop aspect-ratio range (width / height), the ``crop_ratio`` default.
DINO_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_size(value: Any) -> Any:
    """A crop size in its stored form: an int, or a (height, width) tuple when the sides differ (a square
    pair is its int); anything else is returned as it is, for :func:`check_field` to refuse."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        h, w = (int(v) for v in value)
        return h if h == w else (h, w)
    return value


def check_field(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is in ``FIELD_RANGES[name]`` (no-op for other fields);
    a crop size (:data:`SIZE_FIELDS`) may also be a [height, width] pair of such values."""
    spec = FIELD_RANGES.get(name)
    if spec is None:
        return
    if name in SIZE_FIELDS and not isinstance(value, numbers.Integral):
        sides = crop_size(value)
        if not (isinstance(sides, tuple) and all(spec.accepts(v) for v in sides)) and not spec.accepts(sides):
            raise ConfigError("{%s} must be %s or [height, width] of them, got {value!r}" % (name, spec.describe()),
                              (name,), value=value)
        return
    if not spec.accepts(value):
        raise ConfigError("{%s} must be %s, got {value!r}" % (name, spec.describe()), (name,), value=value)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names follow facebookresearch/dino's arguments where it has one.

    Data: ``data`` (synthetic | bdd100k | bdd10k | folder), ``data_root``, ``split``, ``aug``
    (dali | paper | torch; ``reference`` is accepted for ``paper``), ``epoch_length`` (images per epoch, default the dataset size).

    Model (DINO): ``arch`` (a torchvision ResNet-family name or DINO's ``vit_tiny|vit_small|vit_base``;
    DINO's ``deit_*`` spellings are read as ``vit_*``), ``patch_size`` (ViTs: 8 or 16),
    ``drop_path_rate`` (ViTs: the student's stochastic depth; the teacher has none, as in DINO),
    ``out_dim``, ``norm_last_layer``, ``use_bn_in_head``; ``pretrained_weights`` / ``checkpoint_key``:
    start student and teacher from released weights (DINO's loading rule; not a resume).
    Crops: ``crops`` (dino | paper: the recipe, :data:`CROP_RECIPES`), ``global_size``, ``local_size``
    (an int, square, or (height, width), e.g. (512, 1024); stored as an int or a [height, width] list;
    multiples of a ViT's patch), ``crop_ratio`` (the RandomResizedCrop aspect-ratio range, width /
    height: DINO's (3/4, 4/3); the paper's code 1.5-2.5), ``global_crops_scale``, ``local_crops_scale``
    (default: the recipe's, :data:`CROP_SCALES`), ``local_crops_number``.

    Optimisation (DINO): ``optimizer`` (adamw | sgd | lars), ``batch_size_per_gpu``, ``epochs``, ``lr`` (scaled by batch / 256),
    ``min_lr``, ``warmup_epochs``, ``weight_decay`` -> ``weight_decay_end``, ``momentum_teacher``,
    ``teacher_temp`` / ``warmup_teacher_temp`` / ``warmup_teacher_temp_epochs``, ``clip_grad``,
    ``freeze_last_layer``.

    OOD replay (the paper): ``replay`` (ood = the detector fills the buffer; random = a buffer of
    randomly chosen images, the ablation that separates detection from replay; oracle = images whose
    global crops truly hold rare-class pixels, read from the masks: the upper bound of detection;
    oracle-matched = those images flagged at the random arm's rate, 1 - ``ood_percentile``, so the
    buffer turns over as fast as in the other arms; none = plain DINO),
    ``buffer_size`` (C), ``detector`` (teacher = the teacher backbone, in eval mode, on each image's clean view;
    frozen = a separate frozen encoder from ``detector_weights``), ``metric``, ``calib_size`` /
    ``calib_frac``, ``ood_percentile`` (the calibration scores' percentile the threshold is set at),
    ``threshold_mode`` (fixed | online: the threshold then adapts to hold the calibrated flag rate;
    CLI ``--threshold``), ``replay_store`` (crops = the paper's: the ring's stored crops are replayed as
    they are; ids = the ring keeps sample ids and the loader decodes and augments the buffered images
    afresh every step; needs ``aug`` dali or torch), ``dense_layer`` (None: pooled embeddings, the
    paper's; ``layer2|layer3|layer4`` of a ResNet or ``tokens`` of a ViT: a dense detector scores every
    position of that feature map and flags an image whose most rare position is rare; CLI ``--dense-layer``).

    Runtime: ``compile`` (torch.compile the step), ``bf16`` (mixed precision on CUDA, DINO's ``--use_fp16``:
    bf16 autocast where the GPU supports it, fp16 autocast with a GradScaler where not; the CPU runs
    fp32), ``channels_last``,
    ``seed``, ``deterministic``, ``output_dir``, ``saveckp_freq``, ``log_every``, ``tensorboard`` (also write
    the logged scalars to TensorBoard under ``output_dir/tb``; needs the ``tensorboard`` extra), ``max_steps``
    (stop early; for smoke tests), ``max_bad_steps`` (consecutive non-finite losses before stopping).
    """

    # data
    data: str = "synthetic"
    data_root: str | None = None
    split: str = "train"
    aug: str = "dali"
    epoch_length: int | None = None
    num_workers: int | None = None
    # model
    arch: str = "resnet50"
    patch_size: int = 16
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    pretrained_weights: str | None = None
    checkpoint_key: str = "teacher"
    crops: str = "dino"
    global_size: int | Sequence[int] = 224  # or (height, width)
    local_size: int | Sequence[int] = 96
    crop_ratio: tuple[float, float] = DINO_CROP_RATIO
    global_crops_scale: tuple[float, float] | None = None  # None: the recipe's (CROP_SCALES)
    local_crops_scale: tuple[float, float] | None = None
    local_crops_number: int = 6
    # optimisation
    optimizer: str = "adamw"
    batch_size_per_gpu: int = 64
    epochs: int = 100
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    # OOD replay
    replay: str = "ood"
    buffer_size: int = 32
    detector: str = "teacher"
    detector_weights: str | None = None
    metric: str = "euclidean"
    calib_size: int = 256
    calib_frac: float | None = None
    ood_percentile: float = 0.95
    threshold_mode: str = "fixed"
    replay_store: str = "crops"
    dense_layer: str | None = None
    # runtime
    compile: bool = True
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs/oodfast"
    saveckp_freq: int = 20
    log_every: int = 10
    tensorboard: bool = False
    max_steps: int | None = None
    max_bad_steps: int = 5
    synthetic_spec: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked against :data:`FIELD_RANGES` (and the choices and cross-field limits
        below): a bad value raises :class:`ConfigError` naming the field, never a NaN run."""
        if self.aug in AUG_ALIASES:
            object.__setattr__(self, "aug", AUG_ALIASES[self.aug])
        if isinstance(self.arch, str) and self.arch.startswith("deit_"):  # DINO: "DeiT-S" is ViT-S
            object.__setattr__(self, "arch", "vit_" + self.arch.removeprefix("deit_"))
        for name in SIZE_FIELDS:
            object.__setattr__(self, name, crop_size(getattr(self, name)))
        for name in FIELD_RANGES:
            check_field(name, getattr(self, name))
        ratio = self.crop_ratio
        if isinstance(ratio, list):  # a stored config's form
            object.__setattr__(self, "crop_ratio", ratio := tuple(ratio))
        if not (isinstance(ratio, tuple) and len(ratio) == 2 and all(_is_real(v) and math.isfinite(v) for v in ratio)
                and 0 < ratio[0] <= ratio[1]):
            raise ConfigError("{crop_ratio} must be (low, high) aspect ratios (width / height) with 0 < low <= high, "
                              "got {value!r}", ("crop_ratio",), value=ratio)
        choices = {"replay": REPLAY_MODES, "detector": DETECTOR_MODES, "threshold_mode": THRESHOLD_MODES,
                   "aug": AUG_BACKENDS, "metric": METRICS, "optimizer": OPTIMIZERS, "crops": CROP_RECIPES,
                   "replay_store": REPLAY_STORES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError("{%s} must be one of %s, got {value!r}" % (name, ", ".join(allowed)), (name,),
                                  value=getattr(self, name))
        for name, default in zip(("global_crops_scale", "local_crops_scale"), CROP_SCALES[self.crops]):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
            scale = getattr(self, name)
            if isinstance(scale, list):  # a stored config's form
                object.__setattr__(self, name, scale := tuple(scale))
            if not (isinstance(scale, (tuple, list)) and len(scale) == 2
                    and all(_is_real(v) and math.isfinite(v) for v in scale) and 0 < scale[0] <= scale[1] <= 1):
                raise ConfigError("{%s} must be (low, high) with 0 < low <= high <= 1, got {value!r}" % name,
                                  (name,), value=scale)
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            if getattr(self, name) > self.epochs:
                raise ConfigError("{%s} ({value}) must not exceed {epochs} ({epochs_value}); lower {%s} or raise "
                                  "{epochs}" % (name, name), (name, "epochs"), value=getattr(self, name),
                                  epochs_value=self.epochs)
        if self.replay_store == "ids" and self.aug == "paper":
            raise ConfigError("{replay_store} ids needs {aug} dali or torch: the paper's loader cannot re-augment "
                              "the buffered images; use {replay_store} crops with it", ("replay_store", "aug"))
        self._check_vit()
        self._check_dense()
        if not isinstance(self.checkpoint_key, str) or not self.checkpoint_key:
            raise ConfigError("{checkpoint_key} must name a checkpoint entry (teacher or student), got {value!r}",
                              ("checkpoint_key",), value=self.checkpoint_key)
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
            raise ConfigError("{output_dir} must be a folder path, got {value!r}", ("output_dir",),
                              value=self.output_dir)

    def _check_vit(self) -> None:
        """A ViT's patch size is 8 or 16 and both crop sizes are whole numbers of patches."""
        if self.arch not in VIT_ARCHS:
            return
        if self.patch_size not in PATCH_SIZES:
            raise ConfigError("{patch_size} must be 8 or 16 for {arch} (DINO's ViTs), got {value}",
                              ("patch_size", "arch"), value=self.patch_size)
        for name in SIZE_FIELDS:
            size, p = getattr(self, name), self.patch_size
            sides = (size,) if isinstance(size, int) else size
            if any(side % p for side in sides):
                fits = [_multiples(side, p, len(sides) > 1) for side in sides]
                raise ConfigError("{%s} (%s) must be %s of {patch_size} (%d) for %s: use %s"
                                  % (name, " x ".join(map(str, sides)), "a multiple" if len(sides) == 1 else "multiples",
                                     p, self.arch, " x ".join(fits)), (name, "patch_size"))

    def _check_dense(self) -> None:
        """A dense layer is one of :data:`DENSE_LAYERS`, for the ood replay, and fits the scoring
        backbone (the teacher's arch, or the frozen detector's ResNet-50)."""
        layer = self.dense_layer
        if layer is None:
            return
        if layer not in DENSE_LAYERS:
            raise ConfigError("{dense_layer} must be one of %s (or unset: pooled embeddings), got {value!r}"
                              % ", ".join(DENSE_LAYERS), ("dense_layer",), value=layer)
        if self.replay != "ood":
            what = "plain DINO" if self.replay == "none" else f"the {self.replay} replay"
            raise ConfigError("{dense_layer} scores feature maps for {replay} ood; %s scores none: drop "
                              "{dense_layer}" % what, ("dense_layer", "replay"))
        if self.detector == "frozen":
            if layer == "tokens":
                raise ConfigError("{dense_layer} tokens is for a ViT teacher; {detector} frozen is a ResNet-50: use "
                                  "layer2, layer3 or layer4", ("dense_layer", "detector"))
        elif self.arch in VIT_ARCHS and layer != "tokens":
            raise ConfigError("{dense_layer} %s: a ViT's dense features are its patch tokens: use {dense_layer} "
                              "tokens for {arch} %s" % (layer, self.arch), ("dense_layer", "arch"))
        elif self.arch not in VIT_ARCHS and layer == "tokens":
            raise ConfigError("{dense_layer} tokens is for DINO's ViTs; {arch} %s has layer2, layer3, layer4"
                              % self.arch, ("dense_layer", "arch"))
        elif self.arch not in VIT_ARCHS and not self.arch.startswith(RESNET_FAMILIES):
            raise ConfigError("{dense_layer} needs a backbone with stages layer2..layer4 (%s) or a ViT; {arch} %s "
                              "has none" % (", ".join(RESNET_FAMILIES), self.arch), ("dense_layer", "arch"))

    @property
    def is_vit(self) -> bool:
        return self.arch in VIT_ARCHS

    def multicrop(self, dtype: str = "auto"):  # -> oodfast.data.multicrop.MultiCropConfig
        """The :class:`~oodfast.data.multicrop.MultiCropConfig` of this run: the ``crops`` recipe
        (DINO's, or the paper's BDD10K one: plain global crops) at this run's sizes, scales and number of
        local crops; ``dtype`` is the crops' dtype name."""
        from oodfast.data.multicrop.config import MultiCropConfig

        recipe = MultiCropConfig.bdd10k if self.crops == "paper" else MultiCropConfig.dino
        return recipe(global_size=self.global_size, local_size=self.local_size, ratio=tuple(self.crop_ratio),
                      global_scale=tuple(self.global_crops_scale), local_scale=tuple(self.local_crops_scale),
                      local_crops_number=self.local_crops_number, dtype=dtype)

    @property
    def uses_ring(self) -> bool:
        return self.replay != "none"

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's recipe on a GPU (ResNet-50, 2 x 224 + 6 x 96, AdamW 5e-4, buffer 32, 100 epochs)."""
        return cls(**overrides)

    @classmethod
    def paper_code(cls, **overrides: Any) -> TrainConfig:
        """The paper's recipe with its code's BDD100K crops (``DataAugmentationDINO`` in its
        ``main_dino.py``): rectangular global crops of 512 x 1024 (height x width) and local crops of
        224 x 448, aspect ratio 1.5-2.5 (width / height), DINO's photometric recipe and scales."""
        return cls(**{**PAPER_CODE_CROPS, **overrides})

    @classmethod
    def cpu(cls, **overrides: Any) -> TrainConfig:
        """A small run for two CPU cores: resnet18, 2 x 64 + 4 x 32 px crops, batch 16, buffer 8,
        2 epochs of 480 images; a few minutes including compilation."""
        base = dict(arch="resnet18", out_dim=1024, global_size=64, local_size=32, local_crops_number=4,
                    batch_size_per_gpu=16, epochs=2, epoch_length=480, warmup_epochs=0, buffer_size=8,
                    calib_size=64, bf16=False, channels_last=False, saveckp_freq=1, log_every=5)
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples), so a checkpoint stays loadable with weights_only=True."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS = {"paper": TrainConfig.paper, "paper-code": TrainConfig.paper_code, "cpu": TrainConfig.cpu}


def preset_for(device: str) -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if str(device).startswith("cuda") else "cpu"
