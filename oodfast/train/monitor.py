"""What a run reports: steps' scalars read a step late, the JSON-lines log, DINO's ``log.txt``,
TensorBoard, the progress bar.

A step's loss, skip flag and signals (and, on log steps, its monitoring scalars) are 0-d device
tensors; :class:`Readout` copies them to pinned host memory behind an event, and :class:`StepLog`
reads them once the next step is enqueued, so the host never drains the device. ``max_bad_steps``
skipped steps in a row raise :class:`TrainingDiverged`.
"""

from __future__ import annotations

import collections
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Several consecutive non-finite losses: the run stopped; the last checkpoint is intact."""


class Readout:
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
            raise RuntimeError("Readout.push: too many steps pending; pop them first")
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


class StepLog:
    """The log of one run: reads the steps' scalars a step late and acts on them.

    Args:
        path: the JSON-lines log (``output_dir/log.jsonl``); written by rank 0 only (``write``). Beside it,
            ``log.txt`` gets one line per epoch with facebookresearch/dino's keys (``train_loss``,
            ``train_lr``, ``train_wd``, ``epoch``), which DINO's tooling reads.
        device: where the steps run (the readout's pinned memory on CUDA).
        images_per_step: images all ranks train on per step (B x world), for images/s.
        max_entropy: the teacher's maximal entropy (log K), for ``entropy_ratio``.
        max_bad_steps: skipped steps in a row before :class:`TrainingDiverged`.
        tensorboard: a folder for TensorBoard scalars (rank 0), or None.
    """

    def __init__(self, path: Path, device: torch.device, *, rank: int = 0, images_per_step: int,
                 max_entropy: float, max_bad_steps: int, tensorboard: Path | None = None) -> None:
        self.path, self.rank = path, rank
        self.images_per_step, self.max_entropy, self.max_bad_steps = images_per_step, max_entropy, max_bad_steps
        self.readout = Readout(device)
        self.tb = None
        if tensorboard is not None and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'oodfast[tensorboard]'") from None
            self.tb = SummaryWriter(str(tensorboard))
        self.epoch_losses: list[float] = []  # this epoch's step losses so far (checkpointed mid-epoch)
        self.bar: Any = None
        self.restart()

    def restart(self) -> None:
        """Forget the counters of an earlier :meth:`Trainer.train` (not the epoch's losses)."""
        self.bad_in_row, self.images_seen, self.first, self.last = 0, 0, {}, {}
        self.start_timer()

    def start_timer(self) -> None:
        """Images/s count from now (after the first, compiling step)."""
        self.t_start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t_start

    def push(self, meta: dict[str, Any], scalars: dict[str, torch.Tensor]) -> None:
        """A step's ``meta`` (step, epoch, log, timed, values) and device ``scalars``, read later."""
        self.readout.push(meta, scalars)

    def settle(self, *, keep: int = 0) -> int:
        """Act on the scalars of the pending steps but the newest ``keep``: count a skipped step (and stop
        the run after ``max_bad_steps`` in a row), keep the loss, write the log record. Returns the
        signal the ranks agreed on in those steps (0: none)."""
        signum = 0
        for meta, v in self.readout.pop(keep):
            signum = max(signum, self._settle_step(meta, v))
        return signum

    def _settle_step(self, meta: dict[str, Any], v: dict[str, float]) -> int:
        step, epoch = meta["step"], meta["epoch"]
        if v["skipped"]:
            self.bad_in_row += 1
            log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", step, v["loss"], self.bad_in_row)
            self.write({"step": step, "epoch": epoch, "event": "non_finite_loss", "loss": str(v["loss"])})
            if self.bad_in_row >= self.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_in_row} consecutive non-finite losses at step {step}; stopped. The last "
                    f"checkpoint in {self.path.parent} is intact: lower --lr, raise --warmup_epochs or check the "
                    "data, then --resume it")
        else:
            self.bad_in_row = 0
            if meta["timed"]:
                self.images_seen += self.images_per_step
            self.epoch_losses.append(v["loss"])
            if meta["log"]:
                self.last = self._record(step, epoch, v, meta["values"])
                self.first = self.first or self.last
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{v['loss']:.3f}", img_s=f"{self.last['images_per_s']:.1f}",
                                         flag=f"{self.last.get('flag_rate', 0):.3f}", buf=self.last.get("buffer", 0))
        if v["sigterm"] > 0:
            return int(signal.SIGTERM)
        return int(signal.SIGINT) if v["sigint"] > 0 else 0

    def _record(self, step: int, epoch: int, v: dict[str, float], values: dict[str, float]) -> dict[str, Any]:
        seconds, images = self.seconds, self.images_seen
        rec: dict[str, Any] = {"step": step, "epoch": epoch, "loss": v["loss"], **values,
                               "teacher_entropy": v["teacher_entropy"],
                               "entropy_ratio": v["teacher_entropy"] / self.max_entropy,
                               "images_per_s": images / seconds if seconds > 0 and images else 0.0}
        if "flag_rate" in v:  # a run with a replay buffer
            rec.update(flag_rate=v["flag_rate"], threshold=v["threshold"], buffer=int(v["buffer"]),
                       nonfinite=int(v["nonfinite"]))
        self.write(rec)
        if self.tb is not None:
            for key, value in rec.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, step)
        return rec

    @property
    def dino_log(self) -> Path:
        return self.path.parent / "log.txt"

    def epoch_end(self, epoch: int, step: int, *, lr: float, wd: float) -> None:
        """The epoch's record: its mean loss and the last logged scalars (if any step of it was kept),
        and DINO's line in ``log.txt`` (``lr`` / ``wd``: the epoch's mean learning rate and weight decay,
        as DINO's metric logger averages them)."""
        if self.epoch_losses:
            loss = float(np.mean(self.epoch_losses))
            scalars = {k: v for k, v in self.last.items() if k not in ("step", "epoch", "loss")}
            self.write({**scalars, "epoch": epoch, "event": "epoch_end", "step": step, "loss": loss})
            if self.rank == 0:
                with open(self.dino_log, "a") as f:
                    f.write(json.dumps({"train_loss": loss, "train_lr": lr, "train_wd": wd, "epoch": epoch}) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the log (rank 0)."""
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
