"""GradientSync (the flat-buffer gradient all-reduce that replaces DDP) and the crop dtype rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodfast.data.multicrop import MultiCropConfig
from oodfast.train.grad_sync import GradientSync
from oodfast.train.dino import Precision, choose_precision
from oodfast.train.runtime import broadcast_from_rank0_


def test_gradients_accumulate_into_views_of_one_buffer_with_their_parameters_strides():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).to(
        memory_format=torch.channels_last)
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    sync = GradientSync([*model.parameters(), frozen], extra=5)
    assert sync.flat.numel() == sum(p.numel() for p in model.parameters()) + 5
    x = torch.randn(2, 3, 6, 6)
    expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))

    sync.zero_()
    model(x).square().sum().backward()
    for p, g, e in zip(model.parameters(), sync.grads, expected):
        assert p.grad is g and p.grad.stride() == p.stride()  # accumulated in place, in the buffer
        torch.testing.assert_close(p.grad, e)
    assert frozen.grad is None
    # the buffer holds them: scaling it scales every gradient
    sync.flat.mul_(2)
    torch.testing.assert_close(model[0].weight.grad, 2 * expected[0])

    # a .grad dropped (DINO's frozen last layer) is re-attached, and zero_ clears the buffer
    model[2].weight.grad = None
    sync.zero_()
    assert model[2].weight.grad is sync.grads[2] and not sync.flat.any()
    sync.all_reduce_()  # one process: nothing to do, nothing changes


def test_refuses_non_fp32_or_empty_parameter_lists():
    with pytest.raises(ValueError, match="fp32"):
        GradientSync([nn.Parameter(torch.ones(2, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        GradientSync([nn.Parameter(torch.ones(2), requires_grad=False)])
    broadcast_from_rank0_(nn.Linear(2, 2))  # no process group: a no-op


def test_crops_have_the_parameters_dtype_whenever_autocast_is_off():
    # on a GPU without bf16 autocast (the cpu preset on a GPU host) the crops were float16 while the model
    # is float32, and the first conv raised
    def crop_dtype(device_type: str, mixed: bool) -> str:
        return Precision(choose_precision(device_type, mixed, (9, 0)), device_type).crop_dtype

    on_gpu_without_autocast = MultiCropConfig.dino(dtype=crop_dtype("cuda", False))
    assert on_gpu_without_autocast.torch_dtype(torch.device("cuda")) == torch.float32
    assert MultiCropConfig.dino(dtype=crop_dtype("cuda", True)).torch_dtype(torch.device("cuda")) == torch.bfloat16
    assert MultiCropConfig.dino(dtype=crop_dtype("cpu", True)).torch_dtype(torch.device("cpu")) == torch.float32
