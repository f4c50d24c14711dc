"""evaluate_detection end to end on a tiny synthdrive, and its table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodfast.data.discover import discover
from oodfast.data.synthdrive import ensure_synthdrive
from oodfast.evaluate.detect import DetectEvalConfig, detection_markdown, embed_global_crops, evaluate_detection
from oodfast.train.head import build_backbone


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = ensure_synthdrive(tmp_path_factory.mktemp("sd"), progress=False, num_images=48, seed=0, width=128, height=72)
    return discover("bdd10k", root, "train", require_masks=True), discover("bdd10k", root, "val", require_masks=True)


def test_ground_truth_matches_the_masks(files):
    torch.manual_seed(0)
    train, _ = files
    encoder = build_backbone("resnet18")[0]
    feats, rare, shares = embed_global_crops(encoder, train, n_images=None, seed=0, crop_size=32, batch_size=8,
                                             device=torch.device("cpu"), tau=1e-3, rare_ids=(5, 6, 7, 11, 12, 16, 17, 18))
    n = len(train) // 8 * 8 * 2  # both global crops of every image in full batches
    assert feats.shape == (n, 512) and rare.shape == (n,)
    assert np.array_equal(rare, shares >= 1e-3) and (shares >= 0).all() and (shares <= 1).all()
    assert 0 < rare.mean() < 1  # synthdrive's tail: some crops rare, most not


def test_detection_grid_reports_every_row(files):
    torch.manual_seed(0)
    train, val = files
    cfg = DetectEvalConfig(calib_sizes=(8, 16), percentiles=(0.9, 0.8), seeds=(0,), crop_size=32, batch_size=6,
                           knn_k=3, bootstrap=50)
    report = evaluate_detection(build_backbone("resnet18")[0], train, val, cfg)
    rows = report["rows"]
    assert len(rows) == 5 * 2 * 2
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["flag_rate"] <= 1
        if r["detector"] != "random":
            assert 0 <= r["auroc"] <= 1 or np.isnan(r["auroc"])
    text = detection_markdown(report)
    assert text.count("\n| ") == 1 + 20 and "lift" in text and "AUROC" in text
    assert set(report["pr_curves"]) == {f"{d}@{s}" for d in ("euclidean", "cosine", "mahalanobis", "knn") for s in (8, 16)}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown detector"):
        DetectEvalConfig(detectors=("psychic",))
    with pytest.raises(ValueError, match="percentiles"):
        DetectEvalConfig(percentiles=(1.5,))
