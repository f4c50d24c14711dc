"""--optimizer sgd|lars: the same updates as DINO's (torch.optim.SGD with momentum 0.9, utils.LARS), and a
non-finite step skipped on the device through ``found_inf`` (as fused AdamW), bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodfast.train.optim import LARS, SGD, build_optimizer, param_groups


class DinoLARS(torch.optim.Optimizer):
    """facebookresearch/dino's utils.LARS, restated (per parameter, Python loop)."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0., torch.where(update_norm > 0, g["eta"] * param_norm / update_norm,
                                                                 one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def backward(m: nn.Module, step: int) -> None:
    torch.manual_seed(100 + step)
    m.zero_grad(set_to_none=True)
    m(torch.randn(4, 3, 9, 9)).pow(2).sum().backward()


def run(opt_factory, steps: int = 5, *, found_inf: bool = False, bad_step: int | None = None):
    m = model()
    opt = opt_factory(param_groups(m))
    for step in range(steps):
        backward(m, step)
        if step == bad_step:
            for p in m.parameters():
                p.grad.fill_(float("nan"))
            p.grad.view(-1)[0] = float("inf")
        for i, g in enumerate(opt.param_groups):
            g["lr"] = 0.1 / (1 + step)
            if i == 0:
                g["weight_decay"] = 0.04 + 0.01 * step
        if found_inf:
            opt.found_inf = torch.tensor(float(step == bad_step))
        opt.step()
    return m, opt


@pytest.mark.parametrize("ours, reference", [
    (lambda g: SGD(g, lr=0, momentum=0.9), lambda g: torch.optim.SGD(g, lr=0, momentum=0.9)),
    (lambda g: LARS(g), lambda g: DinoLARS(g)),
])
@pytest.mark.parametrize("found_inf", [False, True])
def test_updates_equal_dinos_optimizers(ours, reference, found_inf):
    a, _ = run(ours, found_inf=found_inf)
    b, _ = run(reference)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert not all(torch.equal(p, q) for p, q in zip(model().parameters(), a.parameters())), "nothing moved"


@pytest.mark.parametrize("factory", [lambda g: SGD(g, lr=0, momentum=0.9), lambda g: LARS(g)], ids=["sgd", "lars"])
def test_a_non_finite_step_is_skipped_on_the_device(factory):
    """found_inf = 1 with NaN / inf gradients: weights and momentum buffers stay bit for bit; the run then
    continues exactly as one that never had that step (the bad step's index only shifts the schedule)."""
    good, _ = run(factory, steps=2, found_inf=True)
    m, opt = run(factory, steps=2, found_inf=True)
    before = [p.detach().clone() for p in m.parameters()] + [s[k].clone() for s in opt.state.values() for k in s]
    backward(m, 2)
    for p in m.parameters():
        p.grad.fill_(float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    after = [p.detach().clone() for p in m.parameters()] + [s[k].clone() for s in opt.state.values() for k in s]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert all(torch.isfinite(x).all() for x in after)
    for p, q in zip(m.parameters(), good.parameters()):
        assert torch.equal(p, q)


def test_a_skipped_first_step_leaves_no_garbage_state():
    """A first step that is skipped (no momentum yet) must not leave an uninitialised buffer behind."""
    m, opt = run(lambda g: SGD(g, lr=0, momentum=0.9), steps=1, found_inf=True, bad_step=0)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), model().parameters()))
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in opt.state.values())


def test_build_optimizer_names_dinos_three():
    m = model()
    assert isinstance(build_optimizer("adamw", m), torch.optim.AdamW)
    assert type(build_optimizer("sgd", m)) is SGD and build_optimizer("sgd", m).defaults["momentum"] == 0.9
    assert isinstance(build_optimizer("lars", m), LARS)
    with pytest.raises(ValueError, match="adamw, sgd or lars"):
        build_optimizer("adam", m)
