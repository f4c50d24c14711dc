"""Frozen encoders from checkpoints, weights files or 'random' (oodfast.encoders.load_encoder)."""

from __future__ import annotations

import pytest
import torch

from oodfast.dense import position_view
from oodfast.encoders import DENSE_LAYERS, build_backbone, dense_dim, feature_map, load_encoder
from oodfast.train.checkpoint import save_checkpoint


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def dino_checkpoint(path, backbone: torch.nn.Module, arch: str):  # noqa: ANN001, ANN201
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 512)
    return save_checkpoint(path, {"student": teacher, "teacher": teacher, "optimizer": {}, "epoch": 1,
                                  "args": {"arch": arch}, "dino_loss": {}})


def test_load_encoder_random_is_seeded_and_frozen() -> None:
    state = torch.get_rng_state()
    a = load_encoder("random", "resnet18", "cpu", seed=3)
    b = load_encoder("random", "resnet18", "cpu", seed=3)
    c = load_encoder("random", "resnet18", "cpu", seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_load_encoder_from_checkpoint_and_plain_state_dict(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = dino_checkpoint(tmp_path / "checkpoint.pth", net, "resnet18")
    enc = load_encoder(path, "resnet18", "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    # DINO's released backbone weights: a bare state dict (a torchvision fc is ignored).
    bare = {**net.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(bare, tmp_path / "bare.pth")
    enc2 = load_encoder(tmp_path / "bare.pth", "resnet18", "cpu")
    assert torch.equal(enc2.conv1.weight, net.conv1.weight)


def test_load_encoder_clear_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder(tmp_path / "nope.pth", "resnet18", "cpu")
    net, _ = build_backbone("resnet18")
    path = dino_checkpoint(tmp_path / "checkpoint.pth", net, "resnet18")
    with pytest.raises(ValueError, match=r"missing \(first: layer1\.2\.") as err:
        load_encoder(path, "resnet34", "cpu")
    assert "'resnet18'" in str(err.value)  # the arch it was trained with
    with pytest.raises(ValueError, match=r"mis-shaped: .*\(64, 64, 3, 3\)"):
        load_encoder(path, "resnet50", "cpu")
    with pytest.raises(ValueError, match="unknown backbone arch"):
        load_encoder("random", "resnet7", "cpu")
    with pytest.raises(ValueError, match="no 'ema'"):
        load_encoder(path, "resnet18", "cpu", checkpoint_key="ema")


def dino_vit_checkpoint(path, arch: str = "vit_tiny", patch_size: int = 16):  # noqa: ANN001, ANN201
    """A checkpoint as facebookresearch/dino's main_dino.py writes it: ``args`` an argparse.Namespace, the
    DDP-wrapped student's keys ``module.backbone.*`` / ``module.head.*``, the teacher's ``backbone.*``
    (DINO wraps a ViT teacher without DDP). Student and teacher hold different weights."""
    import argparse

    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(build_backbone(arch, patch_size=patch_size)[0])
    student, teacher = nets
    head = {"head.last_layer.weight_g": torch.ones(8, 1), "head.mlp.0.weight": torch.zeros(4, student.embed_dim)}
    torch.save({
        "student": {f"module.{k}": v for k, v in ({f"backbone.{k}": v for k, v in student.state_dict().items()}
                                                  | head).items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()} | head,
        "optimizer": {}, "epoch": 3, "dino_loss": {"center": torch.zeros(1, 8)},
        "args": argparse.Namespace(arch=arch, patch_size=patch_size, out_dim=8, lr=5e-4),
    }, path)
    return path, student, teacher


def test_load_encoder_dino_vit_checkpoint(tmp_path) -> None:  # noqa: ANN001
    path, student, teacher = dino_vit_checkpoint(tmp_path / "checkpoint.pth")
    enc = load_encoder(path, "vit_tiny", "cpu")  # DINO's default --checkpoint_key teacher
    for k, v in teacher.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    enc_s = load_encoder(path, "vit_tiny", "cpu", checkpoint_key="student")  # module. prefix stripped
    for k, v in student.state_dict().items():
        assert torch.equal(enc_s.state_dict()[k], v), k
    assert not enc_s.training and not any(p.requires_grad for p in enc_s.parameters())
    x = torch.randn(2, 3, 32, 32)
    feats = enc_s(x)
    assert feats.shape == (2, 192)
    torch.testing.assert_close(feats, student.eval()(x))  # the [CLS] embedding of the trained student
    assert not torch.allclose(feats, enc(x))
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight .*the checkpoint says arch 'vit_tiny', patch_size 16"):
        load_encoder(path, "vit_tiny", "cpu", patch_size=8)
    with pytest.raises(ValueError, match="mis-shaped: .*the checkpoint says arch 'vit_tiny'"):
        load_encoder(path, "vit_small", "cpu")


@pytest.mark.parametrize("layer, stride", [("layer2", 8), ("layer3", 16), ("layer4", 32)])
def test_feature_map_of_a_resnet_stage_is_channels_last_and_viewable(layer, stride):
    model = load_encoder("random", "resnet18")
    x = torch.randn(2, 3, 64, 96)
    fmap = feature_map(model, x, layer)
    assert DENSE_LAYERS[layer] == stride
    assert fmap.shape == (2, dense_dim("resnet18", layer), 64 // stride, 96 // stride)
    assert fmap.is_contiguous(memory_format=torch.channels_last)
    assert position_view(fmap).data_ptr() == fmap.data_ptr()
    if layer == "layer4":  # the pooled embedding is the mean of the last map's positions
        torch.testing.assert_close(fmap.mean((2, 3)), model(x), rtol=1e-4, atol=1e-5)


def test_dense_dim_and_vit_tokens():
    assert (dense_dim("resnet50", "layer3"), dense_dim("resnet50", "layer4"), dense_dim("vit_small", "tokens")) \
        == (1024, 2048, 384)
    vit = load_encoder("random", "vit_tiny")
    x = torch.randn(2, 3, 32, 48)
    tokens = feature_map(vit, x, "tokens")
    assert tokens.shape == (2, 6, dense_dim("vit_tiny", "tokens"))
    torch.testing.assert_close(tokens, vit.forward_tokens(x)[:, 1:])
    for call, match in ((lambda: feature_map(vit, x), "layer='tokens'"),
                        (lambda: dense_dim("resnet50", "layer9"), "unknown dense layer"),
                        (lambda: dense_dim("regnet_x_400mf", "layer3"), "ResNet-style")):
        with pytest.raises(ValueError, match=match):
            call()
