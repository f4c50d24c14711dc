"""The replay stores through the Trainer: ``crops`` (the paper's) replays stored crops as they are;
``ids`` re-decodes and re-augments the ring's images every step, their ids reaching the loader
asynchronously. And the detector's rows are the clean views, in both."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from oodfast.bench.stages import prepared_trainer as staged  # calibrated, warmed up, one batch staged
from oodfast.train.trainer import Trainer

from _tiny import tiny


B, C = 4, 2  # tiny()'s batch and buffer


def test_crops_store_stages_b_rows_and_scores_the_clean_views(data_root, tmp_path):  # noqa: F811
    t = staged(Trainer(tiny(data_root, tmp_path / "crops"), progress=False))
    batch = next(iter(t.loader))  # the batch staged() staged (a fresh pass starts at the same batch)
    assert batch.has_clean and all(v.shape[0] == B for v in batch.views) and t.replay.host_ids is None
    assert torch.equal(t.replay.clean, batch.clean.to(t.replay.clean.dtype))
    assert not torch.allclose(t.replay.clean, t.ring.views()[0][:B])  # not the augmented global crop
    ring_rows = [r.clone() for r in t.ring.views()]
    t.stage(batch.views, batch.index, batch.boxes)
    assert all(torch.equal(a[B:], b[B:]) for a, b in zip(ring_rows, t.ring.views())), "stage wrote the ring"
    t.run_step(log=True)
    assert t.monitor.settle() == 0 and t.monitor.last["loss"] > 0


@pytest.mark.slow
def test_ids_store_replays_the_rings_images_with_new_crops_through_the_compiled_step(data_root, tmp_path):  # noqa: F811
    """replay_store=ids with the default compiled step: each batch is B + C rows, the buffered rows'
    ids are the ring's as published ``loader.replay_lag`` steps earlier (the warm-up ring before that),
    their crops change every step, and nothing recompiles."""
    torch._dynamo.reset()
    t = Trainer(tiny(data_root, tmp_path / "ids", replay_store="ids", compile=True, epochs=1, epoch_length=32,
                     max_steps=7), progress=False)
    t.calibrate()
    t.warm_up()
    t.resumed = True  # calibration and warm-up done
    published = {-1: t.ring.ring_ids.tolist()}
    publish = t.replay.host_ids.publish

    def recording(step):
        publish(step)
        published[step] = t.ring.ring_ids.tolist()

    staged_rows = []
    stage = t.stage

    def recording_stage(views, index, boxes=None):
        stage(views, index, boxes)
        staged_rows.append((index.tolist(), t.ring.views()[0][B:].clone()))

    t.replay.host_ids.publish, t.stage = recording, recording_stage
    with torch._dynamo.config.patch(error_on_recompile=True):
        summary = t.train()
    assert summary["steps"] == 7 and len(staged_rows) == 7
    lag = t.loader.replay_lag
    for g, (index, _) in enumerate(staged_rows):
        assert len(index) == B + C
        assert index[B:] == published[max(g - lag, -1)], g
    for (ia, ra), (ib, rb) in zip(staged_rows, staged_rows[1:]):
        for j in range(C):
            if ia[B + j] == ib[B + j]:  # the same image replayed in two steps: new crops
                assert not torch.equal(ra[j], rb[j])
    assert any(ia[B:] == ib[B:] for (ia, _), (ib, _) in zip(staged_rows, staged_rows[1:]))
