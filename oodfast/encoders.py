"""Backbones and frozen encoders: the one place oodfast builds or loads an encoder.

``build_backbone(arch)`` returns a randomly initialised torchvision backbone with ``fc`` removed;
``load_encoder(source, arch, device)`` returns it frozen (eval mode, no gradients), mapping
[B, 3, H, W] to [B, D], from an oodfast / facebookresearch/dino training checkpoint (its teacher's
``backbone.*``), a plain backbone state dict (e.g. DINO's released ``dino_resnet50_pretrain.pth``),
or ``"random"`` (the untrained baseline). Files are read with ``weights_only=True``: a file that
would execute code is refused.

Every caller goes through :func:`load_encoder`: ``oodfast evaluate`` and :mod:`oodfast.evaluate`,
the trainer's frozen detector (``load_encoder(path, "resnet50", device)``) and the drop-in API,
whose :func:`oodfast.compat.load_resnet50_trunk` is that same call with the DINO-weights hint added
to its errors. This module imports nothing from ``oodfast.train`` at import time (the checkpoint
reader is imported when a file is loaded).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn


# torchvision classification families whose models end in a linear ``fc``: the supported backbones.
_FC_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet_")


def backbone_names() -> list[str]:
    """Names ``build_backbone`` accepts: torchvision classification models with an ``fc`` classifier."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n.startswith(_FC_FAMILIES))


def build_backbone(arch: str = "resnet50") -> tuple[nn.Module, int]:
    """A randomly initialised torchvision backbone with ``fc = nn.Identity()`` and its feature width.

    Args:
        arch: torchvision model name, e.g. ``resnet50`` (the paper's), ``resnet18``, ``resnext50_32x4d``.

    Returns:
        (module mapping [B, 3, H, W] to [B, embed_dim], embed_dim), e.g. 2048 for resnet50.
    """
    valid = backbone_names()
    if arch not in valid:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of: {', '.join(valid)}")
    model = torchvision.models.get_model(arch, weights=None)
    embed_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, embed_dim


def _backbone_state(state: Mapping[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """``backbone.*`` entries of a teacher/student state dict (prefixes stripped), or a bare backbone's."""
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = value
    if any(k.startswith("backbone.") for k in clean):
        return {k[len("backbone."):]: v for k, v in clean.items() if k.startswith("backbone.")}
    if any(k.startswith("head.") for k in clean):
        raise ValueError(f"{source}: the state dict has head.* but no backbone.* keys; it is not a DINO teacher/student")
    return clean


def load_encoder(
    source: str | os.PathLike[str],
    arch: str = "resnet50",
    device: str | torch.device = "cpu",
    *,
    checkpoint_key: str = "teacher",
    seed: int = 0,
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
        arch: torchvision backbone name (:func:`build_backbone`).
        device: where the module goes.
        checkpoint_key: which network of a training checkpoint (``teacher`` or ``student``).

    Raises:
        ValueError (``CheckpointError`` for unreadable files): a missing file, an unknown arch, a
        checkpoint without ``checkpoint_key``, or weights that do not fit ``arch`` (the message
        names the missing, unexpected and mis-shaped keys).
    """
    from oodfast.train.checkpoint import CheckpointError, load_checkpoint

    if str(source) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _ = build_backbone(arch)
        return _frozen(model, device)

    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"encoder source {path} does not exist; pass an oodfast/DINO checkpoint "
                         f"(e.g. OUTPUT_DIR/checkpoint.pth from `oodfast train`), DINO backbone weights, or 'random'")
    model, _ = build_backbone(arch)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        if "is not a DINO/oodfast training checkpoint" not in str(e):
            raise
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # loads: load_checkpoint just did
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint") from None
        if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], Mapping):
            state = ckpt[checkpoint_key]
        elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = ckpt
        else:
            raise ValueError(f"{path} is neither a training checkpoint with a {checkpoint_key!r} entry nor a plain "
                             f"state dict of tensors (top-level keys: {sorted(map(str, ckpt))[:8]})") from None
    else:
        if checkpoint_key not in ckpt:
            raise ValueError(f"checkpoint {path} has no {checkpoint_key!r} entry (keys: {sorted(ckpt)})")
        state = ckpt[checkpoint_key]
    weights = _backbone_state(state, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not k.startswith("fc."))
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
        trained = ckpt.get("args", {}).get("arch") if isinstance(ckpt.get("args"), Mapping) else None
        hint = f" (the checkpoint says arch {trained!r})" if trained else " (its args['arch'])"
        raise ValueError(f"weights in {path} do not fit arch {arch!r}: " + "; ".join(parts) +
                         f". Pass the arch the checkpoint was trained with{hint}")
    model.load_state_dict({k: weights[k] for k in expected}, strict=True)
    return _frozen(model, device)


def _frozen(model: nn.Module, device: str | torch.device) -> nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


