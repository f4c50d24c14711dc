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
    assert isinstance(oracle.detector, OracleDetector) and not oracle.detector.matched
    assert float(oracle.detector.flag_rate) == pytest.approx(config.rate)
    matched = Replay.build("oracle-matched", **kw)
    assert matched.detector.matched and matched.detector.rate == pytest.approx(config.rate)
    ood = Replay.build("ood", **kw)
    assert isinstance(ood.detector, RareDetector) and ood.follows_teacher and ood.needs_calibration
    with pytest.raises(ValueError, match="--detector-weights PATH") as info:
        Replay.build("ood", source="frozen", **kw)
    assert str(info.value) == FROZEN_WEIGHTS_HELP
    with pytest.raises(ValueError, match="replay mode must be"):
        Replay.build("sometimes", **kw)


def _teacher(dim_out: int = 16):
    """A DINO teacher as training holds it: a ResNet trunk with BatchNorm, in train mode."""
    from oodfast.encoders import build_backbone
    from oodfast.train.head import DINOHead, MultiCropWrapper

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    return MultiCropWrapper(backbone, DINOHead(dim, dim_out)).train(), dim


def _scoring_replay(dim: int, encoder=None, batch: int = 4) -> Replay:
    ring = RareRing.for_multicrop(C, global_size=32, local_crops_number=1, local_size=16, batch_size=batch)
    return Replay(ring, RareDetector(dim, DetectorConfig(percentile=0.5)), encoder=encoder)


@pytest.mark.parametrize("source", ["teacher", "frozen"])
def test_an_image_scores_the_same_inside_any_batch(source):
    """The detector embeds the clean view with the scoring module in eval mode: BatchNorm uses its
    running statistics, so one image's score does not depend on its batch-mates (in train mode it
    does), and the teacher is back in train mode afterwards."""
    from torchvision import models

    teacher, dim = _teacher()
    encoder = None
    if source == "frozen":
        torch.manual_seed(1)
        encoder = models.resnet18()
        encoder.fc = torch.nn.Identity()
        encoder.eval().requires_grad_(False)
    r = _scoring_replay(dim, encoder)
    torch.manual_seed(2)
    r.calibrate(r.embed(torch.randn(16, 3, 32, 32), teacher))
    image = torch.randn(1, 3, 32, 32)
    scores = []
    for mates in (torch.randn(3, 3, 32, 32), 5.0 * torch.randn(3, 3, 32, 32) + 2.0):
        r.clean.copy_(torch.cat([mates[:1], image, mates[1:]]))
        scores.append(r.detector.score(r.step_input(teacher))[1])
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    assert teacher.training and all(m.training for m in teacher.modules())
    if source == "teacher":  # the same image in train mode: its batch-mates move its features
        with torch.no_grad():
            a = teacher.forward_backbone(torch.cat([image, torch.randn(3, 3, 32, 32)]))[0]
            b = teacher.forward_backbone(torch.cat([image, 5.0 * torch.randn(3, 3, 32, 32) + 2.0]))[0]
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_the_detector_embeds_the_staged_clean_rows_not_the_crops():
    """Stage a batch whose views end with the clean view: the detector's input is the clean rows' own
    embedding (and the score detectors' input a placeholder)."""
    teacher, dim = _teacher()
    r = _scoring_replay(dim)
    n = r.B
    globals_ = [torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32)]
    clean = torch.randn(n, 3, 32, 32)
    r.stage([*globals_, torch.randn(n, 3, 16, 16), clean], torch.arange(n))
    assert torch.equal(r.clean, clean) and torch.equal(r.views()[0][:n], globals_[0])
    got = r.step_input(teacher)
    assert got.shape == (1, n, dim)
    torch.testing.assert_close(got, r.embed(clean, teacher))
    assert not torch.allclose(got, r.embed(globals_[0], teacher))
    rand = Replay(RareRing.for_multicrop(C, global_size=4, local_crops_number=1, local_size=2, batch_size=B),
                  RandomDetector(0.5))
    assert rand.clean is None and rand.step_input(None).shape == (B, 1)


def test_host_ring_ids_give_the_copy_published_at_or_before_a_step_else_the_seed():
    ring = RareRing.for_multicrop(C, global_size=4, local_crops_number=1, local_size=2, batch_size=B)
    r = Replay(ring, RandomDetector(0.5), store="ids")
    ring.ring_ids.copy_(torch.tensor([7, 8, 9]))
    r.host_ids.reset()  # as warm-up leaves it
    assert r.host_ids.at(-5).tolist() == [7, 8, 9]
    for step in range(40):  # more steps than the host keeps
        ring.ring_ids.fill_(100 + step)
        r.publish(step)
    assert r.host_ids.at(39).tolist() == [139] * C and r.host_ids.at(30).tolist() == [130] * C
    assert r.host_ids.at(100).tolist() == [139] * C  # nothing later: the newest
    r.load_state_dict({"ring": ring.state_dict()})  # a resume seeds with the restored ring
    assert r.host_ids.at(0).tolist() == [139] * C
    assert Replay(ring, RandomDetector(0.5)).host_ids is None
    with pytest.raises(ValueError, match=r"--replay-store\) must be crops or ids, got 'pixels'"):
        Replay(ring, RandomDetector(0.5), store="pixels")


def test_priming_gives_a_new_teacher_the_batchnorm_statistics_training_keeps():
    """A new teacher's running statistics are 0 / 1 (training replaces them within tens of steps);
    primed on the global views, the eval-mode embedding of those rows is their train-mode one, and the
    teacher's mode and momentum are as before."""
    teacher, dim = _teacher()
    r = _scoring_replay(dim)
    rows = torch.randn(16, 3, 64, 64) * 2 + 1
    with torch.no_grad():
        trained = teacher.forward_backbone(rows.clone())  # batch statistics (this also moves the running ones)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()

    def agreement() -> float:  # cosine similarity of the eval-mode embeddings with the train-mode ones
        return float(torch.nn.functional.cosine_similarity(r.embed(rows, teacher)[0], trained).min())

    assert agreement() < 0.9
    r.prime_norms([[rows[:8], rows[8:]]], teacher)
    assert agreement() > 0.98
    assert r.primed and teacher.training and teacher.backbone.bn1.momentum == 0.1


def test_a_dense_replay_scores_the_position_view_of_the_scoring_modules_map():
    """dense_layer: the detector's input is the [P, n, D] view of the teacher backbone's map (a ViT's
    patch tokens here; ResNet stages through the Trainer in tests/train/test_dense_replay.py), computed
    in eval mode; an image's score is its most rare position's."""
    from oodfast.dense import DenseRareDetector, position_view
    from oodfast.encoders import build_backbone, feature_map
    from oodfast.train.head import DINOHead, MultiCropWrapper

    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_tiny")
    teacher = MultiCropWrapper(backbone, DINOHead(dim, 16)).train()
    ring = RareRing.for_multicrop(C, global_size=32, local_crops_number=1, local_size=16, batch_size=4)
    r = Replay(ring, DenseRareDetector(dim, DetectorConfig(percentile=0.5)), dense_layer="tokens")
    rows = torch.randn(4, 3, 32, 32)
    got = r.embed(rows, teacher)
    with torch.no_grad():
        want = position_view(feature_map(backbone.eval(), rows, "tokens"))
    backbone.train()
    assert got.shape == (4, 4, dim) and got.stride(-1) == 1  # P = (32 / 16)**2 patch tokens
    torch.testing.assert_close(got, want)
    r.calibrate(r.embed(torch.randn(16, 3, 32, 32), teacher))
    r.clean.copy_(rows)
    torch.testing.assert_close(r.detector.score(r.step_input(teacher)), r.detector.position_scores(want).amax(0))
    with pytest.raises(ValueError, match="dense_layer goes with a DenseRareDetector"):
        Replay(ring, RareDetector(dim), dense_layer="tokens")


def test_dense_calibration_maps_are_capped_and_a_dense_layer_needs_the_ood_replay(monkeypatch, caplog):
    import oodfast.replay as replay_mod

    monkeypatch.setattr(replay_mod, "CALIB_MAP_ELEMENTS", 10 * 4 * 8)  # 10 images of 4 positions x 8 channels
    batches = [torch.randn(4, 32) for _ in range(5)]  # stand-ins for 5 batches of 4 images
    embed = lambda rows: rows.view(len(rows), 4, 8).transpose(0, 1)  # noqa: E731 - [P, b, D], as a map's view
    maps = replay_mod.calibration_maps(embed, batches)
    assert maps.shape == (4, 10, 8) and "fitting on the first 10 images" in caplog.text
    torch.testing.assert_close(maps, torch.cat([embed(b) for b in batches], dim=1)[:, :10])
    kw = dict(capacity=C, batch_size=B, global_size=4, local_size=2, local_crops_number=1, dtype=torch.float32,
              device=torch.device("cpu"), detector=DetectorConfig(), embed_dim=D)
    with pytest.raises(ValueError, match="--dense-layer.*for --replay ood; the random replay scores none"):
        Replay.build("random", dense_layer="layer3", **kw)
    ood = Replay.build("ood", dense_layer="layer2", arch="resnet18", **kw)
    assert type(ood.detector).__name__ == "DenseRareDetector" and ood.detector.dim == 128


@pytest.mark.parametrize("prevalence, rate", [(0.3, 0.05), (0.02, 0.05)])
def test_the_matched_oracle_flags_only_rare_images_at_the_random_arms_rate(prevalence, rate):
    """Above the rate, rare images are flagged with probability rate / prevalence (the buffer turns over
    as in the random arm); below it, every rare image is (an oracle cannot flag more than exist)."""
    torch.manual_seed(0)
    tau, batch = 0.001, 256
    det = OracleDetector(batch, tau, rate, matched=True)
    flagged, rare_seen, total = 0, 0, 0
    for step in range(300):
        rare = torch.rand(batch, 1) < prevalence
        det.shares.copy_(torch.where(rare, torch.rand(batch, 1) * 0.1 + tau, torch.rand(batch, 1) * tau * 0.99))
        flags = det.scores_for(det.shares) > det.threshold
        assert not (flags & ~rare).any(), "a common image was flagged"
        if step >= 20:  # after the running prevalence has settled
            flagged, rare_seen, total = flagged + int(flags.sum()), rare_seen + int(rare.sum()), total + batch
    assert float(det.prevalence) == pytest.approx(prevalence, rel=0.1)
    expected = min(rate, rare_seen / total)
    assert flagged / total == pytest.approx(expected, rel=0.05)
    unmatched = OracleDetector(batch, tau, rate)
    unmatched.shares.copy_(det.shares)
    assert torch.equal(unmatched.scores_for(det.shares) > unmatched.threshold, det.shares >= tau)
    assert set(unmatched.state_dict()) == {"threshold", "flag_rate"}  # an earlier oracle run's keys
    resumed = OracleDetector(batch, tau, rate, matched=True)
    resumed.load_state_dict(det.state_dict())
    assert float(resumed.prevalence) == float(det.prevalence) and float(resumed.batches) == 300
