"""DINOLoss against a faithful re-statement of facebookresearch/dino's loss (main_dino.DINOLoss)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F

from oodfast.train import DINOLoss

OUT_DIM = 64


class UpstreamDINOLoss:
    """DINO's loss, term by term as in the paper's code: a loop over (teacher view, student view) pairs,
    the centre rebound (not in place) from the batch mean, one process (world size 1)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center = torch.zeros(1, out_dim)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total

    def teacher_entropy(self, teacher_output, temp):
        q = F.softmax((teacher_output - self.center) / temp, dim=-1)
        return -(q * torch.log(q)).sum(-1).mean()


def assert_close_verbose(actual, expected, atol, rtol, what=""):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}); "
                             f"first at {idx}: max abs diff {(actual - expected).abs().max().item():.3e}")


def make_outputs(batch, ncrops, gen, scale=3.0, dtype=torch.float32):
    student = (torch.randn(ncrops * batch, OUT_DIM, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(2 * batch, OUT_DIM, generator=gen) * scale + 0.5).to(dtype)
    return student, teacher


# (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs): DINO's default (no warm-up),
# the paper's warm-up 0.04 -> 0.07, and a high final temperature.
TEMPS = [(0.04, 0.04, 0, 10), (0.04, 0.07, 3, 10), (0.02, 0.1, 5, 8)]


@pytest.mark.parametrize("batch,ncrops,temps", list(itertools.product([1, 3, 8], [2, 4, 8], TEMPS)))
def test_matches_upstream_over_steps_and_epochs(batch, ncrops, temps):
    gen = torch.Generator().manual_seed(batch * 100 + ncrops)
    ours, ref = DINOLoss(OUT_DIM, ncrops, *temps), UpstreamDINOLoss(OUT_DIM, ncrops, *temps)
    np.testing.assert_array_equal(ours.teacher_temp_schedule, ref.teacher_temp_schedule)
    nepochs = temps[3]
    for epoch in [0, 1, temps[2], nepochs - 1]:  # warm-up start, inside, end of warm-up, last epoch
        student, teacher = make_outputs(batch, ncrops, gen)
        s_ours = student.clone().requires_grad_()
        s_ref = student.clone().requires_grad_()
        loss = ours(s_ours, teacher, epoch)
        expected = ref(s_ref, teacher, epoch)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert_close_verbose(loss, expected, atol=1e-5, rtol=1e-5, what=f"loss at epoch {epoch}")
        loss.backward()
        expected.backward()
        assert_close_verbose(s_ours.grad, s_ref.grad, atol=1e-7, rtol=1e-4, what="d loss / d student")
        assert_close_verbose(ours.center, ref.center, atol=1e-6, rtol=1e-6, what="center")


def test_center_update_is_dino_ema_over_several_steps():
    gen = torch.Generator().manual_seed(0)
    loss = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 5)
    expected = torch.zeros(1, OUT_DIM)
    for _ in range(5):
        student, teacher = make_outputs(3, 4, gen)
        loss(student, teacher, 0)
        expected = 0.9 * expected + 0.1 * teacher.mean(0, keepdim=True)
        assert_close_verbose(loss.center, expected, atol=1e-6, rtol=1e-6, what="center")
    assert loss.center.abs().sum() > 0


def test_tensor_temperature_path_equals_epoch_path_and_never_recompiles():
    temps = (0.04, 0.07, 4, 6)
    by_epoch, by_tensor = DINOLoss(OUT_DIM, 4, *temps), DINOLoss(OUT_DIM, 4, *temps)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(by_tensor, backend=counter, fullgraph=True)
    temp = torch.zeros(())
    gen = torch.Generator().manual_seed(1)
    for epoch in range(6):
        student, teacher = make_outputs(3, 4, gen)
        temp.copy_(torch.tensor(by_epoch.teacher_temp_schedule[epoch]))
        expected = by_epoch(student, teacher, epoch)
        got = compiled(student, teacher, teacher_temp=temp)
        assert_close_verbose(got, expected, atol=1e-6, rtol=1e-6, what=f"epoch {epoch}")
        assert_close_verbose(by_tensor.center, by_epoch.center, atol=1e-7, rtol=1e-6, what="center")
    assert counter.frame_count == 1, "changing the 0-d temperature must not recompile"
    torch._dynamo.reset()


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_inputs_are_computed_in_fp32(autocast):
    gen = torch.Generator().manual_seed(2)
    student, teacher = make_outputs(8, 4, gen, dtype=torch.bfloat16)
    ours, ref = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 2), UpstreamDINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = ours(student, teacher, 0)
    expected = ref(student.float(), teacher.float(), 0)
    assert loss.dtype == torch.float32 and ours.center.dtype == torch.float32
    assert_close_verbose(loss, expected, atol=1e-5, rtol=1e-5, what="bf16 loss")
    assert_close_verbose(ours.center, ref.center, atol=1e-6, rtol=1e-6, what="bf16 center")
    # the same loss computed in bf16 would be visibly off: the fp32 path is what makes this pass
    bf16_ref = UpstreamDINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 2)
    bf16_ref.center = bf16_ref.center.bfloat16()
    assert (bf16_ref(student, teacher, 0).float() - expected).abs() > (loss - expected).abs()


def test_state_dict_round_trip_holds_the_center_only_and_resumes_identically():
    gen = torch.Generator().manual_seed(3)
    a = DINOLoss(OUT_DIM, 4, 0.04, 0.07, 2, 4)
    for epoch in range(2):
        a(*make_outputs(2, 4, gen), epoch)
    state = a.state_dict()
    assert list(state) == ["center"]  # DINO's dino_loss checkpoint entry
    b = DINOLoss(OUT_DIM, 4, 0.04, 0.07, 2, 4)
    b.load_state_dict(state)
    torch.testing.assert_close(b.center, a.center, rtol=0, atol=0)
    student, teacher = make_outputs(2, 4, gen)
    torch.testing.assert_close(b(student, teacher, 2), a(student, teacher, 2), rtol=0, atol=0)


def test_teacher_entropy_is_mean_entropy_of_teacher_softmax():
    gen = torch.Generator().manual_seed(4)
    ours, ref = DINOLoss(OUT_DIM, 2, 0.04, 0.04, 0, 1), UpstreamDINOLoss(OUT_DIM, 2, 0.04, 0.04, 0, 1)
    student, teacher = make_outputs(5, 2, gen, scale=0.05)
    expected = ref.teacher_entropy(teacher, 0.04)  # before the centre moves
    ours(student, teacher, 0)
    assert_close_verbose(ours.teacher_entropy, expected, atol=1e-5, rtol=1e-5, what="entropy")
    assert 0 < ours.teacher_entropy < ours.max_entropy
    # a constant teacher is uniform after softmax: entropy ln(K), the collapse-monitoring maximum
    uniform = DINOLoss(OUT_DIM, 2, 0.04, 0.04, 0, 1)
    uniform(student, torch.zeros(10, OUT_DIM), 0)
    assert math.isclose(uniform.teacher_entropy.item(), math.log(OUT_DIM), rel_tol=1e-6)
    assert "teacher_entropy" not in uniform.state_dict()


def test_works_with_an_initialised_process_group(tmp_path):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(5)
    student, teacher = make_outputs(3, 4, gen)
    alone = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 1)
    alone(student, teacher, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 1)
        grouped(student, teacher, 0)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(grouped.center, alone.center)


def test_bad_inputs_raise_clear_errors():
    loss = DINOLoss(OUT_DIM, 4, 0.04, 0.04, 0, 3)
    s, t = torch.randn(12, OUT_DIM), torch.randn(6, OUT_DIM)
    with pytest.raises(ValueError, match="multiple of ncrops"):
        loss(torch.randn(10, OUT_DIM), t, 0)
    with pytest.raises(ValueError, match="teacher_output must have 2 x 3 rows"):
        loss(s, torch.randn(4, OUT_DIM), 0)
    with pytest.raises(ValueError, match="out_dim=64"):
        loss(torch.randn(12, 32), t, 0)
    with pytest.raises(ValueError, match="outside the teacher temperature schedule"):
        loss(s, t, 3)
    with pytest.raises(ValueError, match="pass epoch"):
        loss(s, t)
    with pytest.raises(ValueError, match="ncrops"):
        DINOLoss(OUT_DIM, 1, 0.04, 0.04, 0, 3)
    assert loss.center.abs().sum() == 0, "a rejected call must not move the centre"
