"""DINO training with the OOD replay buffer.

Layout (one concern per module; imports point down this list, never up)::

    config.py      TrainConfig: every setting of a run, its checks and presets
    head.py        DINOHead, MultiCropWrapper (backbones come from oodfast.encoders)
    loss.py        DINOLoss (facebookresearch/dino's, without a process group inside)
    schedules.py   per-step lr / weight decay / momentum / teacher temperature, as 0-d tensors
    ema.py         the teacher's in-place EMA
    optim.py       parameter groups, per-parameter clipping, the frozen last layer
    grad_sync.py   GradientSync: one flat all-reduce of gradients and flags (in place of DDP)
    runtime.py     device, process group, rank-0 broadcast, stop signals (SIGTERM / SIGINT)
    checkpoint.py  checkpoint files: DINO's keys plus ours, atomic writes, safe loads, same-run check
    dino.py        DINO: student, teacher, loss, EMA, centre and the compiled step (run_step)
    monitor.py     StepLog: scalars read a step late, log.jsonl, TensorBoard, divergence stop
    trainer.py     Trainer: the loop (epochs, steps, logging and checkpoint cadence, stopping)

The replay buffer itself (detector, ring, calibration, warm-up) is :class:`oodfast.replay.Replay`.
"""

from oodfast.train.ema import ema_update_
from oodfast.train.head import DINOHead, MultiCropWrapper, WeightNormLinear, backbone_names, build_backbone
from oodfast.train.loss import DINOLoss
from oodfast.train.optim import cancel_last_layer_gradients_, clip_gradients_, param_groups
from oodfast.train.schedules import ScheduleTensors, Schedules, cosine_schedule, teacher_temp_schedule

__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropWrapper",
    "ScheduleTensors",
    "Schedules",
    "WeightNormLinear",
    "backbone_names",
    "build_backbone",
    "cancel_last_layer_gradients_",
    "clip_gradients_",
    "cosine_schedule",
    "ema_update_",
    "param_groups",
    "teacher_temp_schedule",
]
