"""buffer.png's captions: score, step, the file name (whole when it fits) and the rare classes."""

from __future__ import annotations

import torch

from oodfast.buffer import RareRing
from oodfast.train import pictures


def test_buffer_captions_keep_the_whole_file_name(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    ring = RareRing.for_multicrop(2, global_size=8, local_crops_number=0)
    ring.append([torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)], sample_id=0, score=17.0, step=55)
    ring.append([torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)], sample_id=1, score=19.9, step=56)
    seen = {}
    monkeypatch.setattr(pictures, "contact_sheet", lambda images, captions, path, title: seen.update(c=captions))
    images = ["/data/synthdrive-s0-0000418.jpg", "/data/" + "x" * 30 + "-frame-0001.jpg"]
    pictures.draw_buffer(ring, tmp_path / "b.png", mean=[0.0] * 3, std=[1.0] * 3, images=images)
    first, second = (c.split("\n") for c in seen["c"])
    assert first[:2] == ["score 17, step 55", "synthdrive-s0-0000418"]
    assert second[1].startswith("..") and second[1].endswith("-frame-0001") and len(second[1]) == 24
