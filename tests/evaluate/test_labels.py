"""Crop labels from train-ID masks (oodfast.evaluate.labels): dominant class, rare presence, pixel shares."""

from __future__ import annotations

import numpy as np
import pytest

from oodfast.data.classes import CLASS_IDS, IGNORE_ID, NUM_CLASSES
from oodfast.data.crops import rare_shares
from oodfast.evaluate.labels import class_pixel_share, crop_labels

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
