"""oodfast.vit against facebookresearch/dino's ViT: parameter names, shapes and outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oodfast.vit import VisionTransformer, build_vit


def dino_key_names(depth: int) -> list[str]:
    """The state-dict keys of DINO's ``vision_transformer.VisionTransformer`` (num_classes=0)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return keys + ["norm.weight", "norm.bias"]


@pytest.mark.parametrize("arch,patch,dim", [("vit_tiny", 16, 192), ("vit_small", 16, 384), ("vit_small", 8, 384),
                                            ("vit_base", 16, 768)])
def test_parameter_names_and_shapes_are_dinos(arch: str, patch: int, dim: int) -> None:
    sd = build_vit(arch, patch).state_dict()
    assert list(sd) == dino_key_names(12)
    assert sd["pos_embed"].shape == (1, (224 // patch) ** 2 + 1, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, patch, patch)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim) and sd["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)


def dino_forward(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """DINO's forward written out: explicit softmax attention, its positional-embedding rule."""
    B, _, h, w = x.shape
    p = m.patch_embed.patch_size
    t = torch.cat((m.cls_token.expand(B, -1, -1), m.patch_embed.proj(x).flatten(2).transpose(1, 2)), 1)
    n = m.pos_embed.shape[1] - 1
    pos = m.pos_embed
    if t.shape[1] - 1 != n or h != w:
        side = int(math.sqrt(n))
        grid = m.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h // p + 0.1) / side, (w // p + 0.1) / side), mode="bicubic")
        pos = torch.cat((m.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, t.shape[-1])), 1)
    t = t + pos
    for blk in m.blocks:
        y = blk.norm1(t)
        N, C, H = y.shape[1], y.shape[2], blk.attn.num_heads
        q, k, v = blk.attn.qkv(y).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
        t = t + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    return m.norm(t)[:, 0]


@pytest.mark.parametrize("size", [(64, 64), (32, 32), (48, 32)], ids=["trained-size", "local", "non-square"])
def test_outputs_match_dinos_forward(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3).eval()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        ours, ref = m(x), dino_forward(m, x)
        attn = m.get_last_selfattention(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    n = (size[0] // 16) * (size[1] // 16) + 1
    assert attn.shape == (3, 3, n, n)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 3, n))
    assert [t.shape for t in m.get_intermediate_layers(x, 2)] == [(3, n, 48)] * 2


def test_released_weights_load_strictly_both_ways() -> None:
    a, b = build_vit("vit_tiny", 16), build_vit("vit_tiny", 16)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_two_crop_resolutions_compile_once_each() -> None:
    m = VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2).eval()
    compiled = torch.compile(m, fullgraph=True)
    big, small = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        compiled(big), compiled(small)
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(compiled(big * 2), m(big * 2), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(compiled(small), m(small), rtol=1e-4, atol=1e-4)


def test_drop_path_is_per_sample_in_training_only() -> None:
    m = build_vit("vit_tiny", 16, drop_path_rate=0.5)
    assert m.blocks[0].drop_path.__class__.__name__ == "Identity"  # DINO's linear decay starts at 0
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), m(x))


def test_bad_sizes_and_options_are_named() -> None:
    m = VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not a whole number of 16x16 patches"):
        m(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="unknown ViT arch 'vit_huge'"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="--patch_size must be 8 or 16"):
        build_vit("vit_small", 14)
