"""The replay buffer: the seed's deque of view lists + stack/cat vs RareRing's ring ops.

    pytest benchmarks/bench_ring.py --benchmark-only

One call = one training step's buffer work for a batch of B images (2 global + 6 local crops), of
which ``flagged`` are rare: the seed appends each flagged image's views to a deque(maxlen=32) and
builds the mixed batch with torch.stack / view / torch.cat (allocating B + 32 rows per view every
step); the ring enqueues on the device (rare_enqueue), copies the flagged crops into their slots in
one launch (ring_copy) and hands out the persistent B + 32 rows without copying. On a GPU the batch
is bfloat16 at 224/96 px; on a CPU float32 with B = 32.
"""

from __future__ import annotations

import os

import pytest
import torch

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, RareDetector
from oodfast.seed import SeedMemoryBuffer

DEVICE = os.environ.get("OODFAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.startswith("cuda")
B = 256 if ON_GPU else 32
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
C = 32


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def batch() -> list[torch.Tensor]:
    return [torch.randn(B, 3, 224, 224, device=DEVICE, dtype=DTYPE) for _ in range(2)] + \
           [torch.randn(B, 3, 96, 96, device=DEVICE, dtype=DTYPE) for _ in range(6)]


@pytest.mark.parametrize("flagged", [1, 8])
def test_seed_deque(benchmark, flagged):
    views, buf = batch(), SeedMemoryBuffer(C)
    for k in range(C):  # warm: the seed's buffer is full before training
        buf.add([v[k] for v in views])
    idx = torch.arange(flagged)

    def step():
        for i in idx:
            buf.add([v[i] for v in views])
        out = buf.concat_with_batch(views)
        sync()
        return out

    benchmark.group = f"ring B={B} flagged={flagged}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = B / benchmark.stats.stats.median


@pytest.mark.parametrize("flagged", [1, 8])
def test_rare_ring(benchmark, flagged):
    views = batch()
    ring = RareRing.for_multicrop(C, batch_size=B, dtype=DTYPE, device=DEVICE)
    det = RareDetector(1, DetectorConfig(metric="euclidean"), device=DEVICE)
    det.fit(torch.arange(100, dtype=torch.float32, device=DEVICE).unsqueeze(1))
    emb = torch.zeros(B, 1, device=DEVICE)
    emb[:flagged] = 1e3  # exactly `flagged` rows above the threshold
    ids, step_t = torch.arange(B, device=DEVICE), torch.zeros((), dtype=torch.int64, device=DEVICE)
    scores, slots = torch.empty(B, device=DEVICE), torch.empty(B, dtype=torch.int32, device=DEVICE)
    ring.stage(views)

    def step():
        det.enqueue(emb, ring, ids, step_t, scores=scores, slots=slots)
        ring.write(slots)
        out = ring.views()
        sync()
        return out

    benchmark.group = f"ring B={B} flagged={flagged}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = B / benchmark.stats.stats.median
