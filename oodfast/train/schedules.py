"""DINO's schedules as per-iteration arrays, and 0-d device tensors the compiled step reads.

The arrays are built on the host exactly as facebookresearch/dino builds them (``utils.cosine_scheduler``
and ``DINOLoss.teacher_temp_schedule``), indexed by the global step ``epoch * niter_per_ep + it``. The
compiled step never sees a Python number that changes: ``Schedules.write_(step, tensors)`` copies the
step's row of a device-resident table into preallocated 0-d tensors (one device copy, no host sync),
so neither a recompile nor a host-to-device transfer happens per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ScheduleTensors", "Schedules", "cosine_schedule", "teacher_temp_schedule"]


def cosine_schedule(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a half cosine from ``base`` to ``final``.

    Identical to DINO's ``cosine_scheduler``: ``warmup_epochs * niter_per_ep`` values from
    ``np.linspace(start_warmup_value, base, warmup_iters)`` (both ends included), then for
    ``i = 0 .. T-1`` with ``T = (epochs - warmup_epochs) * niter_per_ep``:
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / T))`` (so the last value is just above
    ``final``). Returns a float64 array of length ``epochs * niter_per_ep``.
    """
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(f"cosine_schedule: epochs ({epochs}) and niter_per_ep ({niter_per_ep}) must be >= 1")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"cosine_schedule: warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature, as DINOLoss's: ``np.linspace(warmup, final, warmup_epochs)``
    (both ends included) followed by ``final`` for the remaining epochs; float64, length ``nepochs``."""
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}], "
                         f"got {warmup_teacher_temp_epochs}")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


#: Column order of the device table.
_FIELDS = ("lr", "weight_decay", "momentum", "teacher_temp")


@dataclass
class ScheduleTensors:
    """Preallocated 0-d tensors holding the current step's values, plus the device table they come from.

    Pass ``lr``, ``weight_decay``, ``momentum`` (teacher EMA) and ``teacher_temp`` to the compiled
    step; ``Schedules.write_`` updates them in place, so their identity and shape never change.
    """

    lr: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    teacher_temp: torch.Tensor
    table: torch.Tensor  # [total_steps, 4], columns in _FIELDS order

    def as_list(self) -> list[torch.Tensor]:
        return [self.lr, self.weight_decay, self.momentum, self.teacher_temp]


@dataclass(frozen=True)
class Schedules:
    """DINO's four schedules, per global step (``teacher_temp`` per epoch, as in DINOLoss).

    Build with :meth:`dino` from DINO's hyper-parameters. ``lr``, ``weight_decay`` and ``momentum``
    have ``epochs * niter_per_ep`` entries; ``teacher_temp`` has ``epochs``.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    niter_per_ep: int

    @classmethod
    def dino(cls, *, epochs: int, niter_per_ep: int, batch_size: int, lr: float = 5e-4, min_lr: float = 1e-6,
             warmup_epochs: int = 10, weight_decay: float = 0.04, weight_decay_end: float = 0.4,
             momentum_teacher: float = 0.996, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
             warmup_teacher_temp_epochs: int = 0) -> Schedules:
        """The schedules of DINO's ``train_dino`` (defaults: its defaults, which the paper uses).

        Args:
            epochs, niter_per_ep: schedule length (``niter_per_ep`` = steps per epoch, drop-last).
            batch_size: the global batch (per-GPU batch x world size); the peak learning rate is
                ``lr * batch_size / 256`` (linear scaling rule), reached after ``warmup_epochs``.
            min_lr: final learning rate of the cosine.
            weight_decay, weight_decay_end: cosine from one to the other, no warm-up.
            momentum_teacher: teacher EMA momentum, cosine to 1.
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature.
        """
        if batch_size < 1:
            raise ValueError(f"Schedules.dino: batch_size must be >= 1, got {batch_size}")
        return cls(
            lr=cosine_schedule(lr * batch_size / 256.0, min_lr, epochs, niter_per_ep, warmup_epochs=warmup_epochs),
            weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, niter_per_ep),
            momentum=cosine_schedule(momentum_teacher, 1, epochs, niter_per_ep),
            teacher_temp=teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                               epochs),
            niter_per_ep=niter_per_ep,
        )

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the schedule (0 .. {self.total_steps - 1}); "
                             f"a resumed run needs the same epochs and steps per epoch")

    def values(self, step: int) -> dict[str, float]:
        """The step's values as Python floats (for logs; reads host arrays, no device sync)."""
        self._check_step(step)
        return {
            "lr": float(self.lr[step]),
            "weight_decay": float(self.weight_decay[step]),
            "momentum": float(self.momentum[step]),
            "teacher_temp": float(self.teacher_temp[step // self.niter_per_ep]),
        }

    def table(self) -> np.ndarray:
        """[total_steps, 4] float64: lr, weight_decay, momentum, teacher_temp per global step."""
        temp = np.repeat(self.teacher_temp, self.niter_per_ep)[: self.total_steps]
        return np.stack([self.lr, self.weight_decay, self.momentum, temp], axis=1)

    def allocate(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 step: int = 0) -> ScheduleTensors:
        """Upload the table once and return 0-d tensors (on ``device``) holding the values of ``step``.

        fp32 (the default) holds the momentum to ~6e-8, so ``1 - momentum`` computed on the device is
        accurate to ~1.5e-5 relative at 0.996; pass ``dtype=torch.float64`` to keep DINO's precision.
        """
        self._check_step(step)
        table = torch.as_tensor(self.table(), dtype=dtype, device=device)
        row = table[step]
        tensors = ScheduleTensors(*(row[i].clone() for i in range(len(_FIELDS))), table=table)
        return tensors

    def write_(self, step: int, tensors: ScheduleTensors) -> None:
        """Copy the values of ``step`` into ``tensors`` in place: one device copy, no host sync."""
        self._check_step(step)
        torch._foreach_copy_(tensors.as_list(), list(tensors.table[step].unbind(0)))
