"""Data generation (not an ``oodfast bench`` stage): synthdrive speed on one core, per frame drawn,
written as JPEG + PNG mask, with its prevalence stats.

    pytest benchmarks/bench_synthdrive.py --benchmark-only

Target: >= 30 frames/s at 640x360 on one core, i.e. <= 33 ms per frame.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from oodfast.data.synthdrive import SynthConfig, _write_frame


@pytest.mark.parametrize("size", [(640, 360), (1280, 720)], ids=["640x360", "1280x720"])
def test_synthdrive_frame(benchmark, tmp_path: Path, size: tuple[int, int]) -> None:
    cfg = SynthConfig(width=size[0], height=size[1])
    for sub in ("images/10k/train", "labels/sem_seg/masks/train"):
        (tmp_path / sub).mkdir(parents=True)
    frames = itertools.count()
    benchmark.extra_info["target_ms_640x360"] = 33.3
    benchmark.pedantic(lambda: _write_frame((cfg, 0, next(frames), "train", str(tmp_path))),
                       rounds=60, warmup_rounds=3)
