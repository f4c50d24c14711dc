"""Vision Transformers with facebookresearch/dino's parameter names, so DINO's weights load strictly.

``vit_tiny`` / ``vit_small`` / ``vit_base`` (patch 8 or 16) build the encoders of DINO's
``vision_transformer.py``: the state-dict keys (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``), the shapes, the
initialisation and the outputs are DINO's, so a released checkpoint (``dino_deitsmall16_pretrain.pth``)
loads with ``strict=True`` and an oodfast teacher's ``backbone.*`` loads into DINO's own model.

Differences that change no number beyond float rounding: attention runs through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU) instead of an
explicit softmax, and ``forward`` returns the [CLS] embedding, as DINO's does. Positional embeddings
are interpolated to the crop's patch grid with DINO's rule (bicubic, scale factor of the grid + 0.1):
global and local crops are two static resolutions, so a compiled step specialises once per
resolution and never recompiles.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VIT_ARCHS", "VisionTransformer", "build_vit", "vit_base", "vit_small", "vit_tiny"]


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention map [B, heads, N, N] (DINO's ``get_last_selfattention``)."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_layer) -> None:  # noqa: ANN001
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT encoder: [B, 3, H, W] -> the [CLS] embedding [B, embed_dim] (H, W multiples of the patch)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)) -> None:  # noqa: ANN001
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # DINO's stochastic-depth decay rule
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, norm_layer) for r in rates)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int) -> torch.Tensor:
        """Positional embeddings for an h x w pixel input, resampled as DINO does."""
        n = self.pos_embed.shape[1] - 1
        if n_patches == n and h == w:
            return self.pos_embed
        side = math.isqrt(n)
        p = self.patch_embed.patch_size
        h0, w0 = h // p + 0.1, w // p + 0.1  # DINO's offset against floating-point rounding of the size
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), scale_factor=(h0 / side, w0 / side), mode="bicubic").to(grid.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        p = self.patch_embed.patch_size
        if h % p or w % p:
            raise ValueError(f"a {h}x{w} input is not a whole number of {p}x{p} patches; use crop sizes that "
                             f"are multiples of --patch_size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, h, w)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm, [B, 1 + h*w, D] ([CLS] first)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The normed tokens of the last ``n`` blocks (DINO's linear evaluation reads them)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


#: DINO's ViT sizes: embed dim, depth, heads.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
                                               "vit_base": (768, 12, 12)}


def build_vit(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0) -> VisionTransformer:
    """One of :data:`VIT_ARCHS` with DINO's settings (qkv bias, LayerNorm eps 1e-6, MLP ratio 4)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; choose one of: {', '.join(VIT_ARCHS)}")
    if patch_size not in (8, 16):
        raise ValueError(f"--patch_size must be 8 or 16 (DINO's released ViTs), got {patch_size}")
    dim, depth, heads = VIT_ARCHS[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                             drop_path_rate=drop_path_rate)


vit_tiny = partial(build_vit, "vit_tiny")
vit_small = partial(build_vit, "vit_small")
vit_base = partial(build_vit, "vit_base")
