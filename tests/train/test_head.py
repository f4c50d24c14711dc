"""DINOHead (DINO's parameter names), MultiCropWrapper (one backbone call per resolution), backbones."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from oodfast.train import DINOHead, MultiCropWrapper, build_backbone
from oodfast.train.head import WeightNormLinear

# facebookresearch/dino's DINOHead state-dict keys (nlayers=3): nn.Sequential indices with GELU between
# the linears, and torch.nn.utils.weight_norm's weight_g / weight_v on the last layer.
DINO_HEAD_KEYS = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                  "last_layer.weight_g", "last_layer.weight_v"]
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
DINO_HEAD_BN_KEYS = (["mlp.0.weight", "mlp.0.bias"] + [f"mlp.1.{k}" for k in BN] + ["mlp.3.weight", "mlp.3.bias"]
                     + [f"mlp.4.{k}" for k in BN] + ["mlp.6.weight", "mlp.6.bias",
                                                      "last_layer.weight_g", "last_layer.weight_v"])


def test_head_state_dict_keys_and_shapes_match_dino():
    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    state = head.state_dict()
    assert list(state) == DINO_HEAD_KEYS
    assert state["last_layer.weight_g"].shape == (64, 1)
    assert state["last_layer.weight_v"].shape == (64, 8)
    assert state["mlp.0.weight"].shape == (32, 16) and state["mlp.4.weight"].shape == (8, 32)
    assert list(DINOHead(16, 64, use_bn=True, hidden_dim=32, bottleneck_dim=8).state_dict()) == DINO_HEAD_BN_KEYS
    assert list(DINOHead(16, 64, nlayers=1, bottleneck_dim=8).state_dict()) == [
        "mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"]


def test_head_init_and_frozen_norm_as_dino():
    torch.manual_seed(0)
    head = DINOHead(64, 128, hidden_dim=256, bottleneck_dim=32)
    assert torch.all(head.last_layer.weight_g == 1)
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert DINOHead(8, 16, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4).last_layer.weight_g.requires_grad
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2 and torch.all(head.mlp[0].bias == 0)
    # g = 1: every prototype (row of the effective weight) has unit norm, whatever v's scale
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(128))
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 128)
    out.sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None


@pytest.mark.skipif(not hasattr(nn.utils, "weight_norm"), reason="torch.nn.utils.weight_norm was removed")
def test_weight_norm_layer_equals_torch_weight_norm_and_loads_its_state_dict():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = nn.utils.weight_norm(nn.Linear(8, 12, bias=False))
    with torch.no_grad():
        theirs.weight_g.uniform_(0.5, 2.0)
    ours = WeightNormLinear(8, 12)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_head_deepcopies_for_a_teacher():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4)
    teacher = copy.deepcopy(head)
    x = torch.randn(3, 8)
    torch.testing.assert_close(teacher(x), head(x))


class TinyBackbone(nn.Module):
    """Conv -> ReLU -> global pool: no batch statistics, so batching views cannot change the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)  # a classifier the wrapper must drop, as DINO's does

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def counting(backbone):
    calls = []
    backbone.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    return calls


def views(batch, sizes, gen):
    return [torch.randn(batch, 3, s, s, generator=gen) for s in sizes]


def one_by_one(model, vs):
    return model.head(torch.cat([model.backbone(v) for v in vs]))


@pytest.mark.parametrize("batch", [1, 3])
def test_wrapper_runs_backbone_once_per_resolution_and_matches_views_one_by_one(batch):
    gen = torch.Generator().manual_seed(0)
    model = MultiCropWrapper(TinyBackbone(), DINOHead(6, 64, hidden_dim=16, bottleneck_dim=8))
    assert isinstance(model.backbone.fc, nn.Identity)
    calls = counting(model.backbone)
    vs = views(batch, [16, 16, 8, 8, 8, 8], gen)  # 2 global + 4 local
    out, feats = model(vs, return_features=True)
    assert calls == [(2 * batch, 3, 16, 16), (4 * batch, 3, 8, 8)]
    assert out.shape == (6 * batch, 64) and feats.shape == (6 * batch, 6)
    calls.clear()
    expected = one_by_one(model, vs)
    assert len(calls) == 6
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_wrapper_groups_consecutive_views_only_and_accepts_stacked_views():
    gen = torch.Generator().manual_seed(1)
    model = MultiCropWrapper(TinyBackbone(), DINOHead(6, 32, hidden_dim=16, bottleneck_dim=8))
    calls = counting(model.backbone)
    vs = views(2, [16, 8, 16], gen)
    out = model(vs)
    assert calls == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 16, 16)]  # consecutive grouping, as DINO
    torch.testing.assert_close(out, one_by_one(model, vs), rtol=1e-5, atol=1e-6)
    # [V, B, C, H, W] stacks (a RareRing's storage) count as V views, used without a copy
    calls.clear()
    glob, loc = views(2, [16, 16], gen), views(2, [8, 8, 8], gen)
    stacked = model([torch.stack(glob), torch.stack(loc)])
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    torch.testing.assert_close(stacked, model(glob + loc))
    # a single tensor is one view
    torch.testing.assert_close(model(glob[0]), model([glob[0]]))
    with pytest.raises(ValueError, match="view 0 must be"):
        model([torch.randn(3, 8, 8)])


def test_wrapper_around_resnet18_keeps_dino_keys_and_loads_into_torchvision():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    model = MultiCropWrapper(backbone, DINOHead(dim, 64, hidden_dim=32, bottleneck_dim=16)).eval()
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert "head.last_layer.weight_g" in keys and not any(k.startswith("backbone.fc") for k in keys)
    # DINO's eval scripts strip "backbone." and load into a torchvision model with strict=False
    plain = torchvision.models.resnet18()
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    calls = counting(model.backbone)
    gen = torch.Generator().manual_seed(2)
    vs = views(2, [32, 32, 16, 16], gen)
    with torch.no_grad():
        out = model(vs)
        assert len(calls) == 2
        torch.testing.assert_close(out, one_by_one(model, vs), rtol=1e-4, atol=1e-5)  # eval: BN uses running stats


def test_build_backbone():
    model, dim = build_backbone("resnet18")
    assert dim == 512 and isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    for bad in ["resnet51", "vit_b_16", ""]:
        with pytest.raises(ValueError, match=r"unknown backbone arch .*resnet18.*resnet50"):
            build_backbone(bad)


def test_teacher_logits_are_fp32_under_bf16_autocast():
    """The teacher's logits feed a softmax at temperature 0.04: bf16 rounding (2^-8 relative) would be
    magnified 25-fold. With fp32_logits the bottleneck and last layer run in fp32 under autocast."""
    torch.manual_seed(0)
    head = DINOHead(32, 512, hidden_dim=64, bottleneck_dim=16, fp32_logits=True)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        mlp = head.mlp(x)  # the MLP still runs in bf16
    assert out.dtype == torch.float32 and mlp.dtype == torch.bfloat16
    expected = head.last_layer(torch.nn.functional.normalize(mlp.float(), dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    head.fp32_logits = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.bfloat16
