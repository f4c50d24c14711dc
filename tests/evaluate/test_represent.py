"""Representation probes: crop labels, frequency bands, DINO's weighted kNN, the linear probe, metrics,
encoder loading and a small end-to-end run on synthdrive."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodfast.data.classes import CLASS_IDS, CLASS_NAMES, IGNORE_ID, NUM_CLASSES
from oodfast.data.crops import rare_shares
from oodfast.encoders import build_backbone, load_encoder
from oodfast.evaluate.represent import (
    binary_accuracy,
    class_pixel_share,
    crop_labels,
    evaluate_representation,
    extract_features,
    frequency_bands,
    knn_classify,
    knn_votes,
    linear_probe,
    linear_probe_logits,
    mean_interval,
    per_band_accuracy,
)
from oodfast.train.checkpoint import save_checkpoint

ROAD, BUILDING, SKY, CAR, PERSON = (CLASS_IDS[n] for n in ("road", "building", "sky", "car", "person"))


# --------------------------------------------------------------------------------------------------
# crop_labels
# --------------------------------------------------------------------------------------------------


def test_crop_labels_dominant_ignore_and_ties() -> None:
    # 4 x 6 mask:   road road road | car car car
    #               road road road | car car car
    #               255  255  255  | 255 255 car
    #               255  255  sky  | 255 255 255
    mask = np.array([
        [ROAD, ROAD, ROAD, CAR, CAR, CAR],
        [ROAD, ROAD, ROAD, CAR, CAR, CAR],
        [IGNORE_ID, IGNORE_ID, IGNORE_ID, IGNORE_ID, IGNORE_ID, CAR],
        [IGNORE_ID, IGNORE_ID, SKY, IGNORE_ID, IGNORE_ID, IGNORE_ID],
    ], dtype=np.uint8)
    boxes = np.array([
        [0, 0, 6, 4],   # road 6, car 7, sky 1, ignore 10 -> car
        [0, 2, 3, 4],   # ignore 5, sky 1 -> sky (ignore pixels never win)
        [3, 2, 5, 4],   # only ignore -> -1
        [2, 0, 4, 1],   # one road, one car: tie -> the lower ID (road)
        [0, 0, 3, 2],   # all road
    ])
    labels = crop_labels(mask, boxes)
    np.testing.assert_array_equal(labels["dominant"], [CAR, SKY, -1, ROAD, ROAD])
    np.testing.assert_array_equal(labels["counts"][0, [ROAD, CAR, SKY]], [6, 7, 1])
    assert labels["counts"][0].sum() == 14  # ignore pixels are not counted
    assert labels["counts"].shape == (5, NUM_CLASSES)
    assert not labels["rare_present"].any()


def test_crop_labels_match_brute_force_counts() -> None:
    rng = np.random.default_rng(3)
    mask = rng.choice([0, 2, 5, 11, 13, 18, IGNORE_ID], size=(23, 37)).astype(np.uint8)
    x0 = rng.integers(0, 36, 50)
    y0 = rng.integers(0, 22, 50)
    boxes = np.stack([x0, y0, x0 + 1 + rng.integers(0, 37 - x0), y0 + 1 + rng.integers(0, 23 - y0)], axis=1)
    labels = crop_labels(mask, boxes)
    for b, counts, dom in zip(boxes, labels["counts"], labels["dominant"]):
        window = mask[b[1]:b[3], b[0]:b[2]]
        expected = np.bincount(window.ravel(), minlength=256)[:NUM_CLASSES]
        np.testing.assert_array_equal(counts, expected)
        assert dom == (int(np.argmax(expected)) if expected.sum() else -1)
    np.testing.assert_allclose(labels["rare_share"], rare_shares(mask, boxes))


def test_crop_labels_rare_presence_at_tau_boundary() -> None:
    mask = np.full((10, 10), ROAD, dtype=np.uint8)
    mask[4, 4] = PERSON  # one rare pixel: share 1/100 in the whole frame
    boxes = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [4, 4, 6, 6]])
    at = crop_labels(mask, boxes, tau=0.01)
    np.testing.assert_allclose(at["rare_share"], [0.01, 0.0, 0.25])
    np.testing.assert_array_equal(at["rare_present"], [True, False, True])  # share == tau counts as rare
    above = crop_labels(mask, boxes, tau=0.0101)
    np.testing.assert_array_equal(above["rare_present"], [False, False, True])
    # The rare set decides: person is not rare if only cars are.
    assert not crop_labels(mask, boxes, rare_ids=(CAR,), tau=0.01)["rare_present"].any()


@pytest.mark.parametrize(
    ("mask", "boxes", "match"),
    [
        (np.zeros((4, 4), np.uint8), np.array([[0, 0, 5, 4]]), "inside"),
        (np.zeros((4, 4), np.uint8), np.array([[2, 0, 2, 4]]), "positive area"),
        (np.full((4, 4), 30, np.uint8), np.array([[0, 0, 4, 4]]), "train IDs"),
        (np.zeros((4, 4, 3), np.uint8), np.array([[0, 0, 4, 4]]), "mask must be"),
        (np.zeros((4, 4), np.uint8), np.array([0, 0, 4, 4]), "boxes must be"),
    ],
)
def test_crop_labels_rejects_bad_input(mask: np.ndarray, boxes: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        crop_labels(mask, boxes)


def test_class_pixel_share_ignores_255() -> None:
    a = np.array([[ROAD, ROAD], [IGNORE_ID, CAR]], np.uint8)
    b = np.array([[CAR, IGNORE_ID]], np.uint8)
    share = class_pixel_share([a, b])
    assert share[ROAD] == pytest.approx(0.5) and share[CAR] == pytest.approx(0.5)
    assert share.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no labelled pixel"):
        class_pixel_share([np.full((2, 2), IGNORE_ID, np.uint8)])


# --------------------------------------------------------------------------------------------------
# frequency_bands
# --------------------------------------------------------------------------------------------------


def test_frequency_bands_hand_made_table() -> None:
    share = {"road": 0.50, "building": 0.25, "sky": 0.10, "car": 0.08, "sidewalk": 0.04,
             "pole": 0.011, "terrain": 0.010, "person": 0.009}
    bands = frequency_bands(share)
    assert set(bands) == set(range(NUM_CLASSES))
    named = {CLASS_NAMES[c]: b for c, b in bands.items()}
    # Cumulative 0.50, 0.75, 0.85: sky crosses 80% and closes the head.
    assert {n for n, b in named.items() if b == "head"} == {"road", "building", "sky"}
    # 1% exactly is not below 1%: terrain is middle; person (0.9%) and absent classes are tail.
    assert {n for n, b in named.items() if b == "middle"} == {"car", "sidewalk", "pole", "terrain"}
    assert named["person"] == "tail" and named["train"] == "tail"
    # The same table as an array by train ID, and as a dict by ID, gives the same bands.
    arr = np.zeros(NUM_CLASSES)
    for name, value in share.items():
        arr[CLASS_IDS[name]] = value
    assert frequency_bands(arr) == bands
    assert frequency_bands({CLASS_IDS[n]: v for n, v in share.items()}) == bands
    assert frequency_bands(arr * 7.0) == bands  # shares are renormalised


def test_frequency_bands_head_stops_exactly_at_the_cut() -> None:
    bands = frequency_bands({"road": 0.5, "sky": 0.3, "car": 0.2})
    assert bands[ROAD] == bands[SKY] == "head"
    assert bands[CAR] == "middle"


@pytest.mark.parametrize(
    ("share", "match"),
    [({"roads": 1.0}, "unknown class name"), (np.ones(5), "19 entries"), ({"road": -1.0, "sky": 2.0}, "non-negative"),
     (np.zeros(NUM_CLASSES), "not all zero"), ({42: 1.0}, "train ID 42")],
)
def test_frequency_bands_rejects_bad_tables(share: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frequency_bands(share)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------


def knn_brute_force(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, T: float, c: int) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sim = train @ row
        top = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(c)
        for j in top:
            votes[labels[j]] += math.exp(sim[j] / T)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("T", [0.07, 0.5, 5.0])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_knn_matches_brute_force(k: int, T: float) -> None:
    rng = np.random.default_rng(k * 100 + int(T * 100))
    train = rng.normal(size=(61, 13)).astype(np.float32)
    labels = rng.integers(0, 5, 61)
    test = rng.normal(size=(37, 13)).astype(np.float32)
    expected = knn_brute_force(train.astype(np.float64), labels, test.astype(np.float64), k, T, 5)
    got = knn_classify(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), k=k, T=T,
                       num_classes=5, chunk_size=8)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64 and got.shape == (37,)
    # numpy inputs and another chunking give the same answer
    np.testing.assert_array_equal(knn_classify(train, labels, test, k=k, T=T, num_classes=5), got)


def test_knn_temperature_weighting_decides_between_near_and_many() -> None:
    def unit(cos: float) -> list[float]:
        return [cos, math.sqrt(1.0 - cos * cos)]

    # One very close neighbour of class 1 against two farther ones of class 0.
    train = np.array([unit(0.99), unit(0.50), unit(0.45), unit(-0.9)], np.float32)
    labels = np.array([1, 0, 0, 2])
    test = np.array([[1.0, 0.0]], np.float32)
    # T = 0.07: exp(0.99 / 0.07) = 1.4e6 outweighs exp(0.5 / 0.07) + exp(0.45 / 0.07) = 1.9e3.
    assert knn_classify(train, labels, test, k=3, T=0.07)[0] == 1
    # T = 10: weights ~1 each, so the majority (class 0) wins.
    assert knn_classify(train, labels, test, k=3, T=10.0)[0] == 0
    # Scale does not matter: features are L2-normalised first.
    assert knn_classify(train * 100, labels, test * 0.01, k=3, T=0.07)[0] == 1


def test_knn_votes_are_weighted_shares_and_their_argmax_is_the_classifier() -> None:
    def unit(cos: float) -> list[float]:
        return [cos, math.sqrt(1.0 - cos * cos)]

    train = np.array([unit(0.9), unit(0.6), unit(0.3)], np.float32)
    labels = np.array([1, 0, 0])
    test = np.array([[1.0, 0.0]], np.float32)
    votes = knn_votes(train, labels, test, k=3, T=0.5, num_classes=3)
    w = np.exp(np.array([0.9, 0.6, 0.3]) / 0.5)
    np.testing.assert_allclose(votes[0], [(w[1] + w[2]) / w.sum(), w[0] / w.sum(), 0.0], rtol=1e-5)
    # A temperature that overflows exp(sim / T) in float32 still gives finite shares (all weight on the nearest).
    np.testing.assert_allclose(knn_votes(train, labels, test, k=3, T=1e-3)[0], [0.0, 1.0], atol=1e-6)
    rng = np.random.default_rng(3)
    x, y, q = rng.normal(size=(50, 6)), rng.integers(0, 4, 50), rng.normal(size=(30, 6))
    v = knn_votes(x, y, q, k=9, T=0.1, num_classes=4)
    assert v.shape == (30, 4)
    np.testing.assert_allclose(v.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v.argmax(axis=1), knn_classify(x, y, q, k=9, T=0.1, num_classes=4))


def test_knn_rejects_bad_arguments() -> None:
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k must lie"):
        knn_classify(x, np.zeros(4, np.int64), x, k=5)
    with pytest.raises(ValueError, match="T must be"):
        knn_classify(x, np.zeros(4, np.int64), x, k=2, T=0.0)
    with pytest.raises(ValueError, match="dim"):
        knn_classify(x, np.zeros(4, np.int64), np.ones((2, 4), np.float32), k=2)
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x, np.array([0, 1, -1, 0]), x, k=2)


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


def blobs(seed: int, n: int, d: int = 16, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=4.0, size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + rng.normal(size=(n, d))
    x[:, 0] = 5.0  # a constant dimension: standardisation must not divide by zero
    x[:, 1] *= 1000.0  # a badly scaled dimension
    return x.astype(np.float32), y


def test_linear_probe_separates_and_is_deterministic() -> None:
    x_tr, y_tr = blobs(0, 300)
    x_te, y_te = blobs(1, 200)
    pred = linear_probe(x_tr, y_tr, x_te, epochs=30, lr=1e-2, weight_decay=1e-4, seed=0, batch_size=64)
    assert pred.dtype == np.int64 and pred.shape == (200,)
    assert (pred == y_te).mean() >= 0.97
    again = linear_probe(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                         epochs=30, lr=1e-2, weight_decay=1e-4, seed=0, batch_size=64)
    np.testing.assert_array_equal(pred, again)


def test_linear_probe_standardises_features() -> None:
    # Standardisation makes the probe blind to a per-dimension shift and positive scale of the features.
    rng = np.random.default_rng(2)
    x_tr, y_tr = rng.normal(size=(150, 8)).astype(np.float32), rng.integers(0, 3, 150)
    x_te = rng.normal(size=(400, 8)).astype(np.float32)
    a = np.geomspace(1e-3, 1e3, 8).astype(np.float32)
    b = np.linspace(-50, 50, 8).astype(np.float32)
    plain = linear_probe(x_tr, y_tr, x_te, epochs=5, seed=0, batch_size=32)
    moved = linear_probe(x_tr * a + b, y_tr, x_te * a + b, epochs=5, seed=0, batch_size=32)
    assert (plain == moved).mean() >= 0.99  # equal up to float rounding near decision boundaries


def test_linear_probe_seed_changes_the_model() -> None:
    # A hard, noisy task where the optimisation path shows: different seeds, different predictions.
    rng = np.random.default_rng(5)
    x_tr, y_tr = rng.normal(size=(200, 32)).astype(np.float32), rng.integers(0, 4, 200)
    x_te = rng.normal(size=(300, 32)).astype(np.float32)
    a = linear_probe(x_tr, y_tr, x_te, epochs=3, seed=0, batch_size=32)
    b = linear_probe(x_tr, y_tr, x_te, epochs=3, seed=1, batch_size=32)
    np.testing.assert_array_equal(a, linear_probe(x_tr, y_tr, x_te, epochs=3, seed=0, batch_size=32))
    assert not np.array_equal(a, b)


def test_balanced_probe_finds_a_rare_class_the_plain_probe_ignores() -> None:
    # 5% positives with a weak signal: plain cross-entropy's best answer is "negative" almost
    # everywhere; the balanced loss trades accuracy for recall on the rare class.
    rng = np.random.default_rng(11)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.05).astype(np.int64)
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += 1.5 * y
        return x, y

    (x_tr, y_tr), (x_te, y_te) = sample(2000), sample(4000)
    kw = dict(epochs=20, seed=0, batch_size=256)
    plain = binary_accuracy(linear_probe(x_tr, y_tr, x_te, **kw), y_te)
    logits = linear_probe_logits(x_tr, y_tr, x_te, class_weight="balanced", **kw)
    assert logits.shape == (4000, 2) and logits.dtype == np.float32
    balanced = binary_accuracy(logits.argmax(axis=1), y_te, scores=logits[:, 1] - logits[:, 0])
    assert plain["balanced_accuracy"] < 0.6
    assert balanced["balanced_accuracy"] > 0.7
    # The Bayes AUROC of a 1.5-sigma shift is Phi(1.5 / sqrt(2)) = 0.856.
    assert 0.8 < balanced["auroc"] < 0.9
    np.testing.assert_array_equal(linear_probe(x_tr, y_tr, x_te, class_weight="balanced", **kw),
                                  logits.argmax(axis=1))


def test_linear_probe_rejects_bad_arguments() -> None:
    x, y = blobs(0, 20)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        linear_probe(x, y, x, lr=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, num_classes=2)
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe(np.full_like(x, np.nan), y, x)
    with pytest.raises(ValueError, match="class_weight"):
        linear_probe(x, y, x, class_weight="inverse")


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_per_band_accuracy_hand_computed() -> None:
    bands = {0: "head", 1: "head", 2: "middle", 3: "tail", 4: "tail"}
    target = np.array([0, 0, 1, 2, 2, 3])
    pred = np.array([0, 1, 1, 2, 0, 0])
    out = per_band_accuracy(pred, target, bands)
    assert out["overall"] == {"accuracy": pytest.approx(3 / 6), "mean_class_accuracy": pytest.approx((0.5 + 1 + 0.5 + 0) / 4),
                              "n": 6, "classes": 4}
    assert out["head"]["accuracy"] == pytest.approx(2 / 3)
    assert out["head"]["mean_class_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert (out["head"]["n"], out["head"]["classes"]) == (3, 2)
    assert out["middle"]["accuracy"] == pytest.approx(0.5) and out["middle"]["n"] == 2
    assert out["tail"] == {"accuracy": 0.0, "mean_class_accuracy": 0.0, "n": 1, "classes": 1}
    # A band without rows reports None, never NaN.
    empty_tail = per_band_accuracy(pred[:5], target[:5], bands)
    assert empty_tail["tail"] == {"accuracy": None, "mean_class_accuracy": None, "n": 0, "classes": 0}
    with pytest.raises(ValueError, match="no entry for target class"):
        per_band_accuracy(pred, target, {0: "head"})
    with pytest.raises(ValueError, match="same length"):
        per_band_accuracy(pred[:2], target, bands)


def test_binary_accuracy_hand_computed() -> None:
    out = binary_accuracy(np.array([1, 0, 0, 1]), np.array([1, 1, 0, 0]))
    assert out == {"accuracy": 0.5, "balanced_accuracy": 0.5, "n": 4, "prevalence": 0.5}
    # A constant "never rare" predictor: high accuracy at low prevalence, balanced accuracy 0.5.
    out = binary_accuracy(np.zeros(8, bool), np.array([1, 0, 0, 0, 0, 0, 0, 0], bool))
    assert out["accuracy"] == pytest.approx(7 / 8) and out["balanced_accuracy"] == pytest.approx(0.5)
    # TPR 1/2, TNR 2/3.
    out = binary_accuracy(np.array([1, 0, 1, 0, 0]), np.array([1, 1, 0, 0, 0]))
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["prevalence"] == pytest.approx(0.4)
    # AUROC of a score: positives {0.9, 0.3} against negatives {0.1, 0.8} win 3 of 4 pairs.
    out = binary_accuracy(np.zeros(4), np.array([1, 0, 0, 1]), scores=np.array([0.9, 0.1, 0.8, 0.3]))
    assert out["auroc"] == pytest.approx(0.75) and out["balanced_accuracy"] == pytest.approx(0.5)
    assert binary_accuracy(np.zeros(3), np.zeros(3), scores=np.arange(3.0))["auroc"] is None
    with pytest.raises(ValueError, match="one entry per target"):
        binary_accuracy(np.zeros(3), np.zeros(3), scores=np.arange(2.0))


def test_mean_interval_student_t() -> None:
    out = mean_interval([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert out["mean"] == pytest.approx(0.6)
    assert out["low"] == pytest.approx(0.6 - half) and out["high"] == pytest.approx(0.6 + half)
    assert mean_interval([0.1, 0.9], bounds=(0.0, 1.0))["low"] == 0.0
    single = mean_interval([0.4])
    assert single["mean"] == pytest.approx(0.4) and single["low"] is None and single["high"] is None
    assert mean_interval([None, None])["mean"] is None


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


def dino_checkpoint(path, backbone: torch.nn.Module, arch: str):  # noqa: ANN001, ANN201
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 512)
    return save_checkpoint(path, {"student": teacher, "teacher": teacher, "optimizer": {}, "epoch": 1,
                                  "args": {"arch": arch}, "dino_loss": {}})


def test_load_encoder_random_is_seeded_and_frozen() -> None:
    state = torch.get_rng_state()
    a = load_encoder("random", "resnet18", "cpu", seed=3)
    b = load_encoder("random", "resnet18", "cpu", seed=3)
    c = load_encoder("random", "resnet18", "cpu", seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_load_encoder_from_checkpoint_and_plain_state_dict(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = dino_checkpoint(tmp_path / "checkpoint.pth", net, "resnet18")
    enc = load_encoder(path, "resnet18", "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    # DINO's released backbone weights: a bare state dict (a torchvision fc is ignored).
    bare = {**net.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(bare, tmp_path / "bare.pth")
    enc2 = load_encoder(tmp_path / "bare.pth", "resnet18", "cpu")
    assert torch.equal(enc2.conv1.weight, net.conv1.weight)


def test_load_encoder_clear_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder(tmp_path / "nope.pth", "resnet18", "cpu")
    net, _ = build_backbone("resnet18")
    path = dino_checkpoint(tmp_path / "checkpoint.pth", net, "resnet18")
    with pytest.raises(ValueError, match=r"missing \(first: layer1\.2\.") as err:
        load_encoder(path, "resnet34", "cpu")
    assert "'resnet18'" in str(err.value)  # the arch it was trained with
    with pytest.raises(ValueError, match=r"mis-shaped: .*\(64, 64, 3, 3\)"):
        load_encoder(path, "resnet50", "cpu")
    with pytest.raises(ValueError, match="unknown backbone arch"):
        load_encoder("random", "resnet7", "cpu")
    with pytest.raises(ValueError, match="no 'ema'"):
        load_encoder(path, "resnet18", "cpu", checkpoint_key="ema")


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
    res = evaluate_representation(enc, train, test, seeds=(0, 1), crops_per_image=4, size=40, probe_epochs=10,
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
