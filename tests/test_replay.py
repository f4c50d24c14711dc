"""Replay: one call scores, enqueues and copies crops; a skipped step changes nothing; modes and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, OracleDetector, RandomDetector, RareDetector
from oodfast.replay import FROZEN_WEIGHTS_HELP, Replay

B, C, D = 5, 3, 8


def replay(percentile: float = 0.5) -> Replay:
    torch.manual_seed(0)
    ring = RareRing.for_multicrop(C, global_size=4, local_crops_number=1, local_size=2, batch_size=B)
    det = RareDetector(D, DetectorConfig(percentile=percentile))
    return Replay(ring, det)


def crops(value: float) -> list[torch.Tensor]:
    return [torch.full((B, 3, 4, 4), value), torch.full((B, 3, 4, 4), value + 0.5), torch.full((B, 3, 2, 2), value)]


def test_add_scores_enqueues_and_copies_the_flagged_images_crops():
    r = replay()
    r.calibrate(torch.randn(64, D))
    r.stage(crops(7.0), torch.arange(B) + 100)
    emb = torch.zeros(2, B, D)
    emb[:, 3] = 50.0  # far from the mean: the only rare image
    r.step.fill_(4)
    r.add_(emb)
    slot = int(r.slots[3])
    assert r.slots.tolist() == [-1, -1, -1, slot, -1] and int(r.ring.count) == 1
    assert int(r.ring.ring_ids[slot]) == 103 and int(r.ring.ring_steps[slot]) == 4
    assert torch.equal(r.ring.ring_rows(0)[:, slot], torch.stack([torch.full((3, 4, 4), 7.0),
                                                                  torch.full((3, 4, 4), 7.5)]))


def test_a_skipped_add_changes_neither_ring_nor_detector():
    r = replay()
    r.calibrate(torch.randn(64, D))
    r.detector.threshold.fill_(-float("inf"))  # would flag every image
    r.stage(crops(1.0), torch.arange(B))
    before = [t.clone() for t in (*r.ring.state_dict().values(), *r.detector.state_dict().values())]
    r.add_(torch.randn(2, B, D), skipped=torch.tensor(True))
    after = [*r.ring.state_dict().values(), *r.detector.state_dict().values()]
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(before, after))
    assert (r.slots == -1).all()
    r.add_(torch.randn(2, B, D), skipped=torch.tensor(False))
    assert int(r.ring.count) == C


def test_warm_up_fills_the_ring_and_tops_up_with_random_images():
    r = replay(percentile=0.99)
    r.calibrate(torch.randn(64, D))
    batch = SimpleNamespace(views=crops(2.0), index=torch.arange(B), boxes=None)
    teacher = SimpleNamespace(forward_backbone=lambda rows: torch.zeros(2 * B, D))  # nothing is rare
    r.warm_up([batch], teacher=teacher, refill=lambda: [batch])
    assert r.ring.is_full()


def test_modes_share_one_flag_rate_and_frozen_needs_weights():
    config = DetectorConfig(percentile=0.9)
    kw = dict(capacity=C, batch_size=B, global_size=4, local_size=2, local_crops_number=1, dtype=torch.float32,
              device=torch.device("cpu"), detector=config, embed_dim=D)
    rand = Replay.build("random", **kw)
    assert isinstance(rand.detector, RandomDetector) and rand.detector.rate == pytest.approx(config.rate)
    oracle = Replay.build("oracle", **kw)
    assert isinstance(oracle.detector, OracleDetector)
    assert float(oracle.detector.flag_rate) == pytest.approx(config.rate)
    ood = Replay.build("ood", **kw)
    assert isinstance(ood.detector, RareDetector) and ood.follows_teacher and ood.needs_calibration
    with pytest.raises(ValueError, match="--detector-weights PATH") as info:
        Replay.build("ood", source="frozen", **kw)
    assert str(info.value) == FROZEN_WEIGHTS_HELP
    with pytest.raises(ValueError, match="replay mode must be"):
        Replay.build("sometimes", **kw)
