"""The Trainer: the training loop of ``oodfast train`` (data in, step, log, checkpoint, signals).

The pieces it drives: the DINO model and its compiled step (:class:`~oodfast.train.dino.DINO`), the
OOD replay buffer (:class:`~oodfast.replay.Replay`: detector, ring, calibration, warm-up), the
process's device, process group and signals (:mod:`oodfast.train.runtime`) and the log
(:class:`~oodfast.train.monitor.StepLog`). Per step the Trainer stages a loader batch into the
persistent rows, runs the step, and reads the previous step's scalars once this one is enqueued,
so the host never drains the device.

``max_bad_steps`` skipped (non-finite) steps in a row stop the run and leave the last checkpoint
intact. SIGTERM or SIGINT (a cluster's preemption, Ctrl-C) stops the run after the current step (under
torchrun: after the step following the one in which any rank got it, so that every rank stops at the
same step) with a checkpoint of that step, from which ``--resume`` continues as if nothing had
happened; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.buffer import RareRing, hw
from oodfast.data.discover import discover
from oodfast.data.multicrop import multicrop_loader
from oodfast.detect import DetectorConfig
from oodfast.replay import Replay
from oodfast.train.checkpoint import (RESUMABLE_CHANGES, check_checkpoint_file, check_same_run, check_writable_dir,
                                      load_checkpoint, rng_state, save_checkpoint, set_rng_state, to_cpu)
from oodfast.train.config import TrainConfig
from oodfast.train.dino import DINO, build_networks, precision_for
from oodfast.train.monitor import StepLog, TrainingDiverged
from oodfast.train.pictures import read_log, run_pictures
from oodfast.train.runtime import Runtime, StopSignals, resolve_device

__all__ = ["RESUMABLE_CHANGES", "StopSignals", "Trainer", "TrainingDiverged", "TrainingInterrupted", "check_same_run",
           "resolve_device"]

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a step; ``checkpoint`` holds that step."""

    def __init__(self, message: str, signum: int, checkpoint: Path):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    Args:
        config: the run.
        device: ``"cuda"`` / ``"cpu"`` (default: CUDA when available, the GPU of LOCAL_RANK).
        resume: a checkpoint to continue from (its models, optimizer, loss center, ring, detector,
            step and RNG states are restored). Without it, a checkpoint in ``output_dir`` is continued.
        progress: show the progress bar.

    Attributes: ``dino`` (the model and its step), ``replay`` (None for plain DINO), ``runtime``,
    ``monitor`` (the log), ``step`` (steps done), ``loader``, ``files``.
    """

    def __init__(self, config: TrainConfig, *, device: str | torch.device | None = None,
                 resume: str | Path | None = None, progress: bool = True) -> None:
        self.cfg = cfg = config
        self.runtime = Runtime.start(device)
        self.device, self.rank, self.world = self.runtime.device, self.runtime.rank, self.runtime.world
        self.progress = progress and self.rank == 0
        self.out = check_writable_dir(cfg.output_dir, "output_dir")  # refused before any work, not after it
        if resume is not None:
            check_checkpoint_file(resume, "resume")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.precision = precision_for(self.device, cfg.bf16)  # bf16, or fp16 with a loss scaler, or fp32
        self.amp = self.precision.autocast()

        # ============ data ============
        self.files = discover(cfg.data, cfg.data_root, cfg.split, synthetic=cfg.synthetic_spec or None,
                              require_masks=cfg.replay.startswith("oracle"))
        self.crops = cfg.multicrop(dtype=self.precision.crop_dtype)  # the --crops recipe (DINO's or the paper's)
        self.B = cfg.batch_size_per_gpu
        # ============ model, replay buffer, step ============
        student, teacher, embed_dim = build_networks(cfg, self.device, self.rank)
        dtype = self.crops.torch_dtype(self.device)
        self.replay: Replay | None = None
        self._staging: list[torch.Tensor] = []  # plain DINO: persistent batch tensors without a ring
        if cfg.uses_ring:
            self.replay = Replay.build(
                cfg.replay, capacity=cfg.buffer_size, batch_size=self.B, global_size=cfg.global_size,
                local_size=cfg.local_size, local_crops_number=cfg.local_crops_number, dtype=dtype, device=self.device,
                detector=DetectorConfig(metric=cfg.metric, percentile=cfg.ood_percentile,
                                        online=cfg.threshold_mode == "online"),
                source=cfg.detector, embed_dim=embed_dim, frozen_weights=cfg.detector_weights,
                masks=self.files.masks, images=self.files.images, amp=self.amp, store=cfg.replay_store,
                dense_layer=cfg.dense_layer, arch=cfg.arch)
        else:
            self._staging = [torch.zeros(self.B, 3, *hw(s), dtype=dtype, device=self.device)
                             for s in [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops_number]
        self.loader = self._loader(self.files, cfg.seed, cfg.epoch_length, zero_copy=True,  # ids store: B + C rows
                                   replay_ids=getattr(self.replay, "host_ids", None))
        self.steps_per_epoch = len(self.loader)  # >= 1: multicrop_loader refuses data without a full batch
        log.info("data: %s %s, %d images, %d steps per epoch", cfg.data, cfg.split, len(self.files),
                 self.steps_per_epoch)
        self.dino = DINO(cfg, student, teacher, views=self.views, replay=self.replay, world=self.world,
                         steps_per_epoch=self.steps_per_epoch, batch_size=self.B, device=self.device, amp=self.amp,
                         precision=self.precision)

        self.step = 0
        self.compile_seconds = 0.0
        self.monitor = StepLog(self.out / "log.jsonl", self.device, rank=self.rank, images_per_step=self.B * self.world,
                               max_entropy=float(self.dino.loss.max_entropy), max_bad_steps=cfg.max_bad_steps,
                               tensorboard=self.out / "tb" if cfg.tensorboard else None)
        self.resumed = False
        self._signals: StopSignals | None = None
        self._first = True
        self._continue(resume)

    def _continue(self, resume: str | Path | None) -> None:
        """Remove interrupted checkpoint writes and restore ``resume``, or the run in ``output_dir``."""
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

    # ---- data --------------------------------------------------------------------------------------
    def _loader(self, files: Any, seed: int, epoch_length: int | None, *, sharded: bool = True,
                zero_copy: bool = False, replay_ids: Any = None):
        """A multi-crop loader of this run. ``zero_copy``: DALI's own buffers, in its dtype, for batches
        that :meth:`stage` copies (the one conversion to the crop dtype happens in that copy). Its batches
        carry the clean view the detector scores, if it scores one; ``replay_ids``: the ids store's."""
        return multicrop_loader(files, self.crops, self.B, device=self.device, seed=seed, backend=self.cfg.aug,
                                epoch_length=epoch_length, num_workers=self.cfg.num_workers, zero_copy=zero_copy,
                                clean_view=getattr(self.replay, "embeds", False), replay_ids=replay_ids,
                                **({} if sharded else {"shard_id": 0, "num_shards": 1}))

    @property
    def ring(self) -> RareRing | None:
        """The replay ring (None for plain DINO)."""
        return self.replay.ring if self.replay is not None else None

    def views(self) -> list[torch.Tensor]:
        """The B + C rows per view the model sees (persistent tensors)."""
        return self.replay.views() if self.replay is not None else self._staging

    def stage(self, views: list[torch.Tensor], index: torch.Tensor, boxes: torch.Tensor | None = None) -> None:
        """Copy a loader batch into the persistent rows (:meth:`Replay.stage` with a ring)."""
        if self.replay is not None:
            self.replay.stage(views, index, boxes)
        else:
            for dst, src in zip(self._staging, views):
                dst.copy_(src, non_blocking=True)

    # ---- before training: calibration and warm-up -------------------------------------------------
    @torch.no_grad()
    def calibrate(self) -> None:
        """Fit the detector's statistics and threshold on ``calib_size`` images (or ``calib_frac``).

        Every process calibrates on the same images (the first of a seeded permutation), so their
        statistics agree without communication. The embeddings are those training scores: the clean
        views, the scoring module in eval mode (:meth:`Replay.calibrate_on`).
        """
        if self.replay is None or not self.replay.needs_calibration:
            return
        cfg = self.cfg
        n = round(cfg.calib_frac * len(self.files)) if cfg.calib_frac else cfg.calib_size
        n = max(self.B, min(n, len(self.files)))
        pick = np.random.default_rng(cfg.seed).permutation(len(self.files))[:n]
        subset = [self.files.images[i] for i in sorted(pick)]
        log.info("calibrating on %d images", n)
        self.replay.calibrate_on(lambda: self._loader(subset, cfg.seed + 1, None, sharded=False), self.dino.teacher,
                                 self.device)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Fill the ring before training, as the paper does (:meth:`Replay.warm_up`)."""
        if self.replay is None:
            return
        self.replay.warm_up(self._loader(self.files, self.cfg.seed + 2, self.cfg.epoch_length, zero_copy=True),
                            teacher=self.dino.teacher,
                            refill=lambda: self._loader(self.files, self.cfg.seed + 3, None, zero_copy=True))

    # ---- the loop ----------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        total = self.dino.schedules.total_steps
        return total if self.cfg.max_steps is None else min(self.cfg.max_steps, total)

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
        if not self.resumed:
            self.calibrate()
            self.warm_up()
        total = self.total_steps
        if self.step >= total:
            log.warning("the run in %s is complete (%d steps): nothing to do; raise --max-steps, or use a new "
                        "--output_dir for another run", self.out, self.step)
        self.monitor.restart()
        self._first = True
        for epoch in range(self.step // self.steps_per_epoch, self.cfg.epochs):
            if self.step >= total:
                break
            signum = self.runtime.agree_on_signal(stop.signum)  # a signal during calibration, warm-up or an epoch's end
            if signum:
                self._stop(stop, epoch, signum)
            self._epoch(epoch, stop, total)
            if self.step % self.steps_per_epoch == 0 or self.step >= total:
                self.save(epoch)
        summary = {"steps": self.step, "epochs_done": self.step / self.steps_per_epoch, "first": self.monitor.first,
                   "last": self.monitor.last, "seconds": round(self.monitor.seconds, 1),
                   "compile_seconds": round(self.compile_seconds, 1), "checkpoint": str(self.out / "checkpoint.pth"),
                   "log": str(self.monitor.path), "log_txt": str(self.monitor.dino_log)}
        if self.rank == 0:  # buffer.png, curves.png and the collapse warning
            summary.update(run_pictures(self.out, read_log(self.monitor.path), self.ring, mean=self.crops.mean,
                                        std=self.crops.std, images=self.files.images, masks=self.files.masks))
        return summary

    def _epoch(self, epoch: int, stop: StopSignals, total: int) -> None:
        """The steps of ``epoch`` not done yet (all of them unless resuming inside it), up to ``total``."""
        from tqdm.auto import tqdm

        skip = self.step - epoch * self.steps_per_epoch  # > 0: resuming inside this epoch
        if self.replay is not None and self.replay.follows_teacher and epoch > 0 and skip == 0:
            self.calibrate()  # the teacher has moved: refresh the statistics at every epoch start
        self.loader.set_epoch(epoch)
        self.monitor.bar = bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}", unit="step",
                                      disable=not self.progress, dynamic_ncols=True)
        if skip == 0:  # a partial epoch resumed from a checkpoint keeps the losses of its steps before the stop
            self.monitor.epoch_losses = []
        for i, batch in enumerate(self.loader):
            if i < skip:
                continue
            if self.step >= total:
                break
            t0 = time.perf_counter()
            self.stage(batch.views, batch.index, batch.boxes)
            self.run_step(epoch, stop, log=self.step % self.cfg.log_every == 0 or self.step == total - 1,
                          timed=not self._first)
            if self._first:  # the first step of a process compiles: timed apart from the steady state
                self.monitor.settle()
                self.compile_seconds, self._first = time.perf_counter() - t0, False
                self.monitor.start_timer()
            self.step += 1
            bar.update()
            # The step before this one is read now (its copy to the host has long been started).
            signum = self.monitor.settle(keep=1)
            if not signum and self.world == 1:
                signum = stop.signum or 0  # one process: the signal itself, no agreement needed
            if signum and self.step % self.steps_per_epoch:
                self._stop(stop, epoch, signum)
        self.monitor.settle()
        bar.close()
        done = slice(epoch * self.steps_per_epoch, max(self.step, epoch * self.steps_per_epoch + 1))
        self.monitor.epoch_end(epoch, self.step, lr=float(np.mean(self.dino.schedules.lr[done])),
                               wd=float(np.mean(self.dino.schedules.weight_decay[done])))

    def run_step(self, epoch: int = 0, stop: StopSignals | None = None, *, log: bool = False,
                 timed: bool = True) -> None:
        """One training step on the staged rows (:meth:`DINO.run_step`), enqueued without a host
        synchronisation; its scalars reach the host later (``monitor.settle``). ``self.step`` is not
        advanced here."""
        scalars, values = self.dino.run_step(self.step, epoch, signum=stop.signum if stop is not None else None,
                                             monitor=log)
        self.monitor.push({"step": self.step, "epoch": epoch, "log": log, "timed": timed, "values": values}, scalars)

    def _stop(self, stop: StopSignals, epoch: int, signum: int) -> None:
        """Checkpoint this step (rank 0; the other ranks wait for it) and raise TrainingInterrupted."""
        stop.deferring = True  # a second signal now would kill the process mid-write: it waits
        self.monitor.settle()  # the last step's loss belongs to the checkpoint's partial epoch
        self.save(epoch, numbered=False)  # mid-epoch or not, checkpoint.pth holds this step
        self.runtime.barrier()  # no rank exits (and makes torchrun kill rank 0) before the checkpoint is written
        name = signal.Signals(signum).name
        self.monitor.write({"step": self.step, "epoch": epoch, "event": "interrupted", "signal": name})
        ckpt = self.out / "checkpoint.pth"
        raise TrainingInterrupted(f"{name}: stopped after step {self.step} of {self.dino.schedules.total_steps}; "
                                  f"{ckpt} holds it: continue with --resume {ckpt}", signum, ckpt)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint dict (DINO's keys plus ours), from the uncompiled modules.

        DINO's ``epoch`` is the epoch to start from: the next one after a complete epoch, the current
        one again after a partial epoch (oodfast resumes from ``step``, mid-epoch included).
        """
        return {**self.dino.state_dict(), "epoch": self.step // self.steps_per_epoch, "args": self.cfg.to_dict(),
                "step": self.step, "config": self.cfg.to_dict(), **self._own_state()}

    def _own_state(self) -> dict[str, Any]:
        """What differs between DDP ranks: this rank's buffer, detector, RNG and partial epoch's losses
        (the checkpoint's top level holds rank 0's; under DDP ``ranks`` holds every rank's)."""
        replay = self.replay.state_dict() if self.replay is not None else {"ring": None, "detector": None}
        partial = self.step % self.steps_per_epoch
        return {**replay, "rng": rng_state(), "epoch_losses": list(self.monitor.epoch_losses) if partial else []}

    def save(self, epoch: int, numbered: bool = True) -> None:
        """checkpoint.pth (rank 0); with ``numbered``, also checkpointNNNN.pth at the end of every
        ``saveckp_freq``-th epoch (never for a partial epoch). Every rank calls it: under DDP each
        rank's own state (:meth:`_own_state`) is gathered into the checkpoint's ``ranks``."""
        ranks = self.runtime.gather_to_rank0(to_cpu(self._own_state())) if self.world > 1 else None
        if self.rank != 0:
            return
        state = self.state()
        if ranks is not None:
            state["ranks"] = ranks
        # a second signal waits for the write instead of cutting it short
        with self._signals.deferred() if self._signals is not None else contextlib.nullcontext():
            save_checkpoint(self.out / "checkpoint.pth", state)
            complete = self.step == (epoch + 1) * self.steps_per_epoch
            if numbered and complete and self.cfg.saveckp_freq and (epoch + 1) % self.cfg.saveckp_freq == 0:
                save_checkpoint(self.out / f"checkpoint{epoch + 1:04}.pth", state)

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        check_same_run(ckpt.get("config"), self.cfg.to_dict(), path)
        self.dino.load_state_dict(ckpt)
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
        self.monitor.epoch_losses = [float(v) for v in mine.get("epoch_losses", [])]
        set_rng_state(mine["rng"])
        self.resumed = True
        log.info("resumed at step %d (epoch %d)", self.step, self.step // self.steps_per_epoch)
