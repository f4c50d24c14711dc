"""Crop boxes follow torchvision's RandomResizedCrop; rare shares match a brute-force count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from oodfast.data.crops import rare_shares, sample_resized_crop_boxes


@pytest.mark.parametrize("height, width", [(720, 1280), (100, 100), (50, 400)])
def test_boxes_match_torchvision_distribution(height: int, width: int) -> None:
    n = 3000
    ours = sample_resized_crop_boxes(np.random.default_rng(0), n, height, width, (0.4, 1.0))
    assert ours.dtype == np.int64 and ours.shape == (n, 4)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    assert ((ours[:, 2] > ours[:, 0]) & (ours[:, 3] > ours[:, 1])).all()

    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, [0.4, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    # ref rows are (top, left, h, w)
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    ref_aspect = ref[:, 3] / ref[:, 2]
    ref_cx = (ref[:, 1] + ref[:, 3] / 2) / width
    our_area = (ours[:, 2] - ours[:, 0]) * (ours[:, 3] - ours[:, 1]) / (height * width)
    our_aspect = (ours[:, 2] - ours[:, 0]) / (ours[:, 3] - ours[:, 1])
    our_cx = (ours[:, 0] + ours[:, 2]) / 2 / width
    for name, a, b in (("area", our_area, ref_area), ("aspect", our_aspect, ref_aspect), ("centre x", our_cx, ref_cx)):
        result = stats.ks_2samp(a, b)
        assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.3f} (p={result.pvalue:.2g})"


def test_rare_shares_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.choice(np.array([0, 5, 11, 13, 255], np.uint8), size=(37, 53), p=[0.5, 0.1, 0.1, 0.2, 0.1])
    boxes = sample_resized_crop_boxes(rng, 200, 37, 53, (0.05, 1.0))
    got = rare_shares(mask, boxes, rare_ids=(5, 11))
    for (x0, y0, x1, y1), share in zip(boxes, got):
        window = mask[y0:y1, x0:x1]
        assert share == pytest.approx(np.isin(window, [5, 11]).mean())


def test_rare_shares_rejects_empty_boxes() -> None:
    with pytest.raises(ValueError, match="positive area"):
        rare_shares(np.zeros((4, 4), np.uint8), np.array([[1, 1, 1, 3]]))


def test_fallback_is_centred_with_clamped_ratio() -> None:
    # scale > 1 can never fit, so every box takes torchvision's fallback: the centred crop.
    boxes = sample_resized_crop_boxes(np.random.default_rng(0), 5, 100, 400, scale=(2.0, 3.0))
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    assert (h == 100).all() and (w == round(100 * 4 / 3)).all()
    assert (boxes[:, 0] == (400 - w) // 2).all()
    assert math.isclose(float(w[0] / h[0]), 4 / 3, rel_tol=0.01)


# --------------------------------------------------------------------------------------------------
# Masks (``--replay oracle`` reads one per image per step)
# --------------------------------------------------------------------------------------------------

MASK_SIZE = (64, 48)


def _pair(tmp_path, values=(0, 11, 18, 255), size=MASK_SIZE, mode="L"):
    from PIL import Image

    image = tmp_path / "frame.jpg"
    Image.new("RGB", MASK_SIZE, (9, 9, 9)).save(image)
    arr = np.zeros(size[::-1], np.uint8)
    for i, v in enumerate(values):
        arr[:, i::len(values)] = v
    mask = tmp_path / "frame.png"
    Image.fromarray(arr, "L").convert(mode).save(mask, compress_level=0)
    return image, mask, arr


def test_read_mask_returns_the_train_ids(tmp_path) -> None:
    from oodfast.data.crops import read_mask

    image, mask, arr = _pair(tmp_path)
    got = read_mask(mask, image)
    assert got.dtype == np.uint8 and got.shape == (48, 64) and np.array_equal(got, arr)
    assert np.array_equal(read_mask(mask, image_size=MASK_SIZE), arr)
    assert np.array_equal(read_mask(mask), arr)  # no size check asked for


@pytest.mark.parametrize("value", [19, 77, 254])
def test_read_mask_refuses_values_outside_the_label_spec(tmp_path, value: int) -> None:
    """BDD10K train IDs are 0..18 and 255 (ignore): anything else is an error, not "not rare"."""
    from oodfast.data.crops import MaskError, read_mask

    image, mask, _ = _pair(tmp_path, values=(0, value, 255))
    with pytest.raises(MaskError, match=rf"^mask {mask}: values outside 0\.\.18 and 255: {value}; run `oodfast data check`"):
        read_mask(mask, image)


def test_read_mask_refuses_a_mask_of_another_size(tmp_path) -> None:
    from oodfast.data.crops import MaskError, rare_shares, read_mask

    image, mask, arr = _pair(tmp_path, size=(32, 48))
    with pytest.raises(IndexError):  # what the oracle did before: a box past the mask's edge
        rare_shares(arr, np.array([[40, 0, 64, 48]]))
    with pytest.raises(MaskError, match=rf"^mask {mask}: size 32x48 differs from the image's 64x48; "):
        read_mask(mask, image)


def test_read_mask_names_a_truncated_or_wrong_mode_mask(tmp_path, monkeypatch) -> None:
    from PIL import ImageFile

    from oodfast.data.crops import MaskError, read_mask

    image, mask, _ = _pair(tmp_path, values=tuple(range(19)))
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a caller's lenient setting does not hide it
    with pytest.raises(MaskError) as e:
        read_mask(mask, image)
    msg = str(e.value)
    assert msg.startswith(f"mask {mask}: cannot decode it (OSError: ") and "truncated" in msg and "\n" not in msg
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    image, mask, _ = _pair(tmp_path, mode="RGB")
    with pytest.raises(MaskError, match=r"mode RGB, expected single-channel 8-bit \(L or P\)"):
        read_mask(mask, image)
    mask.write_bytes(b"")
    with pytest.raises(MaskError, match=rf"^mask {mask}: cannot decode it \(UnidentifiedImageError"):
        read_mask(mask, image)
    (tmp_path / "frame.jpg").unlink()
    with pytest.raises(MaskError, match=r"its image cannot be read .*frame\.jpg"):
        read_mask(mask, tmp_path / "frame.jpg")
