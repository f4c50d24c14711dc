"""The Trainer: DINO with the OOD replay buffer in the loop (``oodfast train``).

One step, as in the paper but without its host round trips::

    loader batch (B images x 2 global + N local crops)  --stage-->  rows [0, B) of persistent tensors
    teacher(global views of B + C rows), student(all views of B + C rows), DINOLoss    (compiled)
    backward into one flat gradient buffer; ONE all-reduce of gradients, skip flag,
    signal flags and the loss centre (under torchrun); per-parameter clipping,
    last-layer freeze, fused AdamW (skips the step on the device if non-finite)         (eager)
    EMA teacher update with a 0-d momentum, loss centre;
    teacher (or frozen encoder) embeddings of rows [0, B) -> rare_enqueue -> ring_copy (compiled post-step)

The ring lives in rows [B, B + C) of the same persistent tensors (RareRing tail mode), so the model
always sees B + C rows per view with static shapes; schedules enter as 0-d tensors, so nothing
recompiles as they change. An image flagged in step t is replayed from step t + 1 on (it is in step t's
batch anyway), with the teacher detector and the frozen one alike: the paper's frozen detector flags
before the forward, here after the step, so that a skipped step changes nothing.

Nothing in a step waits for the device. A non-finite loss (on any rank) or gradient skips the step on
the device: AdamW's ``found_inf``, an EMA momentum of 1, an unchanged centre, buffer and detector. The
step's loss, skip
flag and signals, and on log steps its monitoring scalars, are copied to pinned host memory behind an
event and read once the next step is enqueued (:class:`_Readout`); ``max_bad_steps`` skipped steps in a
row stop the run and leave the last checkpoint intact. SIGTERM or SIGINT (a cluster's preemption,
Ctrl-C) stops the run after the current step (under torchrun: after the step following the one in
which any rank got it, so that every rank stops at the same step) with a checkpoint of that step, from
which ``--resume`` continues as if nothing had happened; a second signal stops at once.

Under torchrun the student is a plain module and :class:`~oodfast.train.distributed.GradientSync`
averages its gradients (DistributedDataParallel cannot be traced by the fullgraph-compiled step); every
rank starts from rank 0's weights, and the teacher is copied from them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from oodfast.buffer import RareRing
from oodfast.data.discover import discover
from oodfast.data.multicrop import MultiCropConfig, multicrop_loader
from oodfast.detect import DetectorConfig
from oodfast.replay import Replay
from oodfast.train.checkpoint import (check_checkpoint_file, check_writable_dir, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)
from oodfast.train.config import TrainConfig
from oodfast.train.distributed import GradientSync, broadcast_from_rank0_, init_distributed
from oodfast.train.ema import ema_update_
from oodfast.train.head import DINOHead, MultiCropWrapper, build_backbone
from oodfast.train.loss import DINOLoss
from oodfast.train.optim import cancel_last_layer_gradients_, clip_gradients_, grad_norms, param_groups
from oodfast.train.schedules import Schedules

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Several consecutive non-finite losses: the run stopped; the last checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a step; ``checkpoint`` holds that step."""

    def __init__(self, message: str, signum: int, checkpoint: Path):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """While entered, SIGTERM and SIGINT set ``signum`` instead of stopping the process, so the training
    loop can finish its step and checkpoint. A second signal restores the previous handlers and
    re-raises itself: it stops at once, as it would have without this, except while ``deferring``
    (the checkpoint is being written: the stop is under way). A signal the process ignores (a
    background job's SIGINT) stays ignored. Only the main thread can install handlers; elsewhere this
    does nothing (and ``signum`` stays None).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                current = signal.getsignal(s)
                # leave alone a signal the process ignores, or whose handler was not set from Python (None)
                if current is not signal.SIG_IGN and current is not None:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        # Only flags and os.write here: buffered I/O from a signal handler can raise "reentrant call".
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            os.write(2, f"\noodfast: {name}: stopping after this step with a checkpoint (again: stop at once)\n"
                        .encode())
        elif self.deferring:
            os.write(2, f"\noodfast: {name}: the checkpoint is being written; stopping right after\n".encode())
        else:
            self.__exit__()
            signal.raise_signal(signum)


def _to_cpu(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of this process: CUDA when available; an unindexed ``cuda`` is the GPU of LOCAL_RANK
    (under torchrun each process drives its own GPU); an explicit index is kept."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU (driver missing, or a "
                         f"CPU-only torch build); use --device cpu")
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def crop_dtype(on_cuda: bool, bf16: bool) -> str:
    """The crops' dtype name: the dtype the first convolution computes in. bf16 under CUDA autocast,
    else the parameters' fp32 (float16 crops into an fp32 model would make the first conv raise)."""
    return "bfloat16" if on_cuda and bf16 else "float32"


class _Readout:
    """Steps' device scalars copied to the host without a sync, read a step later.

    ``push`` stacks 0-d device tensors into one fp32 vector and starts its copy into pinned host
    memory (``non_blocking``) behind an event. ``pop(keep=1)`` returns the steps older than the newest
    ``keep``, waiting on their events: the trainer reads step t - 1 once step t is enqueued, so the
    host waits for the previous step at most (the GPU keeps step t's work queued) and never drains the
    device. On the CPU the copies are immediate. A pinned buffer per pending step is reused in turn.
    """

    def __init__(self, device: torch.device, size: int = 16, depth: int = 2) -> None:
        self.cuda = device.type == "cuda"
        self._host = [torch.zeros(size, pin_memory=self.cuda) for _ in range(depth + 1)]
        self._turn = 0
        self.pending: collections.deque[tuple[dict[str, Any], list[str], torch.Tensor, Any]] = collections.deque()

    def push(self, meta: dict[str, Any], values: dict[str, torch.Tensor]) -> None:
        if len(self.pending) >= len(self._host) - 1:
            raise RuntimeError("_Readout.push: too many steps pending; pop them first")
        names = list(values)
        host = self._host[self._turn][: len(names)]
        self._turn = (self._turn + 1) % len(self._host)
        host.copy_(torch.stack([v.detach().reshape(()).float() for v in values.values()]), non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((meta, names, host, event))

    def pop(self, keep: int = 0) -> list[tuple[dict[str, Any], dict[str, float]]]:
        """(meta, values) of every pending step but the newest ``keep``, oldest first."""
        out = []
        while len(self.pending) > keep:
            meta, names, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()  # waits for that step's copy, not for the device
            out.append((meta, dict(zip(names, host.tolist()))))
        return out


# Slots after the gradients in GradientSync's all-reduce: the step's non-finite flag, the stop signals a
# rank received, then the DINO loss's batch centre [out_dim].
_NONFINITE, _SIGTERM, _SIGINT, _CENTER = 0, 1, 2, 3


#: Settings that may change when a run is continued: where and how it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"output_dir", "data_root", "num_workers", "log_every", "tensorboard", "max_steps",
                               "max_bad_steps", "saveckp_freq", "compile", "deterministic"})


def check_same_run(stored: dict[str, Any] | None, config: TrainConfig, path: Path) -> None:
    """Raise ValueError naming every setting of ``config`` that contradicts the run stored in ``path``
    (its checkpoint's ``config``), except those in :data:`RESUMABLE_CHANGES`. A checkpoint without a
    stored config (e.g. facebookresearch/dino's own) is not checked."""
    if not isinstance(stored, dict):
        return
    current = config.to_dict()
    differ = [f"{key}: {stored[key]!r} in the run, {current[key]!r} now" for key in current
              if key in stored and key not in RESUMABLE_CHANGES and stored[key] != current[key]]
    if differ:
        raise ValueError(f"{path} holds a run with other settings ({'; '.join(differ)}); use the run's settings "
                         "to continue it, or a new --output_dir to start another")


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    Args:
        config: the run.
        device: ``"cuda"`` / ``"cpu"`` (default: CUDA when available, the GPU of LOCAL_RANK).
        resume: a checkpoint to continue from (its models, optimizer, loss center, ring, detector,
            step and RNG states are restored).
        progress: show the progress bar.
    """

    def __init__(self, config: TrainConfig, *, device: str | torch.device | None = None,
                 resume: str | Path | None = None, progress: bool = True) -> None:
        self.cfg = cfg = config
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL starts: one GPU per process
        self.rank, self.world = init_distributed(self.device)
        self.progress = progress and self.rank == 0
        self.out = check_writable_dir(cfg.output_dir, "output_dir")  # refused before any work, not after it
        if resume is not None:
            check_checkpoint_file(resume, "resume")
        torch.manual_seed(cfg.seed)  # the models: one initialisation on every rank (rank 0's is broadcast too)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.on_cuda = self.device.type == "cuda"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if (self.on_cuda and cfg.bf16) else contextlib.nullcontext()

        # ============ data ============
        self.files = discover(cfg.data, cfg.data_root, cfg.split, synthetic=cfg.synthetic_spec or None,
                              require_masks=cfg.replay == "oracle")
        self.crops = MultiCropConfig.dino(
            global_size=cfg.global_size, local_size=cfg.local_size, global_scale=tuple(cfg.global_crops_scale),
            local_scale=tuple(cfg.local_crops_scale), local_crops_number=cfg.local_crops_number,
            dtype=crop_dtype(self.on_cuda, cfg.bf16))
        self.B = cfg.batch_size_per_gpu
        self.loader = self._loader(self.files, cfg.seed, cfg.epoch_length, zero_copy=True)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.files)} images give no full batch of {self.B} per process; lower "
                             "--batch_size_per_gpu or use more data")
        log.info("data: %s %s, %d images, %d steps per epoch", cfg.data, cfg.split, len(self.files),
                 self.steps_per_epoch)

        # ============ student and teacher ============
        backbone, self.embed_dim = build_backbone(cfg.arch)
        self.student = MultiCropWrapper(backbone, DINOHead(self.embed_dim, cfg.out_dim,
                                                           norm_last_layer=cfg.norm_last_layer))
        # The teacher's logits in fp32 (divided by a temperature of 0.04, bf16 rounding would be magnified).
        self.teacher = MultiCropWrapper(build_backbone(cfg.arch)[0], DINOHead(self.embed_dim, cfg.out_dim,
                                                                              fp32_logits=True))
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.student.to(self.device, memory_format=fmt)
        self.teacher.to(self.device, memory_format=fmt)
        # Every rank starts from rank 0's student, and the teacher is copied from it only then.
        broadcast_from_rank0_(self.student)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        # BatchNorm running statistics move in every forward; a skipped step puts them back.
        self._norm_state = [b for m in (self.student, self.teacher) for b in m.buffers()]
        self._norm_saved = [torch.empty_like(b) for b in self._norm_state]
        torch.manual_seed(cfg.seed + self.rank)  # from here on each rank draws its own numbers
        np.random.seed(cfg.seed + self.rank)
        # Gradients averaged over ranks in one all-reduce after backward (see oodfast.train.distributed:
        # DistributedDataParallel cannot be traced by the fullgraph-compiled step); the flags and the
        # loss centre ride along.
        self.grad_sync = GradientSync(self.student.parameters(), extra=_CENTER + cfg.out_dim, world=self.world)
        self.loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, cfg.epochs).to(self.device)
        # fused: one kernel for all parameters, and a skipped step (found_inf) decided on the device.
        self.optimizer = torch.optim.AdamW(param_groups(self.student), fused=True)
        self.schedules = Schedules.dino(
            epochs=cfg.epochs, niter_per_ep=self.steps_per_epoch, batch_size=self.B * self.world, lr=cfg.lr,
            min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end, momentum_teacher=cfg.momentum_teacher,
            warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)
        self.sched = self.schedules.allocate(self.device)

        # ============ the OOD replay buffer ============
        self.replay: Replay | None = None
        if cfg.uses_ring:
            self.replay = Replay.build(
                cfg.replay, capacity=cfg.buffer_size, batch_size=self.B, global_size=cfg.global_size,
                local_size=cfg.local_size, local_crops_number=cfg.local_crops_number,
                dtype=self.crops.torch_dtype(self.device), device=self.device,
                detector=DetectorConfig(metric=cfg.metric, percentile=cfg.ood_percentile,
                                        online=cfg.threshold == "online"),
                source=cfg.detector, embed_dim=self.embed_dim, frozen_weights=cfg.detector_weights,
                masks=self.files.masks, images=self.files.images, amp=self.amp)
        C = cfg.buffer_size if cfg.uses_ring else 0
        self._staging: list[torch.Tensor] = []
        if self.replay is None:  # plain DINO: persistent batch tensors without a ring
            self._staging = [torch.zeros(self.B, 3, s, s, dtype=self.crops.torch_dtype(self.device), device=self.device)
                             for s in [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops_number]
        self.rows = self.B + C

        self.step = 0
        self._epoch_losses: list[float] = []  # this epoch's step losses so far (checkpointed mid-epoch)
        self.compile_seconds = 0.0
        self._readout = _Readout(self.device)
        self._log_path = self.out / "log.jsonl"
        self._bar: Any = None
        self._bad_in_row, self._images_seen, self._last, self._t_start = 0, 0, {}, time.perf_counter()
        self._forward = torch.compile(self._forward_impl, fullgraph=True) if cfg.compile else self._forward_impl
        self._post = torch.compile(self._post_impl, fullgraph=True) if cfg.compile else self._post_impl
        self.tb = None
        if cfg.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'oodfast[tensorboard]'") from None
            self.tb = SummaryWriter(str(self.out / "tb"))
        self.resumed = False
        self._signals: StopSignals | None = None
        if self.rank == 0:
            for stale in self.out.glob(".checkpoint*.pth.*.tmp"):  # a write cut short by SIGKILL or a crash
                log.warning("removing %s, an interrupted checkpoint write", stale)
                stale.unlink(missing_ok=True)
        if resume is None and (self.out / "checkpoint.pth").is_file():
            # As facebookresearch/dino: the same command again continues its run (a requeued job keeps
            # its progress); a command whose settings contradict the stored run is refused.
            resume = self.out / "checkpoint.pth"
            log.info("continuing the run in %s (from %s)", self.out, resume)
        if resume is not None:
            self._restore(load_checkpoint(resume, map_location=self.device), Path(resume))

    # ------------------------------------------------------------------------------------------
    def _loader(self, files: Any, seed: int, epoch_length: int | None, *, sharded: bool = True,
                zero_copy: bool = False):
        """A multi-crop loader of this run. ``zero_copy``: DALI's own buffers, in its dtype, for batches
        that :meth:`_stage` copies (the one conversion to the crop dtype happens in that copy)."""
        return multicrop_loader(files, self.crops, self.B, device=self.device, seed=seed, backend=self.cfg.aug,
                                epoch_length=epoch_length, num_workers=self.cfg.num_workers, zero_copy=zero_copy,
                                **({} if sharded else {"shard_id": 0, "num_shards": 1}))

    @property
    def ring(self) -> RareRing | None:
        return self.replay.ring if self.replay is not None else None

    @property
    def detector(self) -> Any:
        return self.replay.detector if self.replay is not None else None

    @property
    def encoder(self) -> nn.Module | None:
        return self.replay.encoder if self.replay is not None else None

    def views(self) -> list[torch.Tensor]:
        """The B + C rows per view the model sees (persistent tensors)."""
        return self.replay.views() if self.replay is not None else self._staging

    def _stage(self, views: list[torch.Tensor], index: torch.Tensor, boxes: torch.Tensor | None = None) -> None:
        """Copy a loader batch into the persistent rows (and, for the oracle, its true rare shares)."""
        if self.replay is not None:
            self.replay.stage(views, index, boxes)
        else:
            for dst, src in zip(self._staging, views):
                dst.copy_(src, non_blocking=True)

    # ---- the three compiled pieces -------------------------------------------------------------
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
        """EMA teacher, loss centre, then the detector scores the staged images and the rare ones enter the
        ring. On a skipped step (``skipped``, 0-d bool) none of it changes anything: the momentum is 1,
        the centre stays, and the ring's state and metadata and the detector's threshold and flag rate
        are put back (no slot is written), as are the BatchNorm running statistics."""
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.student.parameters()),
                        torch.where(skipped, torch.ones_like(momentum), momentum))
            self.loss.apply_center_(center, skip=skipped)
            for b, old in zip(self._norm_state, self._norm_saved):
                b.copy_(torch.where(skipped, old, b))
            if self.replay is not None:
                self.replay.add_(self.replay.step_features(teacher_feats), skipped=skipped)

    # ---- calibration and warm-up -----------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self) -> None:
        """Fit the detector's statistics and threshold on ``calib_size`` images (or ``calib_frac``).

        Every process calibrates on the same images (the first of a seeded permutation), so their
        statistics agree without communication.
        """
        if self.replay is None or not self.replay.calibrated:
            return
        cfg = self.cfg
        n = round(cfg.calib_frac * len(self.files)) if cfg.calib_frac else cfg.calib_size
        n = max(self.B, min(n, len(self.files)))
        pick = np.random.default_rng(cfg.seed).permutation(len(self.files))[:n]
        subset = [self.files.images[i] for i in sorted(pick)]
        feats = [self.replay.embed([v.to(self.device) for v in batch.views[:2]], self.teacher).flatten(0, 1)
                 for batch in self._loader(subset, cfg.seed + 1, None, sharded=False)]
        self.replay.calibrate(torch.cat(feats))

    @torch.no_grad()
    def warm_up(self) -> None:
        """Fill the ring before training, as the paper does (:meth:`Replay.warm_up`)."""
        if self.replay is None:
            return
        self.replay.warm_up(self._loader(self.files, self.cfg.seed + 2, self.cfg.epoch_length, zero_copy=True),
                            teacher=self.teacher,
                            refill=lambda: self._loader(self.files, self.cfg.seed + 3, None, zero_copy=True))

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Calibrate, warm the ring up, train, checkpoint. Returns a summary dict.

        Raises:
            TrainingDiverged: ``max_bad_steps`` non-finite losses in a row (the last checkpoint is intact).
            TrainingInterrupted: SIGTERM or SIGINT; the checkpoint holds the last finished step.
        """
        with StopSignals() as stop:  # SIGTERM / SIGINT: finish the step, checkpoint, raise TrainingInterrupted
            self._signals = stop
            try:
                return self._train(stop)
            finally:
                self._signals = None

    def _train(self, stop: StopSignals) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if not self.resumed:
            self.calibrate()
            self.warm_up()
        total = self.schedules.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.schedules.total_steps)
        if self.step >= total:
            log.warning("the run in %s is complete (%d steps): nothing to do; raise --max-steps, or use a new "
                        "--output_dir for another run", self.out, self.step)
        self._log_path = self.out / "log.jsonl"
        self._bad_in_row, self._images_seen, self._last = 0, 0, {}
        self._t_start = time.perf_counter()
        first = True
        start_epoch = self.step // self.steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.step >= total:
                break
            signum = self._agree(stop)  # a signal during calibration, warm-up or an epoch's last step
            if signum:
                self._stop(stop, epoch, signum)
            skip = self.step - epoch * self.steps_per_epoch  # > 0: resuming inside this epoch
            if self.replay is not None and self.replay.follows_teacher and epoch > 0 and skip == 0:
                self.calibrate()  # the teacher has moved: refresh the statistics at every epoch start
            self.loader.set_epoch(epoch)
            self._bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}", unit="step",
                             disable=not self.progress, dynamic_ncols=True)
            # a partial epoch resumed from a checkpoint keeps the losses of its steps before the stop
            self._epoch_losses = self._epoch_losses if skip > 0 else []
            for i, batch in enumerate(self.loader):
                if i < skip:
                    continue
                if self.step >= total:
                    break
                t0 = time.perf_counter()
                self._step(batch, epoch, stop, log=self.step % cfg.log_every == 0 or self.step == total - 1,
                           timed=not first)
                if first:  # the first step of a process compiles: timed apart from the steady state
                    self._settle()
                    self.compile_seconds, first = time.perf_counter() - t0, False
                    self._t_start = time.perf_counter()
                self.step += 1
                self._bar.update()
                # The step before this one is read now (its copy to the host has long been started).
                signum = self._settle(keep=1)
                if not signum and self.world == 1:
                    signum = stop.signum or 0  # one process: the signal itself, no agreement needed
                if signum and self.step % self.steps_per_epoch:
                    self._stop(stop, epoch, signum)
            self._settle()
            self._bar.close()
            if self._epoch_losses:
                scalars = {k: v for k, v in self._last.items() if k not in ("step", "epoch", "loss")}
                self._log({**scalars, "epoch": epoch, "event": "epoch_end", "step": self.step,
                           "loss": float(np.mean(self._epoch_losses))})
            if self.step % self.steps_per_epoch == 0 or self.step >= total:
                self.save(epoch)
        seconds = time.perf_counter() - self._t_start
        return {"steps": self.step, "epochs_done": self.step / self.steps_per_epoch, "last": self._last,
                "seconds": round(seconds, 1), "compile_seconds": round(self.compile_seconds, 1),
                "checkpoint": str(self.out / "checkpoint.pth"), "log": str(self._log_path)}

    def _step(self, batch: Any, epoch: int, stop: StopSignals, *, log: bool, timed: bool = True) -> None:
        """Stage a loader batch and run one step on it (:meth:`run_step`)."""
        self._stage(batch.views, batch.index, batch.boxes)
        self.run_step(epoch, stop, log=log, timed=timed)

    def run_step(self, epoch: int = 0, stop: StopSignals | None = None, *, log: bool = False,
                 timed: bool = True) -> None:
        """One training step on the staged rows, enqueued without a host synchronisation: forward and
        loss, backward, one all-reduce, clipping, AdamW, EMA, centre, the detector's enqueue. A step whose
        loss (on any rank) or gradients are non-finite is skipped on the device and changes nothing
        (weights, optimizer, EMA, centre, buffer, detector). Its scalars reach the host later
        (:meth:`_settle`); ``self.step`` is not advanced here."""
        cfg = self.cfg
        self.schedules.write_(self.step, self.sched)
        if self.replay is not None:
            self.replay.step.fill_(self.step)
        sync = self.grad_sync
        sync.zero_()
        loss, teacher_feats, center, nonfinite = self._forward(self.sched.teacher_temp)
        loss.backward()
        extra = sync.extra
        extra[_NONFINITE].copy_(nonfinite)
        extra[_CENTER:].copy_(center.view(-1))
        if stop is not None and stop.signum is not None and self.world > 1:
            extra[_SIGTERM if stop.signum == signal.SIGTERM else _SIGINT].fill_(1.0)
        sync.all_reduce_()  # the gradients, the flags and the centre: the mean over ranks
        norms = clip_gradients_(sync.params, cfg.clip_grad) if cfg.clip_grad else grad_norms(sync.grads)
        skipped = (extra[_NONFINITE] > 0) | ~torch.isfinite(norms.sum())
        cancel_last_layer_gradients_(epoch, self.student, cfg.freeze_last_layer)
        values = self.schedules.values(self.step)
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if g == 0:  # only the first group is regularised (DINO)
                group["weight_decay"] = values["weight_decay"]
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        self._post(teacher_feats, self.sched.momentum, skipped, extra[_CENTER:].view(1, -1))
        scalars = {"loss": loss, "skipped": skipped, "sigterm": extra[_SIGTERM], "sigint": extra[_SIGINT]}
        if log:
            scalars["teacher_entropy"] = self.loss.teacher_entropy
            if self.ring is not None:
                scalars.update(self.replay.monitor())
        self._readout.push({"step": self.step, "epoch": epoch, "log": log, "timed": timed, "values": values},
                           scalars)

    def _settle(self, *, keep: int = 0) -> int:
        """Act on the scalars of the pending steps but the newest ``keep``: count a skipped step (and stop
        the run after ``max_bad_steps`` in a row), keep the loss, write the log record. Returns the
        signal the ranks agreed on in those steps (0: none)."""
        signum = 0
        for meta, v in self._readout.pop(keep):
            signum = max(signum, self._settle_step(meta, v))
        return signum

    def _settle_step(self, meta: dict[str, Any], v: dict[str, float]) -> int:
        step, epoch = meta["step"], meta["epoch"]
        if v["skipped"]:
            self._bad_in_row += 1
            log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", step, v["loss"], self._bad_in_row)
            self._log({"step": step, "epoch": epoch, "event": "non_finite_loss", "loss": str(v["loss"])})
            if self._bad_in_row >= self.cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self._bad_in_row} consecutive non-finite losses at step {step}; stopped. The last "
                    f"checkpoint in {self.out} is intact: lower --lr, raise --warmup_epochs or check the "
                    "data, then --resume it")
        else:
            self._bad_in_row = 0
            if meta["timed"]:
                self._images_seen += self.B * self.world
            self._epoch_losses.append(v["loss"])
            if meta["log"]:
                self._last = self._record(step, epoch, v, meta["values"])
                if self._bar is not None:
                    self._bar.set_postfix(loss=f"{v['loss']:.3f}", img_s=f"{self._last['images_per_s']:.1f}",
                                          flag=f"{self._last.get('flag_rate', 0):.3f}", buf=self._last.get("buffer", 0))
        if v["sigterm"] > 0:
            return int(signal.SIGTERM)
        return int(signal.SIGINT) if v["sigint"] > 0 else 0

    def _record(self, step: int, epoch: int, v: dict[str, float], values: dict[str, float]) -> dict[str, Any]:
        seconds = time.perf_counter() - self._t_start
        images = self._images_seen
        rec: dict[str, Any] = {"step": step, "epoch": epoch, "loss": v["loss"], **values,
                               "teacher_entropy": v["teacher_entropy"],
                               "entropy_ratio": v["teacher_entropy"] / float(self.loss.max_entropy),
                               "images_per_s": images / seconds if seconds > 0 and images else 0.0}
        if self.ring is not None:
            rec.update(flag_rate=v["flag_rate"], threshold=v["threshold"], buffer=int(v["buffer"]),
                       nonfinite=int(v["nonfinite"]))
        self._log(rec)
        if self.tb is not None:
            for key, value in rec.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, step)
        return rec

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self._log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- stopping on a signal ---------------------------------------------------------------------
    def _agree(self, stop: StopSignals) -> int:
        """The signal any rank got, or 0: one all-reduce under DDP, so every rank takes the same decision.
        Used between epochs only; within an epoch the flags ride in the gradient all-reduce."""
        signum = stop.signum or 0
        if self.world > 1:
            flags = torch.tensor([signum], dtype=torch.int64, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum = int(flags[0])
        return signum

    def _stop(self, stop: StopSignals, epoch: int, signum: int) -> None:
        """Checkpoint this step (rank 0; the other ranks wait for it) and raise TrainingInterrupted."""
        stop.deferring = True  # a second signal now would kill the process mid-write: it waits
        self._settle()  # the last step's loss belongs to the checkpoint's partial epoch
        self.save(epoch, numbered=False)  # mid-epoch or not, checkpoint.pth holds this step
        if self.world > 1:
            dist.barrier()  # no rank exits (and makes torchrun kill rank 0) before the checkpoint is written
        name = signal.Signals(signum).name
        self._log({"step": self.step, "epoch": epoch, "event": "interrupted", "signal": name})
        ckpt = self.out / "checkpoint.pth"
        raise TrainingInterrupted(f"{name}: stopped after step {self.step} of {self.schedules.total_steps}; "
                                  f"{ckpt} holds it: continue with --resume {ckpt}", signum, ckpt)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint dict (DINO's keys plus ours), from the uncompiled modules.

        DINO's ``epoch`` is the epoch to start from: the next one after a complete epoch, the current
        one again after a partial epoch (oodfast resumes from ``step``, mid-epoch included).
        """
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": self.step // self.steps_per_epoch,
            "args": self.cfg.to_dict(), "dino_loss": self.loss.state_dict(), "step": self.step,
            "config": self.cfg.to_dict(), **self._own_state(),
        }

    def _own_state(self) -> dict[str, Any]:
        """What differs between DDP ranks: this rank's buffer, detector, RNG and partial epoch's losses
        (the checkpoint's top level holds rank 0's; under DDP ``ranks`` holds every rank's)."""
        return {**(self.replay.state_dict() if self.replay is not None else {"ring": None, "detector": None}),
                "rng": rng_state(), "epoch_losses": list(self._epoch_losses) if self.step % self.steps_per_epoch else []}

    def save(self, epoch: int, numbered: bool = True) -> None:
        """checkpoint.pth (rank 0); with ``numbered``, also checkpointNNNN.pth at the end of every
        ``saveckp_freq``-th epoch (never for a partial epoch). Every rank calls it: under DDP each
        rank's own state (:meth:`_own_state`) is gathered into the checkpoint's ``ranks``."""
        ranks = None
        if self.world > 1:
            ranks = [None] * self.world if self.rank == 0 else None
            dist.gather_object(_to_cpu(self._own_state()), ranks, dst=0)
        if self.rank != 0:
            return
        state = self.state()
        if ranks is not None:
            state["ranks"] = ranks
        stop = self._signals
        deferring = stop.deferring if stop is not None else False
        if stop is not None:
            stop.deferring = True  # a second signal waits for the write instead of cutting it short
        try:
            save_checkpoint(self.out / "checkpoint.pth", state)
            complete = self.step == (epoch + 1) * self.steps_per_epoch
            if numbered and complete and self.cfg.saveckp_freq and (epoch + 1) % self.cfg.saveckp_freq == 0:
                save_checkpoint(self.out / f"checkpoint{epoch + 1:04}.pth", state)
        finally:
            if stop is not None:
                stop.deferring = deferring

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        check_same_run(ckpt.get("config"), self.cfg, path)
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loss.load_state_dict(ckpt["dino_loss"])
        mine = ckpt  # single process: rank 0's state is the top level
        ranks = ckpt.get("ranks")
        if self.world > 1 and ranks is not None and len(ranks) == self.world:
            mine = ranks[self.rank]
        elif self.world > 1:
            log.warning("the checkpoint holds %s; every rank restores rank 0's buffer, detector and RNG",
                        f"the states of {len(ranks)} ranks, not {self.world}" if ranks else "one rank's state")
        if self.replay is not None:
            self.replay.load_state_dict(mine)
        self.step = int(ckpt["step"])
        self._epoch_losses = [float(v) for v in mine.get("epoch_losses", [])]
        set_rng_state(mine["rng"])
        self.resumed = True
        log.info("resumed at step %d (epoch %d)", self.step, self.step // self.steps_per_epoch)
