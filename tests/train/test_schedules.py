"""Schedules: DINO's cosine_scheduler values, DINO's hyper-parameters, 0-d tensors written in place."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from oodfast.train import Schedules, cosine_schedule

C = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]  # 1, 0.8536, 0.5, 0.1464: a 4-step half cosine


@pytest.mark.parametrize("args,kwargs,expected", [
    # no warm-up: the cosine starts at base and stops one step short of final
    ((1.0, 0.0, 1, 4), {}, C),
    ((2.0, 1.0, 2, 2), {}, [1 + c for c in C]),
    # one warm-up epoch of 2 steps: linspace(0, base, 2) ends exactly at base, then the cosine restarts at base
    ((1.0, 0.0, 3, 2), {"warmup_epochs": 1}, [0.0, 1.0] + C),
    # warm-up from a start value over 4 steps: linspace includes both ends
    ((1.0, 0.0, 4, 2), {"warmup_epochs": 2, "start_warmup_value": 0.4}, [0.4, 0.6, 0.8, 1.0] + C),
    # rising schedule (teacher momentum 0.996 -> 1)
    ((0.996, 1.0, 1, 4), {}, [1.0 - 0.004 * c for c in C]),
    # warm-up over the whole run: no cosine part
    ((1.0, 0.0, 1, 3), {"warmup_epochs": 1}, [0.0, 0.5, 1.0]),
])
def test_cosine_schedule_values_from_dino_formula(args, kwargs, expected):
    got = cosine_schedule(*args, **kwargs)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_cosine_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="niter_per_ep"):
        cosine_schedule(1.0, 0.0, 3, 0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, 3, 2, warmup_epochs=4)


def test_dino_schedules_numbers():
    s = Schedules.dino(epochs=20, niter_per_ep=5, batch_size=64, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=4)
    peak = 5e-4 * 64 / 256
    assert s.total_steps == 100 and len(s.teacher_temp) == 20
    # lr: 10 warm-up epochs (50 steps) from 0 to the scaled peak, then a cosine to 1e-6
    assert s.lr[0] == 0.0
    assert math.isclose(s.lr[1], peak / 49, rel_tol=1e-12)
    assert math.isclose(s.lr[49], peak, rel_tol=1e-12) and math.isclose(s.lr[50], peak, rel_tol=1e-12)
    assert math.isclose(s.lr[75], 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 25 / 50)), rel_tol=1e-12)
    assert math.isclose(s.lr[99], 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 49 / 50)), rel_tol=1e-12)
    # weight decay 0.04 -> 0.4 and momentum 0.996 -> 1, cosines over all 100 steps
    assert math.isclose(s.weight_decay[0], 0.04, rel_tol=1e-12)
    assert math.isclose(s.weight_decay[50], 0.22, rel_tol=1e-12)
    assert math.isclose(s.momentum[0], 0.996, rel_tol=1e-12) and math.isclose(s.momentum[50], 0.998, rel_tol=1e-12)
    assert math.isclose(s.momentum[99], 1 - 0.002 * (1 + math.cos(math.pi * 99 / 100)), rel_tol=1e-12)
    # teacher temperature per epoch: linspace(0.04, 0.07, 4), then 0.07
    np.testing.assert_allclose(s.teacher_temp[:5], [0.04, 0.05, 0.06, 0.07, 0.07], rtol=1e-12)
    assert s.values(12) == {"lr": s.lr[12], "weight_decay": s.weight_decay[12], "momentum": s.momentum[12],
                            "teacher_temp": s.teacher_temp[2]}
    with pytest.raises(ValueError, match="outside the schedule"):
        s.values(100)


def test_write_updates_preallocated_tensors_in_place_without_recompiling():
    s = Schedules.dino(epochs=4, niter_per_ep=3, batch_size=256, warmup_epochs=1, warmup_teacher_temp=0.04,
                       teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    t = s.allocate("cpu")
    ptrs = [x.data_ptr() for x in t.as_list()]
    assert all(x.dim() == 0 and x.dtype == torch.float32 for x in t.as_list())

    def step_fn(lr, wd, m, temp):
        return lr * 1 + wd * 10 + m * 100 + temp * 1000

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(step_fn, backend=counter, fullgraph=True)
    for step in range(s.total_steps):
        s.write_(step, t)
        v = s.values(step)
        assert [x.data_ptr() for x in t.as_list()] == ptrs, "write_ must not reallocate"
        for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
            assert getattr(t, name).item() == pytest.approx(v[name], rel=1e-7), (step, name)
        expected = v["lr"] + 10 * v["weight_decay"] + 100 * v["momentum"] + 1000 * v["teacher_temp"]
        assert compiled(*t.as_list()).item() == pytest.approx(expected, rel=1e-6)
    assert counter.frame_count == 1, "schedule values changed the compiled graph"
    torch._dynamo.reset()
    assert s.allocate("cpu", torch.float64, step=5).momentum.item() == s.momentum[5]
