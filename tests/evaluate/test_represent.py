"""Crop features and the whole representation evaluation (oodfast.evaluate.features / represent) on a
tiny synthdrive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodfast.data.classes import CLASS_NAMES
from oodfast.encoders import load_encoder
from oodfast.evaluate.features import extract_features
from oodfast.evaluate.labels import crop_labels
from oodfast.evaluate.represent import evaluate_representation


# --------------------------------------------------------------------------------------------------
# End to end on synthdrive
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_synthdrive(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from oodfast.data.discover import discover
    from oodfast.data.synthdrive import ensure_synthdrive

    root = ensure_synthdrive(tmp_path_factory.mktemp("synth"), progress=False, num_images=48, seed=0,
                             width=128, height=72)
    return discover("bdd10k", root, "train", require_masks=True), discover("bdd10k", root, "val", require_masks=True)


def test_extract_features_is_deterministic_and_batch_independent(tiny_synthdrive) -> None:  # noqa: ANN001
    train, _ = tiny_synthdrive
    enc = load_encoder("random", "resnet18", "cpu")
    few = type(train)(train.kind, train.root, train.split, train.images[:7], train.masks[:7])
    f1, l1 = extract_features(enc, few, crops_per_image=3, size=32, seed=5, batch_size=4, num_workers=1)
    f2, l2 = extract_features(enc, few, crops_per_image=3, size=32, seed=5, batch_size=64, num_workers=2)
    assert f1.shape == (21, 512) and f1.dtype == torch.float32
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)
    for key in ("dominant", "rare_present", "rare_share", "image", "boxes"):
        np.testing.assert_array_equal(l1[key], l2[key])
    np.testing.assert_array_equal(l1["image"], np.repeat(np.arange(7), 3))
    _, l3 = extract_features(enc, few, crops_per_image=3, size=32, seed=6, batch_size=64)
    assert not np.array_equal(l1["boxes"], l3["boxes"])  # the seed picks the crops
    # Labels are those of the mask under each returned box.
    from PIL import Image

    mask = np.asarray(Image.open(few.masks[2]))
    rows = l1["image"] == 2
    np.testing.assert_array_equal(crop_labels(mask, l1["boxes"][rows])["dominant"], l1["dominant"][rows])


def test_evaluate_representation_end_to_end(tiny_synthdrive) -> None:  # noqa: ANN001
    train, test = tiny_synthdrive
    enc = load_encoder("random", "resnet18", "cpu")
    res = evaluate_representation(enc, train, test, seeds=(0, 1), crops_per_image=4, size=40, probe_max_iter=200,
                                  batch_size=64, num_workers=2)
    assert {"config", "band_rule", "bands", "class_pixel_share", "n_train", "n_test", "rare_prevalence",
            "dominant", "rare_present"} <= set(res)
    assert (res["n_train"], res["n_test"]) == (len(train) * 4, len(test) * 4)
    assert set(res["bands"]) == set(CLASS_NAMES) and set(res["bands"].values()) <= {"head", "middle", "tail"}
    assert res["bands"]["road"] == "head" and res["bands"]["person"] == "tail"
    assert sum(res["class_pixel_share"].values()) == pytest.approx(1.0)
    dom, rare = res["dominant"], res["rare_present"]
    assert dom["knn_k"] == 20
    assert set(dom["knn"]) == {"overall", "head", "middle", "tail"}
    assert 0.0 <= dom["knn"]["overall"]["accuracy"] <= 1.0
    acc = dom["linear"]["overall.accuracy"]
    assert acc["n"] == 2 and len(acc["values"]) == 2
    assert acc["low"] <= acc["mean"] <= acc["high"] and 0.0 <= acc["low"] and acc["high"] <= 1.0
    assert acc["mean"] == pytest.approx(np.mean(acc["values"]))
    assert set(rare["knn"]) == {"accuracy", "balanced_accuracy", "n", "prevalence", "auroc"}
    assert rare["linear_class_weight"] == "balanced" and dom["linear_class_weight"] is None
    assert len(rare["linear"]["auroc"]["values"]) == 2
    assert rare["knn"]["n"] == res["n_test"]
    assert rare["knn"]["prevalence"] == pytest.approx(res["rare_prevalence"]["test"])
    assert 0.0 <= rare["linear"]["balanced_accuracy"]["mean"] <= 1.0
    assert res["config"]["interval"].startswith("student-t")
    with pytest.raises(ValueError, match="seeds"):
        evaluate_representation(enc, train, test, seeds=())
    with pytest.raises(ValueError, match="unknown class name 'roads'"):
        evaluate_representation(enc, train, test, class_share={"roads": 1.0})


def test_evaluate_representation_several_k(tiny_synthdrive) -> None:  # noqa: ANN001
    """``nb_knn``: DINO's weighted kNN for each k (capped at the train rows), against knn_classify on the
    same features; ``knn`` / ``config['k']`` are the first k when the default k=20 is not listed."""
    from oodfast.evaluate.probes import knn_classify

    train, test = tiny_synthdrive
    enc = load_encoder("random", "resnet18", "cpu")
    opts = dict(crops_per_image=2, size=32, num_workers=1)
    res = evaluate_representation(enc, train, test, seeds=(0,), probe_max_iter=50, nb_knn=(3, 7, 3, 100000), T=0.1,
                                  **opts)
    n_train = res["n_train"]
    assert res["config"]["nb_knn"] == [3, 7, 100000] and res["config"]["k"] == 3 and res["config"]["T"] == 0.1
    dom = res["dominant"]
    assert set(dom["knn_by_k"]) == {"3", "7", "100000"}
    assert dom["knn"] == dom["knn_by_k"]["3"] and dom["knn_k"] == 3
    assert dom["knn_k_used"]["100000"] <= n_train and dom["knn_k_used"]["7"] == 7
    x_tr, y_tr = extract_features(enc, train, **opts)
    x_te, y_te = extract_features(enc, test, **opts)
    keep_tr, keep_te = y_tr["dominant"] >= 0, y_te["dominant"] >= 0
    for k in (3, 7):
        pred = knn_classify(x_tr[torch.from_numpy(keep_tr)], y_tr["dominant"][keep_tr], x_te[torch.from_numpy(keep_te)],
                            k=k, T=0.1, num_classes=len(CLASS_NAMES))
        expected = float(np.mean(pred == y_te["dominant"][keep_te]))
        assert dom["knn_by_k"][str(k)]["overall"]["accuracy"] == pytest.approx(expected), k
    assert set(res["rare_present"]["knn_by_k"]) == {"3", "7", "100000"}
    from oodfast.evaluate.represent import representation_markdown

    text = representation_markdown(res)
    assert "kNN (k=3)" in text and "kNN (k=7)" in text and f"kNN (k={dom['knn_k_used']['100000']})" in text
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        evaluate_representation(enc, train, test, nb_knn=(5, 0))
