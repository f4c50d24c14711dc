"""The detect stage: rarity scoring, the paper's per-row scipy loop vs the torch path vs the fused op.

    pytest benchmarks/bench_detect.py --benchmark-only [--benchmark-json out.json]

On a GPU (default when CUDA is available) the fused op is the Triton kernel and B sweeps
{256, 1024, 8192, 65536} at D = 2048; on a CPU the fused op dispatches to the torch path, so
only the paper-vs-torch ratio is meaningful, at B in {256, 1024}. ``extra_info`` carries rows/s and
the achieved GB/s (bytes of x read once), and on a GPU the HBM bandwidth of a device-to-device copy
measured in the same run, so the kernel's share of the physical limit can be read off.

Targets (the bounds ``oodfast bench`` judges are in oodfast/bench/targets.py): euclidean B=1024 bf16
in microseconds eagerly and in a CUDA graph, B=65536 near the copy bandwidth, mahalanobis B=1024 in
tens of microseconds, knn against a 100k bank >= 1M queries/s; on the CPU the torch path >= 100x the
paper's path at B=1024, D=2048.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from oodfast.bench.harness import copy_bandwidth_gbps, cuda_graphed, sync
from oodfast.detect import DetectorConfig, RareDetector
from oodfast.devices import default_device
from oodfast.kernels.rare_enqueue import rare_score_torch
from oodfast.paper import _euclidean

DEVICE = os.environ.get("OODFAST_BENCH_DEVICE") or default_device()
ON_GPU = DEVICE.startswith("cuda")
SIZES = [256, 1024, 8192, 65536] if ON_GPU else [256, 1024]
D = 2048
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.fixture(scope="module")
def copy_bandwidth() -> float | None:
    """GB/s of a device-to-device copy (read + write), the practical HBM limit; GPU only."""
    return copy_bandwidth_gbps(DEVICE) if ON_GPU else None


def fitted(metric: str) -> RareDetector:
    torch.manual_seed(0)
    det = RareDetector(D, DetectorConfig(metric=metric), device=DEVICE)
    n = 1024 if metric != "knn" else (100_000 if ON_GPU else 4096)
    det.fit(torch.randn(n, D, device=DEVICE))
    return det


def run(benchmark, fn, B: int, bandwidth: float | None) -> None:
    """Time ``fn`` in rounds of back-to-back calls lasting >= 2 ms, synchronised once per round (a
    microsecond GPU call timed alone measures its launch and sync). ``extra_info`` is per call; the
    benchmark table's times are per round of ``calls_per_round`` calls."""
    for _ in range(3):
        fn()
    sync(DEVICE)
    start = time.perf_counter()
    fn()
    sync(DEVICE)
    calls = max(1, min(10_000, math.ceil(2e-3 / (time.perf_counter() - start))))

    def timed():
        for _ in range(calls):
            fn()
        sync(DEVICE)

    benchmark.pedantic(timed, rounds=20 if B <= 8192 else 10, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / calls
    benchmark.extra_info.update(rows_per_s=B / seconds, us_per_call=seconds * 1e6, calls_per_round=calls,
                                achieved_gbps=B * D * torch.tensor([], dtype=DTYPE).element_size() / seconds / 1e9,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if bandwidth:
        benchmark.extra_info.update(copy_gbps=bandwidth,
                                    share_of_copy_bandwidth=benchmark.extra_info["achieved_gbps"] / bandwidth)


@pytest.mark.parametrize("B", [b for b in SIZES if b <= 1024])
def test_paper_loop(benchmark, B):
    """The paper's detect(): a scipy distance per row, each with a host copy of the row and the mean."""
    det = fitted("euclidean")
    x = torch.randn(B, D, device=DEVICE)
    mean = det.center.unsqueeze(0)
    benchmark.group = f"euclidean B={B}"
    run(benchmark, lambda: torch.tensor([_euclidean(row, mean) for row in x]), B, None)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis", "knn"])
@pytest.mark.parametrize("B", SIZES)
def test_torch_path(benchmark, metric, B, copy_bandwidth):
    det = fitted(metric)
    x = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"{metric} B={B}"
    if metric == "knn":
        from oodfast.kernels.knn_score import knn_score_torch

        fn = lambda: knn_score_torch(x, det.bank, det.config.knn_k)  # noqa: E731
    else:
        fn = lambda: rare_score_torch(x, det.center, det.proj, det.coef, det.alpha, det.metric_id)  # noqa: E731
    run(benchmark, fn, B, copy_bandwidth)


@pytest.mark.skipif(not ON_GPU, reason="the fused Triton kernel runs on CUDA; on a CPU the op takes the torch path")
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "mahalanobis", "knn"])
@pytest.mark.parametrize("B", SIZES)
def test_fused(benchmark, metric, B, graphed, copy_bandwidth):
    """The fused op, eagerly and replayed from a CUDA graph (launch overhead removed: the 5 us target)."""
    det = fitted(metric)
    x = torch.randn(B, D, device=DEVICE, dtype=DTYPE)
    out = torch.empty(B, device=DEVICE)
    benchmark.group = f"{metric} B={B}"
    fn = lambda: det.score(x, out=out)  # noqa: E731
    run(benchmark, cuda_graphed(fn, DEVICE) if graphed else fn, B, copy_bandwidth)
