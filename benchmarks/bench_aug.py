"""The aug stage: multi-crop throughput in images/s, one image = all its crops (2 global + 6 local,
DINO's recipe).

    pytest benchmarks/bench_aug.py --benchmark-only

Each round is one epoch over synthdrive JPEGs (a fresh pass through the loader; pipelines and
workers are built outside the timed region where the backend allows). Compared in the same run:

    decode_only     the limit: decoding alone (DALI CPU decoder / nvJPEG on the GPU)
    paper           the paper's path: PIL + torchvision in DataLoader workers (workers = cores)
    dali_cpu        our DALI pipeline, CPU only (device_id=None)
    dali_gpu        our DALI pipeline on the GPU (skipped without CUDA)
    torch           torchvision.io decode + batched tensor ops (on the GPU when there is one)

Sizes: 1280x720 with CUDA (the targets, oodfast/bench/targets.py: DALI GPU >= 3,000 images/s and
>= 8x the paper's path, near decode-only); 640x360 and fewer images on a CPU-only machine, where only
the ratio DALI CPU / the paper's path counts (target > 1). ``extra_info`` records
images/s, the image size and the fraction of decode-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oodfast.data.discover import discover
from oodfast.data.multicrop import MultiCropConfig, multicrop_loader
from oodfast.data.synthdrive import SynthConfig, generate
from oodfast.devices import default_device

pytest.importorskip("nvidia.dali")

CUDA = default_device() == "cuda"
SIZE = (1280, 720) if CUDA else (640, 360)
N_IMAGES = 512 if CUDA else 64
BATCH = 64 if CUDA else 16
# Images per timed epoch: on a GPU, 512 files at >= 3,000 images/s would be a ~0.2 s epoch, too short
# to time and dominated by per-epoch costs (the paper's path re-spawns its workers every epoch, as the
# paper's code does); the loaders cycle through the files with fresh permutations instead.
EPOCH = 8 * N_IMAGES if CUDA else N_IMAGES
CORES = len(os.sched_getaffinity(0))
ROUNDS = 3
_decode_rate: dict[str, float] = {}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bench_aug") / "sd"
    generate(root, N_IMAGES, seed=0, config=SynthConfig(width=SIZE[0], height=SIZE[1]),
             val_fraction=0.0, workers=CORES)
    return list(discover("bdd10k", root, "train", use_default_list=False).images)


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += batch.index.numel()
    if batch.views[0].is_cuda:
        torch.cuda.synchronize()
    return n


def _record(benchmark, name: str, images: int, decode_key: str | None = None) -> None:
    rate = images / benchmark.stats.stats.mean
    benchmark.extra_info.update(images_per_s=round(rate, 1), image_size=f"{SIZE[0]}x{SIZE[1]}",
                                images=images, batch=BATCH, cores=CORES, backend=name)
    if decode_key and decode_key in _decode_rate:
        benchmark.extra_info["fraction_of_decode_only"] = round(rate / _decode_rate[decode_key], 3)


def _decode_pipeline(files: list[Path], device: str):
    from nvidia.dali import fn, pipeline_def, types

    data = [np.fromfile(p, dtype=np.uint8) for p in files]
    steps = len(files) // BATCH

    @pipeline_def(batch_size=BATCH, num_threads=CORES, device_id=0 if device == "mixed" else None)
    def decode():
        enc = fn.external_source(source=lambda i: data[(i % steps) * BATCH:(i % steps + 1) * BATCH],
                                 batch=True)
        return fn.decoders.image(enc, device=device, output_type=types.RGB, adjust_orientation=False)

    pipe = decode()
    pipe.build()
    return pipe, steps


@pytest.mark.parametrize("device", ["cpu", pytest.param("mixed", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))])
def test_decode_only(benchmark, files: list[Path], device: str) -> None:
    pipe, steps = _decode_pipeline(files, device)

    def epoch() -> None:
        for _ in range(steps):
            pipe.run()

    epoch()  # warm-up
    benchmark.pedantic(epoch, rounds=ROUNDS, warmup_rounds=0)
    _decode_rate[device] = steps * BATCH / benchmark.stats.stats.mean
    _record(benchmark, f"decode_only_{device}", steps * BATCH)


@pytest.mark.parametrize("backend,device", [
    ("paper", "cpu"),
    ("dali", "cpu"),
    pytest.param("dali", "cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
    ("torch", default_device()),
], ids=["paper", "dali_cpu", "dali_gpu", "torch"])
def test_multicrop(benchmark, files: list[Path], backend: str, device: str) -> None:
    kw = {"num_workers": CORES} if backend in ("paper", "dali") else {}
    loader = multicrop_loader(files, MultiCropConfig.dino(), BATCH, device=device, seed=0, backend=backend,
                              epoch_length=EPOCH, **kw)
    images = _epoch(loader)  # warm-up: builds the pipeline / first workers
    rounds = 1 if backend == "torch" and not CUDA else ROUNDS  # batched ops on 2 CPU cores are slow
    benchmark.pedantic(lambda: _epoch(loader), rounds=rounds, warmup_rounds=0)
    _record(benchmark, f"{backend}_{device}", images, decode_key="mixed" if device == "cuda" else "cpu")
