"""knn_score: the tiled torch path equals brute force; the Triton kernel equals the torch path; bad rows
score NaN; bad arguments raise ValueError naming themselves; the op compiles.

The Triton tests run the kernel on DEVICE: compiled for the GPU on a GPU machine, in Triton's
interpreter without one (tests/conftest.py). The torch path's expected values are computed on the CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oodfast.devices import default_device
from oodfast.kernels.knn_score import _knn_score_triton, knn_score, knn_score_torch, normalize_bank

from _assert import assert_close, assert_equal

DEVICE = torch.device(default_device())


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies on DEVICE, keeping each tensor's strides (the kernels take strided inputs)."""
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t) for t in tensors]


def brute_force(x: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Full [B, N] similarity matrix in float64, then topk: the definition, with no tiling."""
    xhat = torch.nn.functional.normalize(x.double(), dim=1)
    s_k = (xhat @ bank.double().T).topk(k, dim=1).values[:, k - 1]
    return (2 - 2 * s_k).clamp_min(0).sqrt().float()


def assert_scores_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    """Compare squared scores 2 - 2 s_k, which are linear in the similarity.

    score = sqrt(2 - 2 s_k) has an unbounded slope at s_k = 1: when the k-th neighbour is (nearly) the
    query itself, one fp32 rounding in s_k (6e-8) moves the score by 3.5e-4, so score tolerances would
    have to be loose everywhere to pass there.
    """
    assert_close(actual.square(), expected.square(), atol=atol, rtol=rtol, equal_nan=True)


def make(B: int, D: int, N: int, seed: int, bank_dtype=torch.float32, x_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, D, generator=gen) * 3).to(x_dtype)
    bank = normalize_bank(torch.randn(N, D, generator=gen)).to(bank_dtype)
    return x, bank


# ---- the torch path ----------------------------------------------------------------------------

TORCH_CASES = [
    (B, D, N, k) for B, D, N, k in itertools.product([1, 7, 64], [1, 3, 127], [1, 50, 300], [1, 5, 50]) if k <= N
]


@pytest.mark.parametrize("B, D, N, k", TORCH_CASES)
def test_torch_path_matches_brute_force(B, D, N, k):
    x, bank = make(B, D, N, seed=B * 10007 + D * 101 + N + k)
    # tile=16 splits every bank into several tiles, some shorter than k: the running top-k must carry.
    got = knn_score_torch(x, bank, k, tile=16)
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert_scores_close(got, brute_force(x, bank, k), atol=4e-6)
    # Tiling must not change the result at all relative to one big tile.
    assert_scores_close(got, knn_score_torch(x, bank, k, tile=1 << 20), atol=1e-6)


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_torch_path_16bit_bank_is_exact_on_its_values(bank_dtype):
    x, bank = make(9, 40, 120, seed=3, bank_dtype=bank_dtype, x_dtype=bank_dtype)
    assert_scores_close(knn_score_torch(x, bank, 7, tile=50), brute_force(x, bank, 7), atol=4e-6)


def test_score_is_distance_to_kth_neighbour():
    # Direct geometric check of the formula on hand-made vectors in the plane.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[2.0, 0.0]])  # normalises to (1, 0): distances 0, sqrt 2, 2
    for k, want in [(1, 0.0), (2, 2**0.5), (3, 2.0)]:
        assert_close(knn_score_torch(x, bank, k), torch.tensor([want]), atol=1e-6, rtol=0, equal_nan=True)


# ---- Triton kernel (TRITON_INTERPRET=1 on CPU: see tests/conftest.py) ---------------------------

# (B, D, N, k, splits): 1s, primes, k == N, k a power of two, N not a multiple of BLOCK_N (128),
# several splits (partial buffers + merge kernel) and one split (score written directly).
TRITON_CASES = [
    (1, 1, 1, 1, None),
    (7, 3, 300, 5, None),
    (5, 127, 300, 50, 3),
    (16, 20, 130, 1, 2),
    (3, 33, 50, 50, None),
    (2, 17, 257, 64, 2),
    (3, 20, 300, 100, 2),  # KPAD = 128: the wide-tile configuration (fp32: [16 x 256] tiles)
]


@pytest.mark.parametrize("B, D, N, k, splits", TRITON_CASES)
def test_triton_matches_torch_path_fp32(B, D, N, k, splits):
    x, bank = make(B, D, N, seed=B + D + N + k)
    out = torch.full((B,), -1.0, device=DEVICE)
    _knn_score_triton(*on_device(x, bank), k, out, num_splits=splits)
    assert_scores_close(out.cpu(), knn_score_torch(x, bank, k), atol=4e-6)


# The interpreter computes fp16 tl.dot products exactly (numpy), so the only difference from the fp32
# torch path is x_hat rounded to fp16 before the dot: |delta s| <~ 2^-11 * sum|b_j| ~ 1e-3 at D=40,
# and the squared score 2 - 2 s_k by twice that. (bf16 is not tested here: the
# interpreter's bf16 tl.dot is wrong, it reinterprets bits.)
@pytest.mark.parametrize("x_dtype, bank_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16),
                                                 (torch.float16, torch.float32)])
def test_triton_matches_torch_path_16bit(x_dtype, bank_dtype):
    x, bank = make(9, 40, 140, seed=11, bank_dtype=bank_dtype, x_dtype=x_dtype)
    got = knn_score(*on_device(x, bank), 10, backend="triton")
    assert_scores_close(got.cpu(), knn_score_torch(x, bank, 10), atol=4e-3, rtol=1e-3)


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_triton_tile_skip_and_merge_are_exact(order):
    # Bank sorted by similarity to the query: descending -> every tile after the first is skipped by
    # the k-th-largest test; ascending -> every tile improves the running top-k and is merged.
    # Duplicated rows make ties at the k-th position.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, generator=gen)
    base = normalize_bank(torch.randn(300, 24, generator=gen))
    bank = torch.cat([base, base[:40], torch.nn.functional.normalize(x, dim=1).expand(3, 24)])
    sims = bank @ torch.nn.functional.normalize(x, dim=1)[0]
    bank = bank[sims.argsort(descending=order == "descending")].contiguous()
    for k, splits in [(3, 1), (50, 2)]:
        out = torch.empty(1, device=DEVICE)
        _knn_score_triton(*on_device(x, bank), k, out, num_splits=splits)
        assert_scores_close(out.cpu(), knn_score_torch(x, bank, k), atol=4e-6)
    # The query itself is in the bank 3 times: its 3rd nearest neighbour is itself.
    assert knn_score_torch(x, bank, 3).item() < 1e-3


def test_triton_strided_inputs_and_out():
    x_t, bank = make(12, 6, 150, seed=8)
    x = x_t.T.contiguous().T  # same values, column-major strides (1, 12)
    bank_strided = torch.cat([bank, torch.zeros_like(bank)], dim=1)[:, :6]  # row stride 12
    out = torch.zeros(12, 2, device=DEVICE)[:, 0]  # stride 2
    x, bank_strided = on_device(x, bank_strided)
    assert x.stride() == (1, 12) and bank_strided.stride() == (12, 1)
    got = knn_score(x, bank_strided, 5, out=out, backend="triton")
    assert got is out
    assert_scores_close(out.cpu(), knn_score_torch(x_t, bank, 5), atol=4e-6)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_rows_score_nan_and_others_are_unaffected(backend):
    x, bank = make(8, 19, 130, seed=4)
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[4, 0] = float("inf")
    bad[5, 18] = -float("inf")
    bad[6] = 0.0
    got = knn_score(*on_device(bad, bank), 7, backend=backend).cpu()
    nan_rows = torch.tensor([False, True, False, False, True, True, True, False])
    assert_equal(got.isnan(), nan_rows)
    assert_scores_close(got[~nan_rows], knn_score_torch(x[~nan_rows], bank, 7), atol=4e-6)
    # Splitting the bank carries the NaN flag through the merge kernel too.
    if backend == "triton":
        out = torch.empty(8, device=DEVICE)
        _knn_score_triton(*on_device(bad, bank), 7, out, num_splits=2)
        assert_equal(out.isnan().cpu(), nan_rows)
        assert_scores_close(out.cpu(), got, atol=1e-6)


# ---- entry point, validation, normalize_bank, compile ------------------------------------------


def test_out_is_written_in_place_and_returned():
    x, bank = make(5, 8, 60, seed=2)
    xd, bankd = on_device(x, bank)
    out = torch.empty(5, device=DEVICE)
    ptr = out.data_ptr()
    for backend in ("auto", "torch"):  # auto on a GPU: the registered op (Triton)
        assert knn_score(xd, bankd, 4, out=out, backend=backend) is out and out.data_ptr() == ptr
        assert_scores_close(out.cpu(), brute_force(x, bank, 4), atol=4e-6)


def test_empty_batch():
    _, bank = make(1, 8, 60, seed=2)
    for backend in ("auto", "torch", "triton"):
        assert knn_score(*on_device(torch.empty(0, 8), bank), 3, backend=backend).shape == (0,)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(x=torch.randn(4)), "x"),
        (dict(x=torch.randn(4, 8).double()), "x"),
        (dict(x=torch.randint(0, 3, (4, 8))), "x"),
        (dict(bank=torch.randn(3, 10, 8)), "bank"),
        (dict(bank=torch.randn(10, 8).double()), "bank"),
        (dict(bank=torch.randn(10, 7)), "bank"),  # D mismatch names both
        (dict(bank=torch.randn(10, 8, device="meta")), "bank"),  # device mismatch
        (dict(k=0), "k"),
        (dict(k=11), "k"),
        (dict(k=True), "k"),
        (dict(k=2.0), "k"),
        (dict(out=torch.empty(4, dtype=torch.float64)), "out"),
        (dict(out=torch.empty(5)), "out"),
        (dict(out=torch.empty(4, 1)), "out"),
        (dict(out=torch.empty(4, device="meta")), "out"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_validation_names_the_argument(kwargs, name):
    args = dict(x=torch.randn(4, 8), bank=normalize_bank(torch.randn(10, 8)), k=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        knn_score(**args)
    if name == "k":
        assert "N=10" in str(info.value)


def test_triton_rejects_k_beyond_register_budget():
    x, bank = make(2, 8, 300, seed=1)
    with pytest.raises(ValueError, match=r"\bk=257\b"):
        knn_score(*on_device(x, bank), 257, backend="triton")
    # "auto" still works (CPU: the torch path; CUDA: the op falls back to the tiled torch path).
    assert_scores_close(knn_score(*on_device(x, bank), 257).cpu(), brute_force(x, bank, 257), atol=4e-6)


def test_normalize_bank():
    f = torch.randn(20, 9).half() * 7
    bank = normalize_bank(f[:, ::1].T.contiguous().T)
    assert bank.dtype == torch.float32 and bank.is_contiguous() and bank.shape == (20, 9)
    assert_close(bank.norm(dim=1), torch.ones(20), atol=1e-5, rtol=1.3e-6)  # torch.testing's fp32 defaults
    assert_close(bank * f.float().norm(dim=1, keepdim=True), f.float(), atol=1e-5, rtol=1.3e-6)
    f[3] = 0
    f[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"features has 2 zero or non-finite rows \(first: \[3, 7\]\)"):
        normalize_bank(f)
    with pytest.raises(ValueError, match="features"):
        normalize_bank(torch.randn(4))


def test_compiled_fullgraph_matches_eager():
    # One compiled test (about 10-30 s on a 2-core CPU): the custom op traces with no graph break.
    # On a GPU the op is a triton_op, so Inductor compiles the kernel into the graph.
    x, bank = make(6, 24, 80, seed=9)
    x[2] = 0.0
    x, bank = on_device(x, bank)

    def step(x, bank, out):
        knn_score(x * 2.0, bank, 5, out=out)
        return out + 1.0

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, bank, torch.empty(6, device=DEVICE)).cpu()
    want = step(x, bank, torch.empty(6, device=DEVICE)).cpu()
    assert got.isnan()[2] and got.isnan().sum() == 1
    assert_scores_close(got, want, atol=1e-6)


def test_an_unnormalised_bank_is_refused_not_scored_zero():
    """Similarities above 1 clamp every distance to 0: refused with the row and how to fix it; the
    check runs once per bank and again after an in-place change."""
    torch.manual_seed(0)
    features = torch.randn(64, 16)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"bank rows must be L2-normalised: row 0 .*normalize_bank"):
        knn_score(x, features * 3, k=5)
    bank = normalize_bank(features)
    assert torch.isfinite(knn_score(x, bank, k=5)).all()
    bank[7] *= 2  # modified in place: checked again
    with pytest.raises(ValueError, match="row 7"):
        knn_score(x, bank, k=5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_map_positions_score_as_rows_without_a_copy(backend):
    """The dense detector's kNN input: a channels_last [B, D, h, w] map's positions as [B*h*w, D] rows,
    a view of the map's memory (no .contiguous()), scored as brute force on the same rows."""
    from oodfast.dense import position_view

    gen = torch.Generator().manual_seed(5)
    B, D, h, w, k = 3, 24, 5, 3, 4
    fmap = torch.randn(B, D, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    bank = normalize_bank(torch.randn(70, D, generator=gen))
    fmap_d, bank_d = on_device(fmap, bank)
    rows = position_view(fmap_d).transpose(0, 1).reshape(B * h * w, D)
    assert rows.data_ptr() == fmap_d.data_ptr() and rows._base is not None  # a view
    got = knn_score(rows, bank_d, k, backend=backend).cpu()
    expected = brute_force(fmap.permute(0, 2, 3, 1).reshape(-1, D), bank, k)
    assert_scores_close(got, expected, atol=1e-5)
