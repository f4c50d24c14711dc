"""DINOLoss: cross-entropy between a centred, sharpened teacher and the student over all view pairs.

Caron et al., *Emerging Properties in Self-Supervised Vision Transformers* (ICCV 2021), eq. 1-3 and
facebookresearch/dino's ``main_dino.DINOLoss``: the same signature, state (``center`` in the state
dict) and numbers. Differences, none of which changes a value:

* works without a process group: the batch centre is all-reduced only when torch.distributed is
  initialised;
* the teacher temperature may be passed as a 0-d tensor (``teacher_temp=``), so a compiled step does
  not recompile as the warm-up changes it;
* softmax, centring and the loss are computed in fp32 whatever the input dtype (bf16 under autocast);
* the pair loop is folded: sum over student views once, subtract the matching view per teacher view;
* the centre is updated in place, and the mean entropy of the teacher's distribution is kept in the
  ``teacher_entropy`` buffer for collapse monitoring (compare with ``max_entropy`` = ln(out_dim)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from oodfast.train.schedules import teacher_temp_schedule

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """DINO's loss with centring and a teacher-temperature warm-up.

    Args:
        out_dim: K, the head's output width.
        ncrops: number of student views V (2 global + local views), >= 2.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs: the teacher temperature
            rises linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up epochs,
            then stays; ``teacher_temp_schedule`` holds it per epoch (numpy, length ``nepochs``).
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    #: Teacher views: DINO feeds the teacher the two global crops only.
    n_teacher_views = 2

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if ncrops < self.n_teacher_views:
            raise ValueError(f"DINOLoss: ncrops counts all student views (2 global + local) and must be "
                             f">= 2, got {ncrops}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.max_entropy = math.log(out_dim)
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Not persistent: a monitoring value, not training state (DINO's dino_loss dict holds center only).
        self.register_buffer("teacher_entropy", torch.zeros(()), persistent=False)
        self.teacher_temp_schedule: np.ndarray = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int | None = None,
                *, teacher_temp: torch.Tensor | float | None = None, update_center: bool = True) -> torch.Tensor:
        """Mean cross-entropy over all (teacher view, other student view) pairs; updates the centre.

        Args:
            student_output: [V * N, K] logits, view-major (all rows of view 0, then view 1, ...).
            teacher_output: [2 * N, K] logits of the two global views, view-major.
            epoch: picks the temperature from ``teacher_temp_schedule`` (DINO's call).
            teacher_temp: the temperature itself, a float or a 0-d tensor (takes precedence over
                ``epoch``); a compiled step passes a 0-d tensor so that no value is baked into the graph.
            update_center: move the centre here, as DINO does (all-reducing the batch mean when a
                process group is up). A trainer that all-reduces the centre with its gradients passes
                False and calls :meth:`batch_center` and :meth:`apply_center_` itself.

        Returns:
            the loss, a 0-d fp32 tensor. Side effects: ``center`` moves towards the teacher batch mean
            (momentum ``center_momentum``), ``teacher_entropy`` holds the mean entropy (nats) of the
            teacher's centred, sharpened softmax.
        """
        if teacher_temp is None:
            if epoch is None:
                raise ValueError("DINOLoss: pass epoch (index into teacher_temp_schedule) or teacher_temp")
            if not 0 <= epoch < len(self.teacher_temp_schedule):
                raise ValueError(f"DINOLoss: epoch {epoch} is outside the teacher temperature schedule "
                                 f"(nepochs={len(self.teacher_temp_schedule)})")
            teacher_temp = float(self.teacher_temp_schedule[epoch])
        self._check_shapes(student_output, teacher_output)

        student = student_output.float() / self.student_temp
        log_p = F.log_softmax(student, dim=-1).unflatten(0, (self.ncrops, -1))  # [V, N, K]

        with torch.no_grad():
            teacher = (teacher_output.detach().float() - self.center) / teacher_temp
            log_q = F.log_softmax(teacher, dim=-1)
            q = log_q.exp()  # = softmax, as DINO
            self.teacher_entropy.copy_(-(q * log_q).sum(dim=-1).mean())
            q = q.unflatten(0, (self.n_teacher_views, -1))  # [2, N, K]

        # DINO: sum over iq < 2, v != iq of mean_n(-q_iq . log p_v), divided by the number of pairs.
        # Sum the student views once; for teacher view iq, leave out student view iq.
        log_p_all = log_p.sum(dim=0)
        total = log_p.new_zeros(())
        for iq in range(self.n_teacher_views):
            total = total - (q[iq] * (log_p_all - log_p[iq])).sum(dim=-1).mean()
        n_loss_terms = self.n_teacher_views * (self.ncrops - 1)
        loss = total / n_loss_terms

        if update_center:
            self.update_center(teacher_output)
        return loss

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
        if student_output.dim() != 2 or student_output.shape[1] != self.out_dim:
            raise ValueError(f"DINOLoss: student_output must be [ncrops * N, out_dim={self.out_dim}], "
                             f"got {tuple(student_output.shape)}")
        if teacher_output.dim() != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"DINOLoss: teacher_output must be [2 * N, out_dim={self.out_dim}], "
                             f"got {tuple(teacher_output.shape)}")
        rows = student_output.shape[0]
        if rows % self.ncrops:
            raise ValueError(f"DINOLoss: student_output has {rows} rows, not a multiple of ncrops={self.ncrops}")
        n = rows // self.ncrops
        if teacher_output.shape[0] != self.n_teacher_views * n:
            raise ValueError(f"DINOLoss: teacher_output must have 2 x {n} rows (the two global views of the "
                             f"student's N={n} images), got {teacher_output.shape[0]}")

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean over the (global) batch of teacher_output [2N, K]."""
        batch_center = teacher_output.detach().float().sum(dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        self.apply_center_(batch_center / (teacher_output.shape[0] * world_size))

    @torch.no_grad()
    def batch_center(self, teacher_output: torch.Tensor) -> torch.Tensor:
        """This process's mean of teacher_output [2N, K] -> [1, K] fp32 (no communication)."""
        return teacher_output.detach().float().mean(dim=0, keepdim=True)

    @torch.no_grad()
    def apply_center_(self, batch_center: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """center <- m * center + (1 - m) * batch_center ([1, K], already averaged over processes);
        left unchanged where ``skip`` (a 0-d bool tensor, e.g. a skipped non-finite step) is true."""
        new = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(new if skip is None else torch.where(skip, self.center, new))

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}")
