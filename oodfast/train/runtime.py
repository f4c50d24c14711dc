"""Where and how a training process runs: its device, its process group, its stop signals.

* :class:`Runtime` (``Runtime.start(device)``): the device of this process (:func:`oodfast.devices.
  resolve_device`: under torchrun an unindexed ``cuda`` is the GPU of LOCAL_RANK) and, under
  torchrun, the process group (NCCL on CUDA, gloo on the CPU), with the few collectives the loop
  needs outside the step: agreeing on a stop signal, a barrier, gathering per-rank state to rank 0.
* :func:`broadcast_from_rank0_`: every rank starts from rank 0's weights (as DDP's constructor does).
* :class:`StopSignals`: SIGTERM / SIGINT deferred until the step is done and checkpointed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from oodfast.devices import NoGPUError, default_device, resolve_device

__all__ = ["NoGPUError", "Runtime", "StopSignals", "broadcast_from_rank0_", "default_device",
           "init_distributed", "resolve_device"]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun (NCCL on CUDA, gloo on CPU).

    Outside torchrun (no ``WORLD_SIZE`` > 1) this is (0, 1) and nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def broadcast_from_rank0_(module: nn.Module) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's, in place (DDP's constructor does
    this); a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


@dataclass(frozen=True)
class Runtime:
    """This process's device, rank and world size (1 outside torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, device: str | torch.device | None = None) -> Runtime:
        """Resolve ``device`` (default: CUDA when available), pin this process to its GPU before NCCL
        starts, and join the process group under torchrun.

        Raises:
            NoGPUError: CUDA asked for where torch sees none.
        """
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before NCCL starts: one GPU per process
        rank, world = init_distributed(dev)
        return cls(dev, rank, world)

    def agree_on_signal(self, signum: int | None) -> int:
        """The signal any rank got, or 0: one all-reduce under torchrun, so every rank takes the same
        decision. For between epochs only; within an epoch the flags ride in the gradient all-reduce."""
        signum = signum or 0
        if self.world > 1:
            flags = torch.tensor([signum], dtype=torch.int64, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum = int(flags[0])
        return signum

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world > 1:
            dist.barrier()

    def gather_to_rank0(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable, on the CPU) as a list on rank 0; None elsewhere, and in one
        process."""
        if self.world == 1:
            return None
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


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

    @contextlib.contextmanager
    def deferred(self):
        """While entered, a second signal waits instead of stopping the process (a checkpoint write)."""
        before, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = before

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
