"""buffer.png / curves.png drawing and the collapse warning."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from oodfast.visualize import collapse_warning, contact_sheet, denormalize, draw_curves

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_denormalize_inverts_the_loaders_normalisation() -> None:
    rgb = torch.randint(0, 256, (2, 3, 5, 7)).float() / 255
    norm = (rgb - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    out = denormalize(norm.to(torch.bfloat16).float(), MEAN, STD)
    assert out.shape == (2, 5, 7, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)).max() <= 2


def test_contact_sheet_places_every_image_with_its_caption(tmp_path) -> None:  # noqa: ANN001
    imgs = np.zeros((5, 16, 16, 3), np.uint8)
    for i in range(5):
        imgs[i, ..., i % 3] = 40 * (i + 1)
    path = contact_sheet(imgs, [f"score {i}\nperson" for i in range(5)], tmp_path / "buffer.png", columns=4,
                         min_cell=64, title="buffer")
    sheet = np.asarray(Image.open(path))
    assert sheet.shape[1] == 4 * (64 + 6) + 6
    # each tile is its image scaled 4x (nearest): the tile's centre has the image's colour
    for i in range(5):
        x0, y0 = 6 + (i % 4) * 70, 22 + (i // 4) * (64 + 28 + 6)
        assert tuple(sheet[y0 + 32, x0 + 32]) == tuple(imgs[i, 0, 0])
    empty = np.asarray(Image.open(contact_sheet(np.zeros((0, 8, 8, 3), np.uint8), [], tmp_path / "e.png")))
    assert empty.shape[0] > 0 and (empty < 128).any()  # the "empty" text is drawn


def test_curves_draw_each_logged_key_and_skip_events(tmp_path) -> None:  # noqa: ANN001
    recs = [{"step": s, "epoch": 0, "loss": 7 - s / 50, "entropy_ratio": 0.9, "flag_rate": 0.05,
             "threshold": float("nan") if s == 10 else 1.0 + s} for s in range(0, 60, 5)]
    recs.append({"step": 30, "event": "non_finite_loss", "loss": "nan"})
    img = np.asarray(Image.open(draw_curves(recs, tmp_path / "curves.png")))
    blue = (img[..., 2] > 150) & (img[..., 0] < 80)
    assert blue.sum() > 200  # the lines
    # a panel for a key that was never logged still renders (and says so)
    draw_curves([{"step": 0, "loss": 1.0}], tmp_path / "c2.png")


def test_collapse_warning_reads_the_entropy_ratio() -> None:
    def run(ratios):  # noqa: ANN001, ANN202
        return [{"step": 10 * i, "loss": 1.0, "entropy_ratio": r} for i, r in enumerate(ratios)]

    assert "close to uniform" in collapse_warning(run([0.999] * 40))
    assert "one dimension" in collapse_warning(run([0.5] * 30 + [0.01] * 10))
    assert collapse_warning(run([0.99] * 10 + [0.6] * 30)) is None
    assert collapse_warning(run([0.999])) is None  # too short to judge
    assert collapse_warning(run([math.nan] * 40)) is None
