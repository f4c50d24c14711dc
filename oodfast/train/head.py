"""DINO's projection head, the multi-crop wrapper and torchvision backbones.

Parameter names follow facebookresearch/dino (``vision_transformer.DINOHead`` and
``utils.MultiCropWrapper``), so a checkpoint's ``teacher`` / ``student`` state dicts have the keys
DINO's own scripts expect: ``backbone.*`` (a torchvision ResNet without ``fc``) and ``head.mlp.*``,
``head.last_layer.weight_g``, ``head.last_layer.weight_v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oodfast.encoders import backbone_names, build_backbone  # re-exported by oodfast.train

__all__ = ["DINOHead", "MultiCropWrapper", "WeightNormLinear", "backbone_names", "build_backbone"]


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation, ``W = g * v / ||v||`` row by row.

    Computes what ``torch.nn.utils.weight_norm(nn.Linear(in_features, out_features, bias=False))``
    computes (``dim=0``), with the same parameter names and shapes: ``weight_g`` [out, 1] and
    ``weight_v`` [out, in]. Written out because that helper is deprecated, its forward pre-hook keeps
    a non-leaf ``weight`` attribute that breaks ``copy.deepcopy`` (the usual way to build a teacher),
    and its replacement (``torch.nn.utils.parametrizations.weight_norm``) renames the parameters to
    ``parametrizations.weight.original0/1``, which DINO checkpoints do not have.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # v starts as nn.Linear's default (Kaiming-uniform) weight, as in DINO; g = 1 as DINO sets it.
        v = nn.Linear(in_features, out_features, bias=False).weight.detach().clone()
        # Registered g first, then v: the order of torch.nn.utils.weight_norm (and of DINO's state dicts).
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [out, in]: ``v * (g / ||v||_2)`` with the norm over each row."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out]."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> weight-normalised linear layer.

    Args:
        in_dim: backbone feature dimension (2048 for ResNet-50).
        out_dim: number of prototypes K (DINO: 65536).
        use_bn: BatchNorm1d after each hidden linear layer (DINO's ``--use_bn_in_head``, default off).
        norm_last_layer: freeze ``last_layer.weight_g`` at 1, so every prototype has unit norm
            (DINO's ``--norm_last_layer``; more stable, the default).
        nlayers: linear layers in the MLP (>= 1; DINO: 3), GELU between them.
        hidden_dim: width of the hidden layers (2048).
        bottleneck_dim: width of the normalised bottleneck (256).
        fp32_logits: compute the normalised bottleneck and the last layer in fp32 even under autocast.
            For the teacher: its logits are divided by a temperature of 0.04, which would magnify bf16's
            2^-8 rounding of each logit 25-fold before the softmax that makes the student's targets;
            in fp32 that last product costs 2 * N * bottleneck_dim * out_dim FLOPs, forward only.

    Linear layers of the MLP start from a truncated normal (std 0.02) with zero bias, as in DINO.
    ``forward`` maps [N, in_dim] to logits [N, out_dim] in the autocast dtype (the loss casts to fp32).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 fp32_logits: bool = False) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim)):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False
        self.out_dim = out_dim
        self.fp32_logits = fp32_logits

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)  # DINO's trunc_normal_: bounds -2, 2 (absolute)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in_dim] -> logits [N, out_dim] (fp32 with ``fp32_logits``, else the autocast dtype)."""
        x = self.mlp(x)
        if self.fp32_logits:
            with torch.autocast(x.device.type, enabled=False):
                return self.last_layer(F.normalize(x.float(), dim=-1, p=2))
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _group_by_resolution(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive views of the same shape; one tensor [sum of rows, C, H, W] per group.

    A 4-D element is one view [B, C, H, W]; a 5-D element [V, B, C, H, W] is V views of one shape
    already stacked (e.g. a RareRing's storage), used without a copy. Grouping uses Python-side shapes
    only, so under torch.compile it is static (no tensor-valued control flow).
    """
    flat: list[torch.Tensor] = []
    for i, v in enumerate(views):
        if v.dim() == 5:
            flat.append(v.flatten(0, 1))
        elif v.dim() == 4:
            flat.append(v)
        else:
            raise ValueError(f"MultiCropWrapper: view {i} must be [B, C, H, W] or [V, B, C, H, W], "
                             f"got shape {tuple(v.shape)}")
    groups: list[list[torch.Tensor]] = []
    for v in flat:
        if groups and groups[-1][-1].shape[1:] == v.shape[1:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [g[0] if len(g) == 1 else torch.cat(g) for g in groups]


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per resolution, then the head once on all features (DINO's wrapper).

    ``forward(views)`` takes a list of views, each [B, 3, H, W] (or [V, B, 3, H, W] for V stacked views),
    concatenates consecutive views of the same shape, runs ``backbone`` once per such group and
    ``head`` once on the concatenated features: output [sum over views of B, out_dim], views in order.

    DINO groups with ``torch.unique_consecutive`` on a tensor of widths; here the grouping is done on
    Python shapes (compile-friendly) and compares the whole (C, H, W) shape, not only the width.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        # As DINO: drop the classifier (torchvision ResNets: fc; ViTs: head).
        if isinstance(getattr(backbone, "fc", None), nn.Module):
            backbone.fc = nn.Identity()
        if isinstance(getattr(backbone, "head", None), nn.Module):
            backbone.head = nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward_backbone(self, views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone features [sum of rows, embed_dim] of all views, in order."""
        if isinstance(views, torch.Tensor):
            views = [views]
        outputs = []
        for batch in _group_by_resolution(views):
            out = self.backbone(batch)
            if isinstance(out, tuple):  # as DINO: some backbones return (features, extras)
                out = out[0]
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def forward(self, views: torch.Tensor | Sequence[torch.Tensor], *,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs [N, out_dim] of all views; with ``return_features`` also the backbone's [N, D]."""
        features = self.forward_backbone(views)
        out = self.head(features)
        return (out, features) if return_features else out
