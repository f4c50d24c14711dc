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
    main_table = text.split("## Object recall per rare class")[0]
    assert main_table.count("\n| ") == 1 + 20 and "lift" in text and "AUROC" in text
    assert set(report["pr_curves"]) == {f"{d}@{s}" for d in ("euclidean", "cosine", "mahalanobis", "knn") for s in (8, 16)}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown detector"):
        DetectEvalConfig(detectors=("psychic",))
    with pytest.raises(ValueError, match="percentiles"):
        DetectEvalConfig(percentiles=(1.5,))


# --------------------------------------------------------------------------------------------------
# Rare instances, per-object recall, dense detectors, image-level intervals
# --------------------------------------------------------------------------------------------------


def test_rare_instances_are_connected_components_per_class():
    from oodfast.evaluate.objects import crop_instances, rare_instances

    mask = np.zeros((20, 30), np.uint8)
    mask[2:4, 2:4] = 11  # person A
    mask[4:6, 4:6] = 11  # touches A diagonally: the same (8-connected) instance
    mask[10:14, 20:30] = 11  # person B
    mask[10:14, 10:14] = 12  # a rider
    mask[15, 0] = 255
    labels, classes = rare_instances(mask, (11, 12))
    assert sorted(classes.tolist()) == [11, 11, 12] and labels.max() == 3
    assert labels[2, 2] == labels[5, 5] != labels[12, 25]
    assert classes[labels[12, 12] - 1] == 12 and labels[0, 0] == 0
    # Crop boxes resized to 10 x 10 px: box 0 is 20 x 20 source px (scale 1/4 in area): person B has
    # 4 x 10 px inside it = 10 resized px; the rider's 16 px = 4 resized px.
    boxes = np.array([[10, 0, 30, 20], [0, 0, 10, 10]])
    got = crop_instances(labels, classes, boxes, (10, 10), min_object_pixels=5)
    assert got[0].tolist() == [int(labels[12, 25])]
    assert got[1].tolist() == [int(labels[2, 2])]  # box 1 at scale 1: person A's 8 px >= 5
    assert crop_instances(labels, classes, boxes, (10, 10), min_object_pixels=9)[1].size == 0
    assert crop_instances(labels, classes, boxes, (20, 20), min_object_pixels=16)[0].size == 2  # now the rider too


def test_object_recall_by_brute_force():
    from oodfast.evaluate.objects import object_recall

    rng = np.random.default_rng(0)
    flagged = rng.random(40) < 0.4
    crop_image = np.repeat(np.arange(20), 2)
    pair_crop = rng.integers(0, 40, 60)
    pair_class = rng.choice([11, 12, 17], 60)
    out = object_recall(flagged, pair_crop, pair_class, crop_image, {11: "person", 12: "rider", 17: "motorcycle",
                                                                    5: "pole"}, resamples=300)
    assert list(out) == ["person", "rider", "motorcycle", "all"]  # no pole pair: left out
    for name, c in (("person", 11), ("rider", 12), ("motorcycle", 17)):
        sel = pair_class == c
        assert out[name]["recall"] == pytest.approx(flagged[pair_crop[sel]].mean())
        assert out[name]["pairs"] == sel.sum() and out[name]["images"] == np.unique(crop_image[pair_crop[sel]]).size
        lo, hi = out[name]["ci"]
        assert lo <= out[name]["recall"] <= hi
    assert out["all"]["recall"] == pytest.approx(flagged[pair_crop].mean()) and out["all"]["pairs"] == 60


def test_crop_labels_carry_images_and_instances(files):
    from oodfast.evaluate.crop_pass import global_crop_batches, join_labels

    train, _ = files
    torch.manual_seed(0)
    encoder = build_backbone("resnet18")[0]
    batches = list(global_crop_batches(encoder, train, n_images=None, seed=0, crop_size=32, batch_size=8,
                                       device=torch.device("cpu"), tau=1e-3, rare_ids=(5, 6, 7, 11, 12, 16, 17, 18),
                                       pooled=False, layer="layer3", min_object_pixels=1))
    assert all(b.pooled is None and b.maps.shape == (16, 256, 2, 2) for b in batches)
    assert batches[0].maps.is_contiguous(memory_format=torch.channels_last)
    labels = join_labels([b.labels for b in batches])
    # view-major rows: crop b and crop B + b of a batch are the two global crops of one image
    assert np.array_equal(labels.image[:8], labels.image[8:16]) and np.unique(labels.image).size == len(train) // 8 * 8
    # an instance that counts for a crop has rare pixels inside it
    assert labels.pair_crop.size > 0 and (labels.shares[labels.pair_crop] > 0).all()
    assert set(labels.pair_class.tolist()) <= {5, 6, 7, 11, 12, 16, 17, 18}


def test_dense_detectors_and_per_object_recall(files):
    from oodfast.detect import DetectorConfig, RareDetector

    torch.manual_seed(0)
    train, val = files
    cfg = DetectEvalConfig(detectors=("euclidean", "dense-euclidean", "dense-knn"), calib_sizes=(16,),
                           percentiles=(0.9, 0.5), seeds=(0, 1), crop_size=32, batch_size=6, knn_k=3, bootstrap=50,
                           min_object_pixels=1)
    encoder = build_backbone("resnet18")[0]
    report = evaluate_detection(encoder, train, val, cfg)
    rows = {(r["detector"], r["percentile"]): r for r in report["rows"]}
    assert set(rows) == {(d, p) for d in cfg.detectors for p in cfg.percentiles}
    images = report["dataset"]["images"]
    assert report["dataset"]["crops"] == 2 * 2 * (len(val) // 6 * 6) and images == len(val) // 6 * 6
    assert "over images" in report["interval"]
    for (name, p), r in rows.items():
        assert r["images"] == images and r["crops"] == report["dataset"]["crops"]
        for metric in ("precision", "recall", "lift", "flag_rate", "auroc"):
            lo, hi = r[f"{metric}_ci"]
            assert np.isnan(r[metric]) or lo - 1e-9 <= r[metric] <= hi + 1e-9, (name, p, metric)
        obj = r["object_recall"]
        assert obj and "all" in obj and obj["all"]["pairs"] == sum(v["pairs"] for k, v in obj.items() if k != "all")
        assert 0 <= obj["all"]["recall"] <= 1
    # a lower threshold flags more crops, so no object is lost
    for name in cfg.detectors:
        assert rows[(name, 0.5)]["flag_rate"] >= rows[(name, 0.9)]["flag_rate"]
        assert rows[(name, 0.5)]["object_recall"]["all"]["recall"] >= rows[(name, 0.9)]["object_recall"]["all"]["recall"]
    # the pooled threshold is the detector's own (mean over the two seeds' calibrations)
    thresholds = []
    for seed in cfg.seeds:
        calib, _, _ = embed_global_crops(encoder, train, n_images=8, seed=seed, crop_size=32, batch_size=6,
                                         device=torch.device("cpu"), tau=cfg.tau, rare_ids=cfg.rare_ids)
        det = RareDetector(calib.shape[1], DetectorConfig(metric="euclidean", percentile=0.9))
        det.fit(calib[:16])
        thresholds.append(float(det.threshold))
    assert rows[("euclidean", 0.9)]["threshold"] == pytest.approx(np.mean(thresholds), rel=1e-5)
    text = detection_markdown(report)
    assert "over images, not crops" in text and "object recall (" in text and "| dense-knn | 16 | 0.9 |" in text
    assert set(report["pr_curves"]) == {"euclidean@16", "dense-euclidean@16", "dense-knn@16"}


def test_pr_png_is_drawn_with_pillow(tmp_path):
    from PIL import Image

    from oodfast.evaluate.detect import plot_pr

    report = {"dataset": {"prevalence_per_seed": [0.2]},
              "pr_curves": {"euclidean@8": [[0.0, 0.5, 1.0], [1.0, 0.4, 0.2]], "knn@8": [[], []]}}
    path = plot_pr(report, tmp_path / "pr.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert ((img == (31, 119, 180)).all(-1)).sum() > 50  # the first curve's colour is drawn


def test_bad_dense_config_is_refused():
    with pytest.raises(ValueError, match="layer"):
        DetectEvalConfig(layer="layer9")
    with pytest.raises(ValueError, match="min_object_pixels"):
        DetectEvalConfig(min_object_pixels=0)
