"""The fused scoring ops are capturable in a CUDA graph (what `oodfast bench` replays for the 5 us
target): a replay after new inputs are copied in matches the eager op. GPU only."""

from __future__ import annotations

import pytest
import torch

from oodfast.bench.harness import cuda_graphed
from oodfast.detect import DetectorConfig, RareDetector

from _assert import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis", "knn"])
def test_score_replayed_from_a_cuda_graph_matches_eager(metric):
    torch.manual_seed(0)
    det = RareDetector(128, DetectorConfig(metric=metric, knn_k=5), device="cuda")
    det.fit(torch.randn(1024, 128, device="cuda"))
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(256, device="cuda")
    replay = cuda_graphed(lambda: det.score(x, out=out), "cuda")
    x.copy_(torch.randn_like(x))  # new inputs in the captured buffer
    replay()
    torch.cuda.synchronize()
    assert_close(out, det.score(x), rtol=1e-5, atol=1e-5)
