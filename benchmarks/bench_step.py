"""The step stage: the DINO step eager vs compiled, step-only vs end to end, and the OOD overhead per detector mode.

    pytest benchmarks/bench_step.py --benchmark-only

One "image" = all its crops (2 global + N local). On a GPU the paper's preset (ResNet-50,
2 x 224 + 6 x 96, batch 64 + 32 buffer rows, bf16); on a CPU the cpu preset at batch 8. Each case
builds a Trainer on synthdrive, calibrates and warms the buffer, then times steps:

* ``step``: forward + backward + optimizer + post-step (EMA, OOD enqueue, ring copy) on the staged
  batch, no data loading; eager vs compiled (compile time reported apart, in extra_info).
* ``train``: the same with the loader in the loop (end to end), for the end-to-end / step-only ratio.
* ``ood``: the step with random replay (same B + C rows, no detection) vs the teacher detector, for
  the detection overhead; plain DINO (B rows) for the cost of the replayed rows themselves.

Targets (the bounds ``oodfast bench`` judges are in oodfast/bench/targets.py): ResNet-50 DINO images/s,
compiled over eager, end to end as a share of step-only, the teacher-mode OOD overhead (the frozen mode
is measured, untargeted).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from oodfast.bench.harness import sync
from oodfast.bench.stages import prepared_trainer, random_resnet50_weights, train_step
from oodfast.devices import default_device
from oodfast.train.config import TrainConfig
from oodfast.train.trainer import Trainer

DEVICE = os.environ.get("OODFAST_BENCH_DEVICE") or default_device()
ON_GPU = DEVICE.startswith("cuda")


def config(tmp_path, **overrides) -> TrainConfig:
    if ON_GPU:
        return TrainConfig.paper(batch_size_per_gpu=64, epochs=1, warmup_epochs=0, epoch_length=64 * 40, calib_size=256,
                                 output_dir=str(tmp_path), **overrides)
    return TrainConfig.cpu(batch_size_per_gpu=8, epochs=1, epoch_length=8 * 12, calib_size=16, buffer_size=4,
                           output_dir=str(tmp_path), **overrides)


def measure(benchmark, trainer: Trainer, fn) -> None:
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()  # this case's peak, not the whole run's
    start = time.perf_counter()
    fn()  # first call: compiles when compile=True
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    benchmark.pedantic(fn, rounds=5 if not ON_GPU else 20, warmup_rounds=1)
    rows = trainer.B * trainer.world
    benchmark.extra_info.update(images_per_s=rows / benchmark.stats.stats.median,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu",
                                batch=trainer.B, buffer=trainer.cfg.buffer_size if trainer.ring else 0)
    if ON_GPU:
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step(benchmark, tmp_path, compiled):
    trainer = prepared_trainer(Trainer(config(tmp_path, compile=compiled), device=DEVICE, progress=False))
    benchmark.group = "step"
    measure(benchmark, trainer, lambda: (train_step(trainer), sync(DEVICE)))


# Detection overhead at equal rows: random replay (B + C rows, no scoring) vs the teacher detector
# (B + C rows + scoring + enqueue). Plain DINO (B rows) shows what the replayed rows themselves cost.
# The frozen detector (the paper's) adds a second ResNet-50's forward on the global crops.
@pytest.mark.parametrize("replay, detector", [("none", "teacher"), ("random", "teacher"), ("ood", "teacher"),
                                              ("ood", "frozen")],
                         ids=["plain-dino", "random-replay", "teacher-detector", "frozen-detector"])
def test_ood_overhead(benchmark, tmp_path, replay, detector):
    weights = dict(detector_weights=str(random_resnet50_weights(tmp_path))) if detector == "frozen" else {}
    trainer = prepared_trainer(Trainer(config(tmp_path, replay=replay, detector=detector, **weights), device=DEVICE,
                                       progress=False))
    benchmark.group = "ood overhead"
    measure(benchmark, trainer, lambda: (train_step(trainer), sync(DEVICE)))


def test_end_to_end(benchmark, tmp_path):
    """Whole epochs through Trainer.train (loader included); compare images/s with test_step[compiled]."""
    cfg = config(tmp_path)
    trainer = Trainer(cfg, device=DEVICE, progress=False)
    trainer.calibrate()
    trainer.warm_up()
    trainer.resumed = True  # skip calibration inside train()

    def epoch():
        trainer.step = 0
        trainer.train()
        sync(DEVICE)

    benchmark.group = "train"
    start = time.perf_counter()
    epoch()
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    benchmark.pedantic(epoch, rounds=2, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = trainer.steps_per_epoch * trainer.B / benchmark.stats.stats.median
