"""DINO: the model and its step (student, teacher, loss, EMA, centre, gradient sync, compiled pieces).

One step, as in the paper but without its host round trips::

    teacher(global views of B + C rows), student(all views of B + C rows), DINOLoss    (compiled: _forward)
    backward into one flat gradient buffer; ONE all-reduce of gradients, skip flag,
    signal flags and the loss centre (under torchrun); per-parameter clipping,
    last-layer freeze, fused AdamW (skips the step on the device if non-finite)         (eager)
    EMA teacher update with a 0-d momentum, loss centre, BatchNorm statistics kept or put back;
    the replay scores the staged rows and copies the rare ones into its ring            (compiled: _post)

The rows come from ``views()`` (persistent tensors: the staged batch, then the replay ring), so the
model always sees B + C rows per view with static shapes; schedules enter as 0-d tensors, so nothing
recompiles as they change. An image flagged in step t is replayed from step t + 1 on (it is in step t's
batch anyway), with the teacher detector and the frozen one alike: the paper's frozen detector flags
before the forward, here after the step, so that a skipped step changes nothing.

Nothing in a step waits for the device. A non-finite loss (on any rank) or gradient skips the step on
the device: AdamW's ``found_inf``, an EMA momentum of 1, an unchanged centre, BatchNorm statistics,
ring and detector. :meth:`DINO.run_step` returns the step's scalars as device tensors; the loop reads
them a step later.

Under torchrun the student is a plain module and :class:`~oodfast.train.grad_sync.GradientSync`
averages its gradients (DistributedDataParallel cannot be traced by the fullgraph-compiled step);
every rank starts from rank 0's weights (:func:`build_networks`), and the teacher is copied from them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from oodfast.encoders import build_backbone
from oodfast.replay import Replay
from oodfast.train.config import TrainConfig
from oodfast.train.ema import ema_update_
from oodfast.train.grad_sync import GradientSync
from oodfast.train.head import DINOHead, MultiCropWrapper
from oodfast.train.loss import DINOLoss
from oodfast.train.optim import cancel_last_layer_gradients_, clip_gradients_, grad_norms, param_groups
from oodfast.train.runtime import broadcast_from_rank0_
from oodfast.train.schedules import Schedules

# Slots after the gradients in GradientSync's all-reduce: the step's non-finite flag, the stop signals a
# rank received, then the DINO loss's batch centre [out_dim].
_NONFINITE, _SIGTERM, _SIGINT, _CENTER = 0, 1, 2, 3


def build_networks(cfg: TrainConfig, device: torch.device, rank: int = 0) -> tuple[nn.Module, nn.Module, int]:
    """(student, teacher, backbone feature size D) of a run, on ``device``.

    Both are initialised from ``cfg.seed`` on every rank, then every rank takes rank 0's student and
    the teacher is copied from it (frozen: it moves by EMA only). Afterwards the torch and numpy RNGs
    are seeded with ``cfg.seed + rank``: from here on each rank draws its own numbers.
    """
    torch.manual_seed(cfg.seed)
    backbone, embed_dim = build_backbone(cfg.arch)
    student = MultiCropWrapper(backbone, DINOHead(embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer))
    # The teacher's logits in fp32 (divided by a temperature of 0.04, bf16 rounding would be magnified).
    teacher = MultiCropWrapper(build_backbone(cfg.arch)[0], DINOHead(embed_dim, cfg.out_dim, fp32_logits=True))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student.to(device, memory_format=fmt)
    teacher.to(device, memory_format=fmt)
    broadcast_from_rank0_(student)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    return student, teacher, embed_dim


class DINO:
    """Student, teacher, loss, optimizer, schedules and the compiled step of one process.

    Args:
        cfg: the run.
        student, teacher: from :func:`build_networks`.
        views: returns the B + C rows per view the model sees (persistent tensors, global views first).
        replay: the replay buffer whose ring is in those rows, or None (plain DINO).
        world: processes in the run; steps_per_epoch, batch_size: per process (for the schedules).
        device: where it runs; amp: the autocast context of the forward.
    """

    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module, *,
                 views: Callable[[], list[torch.Tensor]], replay: Replay | None, world: int, steps_per_epoch: int,
                 batch_size: int, device: torch.device, amp: Any = None) -> None:
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.views, self.replay, self.world = views, replay, world
        self.amp = amp if amp is not None else contextlib.nullcontext()
        # BatchNorm running statistics move in every forward; a skipped step puts them back.
        self._norm_state = [b for m in (student, teacher) for b in m.buffers()]
        self._norm_saved = [torch.empty_like(b) for b in self._norm_state]
        # Gradients averaged over ranks in one all-reduce after backward (DistributedDataParallel cannot
        # be traced by the fullgraph-compiled step); the flags and the loss centre ride along.
        self.grad_sync = GradientSync(student.parameters(), extra=_CENTER + cfg.out_dim, world=world)
        self.loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, cfg.epochs).to(device)
        # fused: one kernel for all parameters, and a skipped step (found_inf) decided on the device.
        self.optimizer = torch.optim.AdamW(param_groups(student), fused=True)
        self.schedules = Schedules.dino(
            epochs=cfg.epochs, niter_per_ep=steps_per_epoch, batch_size=batch_size * world, lr=cfg.lr,
            min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end, momentum_teacher=cfg.momentum_teacher,
            warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)
        self.sched = self.schedules.allocate(device)
        self._forward = torch.compile(self._forward_impl, fullgraph=True) if cfg.compile else self._forward_impl
        self._post = torch.compile(self._post_impl, fullgraph=True) if cfg.compile else self._post_impl

    def run_step(self, step: int, epoch: int, *, signum: int | None = None,
                 monitor: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One training step on the rows of ``views()``, enqueued without a host synchronisation: forward
        and loss, backward, one all-reduce, clipping, AdamW, EMA, centre, the replay's enqueue. A step
        whose loss (on any rank) or gradients are non-finite is skipped on the device and changes nothing
        (weights, optimizer, EMA, centre, BatchNorm statistics, ring, detector).

        Args:
            step: the global step (indexes the schedules; stored with enqueued images).
            epoch: its epoch (the last layer's freeze).
            signum: a stop signal this rank got (under torchrun it joins the all-reduce).
            monitor: also return the monitoring scalars (teacher entropy, the replay's).

        Returns:
            (scalars, values): 0-d device tensors ``loss``, ``skipped``, ``sigterm``, ``sigint`` (the
            mean over ranks: > 0 if any rank got it) and, with ``monitor``, more; and the step's
            schedule values (host floats).
        """
        cfg = self.cfg
        self.schedules.write_(step, self.sched)
        if self.replay is not None:
            self.replay.step.fill_(step)
        sync = self.grad_sync
        sync.zero_()
        loss, teacher_feats, center, nonfinite = self._forward(self.sched.teacher_temp)
        loss.backward()
        extra = sync.extra
        extra[_NONFINITE].copy_(nonfinite)
        extra[_CENTER:].copy_(center.view(-1))
        if signum is not None and self.world > 1:
            extra[_SIGTERM if signum == signal.SIGTERM else _SIGINT].fill_(1.0)
        sync.all_reduce_()  # the gradients, the flags and the centre: the mean over ranks
        norms = clip_gradients_(sync.params, cfg.clip_grad) if cfg.clip_grad else grad_norms(sync.grads)
        skipped = (extra[_NONFINITE] > 0) | ~torch.isfinite(norms.sum())
        cancel_last_layer_gradients_(epoch, self.student, cfg.freeze_last_layer)
        values = self.schedules.values(step)
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if g == 0:  # only the first group is regularised (DINO)
                group["weight_decay"] = values["weight_decay"]
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        self._post(teacher_feats, self.sched.momentum, skipped, extra[_CENTER:].view(1, -1))
        scalars = {"loss": loss, "skipped": skipped, "sigterm": extra[_SIGTERM], "sigint": extra[_SIGINT]}
        if monitor:
            scalars["teacher_entropy"] = self.loss.teacher_entropy
            if self.replay is not None:
                scalars.update(self.replay.monitor())
        return scalars, values

    # ---- the compiled pieces ---------------------------------------------------------------------
    def _forward_impl(self, teacher_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, teacher backbone features, this rank's batch centre [1, K], loss non-finite as 0-d fp32)."""
        views = self.views()
        if self._norm_state:
            torch._foreach_copy_(self._norm_saved, self._norm_state)
        with self.amp:
            teacher_out, teacher_feats = self.teacher(views[:2], return_features=True)
            student_out = self.student(views)
        # The centre moves in the post-step, with the mean over ranks and only if the step is kept.
        loss = self.loss(student_out, teacher_out, teacher_temp=teacher_temp, update_center=False)
        nonfinite = (~torch.isfinite(loss.detach())).float()
        return loss, teacher_feats.detach(), self.loss.batch_center(teacher_out), nonfinite

    def _post_impl(self, teacher_feats: torch.Tensor, momentum: torch.Tensor, skipped: torch.Tensor,
                   center: torch.Tensor) -> None:
        """EMA teacher, loss centre, then the replay scores the staged images and the rare ones enter the
        ring. On a skipped step (``skipped``, 0-d bool) none of it changes anything: the momentum is 1,
        the centre stays, the BatchNorm running statistics are put back, and so are the ring and the
        detector (:meth:`Replay.add_`)."""
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.student.parameters()),
                        torch.where(skipped, torch.ones_like(momentum), momentum))
            self.loss.apply_center_(center, skip=skipped)
            for b, old in zip(self._norm_state, self._norm_saved):
                b.copy_(torch.where(skipped, old, b))
            if self.replay is not None:
                self.replay.add_(self.replay.step_features(teacher_feats), skipped=skipped)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """facebookresearch/dino's ``student``, ``teacher``, ``optimizer`` and ``dino_loss`` entries, from
        the uncompiled modules (``teacher`` keys ``backbone.*`` / ``head.*``)."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "dino_loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["dino_loss"])
