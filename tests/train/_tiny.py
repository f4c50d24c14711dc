"""The trainer tests' shared pieces: the tiny synthdrive spec, the cpu preset at test size, and a guard
against host reads of tensors (the data_root fixture that uses SPEC is in conftest.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from oodfast.train.config import TrainConfig

#: 64 frames at 128x72: enough for calibration, two short epochs and a buffer of 2.
SPEC = dict(num_images=64, seed=0, width=128, height=72)


def tiny(data_root: str, out: Path, **overrides) -> TrainConfig:
    """The cpu preset at test size: 32/16 px crops, 4 images per step, 16 steps per epoch, eager."""
    base = dict(data="synthetic", data_root=data_root, synthetic_spec=SPEC, arch="resnet18", out_dim=64,
                global_size=32, local_size=16, local_crops_number=2, batch_size_per_gpu=4, epochs=2,
                epoch_length=16, buffer_size=2, calib_size=8, compile=False, log_every=1, output_dir=str(out),
                num_workers=1, deterministic=True)
    return TrainConfig.cpu(**{**base, **overrides})


@contextlib.contextmanager
def no_host_reads():
    """Every Python-side read of a tensor's value (item, bool, float, int, tolist, numpy: on a GPU each
    is a device synchronisation) raises while entered."""
    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a training step read a tensor on the host: Tensor.{name}")
        return read

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
