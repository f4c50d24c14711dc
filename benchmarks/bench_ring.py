"""The ring stage: the paper's deque of view lists + stack/cat vs RareRing's ring ops.

    pytest benchmarks/bench_ring.py --benchmark-only

One call = one training step's buffer work for a batch of B images (2 global + 6 local crops), of
which ``flagged`` are rare: the paper's path appends each flagged image's views to a deque(maxlen=32) and
builds the mixed batch with torch.stack / view / torch.cat (allocating B + 32 rows per view every
step); the ring enqueues on the device (rare_enqueue), copies the flagged crops into their slots in
one launch (ring_copy) and hands out the persistent B + 32 rows without copying. On a GPU the batch
is bfloat16 at 224/96 px; on a CPU float32 with B = 32. The cases are oodfast.bench's (``ring_case``).
"""

from __future__ import annotations

import os

import pytest
import torch

from oodfast.bench.harness import sync
from oodfast.bench.stages import ring_case
from oodfast.devices import default_device

DEVICE = torch.device(os.environ.get("OODFAST_BENCH_DEVICE") or default_device())
ON_GPU = DEVICE.type == "cuda"
B = 256 if ON_GPU else 32


@pytest.mark.parametrize("flagged", [1, 8])
@pytest.mark.parametrize("path", ["paper", "ring"])
def test_ring(benchmark, path, flagged):
    paper_step, ring_step = ring_case(DEVICE, B, 32, flagged, torch.bfloat16 if ON_GPU else torch.float32)
    fn = paper_step if path == "paper" else ring_step

    def step():
        fn()
        sync(DEVICE)

    benchmark.group = f"ring B={B} flagged={flagged}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    benchmark.extra_info["images_per_s"] = B / benchmark.stats.stats.median
