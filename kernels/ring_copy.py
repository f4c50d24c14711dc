"""ring_copy: copy the crops of flagged rows (every view) into their ring slots, in one launch.

After :mod:`oodfast.kernels.rare_enqueue` has given each surviving row its ring slot (``slots[b]``,
-1 for rows that are not enqueued), this op performs, for every view v of every group::

    dst[v, slots[b]] = src[v, b]        for each b with slots[b] >= 0

Views are grouped by resolution (DINO's 2 global views at 224 px, N local views at 96 px): a group is
a pair ``src`` [V, B, *crop] and ``dst`` [V, C, *crop] of one dtype, any strides on the first two
dimensions and a contiguous crop. Up to two groups go in one launch (grid: rows x views of both
groups); a program whose row has no slot returns after one load, so the cost is the bytes of the
flagged rows' crops, not of the batch. The trainer keeps ``src`` and ``dst`` as the head and tail rows
of one persistent batch tensor per group ([V, B + C, *crop]), so the mixed batch of B + C rows
needs no concatenation.

No host synchronisation: which rows are copied is decided on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from oodfast.kernels._op import LaunchConfig, check_tensor, dispatch, kernel_op


@triton.jit
def _copy_row(src_ptr, dst_ptr, src_sv, src_sb, dst_sv, dst_sc, v, b, slot, E, BLOCK: tl.constexpr):
    src = src_ptr + (tl.zeros([], tl.int64) + v) * src_sv + (tl.zeros([], tl.int64) + b) * src_sb
    dst = dst_ptr + (tl.zeros([], tl.int64) + v) * dst_sv + (tl.zeros([], tl.int64) + slot) * dst_sc
    for e0 in range(0, E, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        m = offs < E
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def _ring_copy_kernel(
    slots_ptr,
    src0_ptr, dst0_ptr, src0_sv, src0_sb, dst0_sv, dst0_sc, V0, E0,
    src1_ptr, dst1_ptr, src1_sv, src1_sb, dst1_sv, dst1_sc, E1,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    v = tl.program_id(1)
    slot = tl.load(slots_ptr + b)
    if slot >= 0:
        if v < V0:
            _copy_row(src0_ptr, dst0_ptr, src0_sv, src0_sb, dst0_sv, dst0_sc, v, b, slot, E0, BLOCK)
        else:
            _copy_row(src1_ptr, dst1_ptr, src1_sv, src1_sb, dst1_sv, dst1_sc, v - V0, b, slot, E1, BLOCK)


def launch_config(B: int, V: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch of :func:`ring_copy` for B batch rows, V views in all and crops of ``dtype``.

    Grid (B, V): one program per (row, view); a program whose row has no slot returns after one load.
    BLOCK = 4096 elements per iteration over 8 warps: 16 per thread (two to four 16-byte vectors),
    8 KiB (16-bit) / 16 KiB (fp32) per program step, a 224 x 224 x 3 crop in 37 iterations. ptxas:
    40 registers, no spills, on sm_90a and sm_80. The old 4096 over 4 warps (32 per thread) spilled
    32 B on sm_90a, and 8192 16-bit elements over 8 warps spilled 64 B on sm_90a for a crop size that
    is not a multiple of 16 (every element then has its own mask predicate).
    """
    return LaunchConfig("_ring_copy_kernel", (B, V), dict(BLOCK=4096), num_warps=8, num_stages=1)


def _check_group(i: int, src: torch.Tensor, dst: torch.Tensor, B: int, device: torch.device) -> None:
    s, d = f"src{i}", f"dst{i}"
    for name, t in ((s, src), (d, dst)):
        check_tensor(name, t, min_ndim=3, device=device, device_of="slots", expect="a [V, rows, *crop] tensor")
        if t.shape[0] and t.shape[1] and not t[0, 0].is_contiguous():
            raise ValueError(f"{name}'s crops (dims 2..) must be contiguous; got strides {t.stride()}")
    if src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        raise ValueError(f"{s} {list(src.shape)} and {d} {list(dst.shape)} must agree on views and crop shape")
    if src.dtype != dst.dtype:
        raise ValueError(f"{s} ({src.dtype}) and {d} ({dst.dtype}) must have one dtype")
    if src.shape[1] != B:
        raise ValueError(f"{s} must have B = {B} rows (one per slot entry), got {src.shape[1]}")


def validate(slots: torch.Tensor, src0: torch.Tensor, dst0: torch.Tensor,
             src1: torch.Tensor | None, dst1: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument whose device, dtype, shape or layout is wrong."""
    check_tensor("slots", slots, ndim=1, dtypes=(torch.int32,), expect="an int32 [B] tensor")
    B = slots.shape[0]
    _check_group(0, src0, dst0, B, slots.device)
    if (src1 is None) != (dst1 is None):
        raise ValueError("src1 and dst1 go together: pass both or neither")
    if src1 is not None:
        _check_group(1, src1, dst1, B, slots.device)


def _launch(slots, src0, dst0, src1, dst1) -> None:
    B = slots.shape[0]
    if src1 is None:  # a second group with no views: the grid never reaches it
        src1, dst1 = src0[:0], dst0[:0]
    V = src0.shape[0] + src1.shape[0]
    if B == 0 or V == 0:
        return
    cfg = launch_config(B, V, src0.dtype)
    wrap_triton(_ring_copy_kernel)[cfg.grid](
        slots,
        src0, dst0, src0.stride(0), src0.stride(1), dst0.stride(0), dst0.stride(1), src0.shape[0], src0[0, 0].numel(),
        src1, dst1, src1.stride(0), src1.stride(1), dst1.stride(0), dst1.stride(1), src1[0, 0].numel() if src1.shape[0] else 0,
        **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def ring_copy_torch(slots: torch.Tensor, src0: torch.Tensor, dst0: torch.Tensor,
                    src1: torch.Tensor | None = None, dst1: torch.Tensor | None = None) -> None:
    """The torch path, static shapes and no host sync (torch.compile traces it with fullgraph): each
    ring slot c takes the row b with ``slots[b] == c`` (at most one), or keeps its contents."""
    for src, dst in ((src0, dst0), (src1, dst1)):
        if src is None or dst.shape[1] == 0 or slots.shape[0] == 0:
            continue
        hit = slots.long()[None, :] == torch.arange(dst.shape[1], device=slots.device)[:, None]  # [C, B]
        has = hit.any(1).view(1, -1, *([1] * (dst.dim() - 2)))
        dst.copy_(torch.where(has, src[:, hit.long().argmax(1)], dst))


def _ring_copy_body(slots: torch.Tensor, src0: torch.Tensor, dst0: torch.Tensor,
                    src1: torch.Tensor | None, dst1: torch.Tensor | None) -> None:
    # With a GPU this is a triton_op, whose body torch.compile traces for every device, bypassing
    # register_kernel("cpu"): dispatch sends CPU tensors to the torch path (static metadata only).
    dispatch("auto", slots.device, triton_path=lambda: _launch(slots, src0, dst0, src1, dst1),
             torch_path=lambda: ring_copy_torch(slots, src0, dst0, src1, dst1))


_ring_copy_op = kernel_op("oodfast::ring_copy", mutates_args=("dst0", "dst1"))(_ring_copy_body)
_ring_copy_op.register_kernel("cpu")(ring_copy_torch)
# Mutation only, no outputs; explicit so tracing never runs Triton's interpreter on fake tensors.
_ring_copy_op.register_fake(lambda *args: None)


def ring_copy(slots: torch.Tensor, src0: torch.Tensor, dst0: torch.Tensor,
              src1: torch.Tensor | None = None, dst1: torch.Tensor | None = None, *, backend: str = "auto") -> None:
    """Copy ``src{g}[:, b]`` to ``dst{g}[:, slots[b]]`` for every ``b`` with ``slots[b] >= 0``, in place.

    Args:
        slots: int32 [B] ring slot per batch row, -1 for rows not enqueued (rare_enqueue's output).
        src0, dst0: first group, [V0, B, *crop] and [V0, C, *crop] (e.g. the global views).
        src1, dst1: optional second group (e.g. the local views).
        backend: ``"auto"`` (CUDA tensors: Triton; others: the torch path), ``"triton"`` (needs
            TRITON_INTERPRET=1 on CPU), ``"torch"``.
    """
    if not torch.compiler.is_compiling():
        validate(slots, src0, dst0, src1, dst1)
    args = (slots, src0, dst0, src1, dst1)
    dispatch(backend, slots.device, op=lambda: torch.ops.oodfast.ring_copy(*args),
             triton_path=lambda: _launch(*args), torch_path=lambda: ring_copy_torch(*args))
