"""kNN OOD score (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors").

For an embedding ``x`` and a bank of L2-normalised calibration embeddings ``b_1 .. b_N``::

    x_hat = x / ||x||
    s_k   = k-th largest of  <x_hat, b_j>,  j = 1..N
    score = ||x_hat - b_(k)|| = sqrt(max(2 - 2 * s_k, 0))        (higher = rarer)

since ``||x_hat - b||^2 = 2 - 2 cos`` for unit vectors. Rows of ``x`` that contain a NaN/inf or are all
zero score NaN (callers never enqueue NaN; nothing raises on the hot path).

Layout of this file (top to bottom): the Triton kernels, the launcher (validation, block sizes, grid),
the torch path (pure torch), the custom-op registration and the public entry point ``knn_score``.

How the Triton path finds the k-th largest similarity without ever materialising ``B x N``:

* A program owns ``BLOCK_B`` query rows and one contiguous slice of the bank (a *split*). It walks its
  slice ``BLOCK_N`` bank rows at a time; each tile's similarities ``[BLOCK_B, BLOCK_N]`` come from
  ``tl.dot`` over ``BLOCK_D`` chunks of the feature dimension with fp32 accumulation.
* Each program keeps, per query row, a running buffer of ``KPAD = next_pow2(k)`` similarities sorted
  in descending order, whose first ``k`` entries are always exactly the ``k`` largest similarities seen
  so far. Merging a tile: ``tl.topk(sims, KPAD)`` (bitonic top-k, sorted descending), then the
  bitonic-merge identity ``top_KPAD(a U b) = max(a, reverse(b))`` for two descending sequences (the
  result is bitonic), re-sorted with ``tl.bitonic_merge``: log2(KPAD) compare-exchange rounds instead of
  a full sort of 2*KPAD values.
* A tile in which no similarity exceeds the current k-th largest of any row in the block cannot change
  any row's top-k, so it is skipped (a uniform per-program branch on device values, no host sync). For
  a bank in random order a tile at slice position n is merged with probability about
  1 - exp(-BLOCK_B * k * BLOCK_N / n): the skip pays off on long slices (n >> 64 * 50 * 128 = 410K
  rows); before that nearly every tile pays one bitonic top-k of [BLOCK_B, BLOCK_N], estimated (not yet
  measured) at the same order as the tile's tl.dot, and hidden behind bank loads when few query
  blocks share the bank (the memory-bound small-batch case).
* With one split the program writes the score directly. With ``S > 1`` splits (small batches need
  them to fill the GPU: ``cdiv(B, BLOCK_B)`` programs alone would leave most SMs idle) every program
  writes its sorted buffer to a ``[S, B, KPAD]`` fp32 workspace and a second tiny kernel merges the S
  buffers per row the same way and writes the score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from oodfast.kernels._op import LaunchConfig, check_backend, check_tensor, dispatch, kernel_op, num_sms

__all__ = ["check_bank_normalized", "knn_score", "knn_score_torch", "normalize_bank"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The Triton path keeps KPAD = next_pow2(k) floats per query row in registers for the running buffer
# and sorts tiles of max(128, KPAD) similarities; beyond 256 that no longer fits the register file
# alongside the dot accumulator. backend="auto" takes the torch path for larger k.
_MAX_KPAD = 256


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _merge_desc(top, cand, KPAD: tl.constexpr):
    """The KPAD largest of ``top`` U ``cand``, sorted descending; both inputs [R, KPAD] sorted descending."""
    if KPAD == 1:
        merged = tl.maximum(top, cand)
    else:
        # max(a_i, b_{KPAD-1-i}) holds exactly the KPAD largest of a U b, as a bitonic sequence.
        merged = tl.bitonic_merge(tl.maximum(top, tl.flip(cand, 1)), descending=True)
    return merged


@triton.jit
def _kth_of(top, cols, k):
    """Entry ``k - 1`` of each row of the sorted buffer ``top`` [R, KPAD] -> [R]."""
    return tl.sum(tl.where(cols[None, :] == k - 1, top, 0.0), axis=1)


@triton.jit(do_not_specialize=["write_partial"])  # 0 and 1 share one compiled kernel
def _knn_topk_kernel(
    x_ptr,  # [B, D] fp32/bf16/fp16, any strides, not normalised
    bank_ptr,  # [N, D] fp32/bf16/fp16, any strides, rows L2-normalised
    out_ptr,  # [B] fp32: the score (one split) or 0 / NaN validity flags (several splits)
    ws_ptr,  # [S, B, KPAD] fp32 partial top-KPAD buffers (only touched when WRITE_PARTIAL)
    B,
    N,
    D,
    k,
    rows_per_split,  # bank rows per split, a multiple of BLOCK_N
    stride_xb,
    stride_xd,
    stride_bn,
    stride_bd,
    stride_out,
    write_partial,  # 1: several splits, write the sorted buffer to ws; 0: write the score (a runtime
    # flag, uniform per launch: one compiled kernel for both, half the configurations to compile)
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KPAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)  # query block: fastest-varying, so programs sharing a bank slice run together (L2 reuse)
    pid_s = tl.program_id(1)  # bank split
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, KPAD)
    # int64 offsets: a 1M x 2048 bank has 2^31 elements.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xb

    # ---- pass over D: squared norm and finiteness of each query row --------------------------------
    sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK_B], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        xc = tl.load(x_rows + d[None, :] * stride_xd, mask=row_mask[:, None] & (d < D)[None, :], other=0.0)
        xc = xc.to(tl.float32)
        sumsq += tl.sum(xc * xc, axis=1)
        bad = (xc != xc) | (tl.abs(xc) == float("inf"))
        nonfinite = tl.maximum(nonfinite, tl.max(bad.to(tl.int32), axis=1))
    valid = (nonfinite == 0) & (sumsq > 0.0)
    # Invalid rows get x_hat = 0 (finite similarities); their score is overwritten with NaN at the end.
    inv_norm = tl.where(valid, 1.0 / tl.sqrt_rn(tl.where(valid, sumsq, 1.0)), 0.0)

    # ---- one pass over this program's bank slice, running top-KPAD per query row ---------------------
    top = tl.full([BLOCK_B, KPAD], float("-inf"), dtype=tl.float32)
    kth = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    n_begin = pid_s * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        b_rows = bank_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            xc = tl.load(x_rows + d[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            # Normalise before the cast so a large-magnitude fp32 x cannot overflow a 16-bit bank dtype;
            # the `where` (not a multiply by 0) keeps an inf in an invalid row from turning into NaN.
            xh = tl.where(valid[:, None], xc.to(tl.float32), 0.0) * inv_norm[:, None]
            bt = tl.load(b_rows + d[None, :] * stride_bd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            acc = tl.dot(xh.to(bt.dtype), tl.trans(bt), acc, input_precision=INPUT_PRECISION)
        sims = tl.where(n_mask[None, :], acc, float("-inf"))
        # Exact skip: values <= a row's current k-th largest can never enter its final top-k.
        if tl.max(tl.max((sims > kth[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            top = _merge_desc(top, tl.topk(sims, KPAD), KPAD)
            kth = _kth_of(top, cols, k)

    if write_partial != 0:
        ws = ws_ptr + (pid_s.to(tl.int64) * B + rows)[:, None] * KPAD + cols[None, :]
        tl.store(ws, top, mask=row_mask[:, None])
        # Split 0 hands the validity of each row to the merge kernel through `out` (0 or NaN).
        if pid_s == 0:
            tl.store(out_ptr + rows * stride_out, tl.where(valid, 0.0, float("nan")), mask=row_mask)
    else:
        score = tl.sqrt_rn(tl.maximum(2.0 - 2.0 * kth, 0.0))
        tl.store(out_ptr + rows * stride_out, tl.where(valid, score, float("nan")), mask=row_mask)


@triton.jit
def _knn_merge_kernel(
    ws_ptr,  # [S, B, KPAD] fp32, each row sorted descending
    out_ptr,  # [B] fp32: in 0 / NaN validity flags, out scores
    B,
    k,
    num_splits,
    stride_out,
    BLOCK_B: tl.constexpr,
    KPAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cols = tl.arange(0, KPAD)
    top = tl.full([BLOCK_B, KPAD], float("-inf"), dtype=tl.float32)
    # Pointer increments (64-bit) rather than s * B * KPAD offsets, which could overflow int32.
    parts = ws_ptr + rows.to(tl.int64)[:, None] * KPAD + cols[None, :]
    for _ in range(num_splits):
        top = _merge_desc(top, tl.load(parts, mask=row_mask[:, None], other=float("-inf")), KPAD)
        parts += B * KPAD
    kth = _kth_of(top, cols, k)
    flag = tl.load(out_ptr + rows * stride_out, mask=row_mask, other=0.0)
    score = tl.sqrt_rn(tl.maximum(2.0 - 2.0 * kth, 0.0))
    tl.store(out_ptr + rows * stride_out, tl.where(flag == flag, score, float("nan")), mask=row_mask)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def _check_inputs(x: Tensor, bank: Tensor, k: int, out: Tensor | None) -> None:
    """Raise ValueError naming the offending argument; metadata only (no host sync, trace-safe)."""
    check_tensor("x", x, ndim=2, dtypes=_DTYPES, expect="a float32, bfloat16 or float16 [B, D] tensor")
    check_tensor("bank", bank, ndim=2, dtypes=_DTYPES, device=x.device,
                 expect="a float32, bfloat16 or float16 [N, D] tensor")
    if x.shape[1] != bank.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} features but bank has D={bank.shape[1]}; they must match")
    if x.shape[1] < 1:
        raise ValueError("x must have at least one feature column (D >= 1)")
    n = bank.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= N (bank rows, N={n}); got k={k!r}")
    if out is not None:
        check_tensor("out", out, dtypes=(torch.float32,), shape=(x.shape[0],), device=x.device)


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _block_sizes(b: int, d: int, k: int, bank_dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, KPAD, num_warps), with the reasons behind each choice.

    Few configurations on purpose: every one is compiled for sm_90a and sm_80 by
    tests/kernels/test_compile.py (real compiler + ptxas, no spills allowed), and each costs seconds.

    * KPAD = max(16, next_pow2(k)): the running buffer; k < 16 costs a 16-wide merge instead of a
      narrower one (small next to the tile's top-k) and saves four configurations.
    * BLOCK_B: query rows per program = the MMA M dimension. 64 amortises each bank tile over many
      queries (bank traffic = N*D*bytes per query block). KPAD > 64: 32 rows (16-bit banks) / 16 rows
      (fp32), else the [BLOCK_B, KPAD] buffer and the sort spill. Small batches use the same tiles
      (the masked rows cost MMA and sort work, not bank traffic; not measured on a GPU yet).
    * BLOCK_N: bank rows per tile = MMA N and the width sorted by tl.topk: max(128, KPAD); 256 for
      fp32 banks at KPAD > 64 (KPAD = 128 with 128-wide tiles spilled 16 B on sm_90a).
    * BLOCK_D: reduction chunk = MMA K. 16-bit banks: 64 (128 bytes, one cache line). fp32 banks
      ("ieee" products, FMA-based): 16 (32 spilled 8-12 B on sm_80 at 255 registers). 3 pipeline
      stages (2 for fp32 at KPAD = 32: see launch_config) stay under 80 KiB of shared memory.
    * num_warps: 8. ptxas -v, sm_90a / sm_80 (tests/kernels/test_compile.py prints the table):
      bf16 KPAD 64 [64 x 128]: 187 / 220 registers; bf16 KPAD 256 [32 x 256]: 248 / 255; fp32
      KPAD 64 [64 x 128, K=16]: 218 on sm_80; fp32 KPAD 128 / 256 [16 x 256, K=16]: 185-194; no
      spills. Smaller blocks at 8 warps can be worse, not better: ptxas then caps itself at 128
      registers (two blocks per SM) and spills (fp32 [32 x 128]: 20-24 B on sm_80; [16 x 256] with
      K=32: 40 B on sm_90a).
    """
    kpad = max(16, _next_pow2(k))
    if bank_dtype == torch.float32:
        block_b, block_n, block_d = (64, 128, 16) if kpad <= 64 else (16, 256, 16)
    else:
        block_b, block_n, block_d = (64 if kpad <= 64 else 32), max(128, kpad), 64
    return block_b, block_n, block_d, kpad, 8


def _num_splits(n_query_blocks: int, n: int, block_n: int, sm_count: int) -> int:
    # Aim for ~2 waves of programs; keep >= 4 tiles per split so the per-program prologue (norm pass)
    # and the partial write stay small against the bank pass.
    want = max(1, (2 * sm_count) // n_query_blocks)
    most = max(1, triton.cdiv(n, 4 * block_n))
    return min(want, most)


def launch_config(b: int, d: int, n: int, k: int, bank_dtype: torch.dtype, sm_count: int,
                  num_splits: int | None = None) -> list[LaunchConfig]:
    """The launches of :func:`_knn_score_triton` for x [b, d], a bank [n, d] of ``bank_dtype`` and
    ``k``, on a device with ``sm_count`` SMs: the top-k pass, then (with several splits) the merge.
    A pure function: tests/kernels/test_compile.py compiles every configuration it returns.
    """
    block_b, block_n, block_d, kpad, num_warps = _block_sizes(b, d, k, bank_dtype)
    n_qb = triton.cdiv(b, block_b)
    splits = num_splits if num_splits is not None else _num_splits(n_qb, n, block_n, sm_count)
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, rows_per_split)  # no empty splits
    # fp32 banks: exact fp32 products (TF32 would cost ~1e-3 in the similarity); 16-bit banks are the
    # fast path (half the bank traffic, tensor cores) and need no flag.
    precision = "ieee" if bank_dtype == torch.float32 else "tf32"
    # 3 pipeline stages, except fp32 banks at KPAD = 32 ([64 x 128] tiles, K = 16): with 3, triton
    # 3.6's ptxas spilled 4 B on sm_90a; 2 stages compile spill-free under triton 3.6 and 3.8.
    stages = 2 if bank_dtype == torch.float32 and kpad == 32 else 3
    topk = LaunchConfig("_knn_topk_kernel", (n_qb, splits),
                        dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, KPAD=kpad,
                             INPUT_PRECISION=precision),
                        num_warps=num_warps, num_stages=stages,
                        params=dict(rows_per_split=rows_per_split, splits=splits, write_partial=int(splits > 1)))
    if splits == 1:
        return [topk]
    # [16, KPAD] buffers: the merge reads S*B*KPAD*4 bytes, negligible next to the bank pass.
    merge_b = 16
    return [topk, LaunchConfig("_knn_merge_kernel", (triton.cdiv(b, merge_b),), dict(BLOCK_B=merge_b, KPAD=kpad),
                               num_warps=4, num_stages=1, params=dict(splits=splits))]


def _knn_score_triton(x: Tensor, bank: Tensor, k: int, out: Tensor, *, num_splits: int | None = None) -> None:
    """Launch the Triton kernels, writing scores into ``out`` [B] fp32. ``num_splits`` forces S (tests)."""
    b, d = x.shape
    n = bank.shape[0]
    if b == 0:
        return
    if _next_pow2(k) > _MAX_KPAD:
        raise ValueError(
            f"k={k} is too large for the Triton kernel (next power of two must be <= {_MAX_KPAD}); "
            "use backend='auto' or 'torch'"
        )
    configs = launch_config(b, d, n, k, bank.dtype, num_sms(x.device), num_splits)
    topk = configs[0]
    splits, kpad = topk.params["splits"], topk.constexprs["KPAD"]
    ws = out if splits == 1 else torch.empty((splits, b, kpad), device=x.device, dtype=torch.float32)
    wrap_triton(_knn_topk_kernel)[topk.grid](
        x, bank, out, ws,
        b, n, d, k, topk.params["rows_per_split"],
        x.stride(0), x.stride(1), bank.stride(0), bank.stride(1), out.stride(0), topk.params["write_partial"],
        **topk.constexprs, num_warps=topk.num_warps, num_stages=topk.num_stages,
    )  # fmt: skip
    for merge in configs[1:]:
        wrap_triton(_knn_merge_kernel)[merge.grid](
            ws, out, b, k, splits, out.stride(0), **merge.constexprs,
            num_warps=merge.num_warps, num_stages=merge.num_stages,
        )


# ------------------------------------------------------------------------------------------------
# The torch path
# ------------------------------------------------------------------------------------------------


def knn_score_torch(x: Tensor, bank: Tensor, k: int = 50, *, tile: int = 65536) -> Tensor:
    """kNN OOD score in pure torch, on any device.

    Args:
        x: [B, D] float32/bfloat16/float16 embeddings (not normalised; normalised here in fp32).
        bank: [N, D] float32/bfloat16/float16 L2-normalised rows (see ``normalize_bank``).
        k: which nearest neighbour, 1 <= k <= N (Sun et al. use 50).
        tile: bank rows per step; memory is O(B * (k + tile)), never B x N.

    Returns:
        [B] float32: ``sqrt(max(2 - 2 s_k, 0))`` with ``s_k`` the k-th largest cosine similarity; NaN for
        rows of ``x`` with a NaN/inf or all zeros. Similarities are computed in fp32.
    """
    _check_inputs(x, bank, k, None)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int; got {tile!r}")
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=1)
    xf = torch.where(finite[:, None], xf, 0.0)
    sumsq = (xf * xf).sum(dim=1)
    valid = finite & (sumsq > 0)
    xhat = xf * torch.where(valid, 1.0 / sumsq.sqrt(), 0.0)[:, None]
    running = xhat.new_empty((x.shape[0], 0))
    for start in range(0, bank.shape[0], tile):
        sims = xhat @ bank[start : start + tile].float().T  # [B, <= tile]
        cand = torch.cat([running, sims], dim=1)
        running = cand.topk(min(k, cand.shape[1]), dim=1).values  # sorted descending
    kth = running[:, k - 1]
    score = (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
    return torch.where(valid, score, float("nan"))


_CHECKED_BANKS: dict[tuple, bool] = {}


def check_bank_normalized(bank: Tensor) -> None:
    """Raise ValueError unless every row of ``bank`` [N, D] has unit L2 norm (to 1e-2 for 16-bit banks,
    1e-4 for fp32). A host sync, done once per bank storage and version (cached)."""
    key = (bank.device, bank.data_ptr(), tuple(bank.shape), tuple(bank.stride()), bank.dtype, bank._version)
    if key in _CHECKED_BANKS:
        return
    norms = torch.linalg.vector_norm(bank.float(), dim=1)
    tol = 1e-4 if bank.dtype == torch.float32 else 1e-2
    bad = ~((norms - 1).abs() <= tol)  # NaN rows are bad too
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"bank rows must be L2-normalised: row {i} has norm {float(norms[i]):.4g} "
                         f"({int(bad.sum())} of {bank.shape[0]} rows are not unit vectors); build the bank "
                         "with normalize_bank(features)")
    if len(_CHECKED_BANKS) > 64:
        _CHECKED_BANKS.clear()
    _CHECKED_BANKS[key] = True


def normalize_bank(features: Tensor) -> Tensor:
    """L2-normalise the rows of ``features`` [N, D] in fp32 -> contiguous [N, D] float32 bank.

    Offline setup, not the hot path: it checks (with a host sync) that no row is zero or non-finite,
    since such a row has no direction. Cast the result to bfloat16 for the fast GPU path (half the
    bank traffic; similarities then carry ~3 significant digits).
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D floating tensor [N, D]; got {getattr(features, 'shape', features)!r}")
    f = features.float()
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    bad = ~(torch.isfinite(norm) & (norm > 0)).squeeze(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"features has {int(bad.sum())} zero or non-finite rows (first: {idx}); drop them before building the bank"
        )
    return (f / norm).contiguous()


# ------------------------------------------------------------------------------------------------
# Custom op: oodfast::knn_score_out (Triton for CUDA tensors, the torch path otherwise); traceable with fullgraph
# ------------------------------------------------------------------------------------------------


def _knn_score_torch_into(x: Tensor, bank: Tensor, k: int, out: Tensor) -> None:
    out.copy_(knn_score_torch(x, bank, k))  # still tiled: never B x N


def _knn_score_out_body(x: Tensor, bank: Tensor, k: int, out: Tensor) -> None:
    _check_inputs(x, bank, k, out)
    # With a GPU this is a triton_op, whose body torch.compile traces (decomposes) for every device,
    # bypassing register_kernel("cpu"): dispatch sends CPU tensors, and a k beyond the kernel's
    # register budget, to the torch path (static metadata only), never into a Triton launch Inductor
    # cannot codegen for CPU.
    dispatch("auto", x.device, triton_fits=_next_pow2(k) <= _MAX_KPAD,
             triton_path=lambda: _knn_score_triton(x, bank, k, out),
             torch_path=lambda: _knn_score_torch_into(x, bank, k, out))


_knn_score_out = kernel_op("oodfast::knn_score_out", mutates_args=("out",))(_knn_score_out_body)


_knn_score_out.register_kernel("cpu")(_knn_score_torch_into)
_knn_score_out.register_fake(lambda *args: None)  # mutation only, no outputs


def knn_score(
    x: Tensor, bank: Tensor, k: int = 50, *, out: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """kNN OOD score: distance of the L2-normalised ``x`` to its k-th nearest neighbour in ``bank``.

    Args:
        x: [B, D] float32/bfloat16/float16 embeddings, not normalised (the op normalises in fp32).
        bank: [N, D] float32/bfloat16/float16, rows already L2-normalised (``normalize_bank``). A
            bfloat16/float16 bank is the fast GPU path: x_hat is rounded to the bank's dtype and the
            dot products accumulate in fp32. A float32 bank uses exact fp32 products (no TF32).
        k: 1 <= k <= N; Sun et al. use 50.
        out: optional [B] float32 on x's device, written in place and returned (no output allocation;
            with several bank splits on CUDA a small [S, B, next_pow2(k)] fp32 workspace comes from the
            caching allocator).
        backend: "auto" (the ``oodfast::knn_score_out`` custom op: Triton for CUDA tensors, the torch path
            otherwise), "triton" (force the kernel; on CPU only under ``TRITON_INTERPRET=1``) or "torch"
            (the torch path).

    Any strides are accepted for ``x``, ``bank`` and ``out`` (they are passed to the kernel, nothing is
    copied); a row-major bank is the fast layout. No host synchronisation, except once per bank (and
    again whenever it is modified in place), outside torch.compile: the check that its rows are unit
    vectors (an unnormalised bank would give similarities above 1 and every score 0).

    Returns:
        [B] float32 scores, higher = rarer; NaN for rows of ``x`` with a NaN/inf or all zeros.

    Raises:
        ValueError: a bad argument, or a bank whose rows are not L2-normalised.
    """
    _check_inputs(x, bank, k, out)
    check_backend(backend)
    if not torch.compiler.is_compiling():
        check_bank_normalized(bank)
    if out is None:
        out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    dispatch(backend, x.device, op=lambda: torch.ops.oodfast.knn_score_out(x, bank, k, out),
             triton_path=lambda: _knn_score_triton(x, bank, k, out),
             torch_path=lambda: _knn_score_torch_into(x, bank, k, out))
    return out
