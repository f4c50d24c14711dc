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

A row is flagged when its score is finite and ``s > threshold`` (strict, as the seed's ``dist > thr``);
``threshold`` is a 0-d device tensor, so it can move online without recompiling anything. Rows with
any non-finite element score NaN, are never flagged, and are counted in ``state[3]`` (as are rows
whose score is NaN for another reason, e.g. an all-zero row under cosine).

Flagged rows enter a ring of capacity C exactly like ``collections.deque(maxlen=C).extend(rows)``:
with ``rank`` the prefix count of flags and ``total`` the number flagged in this call, row i
survives when ``rank_i >= total - C`` and lands in slot ``(head + rank_i) % C``. Its sample id,
score and the step are written to the ring metadata; ``head``/``count`` advance on the device.

One launch, no host synchronisation: every program scores its rows and publishes its flags; the
last program to finish (an atomic ticket, as in CUDA's threadFenceReduction sample) scans the flags
in row order, assigns slots, writes the metadata, advances the ring state and resets the scratch
counters for the next call. Deterministic: same inputs, same ring.

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
    scratch      [2] int32 zeros: non-finite rows and the finishing ticket; zero again after every call
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from oodfast.kernels._op import kernel_op

METRICS: dict[str, int] = {"euclidean": 0, "cosine": 1, "mahalanobis": 2, "score": 3}
EUCLIDEAN, COSINE, MAHALANOBIS, SCORE = 0, 1, 2, 3
STATE_HEAD, STATE_COUNT, STATE_ENQUEUED, STATE_NONFINITE = 0, 1, 2, 3


@triton.jit
def _score_rows(x_rows, row_ok, center_ptr, proj_ptr, coef_ptr, alpha_ptr, D, R,
                METRIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Scores [BLOCK_M] of the rows at ``x_rows`` (pointers [BLOCK_M, 1]); NaN where a row is non-finite."""
    sq = tl.zeros([BLOCK_M], tl.float32)      # ||x - mu||^2, or ||x||^2 for cosine
    dot = tl.zeros([BLOCK_M], tl.float32)     # <x, mu_hat> for cosine
    bad = tl.zeros([BLOCK_M], tl.int32)       # non-finite elements per row
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        bad += tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1)
        if METRIC == SCORE:
            sq += tl.sum(x, 1)  # D == 1: the score itself
        else:
            mu = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
            if METRIC == COSINE:
                dot += tl.sum(x * mu[None, :], 1)
                sq += tl.sum(x * x, 1)
            else:
                diff = tl.where(col_ok[None, :], x - mu[None, :], 0.0)
                sq += tl.sum(diff * diff, 1)

    if METRIC == EUCLIDEAN:
        score = tl.sqrt(sq)
    elif METRIC == COSINE:
        score = 1.0 - dot / tl.sqrt(sq)  # a zero row gives NaN: never flagged
    elif METRIC == MAHALANOBIS:
        # alpha ||d||^2 + sum_r coef_r <v_r, d>^2, the projections by tl.dot over R-blocks. x is re-read
        # once per R-block (from L2 for realistic B x D); TF32 on GPUs (DOT_PRECISION) keeps this
        # tensor-core bound rather than FMA bound.
        quad = tl.load(alpha_ptr) * sq
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            p = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                mu = tl.load(center_ptr + cols, mask=col_ok, other=0.0)
                diff = tl.where(col_ok[None, :], x - mu[None, :], 0.0)
                v = tl.load(proj_ptr + rr[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                p += tl.dot(diff, tl.trans(v), input_precision=DOT_PRECISION)
            coef = tl.load(coef_ptr + rr, mask=r_ok, other=0.0)
            quad += tl.sum(p * p * coef[None, :], 1)
        score = tl.sqrt(tl.maximum(quad, 0.0))
    else:
        score = sq
    return tl.where(bad == 0, score, float("nan"))


@triton.jit
def _rare_enqueue_kernel(
    x_ptr, stride_v, stride_b, center_ptr, proj_ptr, coef_ptr, alpha_ptr, threshold_ptr, ids_ptr, step_ptr,
    scores_ptr, slots_ptr, ring_ids_ptr, ring_scores_ptr, ring_steps_ptr, state_ptr, scratch_ptr,
    V, B, D, R, C,
    METRIC: tl.constexpr, HAS_RING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SCAN: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B

    # ---- phase 1: score this program's images: the max over their V views ------------------------
    score = tl.full([BLOCK_M], float("-inf"), tl.float32)
    nan_views = tl.zeros([BLOCK_M], tl.int32)
    for v in range(0, V):
        x_rows = x_ptr + (tl.zeros([], tl.int64) + v) * stride_v + rows.to(tl.int64)[:, None] * stride_b
        s = _score_rows(x_rows, row_ok, center_ptr, proj_ptr, coef_ptr, alpha_ptr, D, R,
                        METRIC, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_R)
        nan_views += (s != s).to(tl.int32)
        score = tl.maximum(score, tl.where(s == s, s, float("-inf")))
    # Any non-finite view, or a score that overflowed: NaN, never flagged.
    score = tl.where((nan_views == 0) & (score < float("inf")), score, float("nan"))
    finite = score == score
    flag = finite & (score > tl.load(threshold_ptr)) & row_ok
    tl.store(scores_ptr + rows, score, mask=row_ok)
    if HAS_RING:
        # -2 marks "flagged, slot pending" for the scan below; -1 is final for the others.
        tl.store(slots_ptr + rows, tl.where(flag, -2, -1).to(tl.int32), mask=row_ok)
        n_nonfinite = tl.sum((row_ok & ~finite).to(tl.int32), 0)
        # Every thread's stores must be issued before the ticket is taken (the atomic is acq_rel).
        tl.debug_barrier()
        tl.atomic_add(scratch_ptr + 0, n_nonfinite)
        ticket = tl.atomic_add(scratch_ptr + 1, 1)

        # ---- phase 2: the last program assigns slots in row order ----------------------------
        if ticket == tl.num_programs(0) - 1:
            head = tl.load(state_ptr + 0)
            count = tl.load(state_ptr + 1)
            step = tl.load(step_ptr)
            # Pass 1: total flagged. Loads are volatile: other programs wrote these rows.
            total = tl.zeros([], tl.int64)
            for s0 in range(0, B, BLOCK_SCAN):
                offs = s0 + tl.arange(0, BLOCK_SCAN)
                f = (tl.load(slots_ptr + offs, mask=offs < B, other=-1, volatile=True) == -2).to(tl.int64)
                total += tl.sum(f, 0)
            # Pass 2: ranks, survivors (the last C flagged, as deque(maxlen=C).extend), slots, metadata.
            carry = tl.zeros([], tl.int64)
            for s0 in range(0, B, BLOCK_SCAN):
                offs = s0 + tl.arange(0, BLOCK_SCAN)
                in_b = offs < B
                f = (tl.load(slots_ptr + offs, mask=in_b, other=-1, volatile=True) == -2).to(tl.int64)
                rank = carry + tl.cumsum(f, 0) - f
                keep = (f == 1) & (rank >= total - C)
                slot = (head + rank) % C
                tl.store(slots_ptr + offs, tl.where(keep, slot, -1).to(tl.int32), mask=in_b)
                sc = tl.load(scores_ptr + offs, mask=in_b, other=0.0, volatile=True)
                ids = tl.load(ids_ptr + offs, mask=in_b, other=0)
                tl.store(ring_ids_ptr + slot, ids, mask=keep)
                tl.store(ring_scores_ptr + slot, sc, mask=keep)
                tl.store(ring_steps_ptr + slot, tl.zeros_like(ids) + step, mask=keep)
                carry += tl.sum(f, 0)
            tl.store(state_ptr + 0, (head + total) % C)
            tl.store(state_ptr + 1, tl.minimum(count + total, C))
            tl.store(state_ptr + 2, tl.load(state_ptr + 2) + total)
            tl.store(state_ptr + 3, tl.load(state_ptr + 3) + tl.atomic_xchg(scratch_ptr + 0, 0).to(tl.int64))
            tl.atomic_xchg(scratch_ptr + 1, 0)


# Tuning: 32 rows x 128 columns of fp32 per program keeps loads 512 B wide per row and gives
# B / 32 programs (2048 at B = 65536, enough to fill an H100's 132 SMs many times over) for the
# memory-bound metrics; 32 x 32 projection tiles are the smallest shape tl.dot maps to tensor cores
# without padding waste at R = 255 (calibration on 256 images). The scan block of 1024 flags keeps
# the single finishing program's two passes at B / 1024 iterations.
BLOCK_M, BLOCK_D, BLOCK_R, BLOCK_SCAN = 32, 128, 32, 1024


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put every argument on one device")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def validate_score_args(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                        alpha: torch.Tensor, scores: torch.Tensor, metric: int) -> None:
    """Raise ValueError naming the first scoring argument whose device, dtype, shape or layout is wrong."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be a [B, D] or [V, B, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
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
        _check("proj", proj, None, f32, dev)
        if proj.dim() != 2 or proj.shape[1] != D:
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
    C = ring_ids.shape[0] if ring_ids.dim() == 1 else -1
    if C < 1:
        raise ValueError(f"ring_ids must have shape [C] with C >= 1, got {list(ring_ids.shape)}")
    _check("ring_ids", ring_ids, (C,), i64, dev)
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
    grid = (triton.cdiv(B, BLOCK_M),)
    wrap_triton(_rare_enqueue_kernel)[grid](
        x3, x3.stride(0), x3.stride(1), center, proj, coef, alpha, threshold, sample_ids, step,
        scores, slots, ring_ids, ring_scores, ring_steps, state, scratch,
        V, B, D, R, ring_ids.shape[0],
        METRIC=metric, HAS_RING=has_ring,
        # The interpreter (CPU) has no TF32; on GPUs TF32 keeps mahalanobis on the tensor cores.
        DOT_PRECISION="tf32" if x.is_cuda else "ieee",
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_SCAN=BLOCK_SCAN,
    )


# ------------------------------------------------------------------------------------------------
# Pure-torch reference: the same contract, written for clarity.
# ------------------------------------------------------------------------------------------------

def rare_score_reference(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                         alpha: torch.Tensor, metric: int) -> torch.Tensor:
    """Scores [B] fp32 of ``x`` [B, D] or [V, B, D] (the max over views; see the module docstring).

    NaN for an image with a non-finite element in any view (or a score that overflows fp32).
    """
    if x.dim() == 3:
        return torch.stack([rare_score_reference(xv, center, proj, coef, alpha, metric) for xv in x]).amax(0)
    x = x.float()
    if metric == SCORE:
        score = x[:, 0].clone()
    elif metric == COSINE:
        score = 1.0 - (x @ center) / x.norm(dim=1)
    elif metric == EUCLIDEAN:
        score = (x - center).norm(dim=1)
    else:
        d = x - center
        score = (alpha * (d * d).sum(1) + ((d @ proj.T) ** 2 * coef).sum(1)).clamp_min(0).sqrt()
    # A non-finite element makes the score NaN or inf (as does overflow): one check on [B], not on [B, D].
    return torch.where(torch.isfinite(score), score, float("nan"))


def rare_enqueue_reference(x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
                           ring_ids, ring_scores, ring_steps, state, scratch, metric: int) -> None:
    """In-place reference of :func:`rare_enqueue` (runs for CPU tensors; mirrors the kernel exactly)."""
    score = rare_score_reference(x, center, proj, coef, alpha, metric)
    finite = ~torch.isnan(score)
    flag = finite & (score > threshold)
    C = ring_ids.shape[0]
    rank = torch.cumsum(flag.long(), 0) - flag.long()
    total = flag.long().sum()
    keep = flag & (rank >= total - C)
    slot = (state[STATE_HEAD] + rank) % C
    scores.copy_(score)
    slots.copy_(torch.where(keep, slot, -1).to(torch.int32))
    ring_ids[slot[keep]] = sample_ids[keep]
    ring_scores[slot[keep]] = score[keep]
    ring_steps[slot[keep]] = step
    state[STATE_HEAD] = (state[STATE_HEAD] + total) % C
    state[STATE_COUNT] = torch.clamp(state[STATE_COUNT] + total, max=C)
    state[STATE_ENQUEUED] += total
    state[STATE_NONFINITE] += (~finite).long().sum()


# ------------------------------------------------------------------------------------------------
# The custom op (CUDA: the Triton kernel, visible to torch.compile; CPU: the reference) and entry points
# ------------------------------------------------------------------------------------------------

@kernel_op("oodfast::rare_enqueue", mutates_args={"scores", "slots", "ring_ids", "ring_scores", "ring_steps",
                                                  "state", "scratch"})
def _rare_enqueue_op(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                     alpha: torch.Tensor, threshold: torch.Tensor, sample_ids: torch.Tensor, step: torch.Tensor,
                     scores: torch.Tensor, slots: torch.Tensor, ring_ids: torch.Tensor, ring_scores: torch.Tensor,
                     ring_steps: torch.Tensor, state: torch.Tensor, scratch: torch.Tensor, metric: int) -> None:
    _launch(x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
            ring_ids, ring_scores, ring_steps, state, scratch, metric, has_ring=True)


_rare_enqueue_op.register_kernel("cpu")(rare_enqueue_reference)


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
    backend: ``"auto"`` dispatches by device (CUDA: the Triton kernel; CPU: the reference);
        ``"triton"`` forces the kernel (on CPU tensors it needs ``TRITON_INTERPRET=1``);
        ``"torch"`` forces the reference.

    Raises:
        ValueError: an argument has the wrong device, dtype, shape or layout (the message names it).
    """
    args = (x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
            ring_ids, ring_scores, ring_steps, state, scratch, metric)
    if not torch.compiler.is_compiling():
        validate(*args)
    if backend == "auto":
        torch.ops.oodfast.rare_enqueue(*args)
    elif backend == "triton":
        _launch(*args, has_ring=True)
    elif backend == "torch":
        rare_enqueue_reference(*args)
    else:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _launch_score(x, center, proj, coef, alpha, scores, metric: int) -> None:
    # Without a ring the kernel never touches the threshold, ids, slots, metadata or counters, so
    # they alias small placeholders.
    p = torch.empty(1, dtype=torch.int64, device=x.device)
    _launch(x, center, proj, coef, alpha, alpha, p, p, scores, scores, p, scores, p, p, p, metric, has_ring=False)


@kernel_op("oodfast::rare_score", mutates_args={"scores"})
def _rare_score_op(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                   alpha: torch.Tensor, scores: torch.Tensor, metric: int) -> None:
    _launch_score(x, center, proj, coef, alpha, scores, metric)


_rare_score_op.register_fake(lambda *args: None)  # mutation only (see rare_enqueue's fake)


@_rare_score_op.register_kernel("cpu")
def _rare_score_cpu(x, center, proj, coef, alpha, scores, metric):
    scores.copy_(rare_score_reference(x, center, proj, coef, alpha, metric))


def rare_score(x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor, alpha: torch.Tensor,
               metric: int, *, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Scores only (no threshold, no ring): the same kernel with its ring phase compiled out.

    Returns ``out`` (allocated as fp32 [B] when None). ``backend`` as in :func:`rare_enqueue`.
    """
    if out is None:
        out = torch.empty(x.shape[-2], dtype=torch.float32, device=x.device)
    if not torch.compiler.is_compiling():
        validate_score_args(x, center, proj, coef, alpha, out, metric)
    if backend == "auto":
        torch.ops.oodfast.rare_score(x, center, proj, coef, alpha, out, metric)
    elif backend == "triton":
        _launch_score(x, center, proj, coef, alpha, out, metric)
    elif backend == "torch":
        out.copy_(rare_score_reference(x, center, proj, coef, alpha, metric))
    else:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return out
