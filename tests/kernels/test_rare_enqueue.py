"""rare_enqueue: scores against a float64 oracle, the ring against collections.deque, Triton against torch.

The op runs on DEVICE: on a GPU machine the Triton kernel is compiled for the GPU (and the torch
path runs there too); without one, the kernel runs in Triton's interpreter (tests/conftest.py).
The checks themselves read CPU copies.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

from oodfast.detect import ledoit_wolf
from oodfast.devices import default_device
import oodfast.kernels.rare_enqueue as rare_module
from oodfast.kernels.rare_enqueue import METRICS, rare_enqueue, rare_score

from _assert import assert_close, assert_equal

DEVICE = torch.device(default_device())
# (dtype, relative score tolerance against the float64 oracle). The oracle scores x as rounded to
# dtype, so every dtype sees the same fp32 arithmetic: fp32 sums over D (~sqrt(D) * 6e-8, 3e-6 at
# D = 2048) and, for mahalanobis on CUDA, "tf32x3" projections (~1e-6). 1e-5 holds with that margin;
# plain TF32 (~5e-4, what the kernel used before) does not. 16-bit inputs get 1e-4 for the larger
# sums of squares their bigger rounding steps produce near the mean. Flags are compared exactly
# except within 10 tolerances of the threshold.
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)]


def make_stats(metric: str, D: int, gen: torch.Generator, n_calib: int | None = None) -> dict[str, torch.Tensor]:
    """Fitted-looking statistics for ``metric`` in D dimensions (mahalanobis: rank < n_calib axes)."""
    calib = torch.randn(n_calib or max(8, min(D, 40)), D, generator=gen) * torch.linspace(0.5, 2.0, D)
    center, alpha = calib.mean(0), torch.tensor(1.0)
    proj, coef = torch.zeros(0, D), torch.zeros(0)
    if metric == "cosine":
        center = center / center.norm()
    elif metric == "mahalanobis":
        mu, a, v, c, _ = ledoit_wolf(calib)
        center, alpha, proj, coef = mu.float(), a.float(), v.float().contiguous(), c.float()
    return dict(center=center.contiguous(), proj=proj, coef=coef, alpha=alpha.reshape(()))


def oracle_scores(x: torch.Tensor, stats: dict, metric: str) -> torch.Tensor:
    """float64 scores, [V, B, D] -> max over views; NaN for non-finite images."""
    x64 = x.double() if x.dim() == 3 else x.double().unsqueeze(0)
    c = stats["center"].double()
    if metric == "euclidean":
        s = (x64 - c).norm(dim=-1)
    elif metric == "cosine":
        s = 1 - (x64 @ c) / x64.norm(dim=-1)
    else:
        d = x64 - c
        P = stats["alpha"].double() * torch.eye(c.numel(), dtype=torch.float64) \
            + stats["proj"].double().T @ torch.diag(stats["coef"].double()) @ stats["proj"].double()
        s = torch.einsum("vbi,ij,vbj->vb", d, P, d).clamp_min(0).sqrt()
    s = torch.where(torch.isfinite(x64).all(-1), s, float("nan"))
    return s.amax(0)


def threshold_flagging(scores: torch.Tensor, n: int) -> float:
    """A threshold halfway between the n-th and (n+1)-th largest finite scores (n of them above it)."""
    s = scores[~torch.isnan(scores)].sort(descending=True).values
    if n == 0:
        return float(s[0]) + 1.0
    if n >= s.numel():
        return float(s[-1]) - 1.0
    return float((s[n - 1] + s[n]) / 2)


class Ring:
    """The ring tensors of one buffer of capacity C."""

    def __init__(self, C: int) -> None:
        self.ids = torch.full((C,), -1, dtype=torch.int64)
        self.scores = torch.zeros(C)
        self.steps = torch.full((C,), -1, dtype=torch.int64)
        self.state = torch.zeros(4, dtype=torch.int64)
        self.scratch = torch.zeros(2, dtype=torch.int32)

    def fifo_ids(self) -> list[int]:
        C, head, count = self.ids.numel(), int(self.state[0]), int(self.state[1])
        return [int(self.ids[(head - count + k) % C]) for k in range(count)]


def call(x, stats, metric, threshold, ids, step, ring: Ring, backend: str):
    """One rare_enqueue on DEVICE; the ring's new state is copied back into the CPU ``ring``."""
    B = x.shape[-2]
    scores = torch.empty(B, device=DEVICE)
    slots = torch.empty(B, dtype=torch.int32, device=DEVICE)
    cpu_ring = (ring.ids, ring.scores, ring.steps, ring.state, ring.scratch)
    dev_ring = [t.to(DEVICE) for t in cpu_ring]
    rare_enqueue(x.to(DEVICE), *(stats[k].to(DEVICE) for k in ("center", "proj", "coef", "alpha")),
                 torch.tensor(threshold, device=DEVICE), ids.to(DEVICE), torch.tensor(step, device=DEVICE),
                 scores, slots, *dev_ring, METRICS[metric], backend=backend)
    for host, dev in zip(cpu_ring, dev_ring):
        host.copy_(dev)
    return scores.cpu(), slots.cpu()


def check_against_deque(xs, stats, metric, C, n_flags, backend, dtype, tol):
    """Run several calls into one ring and compare with deque(maxlen=C).extend of the flagged ids."""
    ring, dq = Ring(C), deque(maxlen=C)
    nonfinite = enqueued = 0
    for call_no, (x, n) in enumerate(zip(xs, n_flags)):
        x = x.to(dtype)
        B = x.shape[-2]
        expected = oracle_scores(x, stats, metric)
        thr = threshold_flagging(expected, n)
        ids = torch.arange(B) + 1000 * call_no
        scores, slots = call(x, stats, metric, thr, ids, call_no, ring, backend)

        finite = ~torch.isnan(expected)
        assert_equal(torch.isnan(scores), ~finite, msg="NaN scores must mark exactly the non-finite images")
        assert_close(scores[finite].double(), expected[finite], rtol=tol, atol=tol, msg="scores")
        flagged = finite & (expected > thr)
        near = (expected - thr).abs() <= 10 * tol * max(1.0, abs(thr))
        got = ~torch.isnan(scores) & (scores > thr)
        bad = (got != flagged) & ~near
        assert not bad.any(), f"flags differ away from the threshold at rows {bad.nonzero().flatten()[:5].tolist()}"
        flagged = got  # near-threshold rows follow the kernel's own decision

        dq.extend(ids[flagged].tolist())
        nonfinite += int((~finite).sum())
        survivors = ids[slots >= 0].tolist()
        assert survivors == ids[flagged].tolist()[-C:], "survivors must be the last C flagged rows, in row order"
        assert ring.fifo_ids() == list(dq)
        enqueued += int(flagged.sum())
        assert int(ring.state[2]) == enqueued
        if survivors:
            assert_equal(ring.ids[slots[slots >= 0].long()], ids[slots >= 0], msg="ring ids")
            assert (ring.steps[slots[slots >= 0].long()] == call_no).all()
    assert int(ring.state[3]) == nonfinite
    assert_equal(ring.scratch, torch.zeros(2, dtype=torch.int32), msg="scratch counters must be reset")


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B, D", [(1, 1), (7, 3), (64, 127), (1000, 2048), (1000, 3)])
@pytest.mark.parametrize("C", [1, 32])
def test_torch_path_matches_oracle_and_deque(metric, dtype, tol, B, D, C):
    if metric == "cosine" and D == 1:
        pytest.skip("cosine is constant in one dimension")
    gen = torch.Generator().manual_seed(B * 7919 + D * 31 + C)
    stats = make_stats(metric, D, gen)
    xs = [torch.randn(B, D, generator=gen) * 1.5 for _ in range(5)]
    if B > 3:  # NaN and inf rows are never enqueued
        xs[1][2, 0] = float("nan")
        xs[3][1, -1] = float("inf")
    # 0 flagged, fewer than C, exactly C, more than C (wrap-arounds), all
    n_flags = [0, min(B, max(1, C // 2)), min(B, C), min(B, C + 5), B]
    check_against_deque(xs, stats, metric, C, n_flags, "torch", dtype, tol)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-4)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, D, C", [(1, 3, 1), (7, 3, 32), (64, 127, 32), (101, 130, 1), (300, 2048, 32)])
def test_triton_kernel_matches_deque(metric, dtype, tol, B, D, C):
    """The Triton kernel itself (compiled on a GPU, interpreted on a CPU): scores, flags, slots and the ring."""
    gen = torch.Generator().manual_seed(B + D + C)
    stats = make_stats(metric, D, gen)
    xs = [torch.randn(B, D, generator=gen) for _ in range(4)]
    if B > 3:
        xs[0][1, 1] = float("nan")
        xs[2][0, 0] = float("-inf")
    n_flags = [0, min(B, C), min(B, C + 3), B]
    check_against_deque(xs, stats, metric, C, n_flags, "triton", dtype, tol)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_views_flag_an_image_when_any_view_is_rare(backend):
    gen = torch.Generator().manual_seed(0)
    stats = make_stats("euclidean", 16, gen)
    x = stats["center"].expand(2, 9, 16).clone()  # every view at the mean: score 0
    x[0, 3] += 5.0   # image 3 rare in view 0
    x[1, 6] += 5.0   # image 6 rare in view 1
    x[1, 8, 0] = float("nan")  # image 8: one broken view -> never enqueued
    x[0, 8] += 5.0
    ring = Ring(4)
    scores, slots = call(x, stats, "euclidean", 1.0, torch.arange(9), 0, ring, backend)
    assert (slots >= 0).nonzero().flatten().tolist() == [3, 6]
    assert torch.isnan(scores[8]) and int(ring.state[3]) == 1
    # ||5 * ones(16)|| = 20; torch.testing's fp32 tolerances
    assert_close(scores[[3, 6]], torch.tensor([5.0, 5.0]) * 4, atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_precomputed_scores(backend):
    scores_in = torch.tensor([0.1, 3.0, float("nan"), 2.5, -1.0, 9.0]).unsqueeze(1)
    ring = Ring(2)
    zeros = dict(center=torch.zeros(1), proj=torch.zeros(0, 1), coef=torch.zeros(0), alpha=torch.tensor(1.0))
    scores, slots = call(scores_in, zeros, "score", 2.0, torch.arange(6), 3, ring, backend)
    assert slots.tolist() == [-1, -1, -1, 1, -1, 0]  # 3 flagged (ranks 0, 1, 2): the last 2 survive
    assert ring.fifo_ids() == [3, 5] and int(ring.state[3]) == 1


def test_rare_score_matches_oracle():
    gen = torch.Generator().manual_seed(5)
    for metric in ("euclidean", "cosine", "mahalanobis"):
        stats = make_stats(metric, 33, gen)
        x = torch.randn(2, 20, 33, generator=gen)
        on_device = [t.to(DEVICE) for t in (x, stats["center"], stats["proj"], stats["coef"], stats["alpha"])]
        for backend in ("auto", "torch", "triton"):
            got = rare_score(*on_device, METRICS[metric], backend=backend)
            assert_close(got.cpu().double(), oracle_scores(x, stats, metric), rtol=1e-5, atol=1e-5,
                         msg=f"{metric} {backend}")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.zeros(4)), "x must be a"),
        (dict(x=torch.zeros(4, 8, dtype=torch.int32)), "x must be float32"),
        (dict(x=torch.zeros(8, 4).T), "contiguous in D"),
        (dict(center=torch.zeros(7)), "center must have shape"),
        (dict(threshold=torch.zeros(1)), "threshold must have shape"),
        (dict(sample_ids=torch.zeros(4, dtype=torch.int32)), "sample_ids must have dtype"),
        (dict(slots=torch.zeros(4, dtype=torch.int64)), "slots must have dtype"),
        (dict(ring_ids=torch.zeros(0, dtype=torch.int64)), "ring_ids must have shape"),
        (dict(state=torch.zeros(3, dtype=torch.int64)), "state must have shape"),
        (dict(metric=9), "metric must be one of"),
    ],
)
def test_bad_arguments_name_themselves(change, match):
    args = dict(x=torch.zeros(4, 8), center=torch.zeros(8), proj=torch.zeros(0, 8), coef=torch.zeros(0),
                alpha=torch.tensor(1.0), threshold=torch.tensor(0.0), sample_ids=torch.zeros(4, dtype=torch.int64),
                step=torch.tensor(0), scores=torch.zeros(4), slots=torch.zeros(4, dtype=torch.int32),
                ring_ids=torch.zeros(2, dtype=torch.int64), ring_scores=torch.zeros(2),
                ring_steps=torch.zeros(2, dtype=torch.int64), state=torch.zeros(4, dtype=torch.int64),
                scratch=torch.zeros(2, dtype=torch.int32), metric=0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rare_enqueue(**args)


def test_mahalanobis_split_over_r_matches_oracle_and_is_bit_stable():
    """R = 149 axes: three R splits (BLOCK_R = 64) whose partials the finishing program (rare_enqueue)
    or the combine launch (rare_score) adds in split order; V = 2 views of 37 images. The same inputs
    twice give bit-identical scores and the same ring."""
    gen = torch.Generator().manual_seed(17)
    D, B = 150, 37
    stats = make_stats("mahalanobis", D, gen, n_calib=150)
    R = stats["proj"].shape[0]
    cfg = rare_module.launch_config(METRICS["mahalanobis"], True, 2, B, D, R, torch.float32, 1, "cpu")[0]
    assert cfg.params["n_split"] >= 3, (R, cfg)
    xs = [torch.randn(2, B, D, generator=gen) for _ in range(3)]
    xs[1][1, 4, 7] = float("nan")
    check_against_deque(xs, stats, "mahalanobis", 8, [0, 5, B], "triton", torch.float32, 1e-5)
    on_device = [t.to(DEVICE) for t in (xs[2], stats["center"], stats["proj"], stats["coef"], stats["alpha"])]
    once = rare_score(*on_device, METRICS["mahalanobis"], backend="triton").cpu()
    assert_close(once.double(), oracle_scores(xs[2], stats, "mahalanobis"), rtol=1e-5, atol=1e-5)
    again = rare_score(*on_device, METRICS["mahalanobis"], backend="triton").cpu()
    assert_equal(once.view(torch.int32), again.view(torch.int32), msg="scores must be bit-stable")
    rings = []
    for _ in range(2):
        ring = Ring(8)
        scores, slots = call(xs[2], stats, "mahalanobis", float(once.median()), torch.arange(B), 0, ring, "triton")
        rings.append((scores.view(torch.int32), slots, ring.ids, ring.state))
    for name, a, b in zip(("scores", "slots", "ring ids", "state"), *rings):
        assert_equal(a, b, msg=f"{name} of the second run")


def test_metric_ids_are_python_ints_and_kernel_constants_constexpr():
    """The Python API takes plain ints (torch op schemas, detect.py); @jit code reads tl.constexpr
    globals (the compiler rejects any other global: "Cannot access global variable SCORE")."""
    import triton.language as tl

    ids = (rare_module.EUCLIDEAN, rare_module.COSINE, rare_module.MAHALANOBIS, rare_module.SCORE)
    assert all(type(v) is int for v in ids) and list(METRICS.values()) == list(ids)
    kernel_side = (rare_module._EUCLIDEAN, rare_module._COSINE, rare_module._MAHALANOBIS, rare_module._SCORE)
    assert all(isinstance(c, tl.constexpr) and c.value == v for c, v in zip(kernel_side, ids))


def test_grid_fills_an_h200_at_the_design_point():
    """B = 1024 images x D = 2048 bf16, V = 2, on 132 SMs: >= 2 programs per SM for the memory-bound
    metrics (the old BLOCK_M = 32 grid had 32), >= 1 per SM for mahalanobis split over R (R = 255),
    and never TF32 for the projections on CUDA (tf32x3 or ieee: fp32-accurate)."""
    for metric in ("euclidean", "cosine"):
        cfg = rare_module.launch_config(METRICS[metric], True, 2, 1024, 2048, 0, torch.bfloat16, 132, "cuda")
        assert len(cfg) == 1 and cfg[0].grid[0] * cfg[0].grid[1] >= 2 * 132, cfg
    for has_ring in (True, False):
        cfgs = rare_module.launch_config(METRICS["mahalanobis"], has_ring, 2, 1024, 2048, 255, torch.bfloat16,
                                         132, "cuda")
        main = cfgs[0]
        assert main.grid[1] > 1 and main.grid[0] * main.grid[1] >= 132, main
        assert main.constexprs["DOT_PRECISION"] in ("tf32x3", "ieee"), main
        assert len(cfgs) == (1 if has_ring else 2)  # rare_score adds the splits in one more launch


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_position_view_is_the_views_axis(metric, backend):
    """A [B, D, h, w] channels_last map viewed as [h*w, B, D] (strides (D, h*w*D, 1), no copy) is
    scored and enqueued as is: the max over positions equals the torch path on a contiguous copy,
    and the flagged images and the ring equal the torch path's."""
    from oodfast.dense import position_view
    from oodfast.kernels.rare_enqueue import rare_enqueue_torch, rare_score_torch

    gen = torch.Generator().manual_seed(11)
    B, D, h, w = 5, 37, 3, 7  # 21 positions, D prime
    stats = make_stats(metric, D, gen)
    fmap = torch.randn(B, D, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    fmap[2, :, 1, 4] = -20.0 * stats["center"] / stats["center"].norm()  # one rare position in image 2
    fmap = on_device_strided(fmap)
    view = position_view(fmap)
    assert view.data_ptr() == fmap.data_ptr() and view.stride() == (D, h * w * D, 1)
    dense_stats = {k: v.to(DEVICE) for k, v in stats.items()}
    args = [dense_stats[k] for k in ("center", "proj", "coef", "alpha")]
    expected = rare_score_torch(view.contiguous().cpu(), *(a.cpu() for a in args), METRICS[metric])
    got = rare_score(view, *args, METRICS[metric], backend=backend).cpu()
    assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{metric} {backend}")
    assert int(got.argmax()) == 2

    thr = threshold_flagging(expected, 2)
    ids, step = torch.arange(B) + 40, torch.tensor(3)
    ring = Ring(4)
    scores, slots = call(view, stats, metric, thr, ids, 3, ring, backend)
    ref = Ring(4)
    ref_scores, ref_slots = torch.empty(B), torch.empty(B, dtype=torch.int32)
    rare_enqueue_torch(view.contiguous().cpu(), *(stats[k] for k in ("center", "proj", "coef", "alpha")),
                       torch.tensor(thr), ids, step, ref_scores, ref_slots, ref.ids, ref.scores, ref.steps,
                       ref.state, ref.scratch, METRICS[metric])
    assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert_equal(slots, ref_slots)
    assert ring.fifo_ids() == ref.fifo_ids() and len(ring.fifo_ids()) == 2


def on_device_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on DEVICE with ``t``'s strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t)
