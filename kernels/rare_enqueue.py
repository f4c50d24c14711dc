"""rare_enqueue: rarity score -> threshold -> FIFO ring slot -> ring metadata, in one launch.

For embeddings ``x`` [B, D] (or [V, B, D]: V views of each of B images, e.g. DINO's two global crops;
an image's score is then the max over its views, so it is flagged when any view is) and fitted
statistics, every row gets a score (higher = rarer)::

    euclidean     s = ||x - mu||                                  (the paper's detector)
    cosine        s = 1 - <x, mu_hat> / ||x||                     (mu_hat = mu / ||mu||)
    mahalanobis   s = sqrt(max(alpha ||d||^2 + sum_r coef_r <v_r, d>^2, 0)),   d = x - mu
                  i.e. d^T P d for P = alpha I + V^T diag(coef) V; a Ledoit-Wolf shrinkage precision
                  has exactly this form with V the calibration set's principal axes (rank <= n).
    score         s = x[:, 0]                                     (precomputed, e.g. by knn_score)

A row is flagged when its score is finite and ``s > threshold`` (strict, like ``dist > thr`` in the paper's code);
``threshold`` is a 0-d device tensor, so it can move online without recompiling anything. Rows with
any non-finite element score NaN, are never flagged, and are counted in ``state[3]`` (as are rows
whose score is NaN for another reason, e.g. an all-zero row under cosine).

Flagged rows enter a ring of capacity C exactly like ``collections.deque(maxlen=C).extend(rows)``:
with ``rank`` the prefix count of flags and ``total`` the number flagged in this call, row i
survives when ``rank_i >= total - C`` and lands in slot ``(head + rank_i) % C``. Its sample id,
score and the step are written to the ring metadata; ``head``/``count`` advance on the device.

One launch, no host synchronisation: every program scores its rows and publishes its flags; the
last program to finish (an atomic ticket, as in CUDA's threadFenceReduction sample) scans the flags
in row order, assigns slots, writes the metadata, advances the ring state and resets the ticket for
the next call. Deterministic: same inputs, same ring, bit for bit (every sum has a fixed order).

Grid (see :func:`launch_config` for the figures): euclidean / cosine / score give each program whole
rows, BLOCK_M of them sized from B and the SM count (B = 1024 on a 132-SM H200: 512 programs of 2
rows). Mahalanobis, compute bound, is split over R as well: program (i, r) writes the partial
quadratic form of BLOCK_M (view, image) rows over its BLOCK_R axes to a workspace, and the finishing
program adds the splits in split order before it scans (``rare_score``, which has no ring and no
ticket, adds them in a second small launch).

Tensors (all on one device):
    x            [B, D] or [V, B, D] fp32 / bf16 / fp16, rows contiguous in D (any view/row strides)
    center       [D] fp32: mu (euclidean, mahalanobis), mu_hat (cosine); ignored for "score"
    proj         [R, D] fp32 principal axes (mahalanobis; R may be 0 otherwise)
    coef         [R] fp32
    alpha        0-d fp32
    threshold    0-d fp32
    sample_ids   [B] int64: ids written to the ring (e.g. positions in the file list)
    step         0-d int64: the training step written to the ring
    scores       [B] fp32, written
    slots        [B] int32, written: the ring slot of each surviving row, -1 otherwise
    ring_ids     [C] int64, ring_scores [C] fp32, ring_steps [C] int64: ring metadata, updated
    state        [4] int64: head, count, enqueued_total, nonfinite_total; updated
    scratch      [2] int32 zeros: [1] the finishing ticket ([0] unused); zero again after every call
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from oodfast.kernels._op import LaunchConfig, check_tensor, dispatch, kernel_op, num_sms

METRICS: dict[str, int] = {"euclidean": 0, "cosine": 1, "mahalanobis": 2, "score": 3}
EUCLIDEAN, COSINE, MAHALANOBIS, SCORE = 0, 1, 2, 3
STATE_HEAD, STATE_COUNT, STATE_ENQUEUED, STATE_NONFINITE = 0, 1, 2, 3
# The same values for @triton.jit code: the compiler only lets a kernel read globals that are
# tl.constexpr (the interpreter reads any global, which hid this). The ints above stay the Python API.
_EUCLIDEAN: tl.constexpr = tl.constexpr(EUCLIDEAN)
_COSINE: tl.constexpr = tl.constexpr(COSINE)
_MAHALANOBIS: tl.constexpr = tl.constexpr(MAHALANOBIS)
_SCORE: tl.constexpr = tl.constexpr(SCORE)


@triton.jit
def _score_rows(x_rows, row_ok, center_ptr, D,
                METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """euclidean / cosine / score of [BLOCK_M] rows at ``x_rows`` (pointers [BLOCK_M, 1]); NaN where a
    row is non-finite."""
    sq = tl.zeros([BLOCK_M], tl.float32)      # ||x - mu||^2, or ||x||^2 for cosine
    dot = tl.zeros([BLOCK_M], tl.float32)     # <x, mu_hat> for cosine
    bad = tl.zeros([BLOCK_M], tl.int32)       # non-finite elements per row
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        bad += tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1)
        if METRIC == _SCORE:
            sq += tl.sum(x, 1)  # D == 1: the score itself
        else:
            mu = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
            if METRIC == _COSINE:
                dot += tl.sum(x * mu[None, :], 1)
                sq += tl.sum(x * x, 1)
            else:
                diff = tl.where(col_ok[None, :], x - mu[None, :], 0.0)
                sq += tl.sum(diff * diff, 1)
    if METRIC == _EUCLIDEAN:
        score = tl.sqrt(sq)
    elif METRIC == _COSINE:
        score = 1.0 - dot / tl.sqrt(sq)  # a zero row gives NaN: never flagged
    else:
        score = sq
    return tl.where(bad == 0, score, float("nan"))


@triton.jit
def _mahalanobis_part(x_rows, row_ok, center_ptr, proj_ptr, coef_ptr, alpha_ptr, D, R, pid_r,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """Split ``pid_r``'s share of the quadratic form of [BLOCK_M] rows: sum over its BLOCK_R axes of
    coef_r <v_r, d>^2, plus alpha ||d||^2 in split 0; NaN where a row is non-finite. One pass over x."""
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    sq = tl.zeros([BLOCK_M], tl.float32)
    bad = tl.zeros([BLOCK_M], tl.int32)
    p = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        bad += tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1)
        mu = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
        diff = tl.where(col_ok[None, :], x - mu[None, :], 0.0)
        sq += tl.sum(diff * diff, 1)
        v = tl.load(proj_ptr + rr[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        p += tl.dot(diff, tl.trans(v), input_precision=DOT_PRECISION)
    coef = tl.load(coef_ptr + rr, mask=r_ok, other=0.0)
    part = tl.sum(p * p * coef[None, :], 1)
    if pid_r == 0:
        part += tl.load(alpha_ptr) * sq
    return tl.where(bad == 0, part, float("nan"))


@triton.jit
def _combine_scores(ws_ptr, offs, in_b, V, B, n_split, BLOCK: tl.constexpr):
    """Mahalanobis scores [BLOCK] of images ``offs`` from the split partials ``ws`` [n_split, V * B]:
    the sum over splits in split order (deterministic), the square root, the max over views."""
    score = tl.full([BLOCK], float("-inf"), tl.float32)
    nan_views = tl.zeros([BLOCK], tl.int32)
    for v in range(0, V):
        q = tl.zeros([BLOCK], tl.float32)
        for s in range(0, n_split):
            row = (tl.zeros([], tl.int64) + s) * V * B + v * B
            q += tl.load(ws_ptr + row + offs, mask=in_b, other=0.0, volatile=True)
        sv = tl.where(q == q, tl.sqrt(tl.maximum(q, 0.0)), float("nan"))  # maximum drops NaN: keep it
        nan_views += (sv != sv).to(tl.int32)
        score = tl.maximum(score, tl.where(sv == sv, sv, float("-inf")))
    return tl.where((nan_views == 0) & (score < float("inf")), score, float("nan"))


@triton.jit
def _rare_enqueue_kernel(
    x_ptr, stride_v, stride_b, center_ptr, proj_ptr, coef_ptr, alpha_ptr, threshold_ptr, ids_ptr, step_ptr,
    scores_ptr, slots_ptr, ring_ids_ptr, ring_scores_ptr, ring_steps_ptr, state_ptr, scratch_ptr, ws_ptr,
    V, B, D, R, C, n_split,
    METRIC: tl.constexpr, HAS_RING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SCAN: tl.constexpr,
):
    pid = tl.program_id(0)
    if METRIC == _MAHALANOBIS:
        # ---- phase 1 (mahalanobis): rows are (view, image) pairs i = v * B + b; program (pid, pid_r)
        # writes its split's partial quadratic form of its BLOCK_M rows to ws[pid_r, i].
        pid_r = tl.program_id(1)
        i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        i_ok = i < V * B
        v = i // B
        x_rows = x_ptr + v.to(tl.int64)[:, None] * stride_v + (i - v * B).to(tl.int64)[:, None] * stride_b
        part = _mahalanobis_part(x_rows, i_ok, center_ptr, proj_ptr, coef_ptr, alpha_ptr, D, R, pid_r,
                                 DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_R)
        tl.store(ws_ptr + pid_r.to(tl.int64) * V * B + i, part, mask=i_ok)
    else:
        # ---- phase 1: score this program's images: the max over their V views -------------------
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        score = tl.full([BLOCK_M], float("-inf"), tl.float32)
        nan_views = tl.zeros([BLOCK_M], tl.int32)
        for v in range(0, V):
            x_rows = x_ptr + (tl.zeros([], tl.int64) + v) * stride_v + rows.to(tl.int64)[:, None] * stride_b
            s = _score_rows(x_rows, row_ok, center_ptr, D, METRIC, BLOCK_M, BLOCK_D)
            nan_views += (s != s).to(tl.int32)
            score = tl.maximum(score, tl.where(s == s, s, float("-inf")))
        # Any non-finite view, or a score that overflowed: NaN, never flagged.
        score = tl.where((nan_views == 0) & (score < float("inf")), score, float("nan"))
        tl.store(scores_ptr + rows, score, mask=row_ok)
        if HAS_RING:
            flag = (score == score) & (score > tl.load(threshold_ptr)) & row_ok
            # -2 marks "flagged, slot pending" for the scan below; -1 is final for the others.
            tl.store(slots_ptr + rows, tl.where(flag, -2, -1).to(tl.int32), mask=row_ok)
    if HAS_RING:
        # Every thread's stores must be issued before the ticket is taken (the atomic is acq_rel).
        # One same-address atomic per program: with B / BLOCK_M programs this is the contended part.
        tl.debug_barrier()
        ticket = tl.atomic_add(scratch_ptr + 1, 1)

        # ---- phase 2: the last program assigns slots in row order ----------------------------
        if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
            threshold = tl.load(threshold_ptr)
            if METRIC == _MAHALANOBIS:
                # Scores and flags from the partials, for every image (B * V * n_split loads, ~1 us
                # at B = 1024, V = 2, 4 splits: small next to the projections).
                for s0 in range(0, B, BLOCK_SCAN):
                    offs = s0 + tl.arange(0, BLOCK_SCAN)
                    in_b = offs < B
                    score = _combine_scores(ws_ptr, offs, in_b, V, B, n_split, BLOCK_SCAN)
                    flag = (score == score) & (score > threshold)
                    tl.store(scores_ptr + offs, score, mask=in_b)
                    tl.store(slots_ptr + offs, tl.where(flag, -2, -1).to(tl.int32), mask=in_b)
                tl.debug_barrier()  # this program's stores, read back by other threads below
            # int32 ranks and counts (B < 2^31; head < C): int64 [BLOCK_SCAN] scans spilled on sm_80/90.
            head = tl.load(state_ptr + 0).to(tl.int32)
            count = tl.load(state_ptr + 1)
            step = tl.load(step_ptr)
            # Pass 1: total flagged and non-finite (NaN scores). Loads are volatile: other programs
            # wrote these rows.
            total = tl.zeros([], tl.int32)
            nonfinite = tl.zeros([], tl.int32)
            for s0 in range(0, B, BLOCK_SCAN):
                offs = s0 + tl.arange(0, BLOCK_SCAN)
                in_b = offs < B
                f = (tl.load(slots_ptr + offs, mask=in_b, other=-1, volatile=True) == -2).to(tl.int32)
                total += tl.sum(f, 0)
                sc = tl.load(scores_ptr + offs, mask=in_b, other=0.0, volatile=True)
                nonfinite += tl.sum((sc != sc).to(tl.int32), 0)
            # Pass 2: ranks, survivors (the last C flagged, as deque(maxlen=C).extend), slots, metadata.
            carry = tl.zeros([], tl.int32)
            for s0 in range(0, B, BLOCK_SCAN):
                offs = s0 + tl.arange(0, BLOCK_SCAN)
                in_b = offs < B
                f = (tl.load(slots_ptr + offs, mask=in_b, other=-1, volatile=True) == -2).to(tl.int32)
                rank = carry + tl.cumsum(f, 0) - f
                keep = (f == 1) & (rank >= total - C)
                slot = (head + rank % C) % C
                tl.store(slots_ptr + offs, tl.where(keep, slot, -1), mask=in_b)
                sc = tl.load(scores_ptr + offs, mask=in_b, other=0.0, volatile=True)
                ids = tl.load(ids_ptr + offs, mask=in_b, other=0)
                tl.store(ring_ids_ptr + slot, ids, mask=keep)
                tl.store(ring_scores_ptr + slot, sc, mask=keep)
                tl.store(ring_steps_ptr + slot, tl.zeros_like(ids) + step, mask=keep)
                carry += tl.sum(f, 0)
            tl.store(state_ptr + 0, ((head + total % C) % C).to(tl.int64))
            tl.store(state_ptr + 1, tl.minimum(count + total, C))
            tl.store(state_ptr + 2, tl.load(state_ptr + 2) + total)
            tl.store(state_ptr + 3, tl.load(state_ptr + 3) + nonfinite)
            tl.atomic_xchg(scratch_ptr + 1, 0)


@triton.jit
def _rare_combine_kernel(ws_ptr, scores_ptr, V, B, n_split, BLOCK: tl.constexpr):
    """rare_score's second launch for mahalanobis (no ring, so no finishing program): scores from the
    split partials."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_b = offs < B
    tl.store(scores_ptr + offs, _combine_scores(ws_ptr, offs, in_b, V, B, n_split, BLOCK), mask=in_b)


# ------------------------------------------------------------------------------------------------
# Launch configuration (a pure function: tests/kernels/test_compile.py compiles every choice it makes)
# ------------------------------------------------------------------------------------------------

#: Flags per iteration of the finishing program's two passes (B / 1024 iterations each).
BLOCK_SCAN = 1024
#: The finishing program's scan width for euclidean / cosine with a ring at BLOCK_M = 32: with 1024
#: triton 3.6's ptxas spilled 16 B (fp32, sm_80); see launch_config.
RING_BLOCK_SCAN_M32 = 512
#: Elements of x per program per iteration for euclidean / cosine: 16 KiB of fp32 over 4 warps
#: (32 per thread), the tile [BLOCK_M, 4096 / BLOCK_M].
_TILE = 4096


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def launch_config(metric: int, has_ring: bool, V: int, B: int, D: int, R: int, dtype: torch.dtype,
                  sm_count: int, device_type: str) -> list[LaunchConfig]:
    """The launches :func:`rare_enqueue` (``has_ring``) / :func:`rare_score` issue for x [V, B, D]
    of ``dtype``, R projection axes (mahalanobis) on a device with ``sm_count`` SMs.

    Grid choices (B = 1024, D = 2048 bf16 on a 132-SM H200 is the design point):

    * euclidean / cosine: memory bound, one program per BLOCK_M images, BLOCK_M in {2, 8, 32} the
      largest <= B / (2 * SMs): at least two programs per SM (B = 1024 -> BLOCK_M = 2, 512 programs,
      8 KiB of x each per view), up to 32 rows for large batches (B = 65536 -> 2048 programs). Rows
      are never split over D, so a row's reduction order is fixed (bit-stable) and no second
      reduction phase is needed. The tile is [2, 1024], [8, 512] or [32, 128]: at most 32
      fp32 per thread at 4 warps.
    * score: B / 256 programs; each reads 1 KiB, the cost is the scan, and fewer programs take fewer
      of the (same-address) ticket atomics.
    * mahalanobis: compute bound (2 V B D R flops), split over R: program (i, r) projects BLOCK_M
      (view, image) rows onto BLOCK_R = 32 axes with tl.dot (K = BLOCK_D = 32), reading x once, and
      writes its partial sum to a [splits, V * B] fp32 workspace; the finishing program (rare_enqueue)
      or one more small launch (rare_score) adds the splits in split order: deterministic.
      BLOCK_M is 64, 32 or 16, the largest that still gives one program per SM (B = 1024, V = 2,
      R = 255: BLOCK_M = 64, 32 x 8 = 256 programs; the old grid ran 32 programs, each over all R).
      ptxas: [64 x 32] tiles at 4 warps use 168 registers on sm_80 with tf32x3, no spills; [64 x 64]
      reached 255 and spilled 24 B.
    * ring variants (rare_enqueue, the finishing program's scan after phase 1): triton 3.6's ptxas
      spilled 4-16 B at 4 warps / BLOCK_SCAN = 1024 at low register counts (64-168, not pressure:
      mahalanobis BLOCK_M = 16 on sm_80/90 and 64 on sm_80, euclidean fp32 BLOCK_M = 32 on sm_80), and
      other widths moved the spills rather than removing them (512 at 4 warps: cosine fp32 BLOCK_M = 8
      on sm_90, 12 B; 2048: 4-44 B on sm_90). Hence mahalanobis with a ring runs 8 warps (phase 1 and
      the scan), euclidean / cosine at BLOCK_M = 32 scan 512 flags per iteration. ptxas -v (registers
      / spill B), triton 3.6: mahalanobis BLOCK_M = 16 96 / 4-8 -> 80 / 0 (sm_90a and sm_80), BLOCK_M
      = 64 bf16 on sm_80 168 / 4 -> 176 / 0, euclidean fp32 BLOCK_M = 32 on sm_80 128 / 16 -> 138 / 0;
      every mahalanobis ring configuration 78-182 registers at 8 warps (3.8: 64-128), euclidean /
      cosine BLOCK_M = 32 92-153 (3.8: 80-154); no spills on either.
      The projections run in "tf32x3" on CUDA (three TF32 MMAs: fp32 accuracy, ~1e-6 relative, on
      the tensor cores; plain TF32 cost ~5e-4 and changed flags near the threshold), exact fp32
      ("ieee") in the interpreter.
    """
    ring = bool(has_ring)
    if metric == MAHALANOBIS:
        block_r, block_d = 32, 32
        n_split = max(1, triton.cdiv(R, block_r))
        block_m = 16
        for bm in (64, 32):
            if triton.cdiv(V * B, bm) * n_split >= sm_count:
                block_m = bm
                break
        main = LaunchConfig("_rare_enqueue_kernel", (triton.cdiv(V * B, block_m), n_split),
                            dict(METRIC=metric, HAS_RING=ring,
                                 DOT_PRECISION="tf32x3" if device_type == "cuda" else "ieee",
                                 BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_SCAN=BLOCK_SCAN),
                            num_warps=8 if ring else 4, num_stages=3, params=dict(n_split=n_split))
        if ring:
            return [main]
        return [main, LaunchConfig("_rare_combine_kernel", (triton.cdiv(B, BLOCK_SCAN),),
                                   dict(BLOCK=BLOCK_SCAN), num_warps=4, num_stages=1,
                                   params=dict(n_split=n_split))]
    if metric == SCORE:
        block_m, block_d = 256, 1
    else:
        # Rows per program: 2, 8 or 32 (three configurations to compile, not six), the largest with
        # at least two programs per SM.
        per_sm = B // (2 * max(1, sm_count))
        block_m = 32 if per_sm >= 32 else 8 if per_sm >= 8 else 2
        block_d = max(128, min(1024, _TILE // block_m))
    scan = RING_BLOCK_SCAN_M32 if ring and block_m == 32 else BLOCK_SCAN
    return [LaunchConfig("_rare_enqueue_kernel", (triton.cdiv(B, block_m), 1),
                         dict(METRIC=metric, HAS_RING=ring, DOT_PRECISION="ieee",
                              BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=16, BLOCK_SCAN=scan),
                         num_warps=4, num_stages=3, params=dict(n_split=1))]


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    """Every tensor argument but x is contiguous, of one exact shape, on x's device."""
    check_tensor(name, t, shape=shape, dtypes=dtypes, device=device, contiguous=True)


def validate_score_args(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                        alpha: torch.Tensor, scores: torch.Tensor, metric: int) -> None:
    """Raise ValueError naming the first scoring argument whose device, dtype, shape or layout is wrong."""
    check_tensor("x", x, ndim=(2, 3), expect="a [B, D] or [V, B, D] tensor")
    check_tensor("x", x, dtypes=_FLOATS, expect="float32, bfloat16 or float16")
    if x.shape[-1] > 0 and x.stride(-1) != 1:
        raise ValueError("x rows must be contiguous in D (x.stride(-1) == 1); call .contiguous()")
    if metric not in METRICS.values():
        raise ValueError(f"metric must be one of {METRICS}, got {metric}")
    B, D = x.shape[-2:]
    if metric == SCORE and D != 1:
        raise ValueError(f"metric 'score' takes precomputed scores as x of shape [B, 1], got {list(x.shape)}")
    dev, f32 = x.device, (torch.float32,)
    if metric != SCORE:
        _check("center", center, (D,), f32, dev)
    if metric == MAHALANOBIS:
        check_tensor("proj", proj, ndim=2, dtypes=f32, device=dev, contiguous=True)
        if proj.shape[1] != D:
            raise ValueError(f"proj must have shape [R, {D}], got {list(proj.shape)}")
        _check("coef", coef, (proj.shape[0],), f32, dev)
    _check("alpha", alpha, (), f32, dev)
    _check("scores", scores, (B,), f32, dev)


def validate(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor, alpha: torch.Tensor,
             threshold: torch.Tensor, sample_ids: torch.Tensor, step: torch.Tensor, scores: torch.Tensor,
             slots: torch.Tensor, ring_ids: torch.Tensor, ring_scores: torch.Tensor, ring_steps: torch.Tensor,
             state: torch.Tensor, scratch: torch.Tensor, metric: int) -> None:
    """Raise ValueError naming the first argument whose device, dtype, shape or layout is wrong."""
    validate_score_args(x, center, proj, coef, alpha, scores, metric)
    B, dev, i64 = x.shape[-2], x.device, (torch.int64,)
    _check("threshold", threshold, (), (torch.float32,), dev)
    _check("sample_ids", sample_ids, (B,), i64, dev)
    _check("step", step, (), i64, dev)
    _check("slots", slots, (B,), (torch.int32,), dev)
    check_tensor("ring_ids", ring_ids, ndim=1, dtypes=i64, device=dev, contiguous=True)
    if ring_ids.shape[0] < 1:
        raise ValueError(f"ring_ids must have shape [C] with C >= 1, got {list(ring_ids.shape)}")
    C = ring_ids.shape[0]
    _check("ring_scores", ring_scores, (C,), (torch.float32,), dev)
    _check("ring_steps", ring_steps, (C,), i64, dev)
    _check("state", state, (4,), i64, dev)
    _check("scratch", scratch, (2,), (torch.int32,), dev)


def _launch(x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
            ring_ids, ring_scores, ring_steps, state, scratch, metric: int, has_ring: bool) -> None:
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    V, B, D = x3.shape
    if B == 0:
        return
    R = proj.shape[0] if metric == MAHALANOBIS else 0
    configs = launch_config(metric, has_ring, V, B, D, R, x.dtype, num_sms(x.device), x.device.type)
    main = configs[0]
    n_split = main.params["n_split"]
    # mahalanobis: the split partials (fp32 [splits, V * B], from the caching allocator); others: unused.
    ws = torch.empty((n_split, V * B) if metric == MAHALANOBIS else (1,), dtype=torch.float32, device=x.device)
    wrap_triton(_rare_enqueue_kernel)[main.grid](
        x3, x3.stride(0), x3.stride(1), center, proj, coef, alpha, threshold, sample_ids, step,
        scores, slots, ring_ids, ring_scores, ring_steps, state, scratch, ws,
        V, B, D, R, ring_ids.shape[0], n_split,
        **main.constexprs, num_warps=main.num_warps, num_stages=main.num_stages,
    )
    for extra in configs[1:]:  # rare_score, mahalanobis: the split partials -> scores
        wrap_triton(_rare_combine_kernel)[extra.grid](
            ws, scores, V, B, n_split, **extra.constexprs, num_warps=extra.num_warps, num_stages=extra.num_stages)


# ------------------------------------------------------------------------------------------------
# The torch path: the same contract in pure torch, written for clarity.
# ------------------------------------------------------------------------------------------------

def rare_score_torch(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                         alpha: torch.Tensor, metric: int) -> torch.Tensor:
    """Scores [B] fp32 of ``x`` [B, D] or [V, B, D] (the max over views; see the module docstring).

    NaN for an image with a non-finite element in any view (or a score that overflows fp32). All
    views in one pass (a dense map's 196 positions are 196 views: no per-view loop).
    """
    x = x.float()
    if metric == SCORE:
        score = x[..., 0].clone()
    elif metric == COSINE:
        score = 1.0 - (x @ center) / x.norm(dim=-1)
    elif metric == EUCLIDEAN:
        score = (x - center).norm(dim=-1)
    else:
        d = x - center
        score = (alpha * (d * d).sum(-1) + ((d @ proj.T) ** 2 * coef).sum(-1)).clamp_min(0).sqrt()
    # A non-finite element makes the score NaN or inf (as does overflow): one check on [V, B], not on
    # [V, B, D]; amax over views keeps a NaN, so an image with one bad view scores NaN.
    score = torch.where(torch.isfinite(score), score, float("nan"))
    return score.amax(0) if score.dim() == 2 else score


def rare_enqueue_torch(x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
                           ring_ids, ring_scores, ring_steps, state, scratch, metric: int) -> None:
    """The torch path of :func:`rare_enqueue`, in place (runs for CPU tensors; mirrors the kernel exactly)."""
    score = rare_score_torch(x, center, proj, coef, alpha, metric)
    finite = ~torch.isnan(score)
    flag = finite & (score > threshold)
    C = ring_ids.shape[0]
    rank = torch.cumsum(flag.long(), 0) - flag.long()
    total = flag.long().sum()
    keep = flag & (rank >= total - C)
    slot = (state[STATE_HEAD] + rank) % C
    scores.copy_(score)
    slots.copy_(torch.where(keep, slot, -1).to(torch.int32))
    # Scatter the survivors (distinct slots) with static shapes, no boolean indexing: the others go to
    # a spare slot C that is dropped. No host sync, and traceable by torch.compile (fullgraph).
    where = torch.where(keep, slot, C)
    for ring, value in ((ring_ids, sample_ids), (ring_scores, score), (ring_steps, step.expand(score.shape))):
        ring.copy_(torch.cat([ring, ring[:1]]).scatter_(0, where, value.to(ring.dtype))[:C])
    state[STATE_HEAD] = (state[STATE_HEAD] + total) % C
    state[STATE_COUNT] = torch.clamp(state[STATE_COUNT] + total, max=C)
    state[STATE_ENQUEUED] += total
    state[STATE_NONFINITE] += (~finite).long().sum()


# ------------------------------------------------------------------------------------------------
# The custom op (CUDA: the Triton kernel, visible to torch.compile; CPU: the torch path) and entry points
# ------------------------------------------------------------------------------------------------

def _rare_enqueue_body(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                       alpha: torch.Tensor, threshold: torch.Tensor, sample_ids: torch.Tensor, step: torch.Tensor,
                       scores: torch.Tensor, slots: torch.Tensor, ring_ids: torch.Tensor, ring_scores: torch.Tensor,
                       ring_steps: torch.Tensor, state: torch.Tensor, scratch: torch.Tensor, metric: int) -> None:
    # With a GPU this is a triton_op, whose body torch.compile traces for every device, bypassing
    # register_kernel("cpu"): dispatch sends CPU tensors to the torch path, not into a Triton launch
    # (it branches on static metadata only).
    args = (x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
            ring_ids, ring_scores, ring_steps, state, scratch, metric)
    dispatch("auto", x.device, triton_path=lambda: _launch(*args, has_ring=True),
             torch_path=lambda: rare_enqueue_torch(*args))


RARE_ENQUEUE_MUTATES = ("scores", "slots", "ring_ids", "ring_scores", "ring_steps", "state", "scratch")
_rare_enqueue_op = kernel_op("oodfast::rare_enqueue", mutates_args=RARE_ENQUEUE_MUTATES)(_rare_enqueue_body)
_rare_enqueue_op.register_kernel("cpu")(rare_enqueue_torch)


@_rare_enqueue_op.register_fake
def _(*args) -> None:
    # Mutation only, no outputs: nothing to propagate. Explicit, because tracing the launcher for a
    # fake kernel would run Triton's interpreter on fake tensors when TRITON_INTERPRET=1.
    return None


def rare_enqueue(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                 alpha: torch.Tensor, threshold: torch.Tensor, sample_ids: torch.Tensor, step: torch.Tensor,
                 scores: torch.Tensor, slots: torch.Tensor, ring_ids: torch.Tensor, ring_scores: torch.Tensor,
                 ring_steps: torch.Tensor, state: torch.Tensor, scratch: torch.Tensor, metric: int,
                 *, backend: str = "auto") -> None:
    """Score ``x``, flag rows above ``threshold``, and enqueue them into the ring; all in place.

    Args are as in the module docstring; ``metric`` is a value of :data:`METRICS`.
    backend: ``"auto"`` dispatches by device (CUDA: the Triton kernel; CPU: the torch path);
        ``"triton"`` forces the kernel (on CPU tensors it needs ``TRITON_INTERPRET=1``);
        ``"torch"`` forces the torch path.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or layout (the message names it).
    """
    args = (x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
            ring_ids, ring_scores, ring_steps, state, scratch, metric)
    if not torch.compiler.is_compiling():
        validate(*args)
    dispatch(backend, x.device, op=lambda: torch.ops.oodfast.rare_enqueue(*args),
             triton_path=lambda: _launch(*args, has_ring=True), torch_path=lambda: rare_enqueue_torch(*args))


def _launch_score(x, center, proj, coef, alpha, scores, metric: int) -> None:
    # Without a ring the kernel never touches the threshold, ids, slots, metadata or counters, so
    # they alias small placeholders.
    p = torch.empty(1, dtype=torch.int64, device=x.device)
    _launch(x, center, proj, coef, alpha, alpha, p, p, scores, scores, p, scores, p, p, p, metric, has_ring=False)


def _rare_score_torch_into(x, center, proj, coef, alpha, scores, metric: int) -> None:
    scores.copy_(rare_score_torch(x, center, proj, coef, alpha, metric))


def _rare_score_body(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                     alpha: torch.Tensor, scores: torch.Tensor, metric: int) -> None:
    args = (x, center, proj, coef, alpha, scores, metric)  # static metadata only: see _rare_enqueue_body
    dispatch("auto", x.device, triton_path=lambda: _launch_score(*args),
             torch_path=lambda: _rare_score_torch_into(*args))


_rare_score_op = kernel_op("oodfast::rare_score", mutates_args=("scores",))(_rare_score_body)


_rare_score_op.register_fake(lambda *args: None)  # mutation only (see rare_enqueue's fake)


_rare_score_op.register_kernel("cpu")(_rare_score_torch_into)


def rare_score(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor, alpha: torch.Tensor,
               metric: int, *, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Scores only (no threshold, no ring): the same kernel with its ring phase compiled out.

    Returns ``out`` (allocated as fp32 [B] when None). ``backend`` as in :func:`rare_enqueue`.
    """
    if out is None:
        out = torch.empty(x.shape[-2], dtype=torch.float32, device=x.device)
    args = (x, center, proj, coef, alpha, out, metric)
    if not torch.compiler.is_compiling():
        validate_score_args(*args)
    dispatch(backend, x.device, op=lambda: torch.ops.oodfast.rare_score(*args),
             triton_path=lambda: _launch_score(*args), torch_path=lambda: _rare_score_torch_into(*args))
    return out
