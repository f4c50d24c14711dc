"""The ops' bodies run the torch path for CPU tensors when they are ``triton_op``s.

On a GPU host :func:`oodfast.kernels._op.kernel_op` registers ``torch.library.triton_op``, and
torch.compile traces a triton_op's body for every device, bypassing ``register_kernel("cpu")``: CPU
tensors on a GPU host would reach the Triton launcher. This test builds that registration on any
host (``triton_op`` explicitly, under a test namespace) and checks that, compiled with
``fullgraph=True``, CPU tensors give the torch path's result and never call a launcher. One
torch.compile (tens of seconds on a 2-core CPU) covers all four ops.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import triton_op

from oodfast.kernels import knn_score as kn
from oodfast.kernels import rare_enqueue as re_
from oodfast.kernels import ring_copy as rc

from _assert import assert_close


def _launcher_called(*args, **kwargs):
    raise AssertionError("a Triton launcher was called for CPU tensors")


@pytest.fixture(scope="module")
def test_ops():
    """The four op bodies registered as triton_ops, as on a GPU host."""
    triton_op("oodfast_test::rare_enqueue", mutates_args=re_.RARE_ENQUEUE_MUTATES)(re_._rare_enqueue_body)
    triton_op("oodfast_test::rare_score", mutates_args=("scores",))(re_._rare_score_body)
    triton_op("oodfast_test::ring_copy", mutates_args=("dst0", "dst1"))(rc._ring_copy_body)
    triton_op("oodfast_test::knn_score_out", mutates_args=("out",))(kn._knn_score_out_body)
    return torch.ops.oodfast_test


def test_compiled_triton_ops_on_cpu_tensors_run_the_torch_path(test_ops, monkeypatch):
    for module, name in ((re_, "_launch"), (re_, "_launch_score"), (rc, "_launch"), (kn, "_knn_score_triton")):
        monkeypatch.setattr(module, name, _launcher_called)
    gen = torch.Generator().manual_seed(0)
    B, D, C = 6, 8, 4
    x = torch.randn(B, D, generator=gen)
    x[1] += 10.0  # rare
    x[4] -= 10.0  # rare
    center, proj, coef, alpha = torch.zeros(D), torch.zeros(0, D), torch.zeros(0), torch.tensor(1.0)
    bank = kn.normalize_bank(torch.randn(20, D, generator=gen))
    crops = torch.randn(1, B + C, 3, 2, 2, generator=gen)

    def make_state():
        return dict(scores=torch.zeros(B), slots=torch.zeros(B, dtype=torch.int32),
                    ring_ids=torch.full((C,), -1, dtype=torch.int64), ring_scores=torch.zeros(C),
                    ring_steps=torch.zeros(C, dtype=torch.int64), state=torch.zeros(4, dtype=torch.int64),
                    scratch=torch.zeros(2, dtype=torch.int32), score_only=torch.zeros(B), knn=torch.zeros(B),
                    crops=crops.clone())

    def step(ops, x, st, threshold, ids, step_no):
        ops.rare_enqueue(x, center, proj, coef, alpha, threshold, ids, step_no, st["scores"], st["slots"],
                         st["ring_ids"], st["ring_scores"], st["ring_steps"], st["state"], st["scratch"],
                         re_.EUCLIDEAN)
        ops.rare_score(x, center, proj, coef, alpha, st["score_only"], re_.EUCLIDEAN)
        ops.ring_copy(st["slots"], st["crops"][:, :B], st["crops"][:, B:], None, None)
        ops.knn_score_out(x, bank, 3, st["knn"])
        return st["scores"] * 2.0

    args = (x, torch.tensor(5.0), torch.arange(B) + 100, torch.tensor(7))
    got = make_state()
    out = torch.compile(step, fullgraph=True)(test_ops, *args[:1], got, *args[1:])

    want = make_state()
    re_.rare_enqueue_torch(x, center, proj, coef, alpha, args[1], args[2], args[3], want["scores"],
                               want["slots"], want["ring_ids"], want["ring_scores"], want["ring_steps"],
                               want["state"], want["scratch"], re_.EUCLIDEAN)
    want["score_only"].copy_(re_.rare_score_torch(x, center, proj, coef, alpha, re_.EUCLIDEAN))
    rc.ring_copy_torch(want["slots"], want["crops"][:, :B], want["crops"][:, B:])
    want["knn"].copy_(kn.knn_score_torch(x, bank, 3))

    assert (want["slots"] >= 0).sum() == 2, "the test must enqueue something"
    # integers exactly; floats to fp32 rounding (Inductor fuses the norms differently): torch.testing's
    # fp32 tolerances
    for key in want:
        assert_close(got[key], want[key], atol=1e-5, rtol=1.3e-6, msg=key)
    assert_close(out, want["scores"] * 2.0, atol=1e-5, rtol=1.3e-6, msg="output")
