"""TrainConfig: every setting of a run, with DINO's names where DINO has one, and named presets.

``TrainConfig.paper()`` is the paper's recipe (ResNet-50, 2 x 224 + 6 x 96 crops, AdamW lr 5e-4 with
the linear scaling rule, cosine schedules, buffer 32, 100 epochs) for a GPU; ``TrainConfig.cpu()`` a
small run that finishes in minutes on two CPU cores (resnet18, 64/32 px crops), so the whole pipeline
can be exercised anywhere. ``preset_for(device)`` picks one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DETECTOR_MODES = ("teacher", "frozen")
REPLAY_MODES = ("ood", "random", "oracle", "none")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names follow facebookresearch/dino's arguments where it has one.

    Data: ``data`` (synthetic | bdd100k | bdd10k | folder), ``data_root``, ``split``, ``aug``
    (dali | reference | torch), ``epoch_length`` (images per epoch, default the dataset size).

    Model (DINO): ``arch``, ``out_dim``, ``norm_last_layer``; crops: ``global_size``, ``local_size``,
    ``global_crops_scale``, ``local_crops_scale``, ``local_crops_number``.

    Optimisation (DINO): ``batch_size_per_gpu``, ``epochs``, ``lr`` (scaled by batch / 256),
    ``min_lr``, ``warmup_epochs``, ``weight_decay`` -> ``weight_decay_end``, ``momentum_teacher``,
    ``teacher_temp`` / ``warmup_teacher_temp`` / ``warmup_teacher_temp_epochs``, ``clip_grad``,
    ``freeze_last_layer``.

    OOD replay (the paper): ``replay`` (ood = the detector fills the buffer; random = a buffer of
    randomly chosen images, the ablation that separates detection from replay; oracle = images whose
    global crops truly hold rare-class pixels, read from the masks: the upper bound of detection;
    none = plain DINO),
    ``buffer_size`` (C), ``detector`` (teacher = reuse the teacher's embedding of the global crops;
    frozen = a separate frozen encoder from ``detector_weights``), ``metric``, ``calib_size`` /
    ``calib_frac``, ``ood_percentile``, ``threshold`` (fixed | online).

    Runtime: ``compile`` (torch.compile the step), ``bf16`` (autocast on CUDA), ``channels_last``,
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
    out_dim: int = 65536
    norm_last_layer: bool = True
    global_size: int = 224
    local_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 6
    # optimisation
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
    threshold: str = "fixed"
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
        checks = [
            (self.replay in REPLAY_MODES, f"replay must be one of {REPLAY_MODES}, got {self.replay!r}"),
            (self.detector in DETECTOR_MODES, f"detector must be one of {DETECTOR_MODES}, got {self.detector!r}"),
            (self.threshold in ("fixed", "online"), f"threshold must be 'fixed' or 'online', got {self.threshold!r}"),
            (self.aug in ("dali", "reference", "torch"), f"aug must be dali, reference or torch, got {self.aug!r}"),
            (self.batch_size_per_gpu >= 1, f"batch_size_per_gpu must be >= 1, got {self.batch_size_per_gpu}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.buffer_size >= 1, f"buffer_size must be >= 1, got {self.buffer_size}"),
            (0.0 < self.ood_percentile < 1.0, f"ood_percentile must be in (0, 1), got {self.ood_percentile}"),
            (self.calib_frac is None or 0.0 < self.calib_frac <= 1.0, f"calib_frac must be in (0, 1], got {self.calib_frac}"),
            (self.local_crops_number >= 0, f"local_crops_number must be >= 0, got {self.local_crops_number}"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0 (0 disables), got {self.clip_grad}"),
            (self.warmup_teacher_temp_epochs <= self.epochs,
             f"warmup_teacher_temp_epochs ({self.warmup_teacher_temp_epochs}) must not exceed epochs ({self.epochs})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def uses_ring(self) -> bool:
        return self.replay != "none"

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's recipe on a GPU (ResNet-50, 2 x 224 + 6 x 96, AdamW 5e-4, buffer 32, 100 epochs)."""
        return cls(**overrides)

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


PRESETS = {"paper": TrainConfig.paper, "cpu": TrainConfig.cpu}


def preset_for(device: str) -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if str(device).startswith("cuda") else "cpu"
