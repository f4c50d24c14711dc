"""The OOD ops inside torch.compile(fullgraph=True): no graph break, no recompile, same as eager."""

from __future__ import annotations

import torch
import torch._dynamo

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, RareDetector


def build(metric: str):
    torch.manual_seed(0)
    det = RareDetector(16, DetectorConfig(metric=metric, percentile=0.7, online=True))
    det.fit(torch.randn(200, 16))
    ring = RareRing.for_multicrop(4, global_size=8, local_crops_number=2, local_size=4, batch_size=6)
    return det, ring


def ood_step(det: RareDetector, ring: RareRing, emb: torch.Tensor, ids: torch.Tensor, step: torch.Tensor,
             scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    det.enqueue(emb, ring, ids, step, scores=scores, slots=slots)
    ring.write(slots)
    return torch.stack([v.float().sum() for v in ring.views()])


def test_compiled_step_matches_eager_with_no_graph_break_or_recompile():
    torch._dynamo.reset()
    eager_det, eager_ring = build("mahalanobis")
    comp_det, comp_ring = build("mahalanobis")
    compiled = torch.compile(ood_step, fullgraph=True)  # fullgraph: any graph break raises
    gen = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for it in range(4):
            emb = torch.randn(2, 6, 16, generator=gen) * (1 + it)
            crops = [torch.randn(6, 3, 8, 8, generator=gen) for _ in range(2)] + \
                    [torch.randn(6, 3, 4, 4, generator=gen) for _ in range(2)]
            ids, step = torch.arange(6) + 10 * it, torch.tensor(it)
            outs = []
            for det, ring, fn in ((eager_det, eager_ring, ood_step), (comp_det, comp_ring, compiled)):
                ring.stage(crops)
                scores, slots = torch.empty(6), torch.empty(6, dtype=torch.int32)
                outs.append((fn(det, ring, emb, ids, step, scores, slots), scores, slots))
            (e_sum, e_scores, e_slots), (c_sum, c_scores, c_slots) = outs
            torch.testing.assert_close(c_scores, e_scores)
            assert torch.equal(c_slots, e_slots)
            # the same crops in the same slots, exactly; the compiled sum may add them in another order
            assert all(torch.equal(c, e) for c, e in zip(comp_ring.views(), eager_ring.views()))
            torch.testing.assert_close(c_sum, e_sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(comp_ring.state, eager_ring.state) and int(comp_ring.state[2]) > 0
    torch.testing.assert_close(comp_det.threshold, eager_det.threshold)  # the online threshold moved alike
    assert not torch.equal(comp_det.threshold, build("mahalanobis")[0].threshold)
