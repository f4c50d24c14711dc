"""Head / middle / tail frequency bands (oodfast.evaluate.bands)."""

from __future__ import annotations

import numpy as np
import pytest

from oodfast.data.classes import CLASS_IDS, CLASS_NAMES, NUM_CLASSES
from oodfast.evaluate.bands import frequency_bands

ROAD, SKY, CAR = (CLASS_IDS[n] for n in ("road", "sky", "car"))


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
