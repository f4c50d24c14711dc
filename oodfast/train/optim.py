"""DINO's optimisers and their helpers: parameter groups, per-parameter gradient clipping, last-layer
freezing, and ``--optimizer adamw|sgd|lars``.

Same behaviour as facebookresearch/dino's ``utils.get_params_groups``, ``utils.clip_gradients``,
``utils.cancel_gradients_last_layer`` and ``utils.LARS``. The clipping is rewritten with foreach ops and
returns the norms as a tensor instead of a list of ``.item()`` floats, so it never synchronises with the
host.

A skipped step is decided on the device: every optimizer :func:`build_optimizer` returns reads a 0-d
``found_inf`` attribute (1.0: skip) in ``step()``, as fused AdamW does, so a non-finite step leaves
weights and optimizer state bit for bit as they were without a host synchronisation. :class:`SGD`
(DINO's ``torch.optim.SGD(momentum=0.9)``) and :class:`LARS` (DINO's ``utils.LARS``) are written for
that with foreach ops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LARS", "SGD", "build_optimizer", "cancel_last_layer_gradients_", "clip_gradients_", "grad_norms",
           "param_groups"]


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


class SGD(torch.optim.Optimizer):
    """SGD with heavy-ball momentum, as DINO runs it (``torch.optim.SGD(groups, lr=0, momentum=0.9)``):
    ``d = g + weight_decay * p``, ``buf = momentum * buf + d`` (``buf = d`` on the first step),
    ``p -= lr * buf``; the buffer is the state's ``momentum_buffer``, as torch's.

    A 0-d ``found_inf`` attribute (1.0 = skip, set by the caller before ``step()``, as for fused AdamW)
    makes the step change nothing, decided on the device: the non-finite gradients of a skipped step
    are zeroed in place first, then the buffer moves by ``lerp(buf, new, keep)`` and the weights by
    ``keep * -lr * buf`` with ``keep = 1 - found_inf``: for a finite update both are exactly unchanged
    when ``keep`` is 0.
    """

    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0) -> None:  # noqa: ANN001
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: lr, momentum and weight_decay must be >= 0, got "
                             f"{lr}, {momentum}, {weight_decay}")
        super().__init__(params, self._defaults(lr=lr, momentum=momentum, weight_decay=weight_decay))

    _state_key = "momentum_buffer"

    def _defaults(self, **values: float) -> dict:
        return values

    def _direction(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step direction before momentum: ``g + weight_decay * p``."""
        if group["weight_decay"]:
            return torch._foreach_add(grads, params, alpha=group["weight_decay"])
        return grads

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1.0 - found_inf.reshape(()).float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if keep is not None:  # a skipped step's gradients may be non-finite: zeros keep the update finite
                for g in grads:
                    g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            bufs = []
            for p in params:
                state = self.state[p]
                if self._state_key not in state:  # zeros: the first step's buffer is then d, as torch's
                    state[self._state_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state[self._state_key])
            direction = self._direction(group, params, grads)
            if keep is None:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, direction)
                torch._foreach_add_(params, bufs, alpha=-group["lr"])
                continue
            new = torch._foreach_mul(bufs, group["momentum"])
            torch._foreach_add_(new, direction)
            weight = keep.to(bufs[0].device)
            # lerp(buf, new, 1) is new and lerp(buf, new, 0) is buf, bit for bit; the list overload takes a
            # 0-d tensor without a host read (see oodfast.train.ema)
            torch._foreach_lerp_(bufs, new, [weight] * len(bufs))
            # keep * buf is buf or 0 exactly; adding it with alpha = -lr is then torch.optim.SGD's own update
            # (multiplying by a float32 keep * -lr instead rounds differently once add_ fuses its alpha)
            torch._foreach_add_(params, torch._foreach_mul(bufs, weight), alpha=-group["lr"])
        return None


class LARS(SGD):
    """DINO's ``utils.LARS`` (from Barlow Twins): SGD with momentum whose update of every parameter
    that is not 1-D (weights, not biases or norm parameters) is weight-decayed and rescaled to
    ``eta * ||p|| / ||d||`` (trust ratio 1 where either norm is 0); 1-D parameters get neither.
    The buffer is the state's ``mu``, as DINO's. ``found_inf`` skips a step as in :class:`SGD`.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,  # noqa: ANN001
                 eta: float = 0.001) -> None:
        self._eta = eta
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    _state_key = "mu"

    def _defaults(self, **values: float) -> dict:
        return {**values, "eta": self._eta}

    def _direction(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(grads)
        idx = [i for i, p in enumerate(params) if p.ndim != 1]
        if not idx:
            return out
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        ds = torch._foreach_add(gs, ps, alpha=group["weight_decay"]) if group["weight_decay"] else list(gs)
        p_norm, d_norm = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(ds))
        one = torch.ones_like(p_norm)
        trust = torch.where(p_norm > 0, torch.where(d_norm > 0, group["eta"] * p_norm / d_norm, one), one)
        ds = torch._foreach_mul(ds, list(trust.unbind(0)))
        for i, d in zip(idx, ds):
            out[i] = d
        return out


def build_optimizer(name: str, model: nn.Module, *, fused: bool = True) -> torch.optim.Optimizer:
    """DINO's ``--optimizer`` over :func:`param_groups`: ``adamw`` (torch's, fused: the skip is its own
    ``found_inf``), ``sgd`` (:class:`SGD`, momentum 0.9) or ``lars`` (:class:`LARS`). The learning rate
    and weight decay are set per step by the schedules."""
    groups = param_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, fused=fused)
    if name == "sgd":
        return SGD(groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or lars")
