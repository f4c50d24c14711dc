"""GradientSync: data parallelism for the compiled DINO step, one flat gradient all-reduce.

Why not ``DistributedDataParallel``: the step is compiled with ``torch.compile(fullgraph=True)``, and
dynamo cannot trace ``DistributedDataParallel.forward`` (its reducer is a C++ object driven from
Python hooks: "Unsupported method call"); compiling around DDP instead needs graph breaks at bucket
boundaries (DDPOptimizer), which ``fullgraph=True`` forbids. So the student is a plain module, and
:class:`GradientSync` does what DDP's reducer does, after backward rather than overlapped with it:

* every gradient is a view into one flat fp32 buffer (DDP's ``gradient_as_bucket_view``), so autograd
  accumulates straight into it and the average over ranks is ONE all-reduce per step, issued from
  eager code after ``backward()`` (asynchronous on the GPU with NCCL; no host synchronisation);
* a few further slots ride along in the same all-reduce: the step's non-finite flag, the signals a
  rank received, and the DINO loss's batch centre, so the ranks agree on skipping, stopping and the
  centre without another collective;
* :func:`oodfast.train.runtime.broadcast_from_rank0_` gives every rank rank 0's parameters and buffers
  before training, as DDP's constructor does.

Compared with DDP this gives up the overlap of communication with the backward pass (for ResNet-50,
100 MB of fp32 gradients: about a millisecond on NVLink) and gains a step that compiles whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradientSync"]


class GradientSync:
    """The gradients of ``params`` as views into one flat fp32 buffer, averaged over ranks in one all-reduce.

    Args:
        params: the trainable parameters (those with ``requires_grad``), fp32, on one device.
        extra: further fp32 slots after the gradients (``self.extra``, [extra]) that join the same
            all-reduce and come out as the mean over ranks.
        world: the number of processes (1: no communication; the buffer still serves as the gradients).

    Per step: :meth:`zero_` before ``backward()`` (zeroes the buffer and re-attaches any ``.grad`` that
    was replaced or set to None, e.g. by a frozen last layer), then :meth:`all_reduce_` after it. Each
    view has its parameter's strides (a channels_last conv weight gets a channels_last gradient), as
    autograd's layout contract expects.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, extra: int = 0, world: int = 1) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientSync: no parameter requires a gradient")
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) != 1 or dtypes != {torch.float32}:
            raise ValueError(f"GradientSync: parameters must be fp32 on one device, got {dtypes} on {devices}")
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + extra, dtype=torch.float32, device=devices.pop())
        self.grads: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            # A dense parameter spans exactly numel() elements whatever its strides.
            self.grads.append(self.flat[offset : offset + p.numel()].as_strided(p.shape, p.stride()))
            offset += p.numel()
        self.extra = self.flat[n:]
        self.world = world
        self._op = None
        if world > 1:
            # NCCL averages in the collective; gloo has no AVG: sum, then one division.
            self._op = dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM

    def zero_(self) -> None:
        """Zero every gradient (one fill of the buffer) and point each ``.grad`` at its view."""
        self.flat.zero_()
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def all_reduce_(self) -> None:
        """Average the gradients and the extra slots over ranks, in place (one collective)."""
        if self.world == 1:
            return
        dist.all_reduce(self.flat, op=self._op)
        if self._op == dist.ReduceOp.SUM:
            self.flat.div_(self.world)
