"""GPU only: the default training path (compiled step, bf16 autocast, channels_last, DALI when installed)
runs 20 steps without one host synchronisation.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise (``.item()``,
``bool(tensor)``, blocking copies, ``nonzero``...). It is on for the whole loop (loader iteration,
staging, step, the asynchronous read of the previous step's scalars), after a first compiled step
and with the checkpoint write (a device-to-host copy by design) left out. benchmarks/gpu.sh runs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from oodfast.train.config import TrainConfig
from oodfast.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = dict(num_images=96, seed=0, width=320, height=180)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    from oodfast.data.synthdrive import ensure_synthdrive

    root = tmp_path_factory.mktemp("synth-cuda")
    ensure_synthdrive(root, progress=False, **SPEC)
    return str(root)


def gpu_config(data_root: str, out: Path, **overrides) -> TrainConfig:
    """The paper preset's defaults (compile, bf16, channels_last) at a size that compiles quickly."""
    aug = "dali" if importlib.util.find_spec("nvidia.dali") else "torch"
    base = dict(data="synthetic", data_root=data_root, synthetic_spec=SPEC, aug=aug, arch="resnet18",
                out_dim=4096, global_size=96, local_size=48, local_crops_number=2, batch_size_per_gpu=16,
                epochs=1, epoch_length=16 * 40, warmup_epochs=0, buffer_size=4, calib_size=32, log_every=5,
                output_dir=str(out))
    return TrainConfig.paper(**{**base, **overrides})


def test_twenty_steps_of_the_default_path_never_synchronise(data_root, tmp_path):
    t = Trainer(gpu_config(data_root, tmp_path / "run", max_steps=1), device="cuda", progress=False)
    assert isinstance(t.amp, torch.autocast) and t.crops.torch_dtype(t.device) == torch.bfloat16
    t.train()  # calibration, warm-up and the compiling first step, outside the check
    save = t.save

    def save_outside_the_check(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        return save(*args, **kwargs)

    t.save = save_outside_the_check
    t.cfg = t.cfg.replace(max_steps=21)
    t.resumed = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        summary = t.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["steps"] == 21
    assert summary["last"]["loss"] > 0 and summary["last"]["step"] == 20


def test_bf16_off_on_a_gpu_trains_with_fp32_crops(data_root, tmp_path):
    """The cpu preset's bf16=False on a GPU host: crops in the parameters' fp32 (float16 crops used to
    reach an fp32 conv and raise)."""
    t = Trainer(gpu_config(data_root, tmp_path / "fp32", bf16=False, compile=False, max_steps=2), device="cuda",
                progress=False)
    assert t.crops.torch_dtype(t.device) == torch.float32
    assert t.train()["steps"] == 2
