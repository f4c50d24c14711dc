"""ema_update_: the teacher EMA, in place, equal to DINO's m * t + (1 - m) * s, with a 0-d tensor momentum."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from oodfast.train import DINOHead, ema_update_


def pair(seed=0):
    torch.manual_seed(seed)
    student = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:  # the frozen weight_g stays 1 in both, as in DINO
                p.add_(torch.randn_like(p))
    return list(teacher.parameters()), list(student.parameters())


@pytest.mark.parametrize("momentum", [0.996, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_ema_equals_manual_formula_in_place(momentum, as_tensor):
    teacher, student = pair()
    before = [t.detach().clone() for t in teacher]
    ptrs = [t.data_ptr() for t in teacher]
    m = torch.tensor(momentum) if as_tensor else momentum
    ema_update_(teacher, student, m)
    assert [t.data_ptr() for t in teacher] == ptrs
    for t, t0, s in zip(teacher, before, student):
        torch.testing.assert_close(t, momentum * t0 + (1 - momentum) * s.detach(), rtol=1e-6, atol=1e-7)
    # equal teacher and student entries (the frozen weight_g = 1) stay exactly 1, without drift
    weight_g = teacher[-2]  # DINOHead's parameters end with last_layer.weight_g, last_layer.weight_v
    assert weight_g.shape == (32, 1) and torch.all(weight_g == 1)


def test_momentum_one_keeps_teacher_and_student_is_untouched():
    teacher, student = pair(1)
    before_t = [t.detach().clone() for t in teacher]
    before_s = [s.detach().clone() for s in student]
    ema_update_(teacher, student, torch.tensor(1.0))
    for a, b in zip(teacher, before_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(student, before_s):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_ema_never_recompiles_as_momentum_changes():
    teacher, student = pair(2)
    ref_teacher = [t.detach().clone() for t in teacher]
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(ema_update_, backend=counter, fullgraph=True)
    momentum = torch.zeros(())
    for m in [0.996, 0.997, 0.9995, 1.0]:
        momentum.fill_(m)
        compiled(teacher, student, momentum)
        for i, (t, s) in enumerate(zip(ref_teacher, student)):
            ref_teacher[i] = momentum * t + (1 - momentum) * s.detach()
    assert counter.frame_count == 1
    for a, b in zip(teacher, ref_teacher):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_mismatched_lists_raise():
    teacher, student = pair()
    with pytest.raises(ValueError, match="teacher parameters"):
        ema_update_(teacher[:-1], student, 0.9)
    with pytest.raises(ValueError, match="0-d"):
        ema_update_(teacher, student, torch.tensor([0.9, 0.9]))
