"""DINO's optimiser helpers: parameter groups, per-parameter gradient clipping, last-layer freezing.

Same behaviour as facebookresearch/dino's ``utils.get_params_groups``, ``utils.clip_gradients`` and
``utils.cancel_gradients_last_layer``. The clipping is rewritten with foreach ops and returns the norms
as a tensor instead of a list of ``.item()`` floats, so it never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["cancel_last_layer_gradients_", "clip_gradients_", "grad_norms", "param_groups"]


def param_groups(model: nn.Module) -> list[dict]:
    """DINO's two AdamW groups: weights (decayed), then biases and 1-D (norm) parameters (no decay).

    Parameters with ``requires_grad=False`` (e.g. the frozen ``last_layer.weight_g``) are left out.
    The schedules set group 0's weight decay; group 1 keeps ``weight_decay=0``.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.dim() == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_(model: nn.Module | Iterable[torch.Tensor], clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to L2 norm ``clip`` on its own (DINO's ``clip_gradients``).

    For every parameter with a gradient: ``coef = clip / (||g|| + 1e-6)``; if ``coef < 1``, ``g *= coef``.
    Here ``g *= min(coef, 1)`` for all (multiplying by 1.0 leaves g bit-for-bit unchanged), so there is
    no branch on a tensor value.

    Args:
        model: a module (its ``parameters()``) or an iterable of parameters.
        clip: the maximal norm per parameter (DINO: 3.0), > 0.

    Returns:
        the gradient norms before clipping, a 1-D fp32 tensor with one entry per parameter that has a
        gradient (DINO returns them as a list of floats).
    """
    if clip <= 0:
        raise ValueError(f"clip_gradients_: clip must be > 0 (0 disables clipping: do not call), got {clip}")
    params = model.parameters() if isinstance(model, nn.Module) else model
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = grad_norms(grads)
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    if all(g.dtype == torch.float32 for g in grads):
        torch._foreach_mul_(grads, list(coefs.unbind(0)))  # one fused launch per dtype/device
    else:
        torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(0), grads)])
    return norms


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor in ``grads``: a 1-D fp32 tensor (foreach kernels, no host sync)."""
    return torch.stack(torch._foreach_norm(grads)).float()


def cancel_last_layer_gradients_(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """While ``epoch < freeze_last_layer``, drop the gradients of every parameter whose name contains
    ``last_layer`` (DINO keeps the head's output layer fixed during the first epoch), so the optimiser
    skips them entirely (no Adam moment or weight-decay update), as in DINO."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None
