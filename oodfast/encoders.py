"""Backbones and frozen encoders: the one place oodfast builds or loads an encoder.

``build_backbone(arch)`` returns a randomly initialised backbone: a torchvision ResNet-family model
with ``fc`` removed, or one of DINO's ViTs (:mod:`oodfast.vit`, ``vit_tiny|vit_small|vit_base`` with
``patch_size`` 8 or 16). ``load_encoder(source, arch, device)`` returns it frozen (eval mode, no gradients), mapping
[B, 3, H, W] to [B, D], from an oodfast / facebookresearch/dino training checkpoint (its teacher's
``backbone.*``), a plain backbone state dict (e.g. DINO's released ``dino_resnet50_pretrain.pth``),
or ``"random"`` (the untrained baseline). Files are read with ``weights_only=True``: a file that
would execute code is refused.

Every caller goes through :func:`load_encoder`: ``oodfast evaluate`` and :mod:`oodfast.evaluate`,
the trainer's frozen detector (``load_encoder(path, "resnet50", device)``) and the drop-in API,
whose :func:`oodfast.compat.load_resnet50_trunk` is that same call with the DINO-weights hint added
to its errors. Files are read by :mod:`oodfast.safeload` (DINO's loading rule: ``module.`` and
``backbone.`` prefixes stripped); nothing here imports from ``oodfast.train``.

Dense features (:mod:`oodfast.dense`): :func:`feature_map` returns a backbone's map before pooling, a
ResNet stage (``layer2|layer3|layer4``) as channels_last [B, D, h, w] or a ViT's patch tokens [B, N, D]
(``tokens``); :func:`dense_dim` gives its D.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from oodfast.safeload import checkpoint_args, load_torch_file, network_state
from oodfast.vit import VIT_ARCHS, build_vit

# torchvision classification families whose models end in a linear ``fc``: the supported backbones.
_FC_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet_")


def backbone_names() -> list[str]:
    """Names ``build_backbone`` accepts: DINO's ViTs, and torchvision classification models with an
    ``fc`` classifier."""
    names = torchvision.models.list_models(module=torchvision.models)
    return list(VIT_ARCHS) + sorted(n for n in names if n.startswith(_FC_FAMILIES))


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def build_backbone(arch: str = "resnet50", *, patch_size: int = 16, drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
    """A randomly initialised backbone without classifier, and its feature width.

    Args:
        arch: ``vit_tiny`` / ``vit_small`` / ``vit_base`` (DINO's ViTs), or a torchvision model name,
            e.g. ``resnet50`` (the paper's), ``resnet18``, ``resnext50_32x4d``.
        patch_size, drop_path_rate: ViTs only (DINO's ``--patch_size`` and ``--drop_path_rate``).

    Returns:
        (module mapping [B, 3, H, W] to [B, embed_dim], embed_dim), e.g. 2048 for resnet50, 384 for vit_small.
    """
    if is_vit(arch):
        model = build_vit(arch, patch_size, drop_path_rate)
        return model, model.embed_dim
    valid = backbone_names()
    if arch not in valid:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of: {', '.join(valid)}")
    model = torchvision.models.get_model(arch, weights=None)
    embed_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, embed_dim


#: The maps :func:`feature_map` returns: layer -> input pixels per position (a ViT's: its patch size).
#: At 224 x 224 input, layer3 is 14 x 14 positions (the dense detector's default), layer4 7 x 7.
DENSE_LAYERS: dict[str, int | None] = {"layer2": 8, "layer3": 16, "layer4": 32, "tokens": None}
_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")
_RESNET_FAMILIES = ("resnet", "resnext", "wide_resnet")  # torchvision models with layer1..layer4


def _check_dense_layer(arch_or_model: str | nn.Module, layer: str) -> None:
    vit = is_vit(arch_or_model) if isinstance(arch_or_model, str) else hasattr(arch_or_model, "forward_tokens")
    if layer not in DENSE_LAYERS:
        raise ValueError(f"unknown dense layer {layer!r}; choose one of: {', '.join(DENSE_LAYERS)}")
    if vit and layer != "tokens":
        raise ValueError(f"a ViT's dense features are its patch tokens: pass layer='tokens', not {layer!r}")
    if not vit and layer == "tokens":
        raise ValueError("layer='tokens' is for DINO's ViTs; a ResNet's dense layers are layer2, layer3, layer4")


def dense_dim(arch: str, layer: str = "layer3") -> int:
    """Channels D of :func:`feature_map`'s output for ``arch`` at ``layer``, e.g. resnet50 layer3: 1024,
    resnet18 layer3: 256, vit_small tokens: 384 (the model is built on the meta device: no weights)."""
    _check_dense_layer(arch, layer)
    if is_vit(arch):
        return VIT_ARCHS[arch][0]
    if arch not in backbone_names():
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of: {', '.join(backbone_names())}")
    if not arch.startswith(_RESNET_FAMILIES):
        raise ValueError(f"{arch} has no stage {layer!r}: dense maps are for ResNet-style models "
                         f"({', '.join(_RESNET_FAMILIES)}: layer2..layer4) and DINO's ViTs")
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    return [m for m in getattr(model, layer).modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def feature_map(backbone: nn.Module, x: torch.Tensor, layer: str = "layer3") -> torch.Tensor:
    """The dense features of ``backbone`` (from :func:`build_backbone` / :func:`load_encoder`) for
    images ``x`` [B, 3, H, W], without pooling.

    Returns:
        ResNet (``layer2|layer3|layer4``): the stage's output [B, D, H/s, W/s] (s = DENSE_LAYERS[layer])
        in channels_last memory, so :func:`oodfast.dense.position_view` views it without a copy. ViT
        (``tokens``): the patch tokens of the last block after the final norm, [B, N, D] ([CLS]
        dropped; a view, contiguous in D).

    Raises:
        ValueError: an unknown layer, a layer that does not fit the model, or a model with neither
        ResNet stages nor ViT tokens.
    """
    _check_dense_layer(backbone, layer)
    if hasattr(backbone, "forward_tokens"):
        return backbone.forward_tokens(x)[:, 1:]
    if not all(hasattr(backbone, n) for n in (*_RESNET_STEM, layer)):
        raise ValueError(f"{type(backbone).__name__} has no ResNet stages (conv1 ... {layer}): feature_map "
                         "takes build_backbone's ResNets and ViTs")
    y = x.contiguous(memory_format=torch.channels_last)
    for name in (*_RESNET_STEM, "layer1", "layer2", "layer3", "layer4"):
        y = getattr(backbone, name)(y)
        if name == layer:
            break
    return y.contiguous(memory_format=torch.channels_last)  # no copy when the convs kept channels_last


def load_encoder(
    source: str | os.PathLike[str],
    arch: str = "resnet50",
    device: str | torch.device = "cpu",
    *,
    checkpoint_key: str = "teacher",
    seed: int = 0,
    patch_size: int = 16,
) -> nn.Module:
    """A frozen backbone (eval mode, no gradients) mapping [B, 3, H, W] to features [B, D].

    Args:
        source: ``"random"`` for a randomly initialised ``arch`` (the no-pretraining baseline; its
            initialisation is seeded by ``seed`` and does not touch the global RNG), or a path to
            (a) an oodfast / facebookresearch/dino training checkpoint: the ``checkpoint_key``
            (``teacher``) state dict's ``backbone.*`` keys are loaded (``module.`` / ``_orig_mod.``
            prefixes stripped); or (b) a plain backbone state dict, e.g. DINO's released
            ``dino_resnet50_pretrain.pth`` (a torchvision ``fc`` is ignored). Loading is
            ``weights_only`` (no code runs).
        arch: a backbone name of :func:`build_backbone` (a torchvision ResNet or DINO's ViTs).
        device: where the module goes.
        checkpoint_key: which network of a training checkpoint (``teacher`` or ``student``).
        patch_size: a ViT's patch size (8 or 16; DINO's ``--patch_size``).

    Raises:
        ValueError (``CheckpointError`` for unreadable files): a missing file, an unknown arch, a
        checkpoint without ``checkpoint_key``, or weights that do not fit ``arch`` (the message
        names the missing, unexpected and mis-shaped keys).
    """
    if str(source) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _ = build_backbone(arch, patch_size=patch_size)
        return _frozen(model, device)

    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"encoder source {path} does not exist; pass an oodfast/DINO checkpoint "
                         f"(e.g. OUTPUT_DIR/checkpoint.pth from `oodfast train`), DINO backbone weights, or 'random'")
    model, _ = build_backbone(arch, patch_size=patch_size)
    ckpt = load_torch_file(path)
    weights = backbone_weights(network_state(ckpt, checkpoint_key, path), path)
    args = checkpoint_args(ckpt) if isinstance(ckpt, Mapping) else {}
    load_weights(model, weights, path, arch, trained=args.get("arch"),
                 trained_patch_size=args.get("patch_size") if is_vit(str(args.get("arch"))) else None)
    return _frozen(model, device)


def backbone_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The encoder's part of :func:`oodfast.safeload.network_state`'s output: ``head.*`` (DINO's
    projection head) dropped; a state dict that holds only a head is refused."""
    if state and all(k.startswith("head.") for k in state):
        raise ValueError(f"{path}: the state dict has head.* but no backbone.* keys; it is not a DINO teacher/student")
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str | os.PathLike[str], arch: str,
                 *, trained: str | None = None, trained_patch_size: int | None = None) -> None:
    """``model.load_state_dict(weights, strict=True)``, ignoring a classifier (``fc.*`` / ``head.*``).

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys, and the arch (and a ViT's
            patch size) the checkpoint says it was trained with (``trained``, ``trained_patch_size``).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not k.startswith(("fc.", "head.")))
    shapes = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append("mis-shaped: " + ", ".join(
                f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:5]))
        hint = f" (the checkpoint says arch {trained!r})" if trained else " (its args['arch'])"
        if trained_patch_size is not None:
            hint = f" (the checkpoint says arch {trained!r}, patch_size {trained_patch_size})"
        raise ValueError(f"weights in {path} do not fit arch {arch!r}: " + "; ".join(parts) +
                         f". Pass the arch{' and patch size' if trained_patch_size is not None else ''} the "
                         f"checkpoint was trained with{hint}")
    model.load_state_dict({k: weights[k] for k in expected}, strict=True)


def _frozen(model: nn.Module, device: str | torch.device) -> nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


