"""param_groups, clip_gradients_ and cancel_last_layer_gradients_ against DINO's utils."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodfast.train import DINOHead, MultiCropWrapper, cancel_last_layer_gradients_, clip_gradients_, param_groups


def model_with_grads(seed=0, scale=1.0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = MultiCropWrapper(backbone, DINOHead(4, 32, hidden_dim=16, bottleneck_dim=8))
    out = model([torch.randn(2, 3, 8, 8)])
    (out.pow(2).sum() * scale).backward()
    return model


def dino_clip_gradients(model, clip):
    """DINO's utils.clip_gradients, restated: each parameter's gradient on its own, a Python branch."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


@pytest.mark.parametrize("clip", [0.05, 0.5, 3.0, 1e6])
def test_clip_equals_dino_per_parameter_clip(clip):
    ours, ref = model_with_grads(scale=10.0), model_with_grads(scale=10.0)
    norms = clip_gradients_(ours, clip)
    expected_norms = dino_clip_gradients(ref, clip)
    assert norms.shape == (len(expected_norms),)
    torch.testing.assert_close(norms, torch.tensor(expected_norms), rtol=1e-6, atol=0)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)
            assert p.grad.norm() <= clip * (1 + 1e-5), name
    fresh = model_with_grads(scale=10.0)
    unclipped = [torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), fresh.parameters())
                 if p.grad is not None]
    # each parameter is clipped on its own: exactly those above the clip change, the others stay bit for bit
    assert unclipped == [n <= clip for n in expected_norms]
    if clip in (0.5, 3.0):
        assert any(unclipped) and not all(unclipped), "the grid should mix clipped and unclipped parameters"


def test_clip_accepts_a_parameter_list_and_rejects_bad_clip():
    model = model_with_grads()
    norms = clip_gradients_(list(model.parameters()), 3.0)
    assert len(norms) == sum(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="clip must be > 0"):
        clip_gradients_(model, 0.0)


def test_param_groups_as_dino():
    model = model_with_grads()
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg = sorted(names[id(p)] for p in groups[0]["params"])
    not_reg = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert reg == sorted(["backbone.0.weight", "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight",
                          "head.last_layer.weight_v"])
    assert not_reg == sorted(["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "head.mlp.0.bias",
                              "head.mlp.2.bias", "head.mlp.4.bias"])
    # the frozen weight_g (norm_last_layer) is in neither group
    assert "head.last_layer.weight_g" not in reg + not_reg
    torch.optim.AdamW(groups)  # valid optimiser groups


def test_cancel_last_layer_gradients_during_frozen_epochs_only():
    model = model_with_grads()
    model.head.last_layer.weight_g.grad = torch.zeros_like(model.head.last_layer.weight_g)
    cancel_last_layer_gradients_(1, model, freeze_last_layer=1)  # epoch 1: no longer frozen
    assert model.head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients_(0, model, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is None and model.head.last_layer.weight_g.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if "last_layer" not in n)
