"""DINO: the model and its step (student, teacher, loss, EMA, centre, gradient sync, compiled pieces).

One step, as in the paper but without its host round trips::

    the detector's embedding of the staged clean views, the scoring module
    (teacher or frozen encoder) in eval mode                                           (compiled: _features)
    teacher(global views of B + C rows), student(all views of B + C rows), DINOLoss    (compiled: _forward)
    backward (of the loss times the fp16 loss scale, where used) into one flat gradient
    buffer; ONE all-reduce of gradients, skip flag, signal flags and the loss centre
    (under torchrun); unscaling, per-parameter clipping, last-layer freeze, the
    optimizer (fused AdamW, or DINO's SGD / LARS: each skips a non-finite step on the
    device through ``found_inf``); the loss scale's update                               (eager)
    EMA teacher update with a 0-d momentum, loss centre, BatchNorm statistics kept or put back;
    the replay scores the staged rows and copies the rare ones into its ring            (compiled: _post)
    the ``ids`` store's asynchronous copy of the ring's ids to the host, for the loader (eager)

The rows come from ``views()`` (persistent tensors: the staged batch, then the replay ring), so the
model always sees B + C rows per view with static shapes; schedules enter as 0-d tensors, so nothing
recompiles as they change. An image flagged in step t is replayed from step t + 1 on (it is in step t's
batch anyway; the ``ids`` store replays it once its id has reached the loader, ``loader.replay_lag``
steps later), with the teacher detector and the frozen one alike: the paper's frozen detector flags
before the forward, here after the step, so that a skipped step changes nothing.

The detector scores the clean views (no photometric augmentation) with the scoring module in eval
mode (:meth:`oodfast.replay.Replay.step_input`): the teacher's BatchNorm uses its running statistics
and does not update them, so a score depends on the image alone, and calibration (the same call on
the same kind of rows) sees what training sees. The mode switch is a host-side flag around the
separately compiled ``_features`` (compiled once in eval mode, as ``_forward`` is in train mode).

Nothing in a step waits for the device. A non-finite loss (on any rank) or gradient skips the step on
the device: AdamW's ``found_inf``, an EMA momentum of 1, an unchanged centre, BatchNorm statistics,
ring and detector. :meth:`DINO.run_step` returns the step's scalars as device tensors; the loop reads
them a step later.

Precision (DINO's ``--use_fp16``, the config's ``bf16``): :func:`choose_precision` picks bf16 autocast on
GPUs that support bf16, fp16 autocast with a ``torch.amp.GradScaler`` on those that do not (V100, T4),
and fp32 on the CPU. The scaler's state is the checkpoint's ``fp16_scaler`` (DINO's key).

Backbones come from :func:`oodfast.encoders.build_backbone`: a ViT student gets ``drop_path_rate``, its
teacher none (as DINO). ``pretrained_weights`` starts both from released weights
(:func:`load_pretrained_`).

Under torchrun the student is a plain module and :class:`~oodfast.train.grad_sync.GradientSync`
averages its gradients (DistributedDataParallel cannot be traced by the fullgraph-compiled step);
every rank starts from rank 0's weights (:func:`build_networks`), and the teacher is copied from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from oodfast.encoders import backbone_weights, build_backbone, load_weights
from oodfast.replay import Replay
from oodfast.safeload import checkpoint_args, load_torch_file, network_state
from oodfast.train.config import TrainConfig
from oodfast.train.ema import ema_update_
from oodfast.train.grad_sync import GradientSync
from oodfast.train.head import DINOHead, MultiCropWrapper
from oodfast.train.loss import DINOLoss
from oodfast.train.optim import build_optimizer, cancel_last_layer_gradients_, clip_gradients_, grad_norms
from oodfast.train.runtime import broadcast_from_rank0_
from oodfast.train.schedules import Schedules

log = logging.getLogger(__name__)

# Slots after the gradients in GradientSync's all-reduce: the step's non-finite flag, the stop signals a
# rank received, then the DINO loss's batch centre [out_dim].
_NONFINITE, _SIGTERM, _SIGINT, _CENTER = 0, 1, 2, 3


def choose_precision(device_type: str, mixed: bool, capability: tuple[int, int] | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: how a step computes, from the device alone.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        mixed: mixed precision asked for (the config's ``bf16``, DINO's ``--use_fp16``).
        capability: the GPU's compute capability (``torch.cuda.get_device_capability``), None on the CPU.

    Mixed precision on a GPU with bf16 (compute capability 8.0 and up: A100, H100, RTX 30xx and later) is
    bf16 autocast; on older GPUs (V100 7.0, T4 7.5) fp16 autocast with a loss scaler, as DINO's
    ``--use_fp16``. The CPU runs fp32 (no autocast).
    """
    if not mixed or device_type != "cuda":
        return "fp32"
    return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"


@dataclass(frozen=True)
class Precision:
    """A step's precision: ``name`` (bf16 | fp16 | fp32) on ``device_type``."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def crop_dtype(self) -> str:
        """The crops' dtype name: the autocast dtype, else the parameters' fp32."""
        return {"bf16": "bfloat16", "fp16": "float16"}.get(self.name, "float32")

    def autocast(self) -> Any:
        """The forward's autocast context (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (DINO's ``fp16_scaler``), None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def precision_for(device: torch.device, mixed: bool) -> Precision:
    """:func:`choose_precision` for ``device`` (its compute capability read on CUDA)."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return Precision(choose_precision(device.type, mixed, capability), device.type)


def build_networks(cfg: TrainConfig, device: torch.device, rank: int = 0) -> tuple[nn.Module, nn.Module, int]:
    """(student, teacher, backbone feature size D) of a run, on ``device``.

    Both are initialised from ``cfg.seed`` on every rank (a ViT student with ``cfg.drop_path_rate``, its
    teacher without), the student then takes ``cfg.pretrained_weights`` if given, then every rank takes
    rank 0's student and the teacher is copied from it (frozen: it moves by EMA only). Afterwards the
    torch and numpy RNGs are seeded with ``cfg.seed + rank``: from here on each rank draws its own numbers.
    """
    torch.manual_seed(cfg.seed)
    backbone, embed_dim = build_backbone(cfg.arch, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path_rate)
    student = MultiCropWrapper(backbone, DINOHead(embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                                                  norm_last_layer=cfg.norm_last_layer))
    # The teacher's logits in fp32 (divided by a temperature of 0.04, bf16 rounding would be magnified).
    teacher = MultiCropWrapper(build_backbone(cfg.arch, patch_size=cfg.patch_size)[0],
                               DINOHead(embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, fp32_logits=True))
    if cfg.pretrained_weights:
        load_pretrained_(student, cfg.pretrained_weights, cfg.checkpoint_key, cfg.arch)
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


def load_pretrained_(model: MultiCropWrapper, path: str | os.PathLike[str], checkpoint_key: str = "teacher",
                     arch: str = "resnet50") -> bool:
    """Load released weights into a student (DINO's ``--pretrained_weights`` / ``--checkpoint_key``).

    The file is read safely (:func:`oodfast.safeload.load_torch_file`) and picked by DINO's rule
    (:func:`oodfast.safeload.network_state`: the ``checkpoint_key`` entry of a training checkpoint, or a
    plain state dict; ``module.`` / ``_orig_mod.`` / ``backbone.`` stripped). The backbone is loaded
    strictly; the head only if the file has ``head.*`` weights of exactly this head's keys and shapes,
    else it stays random (logged, with the reason). No optimizer or step state is read (that is
    ``--resume``).

    Returns:
        Whether the head was loaded too.

    Raises:
        ValueError: an unreadable file, no ``checkpoint_key`` entry, or a backbone that does not fit
            ``arch`` (naming the missing, unexpected and mis-shaped keys).
    """
    ckpt = load_torch_file(path)
    state = network_state(ckpt, checkpoint_key, path)
    trained = checkpoint_args(ckpt).get("arch") if isinstance(ckpt, Mapping) else None
    load_weights(model.backbone, backbone_weights(state, path), path, arch, trained=trained)
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    expected = model.head.state_dict()
    if not head:
        log.warning("--pretrained_weights %s: backbone loaded; the file has no head.* weights, so the DINO head "
                    "starts random", path)
        return False
    missing, unexpected = sorted(set(expected) - set(head)), sorted(set(head) - set(expected))
    shapes = [f"{k} {tuple(head[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in head and head[k].shape != v.shape]
    if missing or unexpected or shapes:
        why = "; ".join(filter(None, [missing and f"missing {', '.join(missing[:3])}",
                                      unexpected and f"unexpected {', '.join(unexpected[:3])}",
                                      shapes and f"mis-shaped {', '.join(shapes[:3])}"]))
        log.warning("--pretrained_weights %s: backbone loaded; its head does not fit this one (%s: e.g. another "
                    "--out_dim or --use_bn_in_head), so the DINO head starts random", path, why)
        return False
    model.head.load_state_dict(head, strict=True)
    log.info("--pretrained_weights %s: backbone and head loaded (%s)", path, checkpoint_key)
    return True


class DINO:
    """Student, teacher, loss, optimizer, schedules and the compiled step of one process.

    Args:
        cfg: the run.
        student, teacher: from :func:`build_networks`.
        views: returns the B + C rows per view the model sees (persistent tensors, global views first).
        replay: the replay buffer whose ring is in those rows, or None (plain DINO).
        world: processes in the run; steps_per_epoch, batch_size: per process (for the schedules).
        device: where it runs; precision: bf16 / fp16 / fp32 (default: :func:`precision_for` the device
            and ``cfg.bf16``); amp: the autocast context of the forward (default: the precision's).
    """

    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module, *,
                 views: Callable[[], list[torch.Tensor]], replay: Replay | None, world: int, steps_per_epoch: int,
                 batch_size: int, device: torch.device, amp: Any = None,
                 precision: Precision | None = None) -> None:
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.views, self.replay, self.world = views, replay, world
        self.precision = precision if precision is not None else precision_for(device, cfg.bf16)
        self.amp = amp if amp is not None else self.precision.autocast()
        # fp16: DINO's loss scaler (bf16 and fp32 need none); its state is the checkpoint's fp16_scaler.
        self.scaler = self.precision.grad_scaler()
        # BatchNorm running statistics move in every forward; a skipped step puts them back.
        self._norm_state = [b for m in (student, teacher) for b in m.buffers()]
        self._norm_saved = [torch.empty_like(b) for b in self._norm_state]
        # Gradients averaged over ranks in one all-reduce after backward (DistributedDataParallel cannot
        # be traced by the fullgraph-compiled step); the flags and the loss centre ride along.
        self.grad_sync = GradientSync(student.parameters(), extra=_CENTER + cfg.out_dim, world=world)
        self.loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, cfg.epochs).to(device)
        # DINO's --optimizer over its parameter groups; each skips a step on the device (found_inf).
        self.optimizer = build_optimizer(cfg.optimizer, student)
        self.schedules = Schedules.dino(
            epochs=cfg.epochs, niter_per_ep=steps_per_epoch, batch_size=batch_size * world, lr=cfg.lr,
            min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end, momentum_teacher=cfg.momentum_teacher,
            warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)
        self.sched = self.schedules.allocate(device)
        self._forward = torch.compile(self._forward_impl, fullgraph=True) if cfg.compile else self._forward_impl
        self._post = torch.compile(self._post_impl, fullgraph=True) if cfg.compile else self._post_impl
        features = replay.features if replay is not None else None
        self._features = torch.compile(features, fullgraph=True) if cfg.compile and replay is not None else features

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
        # the detector's input first, from the teacher as the forward sees it (eval mode: no state moves)
        scored = self.replay.step_input(self.teacher, self._features) if self.replay is not None else None
        loss, center, nonfinite = self._forward(self.sched.teacher_temp)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        extra = sync.extra
        extra[_NONFINITE].copy_(nonfinite)
        extra[_CENTER:].copy_(center.view(-1))
        if signum is not None and self.world > 1:
            extra[_SIGTERM if signum == signal.SIGTERM else _SIGINT].fill_(1.0)
        sync.all_reduce_()  # the gradients, the flags and the centre: the mean over ranks
        if self.scaler is not None:  # in place, and records the scaler's own inf check (no host read)
            self.scaler.unscale_(self.optimizer)
        norms = clip_gradients_(sync.params, cfg.clip_grad) if cfg.clip_grad else grad_norms(sync.grads)
        skipped = (extra[_NONFINITE] > 0) | ~torch.isfinite(norms.sum())
        cancel_last_layer_gradients_(epoch, self.student, cfg.freeze_last_layer)
        values = self.schedules.values(step)
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if g == 0:  # only the first group is regularised (DINO)
                group["weight_decay"] = values["weight_decay"]
        # The optimizer is stepped directly (not through scaler.step, which would replace found_inf with
        # its own and, for optimizers without that attribute, read it on the host).
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an inf / NaN gradient, grows it after 2000 good steps
        self._post(scored, self.sched.momentum, skipped, extra[_CENTER:].view(1, -1))
        if self.replay is not None:
            self.replay.publish(step)  # the ids store: ring ids to the host, asynchronously
        scalars = {"loss": loss, "skipped": skipped, "sigterm": extra[_SIGTERM], "sigint": extra[_SIGINT]}
        if monitor:
            scalars["teacher_entropy"] = self.loss.teacher_entropy
            if self.replay is not None:
                scalars.update(self.replay.monitor())
        return scalars, values

    # ---- the compiled pieces ---------------------------------------------------------------------
    def _forward_impl(self, teacher_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, this rank's batch centre [1, K], loss non-finite as 0-d fp32)."""
        views = self.views()
        if self._norm_state:
            torch._foreach_copy_(self._norm_saved, self._norm_state)
        with self.amp:
            teacher_out = self.teacher(views[:2])
            student_out = self.student(views)
        # The centre moves in the post-step, with the mean over ranks and only if the step is kept.
        loss = self.loss(student_out, teacher_out, teacher_temp=teacher_temp, update_center=False)
        nonfinite = (~torch.isfinite(loss.detach())).float()
        return loss, self.loss.batch_center(teacher_out), nonfinite

    def _post_impl(self, scored: torch.Tensor | None, momentum: torch.Tensor, skipped: torch.Tensor,
                   center: torch.Tensor) -> None:
        """EMA teacher, loss centre, then the replay scores the staged images (``scored``: the detector's
        input, :meth:`Replay.step_input`) and the rare ones enter the ring. On a skipped step
        (``skipped``, 0-d bool) none of it changes anything: the momentum is 1, the centre stays, the
        BatchNorm running statistics are put back, and so are the ring and the
        detector (:meth:`Replay.add_`)."""
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.student.parameters()),
                        torch.where(skipped, torch.ones_like(momentum), momentum))
            self.loss.apply_center_(center, skip=skipped)
            for b, old in zip(self._norm_state, self._norm_saved):
                b.copy_(torch.where(skipped, old, b))
            if self.replay is not None:
                self.replay.add_(scored, skipped=skipped)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """facebookresearch/dino's ``student``, ``teacher``, ``optimizer``, ``dino_loss`` and, with fp16,
        ``fp16_scaler`` entries, from the uncompiled modules (``teacher`` keys ``backbone.*`` / ``head.*``)."""
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "dino_loss": self.loss.state_dict()}
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["dino_loss"])
        if self.scaler is not None and state.get("fp16_scaler"):
            self.scaler.load_state_dict(state["fp16_scaler"])
        elif self.scaler is not None:
            log.info("the checkpoint has no fp16_scaler (it ran in bf16 or fp32): the loss scale starts afresh")
