"""ring_copy: the Triton kernel and the torch path copy exactly the flagged rows.

Tensors live on DEVICE: on a GPU machine the kernel is compiled for the GPU; without one it runs in
Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from oodfast.devices import default_device
from oodfast.kernels.ring_copy import ring_copy

from _assert import assert_equal

DEVICE = torch.device(default_device())


def batch(V: int, rows: int, crop: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(V, rows, *crop, generator=gen) * 10).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C", [(1, 1), (7, 4), (33, 32)])
def test_two_groups_in_tail_layout(backend, dtype, B, C):
    gen = torch.Generator().manual_seed(B * 100 + C)
    g = batch(2, B + C, (3, 9, 7), dtype, gen)     # [V, B + C, ...]: batch rows then ring rows
    loc = batch(6, B + C, (3, 4, 5), dtype, gen)
    perm = torch.randperm(B, generator=gen)
    slots = torch.full((B,), -1, dtype=torch.int32)
    n = min(B, C) - (1 if B > 2 else 0)
    slots[perm[:n]] = torch.randperm(C, generator=gen)[:n].to(torch.int32)
    g0, l0 = g.clone(), loc.clone()
    ring_copy(slots.to(DEVICE), g[:, :B], g[:, B:], loc[:, :B], loc[:, B:], backend=backend)

    expected_g, expected_l = g0.clone(), l0.clone()
    for b in range(B):
        if slots[b] >= 0:
            expected_g[:, B + int(slots[b])] = g0[:, b]
            expected_l[:, B + int(slots[b])] = l0[:, b]
    assert_equal(g, expected_g, msg="global views")
    assert_equal(loc, expected_l, msg="local views")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_single_group_and_separate_tensors(backend):
    gen = torch.Generator().manual_seed(1)
    src, dst = batch(1, 5, (3, 2, 2), torch.float32, gen), torch.zeros(1, 3, 3, 2, 2, device=DEVICE)
    slots = torch.tensor([-1, 2, -1, 0, -1], dtype=torch.int32, device=DEVICE)
    ring_copy(slots, src, dst, backend=backend)
    assert_equal(dst[0, 2], src[0, 1], msg="slot 2")
    assert_equal(dst[0, 0], src[0, 3], msg="slot 0")
    assert not dst[0, 1].any()


def test_no_flagged_row_copies_nothing():
    src, dst = torch.ones(2, 4, 3, device=DEVICE), torch.zeros(2, 2, 3, device=DEVICE)
    ring_copy(torch.full((4,), -1, dtype=torch.int32, device=DEVICE), src, dst, backend="triton")
    assert not dst.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slots=torch.zeros(4, dtype=torch.int64)), "slots must be an int32"),
        (dict(src0=torch.zeros(2, 3, 3)), "src0 must have B = 4 rows"),
        (dict(dst0=torch.zeros(2, 2, 4)), "must agree on views and crop shape"),
        (dict(dst0=torch.zeros(2, 2, 3, dtype=torch.float16)), "must have one dtype"),
        (dict(src1=torch.zeros(1, 4, 3)), "src1 and dst1 go together"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(slots=torch.zeros(4, dtype=torch.int32), src0=torch.zeros(2, 4, 3), dst0=torch.zeros(2, 2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ring_copy(**args)
