"""DINO training pieces: head, multi-crop wrapper, loss, schedules, EMA, optimiser helpers."""

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
