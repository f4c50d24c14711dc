"""The teacher's exponential moving average of the student, in place and without a host sync.

DINO (``train_one_epoch``) does ``param_k.mul_(m).add_((1 - m) * param_q)`` per parameter, with ``m``
a Python float read from the momentum schedule. Here the whole parameter list is updated with one
``torch._foreach_lerp_``: ``t <- t + (1 - m) * (s - t)``, which is ``m * t + (1 - m) * s`` and leaves a
parameter that equals its student copy (e.g. the frozen ``weight_g`` = 1) exactly unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor],
                momentum: torch.Tensor | float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for each pair, in place.

    Args:
        teacher_params, student_params: matching lists of tensors (same shapes, dtypes, devices), e.g.
            ``list(teacher.parameters())`` and ``list(student.parameters())``.
        momentum: a 0-d tensor (the compiled step's schedule value; changing it never recompiles) or a
            float.

    ``torch._foreach_lerp_`` has no overload taking a tensor weight in torch 2.15: a 0-d tensor given as
    the scalar weight is turned into a Python number, a ``.item()`` (a device sync in eager mode; under
    torch.compile dynamo rewrites it). The weight is therefore passed as a list of 0-d tensors (the
    ``.List`` overload), which broadcasts, never syncs, and under torch.compile fuses into one kernel.
    """
    teacher_params = list(teacher_params)
    student_params = list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"ema_update_: {len(teacher_params)} teacher parameters but {len(student_params)} "
                         "student parameters; build the teacher as a copy of the student")
    if not teacher_params:
        return
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1:
            raise ValueError(f"ema_update_: momentum must be a 0-d tensor, got shape {tuple(momentum.shape)}")
        weight = 1 - momentum.reshape(())
        weights = {}
        for t in teacher_params:  # one cast per (dtype, device), a no-op when they already match
            key = (t.dtype, t.device)
            if key not in weights:
                weights[key] = weight.to(dtype=t.dtype, device=t.device)
        torch._foreach_lerp_(teacher_params, student_params, [weights[(t.dtype, t.device)] for t in teacher_params])
    else:
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - float(momentum))
