"""Dense rarity in training (``dense_layer``): the detector scores every position of the scoring module's
feature map and flags an image whose most rare position is rare; through the Trainer, its checkpoint and
its resume, and the settings it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

from oodfast.dense import DenseRareDetector
from oodfast.encoders import dense_dim
from oodfast.train.checkpoint import check_same_run, load_checkpoint
from oodfast.train.config import ConfigError, TrainConfig
from oodfast.train.trainer import Trainer

from _tiny import no_host_reads, tiny


B, C = 4, 2  # tiny()'s batch and buffer; its 32 px clean view gives a 2 x 2 layer3 map (P = 4)


@pytest.mark.slow
def test_dense_layer3_trains_through_the_compiled_step_and_flags_by_the_position_max(data_root, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    t = Trainer(tiny(data_root, tmp_path / "dense", dense_layer="layer3", compile=True, max_steps=4), progress=False)
    det = t.replay.detector
    assert isinstance(det, DenseRareDetector) and det.dim == dense_dim("resnet18", "layer3") == 256
    t.calibrate()
    t.warm_up()
    assert t.ring.is_full() and bool(det.fitted)
    batch = next(iter(t.loader))
    t.stage(batch.views, batch.index, batch.boxes)
    maps = t.replay.embed(t.replay.clean, t.dino.teacher)  # what the step scores: the teacher before its update
    assert maps.shape == (4, B, 256) and maps.stride() == (256, 4 * 256, 1)  # the channels_last map's view
    best = det.position_scores(maps).amax(0)
    det.threshold.fill_(float(best.median()))  # the lower middle of 4: two images above it
    threshold, enqueued = det.threshold.clone(), int(t.ring.enqueued_total)
    t.run_step()  # compiles
    assert t.monitor.settle() == 0
    torch.testing.assert_close(t.replay.scores, best, rtol=1e-4, atol=1e-4)
    flagged = best > threshold
    assert int(flagged.sum()) == 2 and torch.equal(t.replay.slots >= 0, flagged)
    assert int(t.ring.enqueued_total) == enqueued + 2
    assert t.ring.ring_ids[t.replay.slots[flagged].long()].tolist() == batch.index[flagged].tolist()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with no_host_reads():
            t.run_step(log=True)  # the compiled dense step reads nothing on the host
        t.resumed = True  # calibrated and warmed up: train() goes straight to the steps
        summary = t.train()
    assert summary["steps"] == 4 and t.monitor.last["loss"] > 0 and int(t.ring.count) == C


def test_a_dense_knn_run_resumes_with_its_coreset_bank_and_another_layer_is_refused(data_root, tmp_path):  # noqa: F811
    out = tmp_path / "knn"
    knn = dict(dense_layer="layer3", metric="knn", calib_size=64)  # 51 bank images x 4 positions, 13 held out
    t = Trainer(tiny(data_root, out, max_steps=2, **knn), progress=False)
    t.replay.detector.coreset = 64  # fewer bank rows than the 204 calibration positions: a k-center coreset
    assert t.train()["steps"] == 2
    bank = t.replay.detector.bank.clone()
    assert bank.shape == (64, 256)
    stored = load_checkpoint(out / "checkpoint.pth")
    assert torch.equal(stored["detector"]["bank"], bank) and stored["config"]["dense_layer"] == "layer3"
    again = Trainer(tiny(data_root, out, max_steps=3, **knn), progress=False)
    det = again.replay.detector
    assert again.resumed and isinstance(det, DenseRareDetector) and det.fitted
    assert torch.equal(det.bank, bank) and torch.equal(det.threshold, t.replay.detector.threshold)
    assert torch.equal(again.ring.ring_ids, t.ring.ring_ids)
    assert again.train()["steps"] == 3
    for other in ("layer2", None):
        with pytest.raises(ValueError, match="dense_layer: 'layer3' in the run"):
            Trainer(tiny(data_root, out, max_steps=3, **{**knn, "dense_layer": other}), progress=False)


def test_a_stored_run_from_before_dense_layers_is_a_pooled_run():
    path = Path("ckpt.pth")
    check_same_run({"metric": "knn"}, {"metric": "knn", "dense_layer": None}, path)
    with pytest.raises(ValueError, match="dense_layer: None in the run, 'layer3' now"):
        check_same_run({"metric": "knn"}, {"metric": "knn", "dense_layer": "layer3"}, path)


@pytest.mark.parametrize("changes, words", [
    (dict(dense_layer="layer5"), "dense_layer must be one of layer2, layer3, layer4, tokens"),
    (dict(dense_layer="layer3", arch="vit_small"), "use dense_layer tokens for arch vit_small"),
    (dict(dense_layer="tokens"), "tokens is for DINO's ViTs"),
    (dict(dense_layer="tokens", detector="frozen"), "detector frozen is a ResNet-50"),
    (dict(dense_layer="layer3", replay="oracle"), "the oracle replay scores none"),
    (dict(dense_layer="layer4", arch="regnet_y_400mf"), "needs a backbone with stages layer2..layer4"),
])
def test_dense_layers_that_do_not_fit_the_run_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError, match=words) as info:
        TrainConfig.cpu(**changes)
    assert info.value.field == "dense_layer" and "\n" not in str(info.value)


def test_dense_layers_that_fit_are_accepted():
    assert TrainConfig.cpu(dense_layer="layer2", detector="frozen").dense_layer == "layer2"
    assert TrainConfig.cpu(dense_layer="tokens", arch="vit_tiny").to_dict()["dense_layer"] == "tokens"
    assert TrainConfig.cpu().dense_layer is None  # pooled embeddings, as the paper
