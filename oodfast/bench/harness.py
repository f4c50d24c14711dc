"""Timing and environment facts shared by ``oodfast bench`` and the benchmarks/ suites.

Every measured path runs ``warmup`` times untimed (compilation, autotuning, caches), then ``repeats``
timed runs, each synchronised with the device before and after; a row reports the median with the
10th-90th percentile spread. Compile time is reported apart from the steady state (the first call),
and on CUDA the peak memory allocated while the path ran (the counter is reset before its first call).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: median and the 10th / 90th percentiles over ``repeats`` timed samples."""

    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    first_call_s: float  # the first (warm-up) call: includes compilation where there is any
    peak_mem_gib: float | None = None  # CUDA only: peak allocated from the first call to the last
    calls_per_sample: int = 1

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 2, repeats: int = 10,
            min_sample_s: float = 0.0) -> Timing:
    """Time ``fn``, synchronising the device before and after each timed sample.

    A sample is one call, or with ``min_sample_s`` as many back-to-back calls as fill that time
    (estimated from the last warm-up call), divided by their number: for microsecond calls, whose
    single-call timing would be dominated by the host's launch and synchronisation round trip.
    """
    cuda = torch.device(device).type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = last = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        start = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - start
    calls = max(1, min(10_000, math.ceil(min_sample_s / max(last, 1e-9)))) if min_sample_s else 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    t = np.asarray(times)
    return Timing(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), repeats, first,
                  torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, calls)


def cuda_graphed(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph; returns a function that replays it (and keeps ``fn`` alive).

    ``fn`` must be capturable: fixed input and output tensors (e.g. ``out=``) and no host sync. It is
    first run ``warmup`` times on a side stream, as torch's CUDA-graph notes prescribe, so lazy
    initialisation and Triton's compilation happen outside the capture. The capture is thread-local:
    CUDA calls from other threads (a DALI pipeline still alive) do not invalidate it.

    Raises:
        RuntimeError: ``fn`` cannot be captured.
    """
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()

    def replay(graph: torch.cuda.CUDAGraph = graph, fn: Callable[[], Any] = fn) -> None:
        graph.replay()

    return replay


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Achieved GB/s (read + write) of a device-to-device copy: the practical memory-bandwidth limit."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * src.numel() * src.element_size() / t.median_s / 1e9


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device name, driver, library versions, git SHA and date: what a committed report must carry."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "device_type": dev.type,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dali": _version("nvidia-dali-cuda130"),
        "oodfast": _version("oodfast"),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["cuda"] = torch.version.cuda
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    # benchmarks/gpu.sh runs an installed copy on a machine the tree reached without .git: it passes the
    # SHA the carried wheel was built at (OODFAST_GIT_SHA) and how oodfast got there (OODFAST_INSTALL)
    info["git_sha"] = os.environ.get("OODFAST_GIT_SHA") or None
    if os.environ.get("OODFAST_INSTALL"):
        info["install"] = os.environ["OODFAST_INSTALL"]
    if info["git_sha"] is None:
        try:
            root = Path(__file__).resolve().parents[2]
            info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                             timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["git_sha"] = None
    return info
