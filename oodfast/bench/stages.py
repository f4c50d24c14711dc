"""The stages of ``oodfast bench``: each measures the paper's path and oodfast's in the same run.

A stage returns rows (dicts) with ``stage``, ``case``, ``path``, ``images_per_s`` (or rows/s), ``us_per_call``
with its spread, ``speedup`` over the stage's baseline (the paper's path; eager for the step), and where
it applies the share of a
physical limit (``limit``: HBM copy bandwidth for scoring; decode-only for augmentation; step-only
for end-to-end training). One image = all its crops.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oodfast.bench.harness import Timing, copy_bandwidth_gbps, cuda_graphed, time_fn

Row = dict[str, Any]
log = logging.getLogger(__name__)


#: Path names the targets (oodfast.bench.targets) and tests select rows by; "seed" is the paper's code.
SEED_SCORE, TORCH, FUSED, FUSED_GRAPH = "seed (scipy loop)", "torch", "fused (Triton)", "fused (Triton), CUDA graph"
EAGER_STEP, COMPILED_STEP, RANDOM_REPLAY_STEP = "eager", "compiled", "compiled, random replay"
FROZEN_STEP, END_TO_END = "compiled, frozen detector", "end to end (loader + step)"
SEED_AUG = "seed (PIL + DataLoader)"
SEED_RING, RING = "seed (deque + stack/cat)", "RareRing (enqueue + ring_copy)"


def dali_path(device: torch.device | str) -> str:
    return f"DALI {torch.device(device).type}"


def _row(stage: str, case: str, path: str, t: Timing, items: int, device: torch.device, **extra: Any) -> Row:
    return {"stage": stage, "case": case, "path": path, "items_per_s": items / t.median_s,
            "us_per_call": t.median_s * 1e6, "us_p10": t.p10_s * 1e6, "us_p90": t.p90_s * 1e6,
            "calls_per_sample": t.calls_per_sample, "first_call_s": t.first_call_s, "peak_mem_gib": t.peak_mem_gib,
            **extra}


def _failed(stage: str, case: str, path: str, error: str) -> Row:
    """A path that could not be measured: kept in the report (and named by the targets) with its error."""
    return {"stage": stage, "case": case, "path": path, "error": error}


def _per_call(row: Row, calls: int) -> Row:
    """Express a row timed over ``calls`` steps (an epoch) per step, spread included."""
    for key in ("us_per_call", "us_p10", "us_p90"):
        row[key] /= calls
    return row


def _speedups(rows: list[Row], baseline: str, key: str = "speedup") -> list[Row]:
    """Add ``key`` (default ``speedup``): the row's speed over the row of path ``baseline`` in the same case."""
    base = {r["case"]: r["us_per_call"] for r in rows if r["path"] == baseline and "error" not in r}
    for r in rows:
        if r["case"] in base and "error" not in r:
            r[key] = base[r["case"]] / r["us_per_call"]
    return rows


# ---- detect: the paper's scipy loop vs the torch path vs the fused kernel --------------------------

def bench_detect(device: torch.device, quick: bool) -> list[Row]:
    """Rows per (metric, B): the paper's loop (B <= 1024), the torch path, and on a GPU the fused
    Triton op eagerly and replayed from a CUDA graph. ``speedup`` is over the paper's loop where it ran,
    ``vs_torch`` over the torch path; ``limit`` is the share of the copy bandwidth (GPU)."""
    from oodfast.detect import DetectorConfig, RareDetector
    from oodfast.kernels.knn_score import knn_score_torch
    from oodfast.kernels.rare_enqueue import rare_score_torch
    from oodfast.paper import _euclidean

    gpu = device.type == "cuda"
    D = 2048
    sizes = ([1024, 65536] if quick else [256, 1024, 8192, 65536]) if gpu else ([1024] if quick else [256, 1024])
    # every metric has a GPU target, so a quick GPU run keeps them all; a quick CPU run keeps two
    metrics = ["euclidean", "mahalanobis"] if quick and not gpu else ["euclidean", "cosine", "mahalanobis", "knn"]
    dtype = torch.bfloat16 if gpu else torch.float32
    bandwidth = copy_bandwidth_gbps(device) if gpu else None
    # Paths other than the paper's loop: 10 warm-up calls (a fresh process's first calls pay page faults
    # for their temporaries), then samples of back-to-back calls lasting >= 2 ms, so that a microsecond
    # call is not timed as its launch and device sync.
    repeats = 20 if gpu else 30
    rows: list[Row] = []
    for metric in metrics:
        torch.manual_seed(0)
        det = RareDetector(D, DetectorConfig(metric=metric), device=device)
        det.fit(torch.randn(100_000 if (metric == "knn" and gpu) else 1024, D, device=device))
        for B in sizes:
            case = f"{metric} B={B} D={D}"
            x = torch.randn(B, D, device=device, dtype=dtype)
            out = torch.empty(B, device=device)
            paths: list[tuple[str, Callable[[], Any]]] = []
            if metric == "euclidean" and B <= 1024:
                mean = det.center.unsqueeze(0)
                paths.append((SEED_SCORE, lambda x=x, mean=mean: [_euclidean(r, mean) for r in x]))
            if metric == "knn":
                paths.append((TORCH, lambda x=x, det=det: knn_score_torch(x, det.bank, det.config.knn_k)))
            else:
                paths.append((TORCH, lambda x=x, det=det: rare_score_torch(
                    x, det.center, det.proj, det.coef, det.alpha, det.metric_id)))
            fused = lambda x=x, det=det, out=out: det.score(x, out=out)  # noqa: E731
            if gpu:
                paths.append((FUSED, fused))
            for name, fn in paths:
                paper = name == SEED_SCORE
                t = time_fn(fn, device, warmup=3 if paper else 10, repeats=3 if paper else repeats,
                            min_sample_s=0 if paper else 2e-3)
                rows.append(_detect_row(case, name, t, B, x, bandwidth, device))
            if gpu:  # the same op replayed from a CUDA graph: no launch overhead (first call = capture)
                start = time.perf_counter()
                try:
                    replay = cuda_graphed(fused, device)
                except RuntimeError as e:
                    log.warning("bench detect %s: CUDA-graph capture failed: %s", case, e)
                    rows.append(_failed("detect", case, FUSED_GRAPH, f"CUDA-graph capture failed: {e}"))
                    continue
                capture_s = time.perf_counter() - start
                t = time_fn(replay, device, warmup=3, repeats=repeats, min_sample_s=2e-3)
                rows.append(_detect_row(case, FUSED_GRAPH, t, B, x, bandwidth, device, first_call_s=capture_s))
    _speedups(rows, TORCH, key="vs_torch")
    return _speedups(rows, SEED_SCORE)


def _detect_row(case: str, path: str, t: Timing, B: int, x: torch.Tensor, bandwidth: float | None,
                device: torch.device, **extra: Any) -> Row:
    """A detect row: rows/s, the GB/s of reading x once, and its share of the copy bandwidth."""
    gbps = x.numel() * x.element_size() / t.median_s / 1e9
    return _row("detect", case, path, t, B, device, gbps=gbps, limit=gbps / bandwidth if bandwidth else None,
                **extra)


# ---- ring: the paper's deque of view lists + stack/cat vs RareRing -----------------------------------

def bench_ring(device: torch.device, quick: bool) -> list[Row]:
    """Rows for one step's buffer work: the paper's deque + stack/cat and RareRing (rare_enqueue +
    ring_copy, the mixed batch handed out without copying); ``speedup`` over the paper's."""
    gpu = device.type == "cuda"
    B, C, flagged = (256 if gpu else (16 if quick else 32)), 32, 8
    paper_step, ring_step = ring_case(device, B, C, flagged, torch.bfloat16 if gpu else torch.float32)
    case = f"B={B} C={C} flagged={flagged}"
    repeats = 20 if gpu else 5
    rows = [_row("ring", case, SEED_RING, time_fn(paper_step, device, repeats=repeats), B, device),
            _row("ring", case, RING, time_fn(ring_step, device, repeats=repeats), B, device)]
    return _speedups(rows, SEED_RING)


# ---- step and train: eager vs compiled DINO step; end to end vs step-only ---------------------------

def prepared_trainer(trainer: Any) -> Any:
    """Calibrate, warm the buffer up and stage one batch: ready for :func:`train_step` (no loader)."""
    trainer.calibrate()
    trainer.warm_up()
    batch = next(iter(trainer.loader))
    trainer.stage(batch.views, batch.index, batch.boxes)
    return trainer


def train_step(t: Any) -> None:
    """One full step on the staged batch: the trainer's own ``run_step`` (pre-step, forward + loss,
    backward, all-reduce, clipping, AdamW, post-step), its scalars read back a step late as the training
    loop does."""
    t.run_step()
    t.monitor.readout.pop(keep=1)


def ring_case(device: torch.device, B: int, C: int, flagged: int, dtype: torch.dtype):
    """(paper_step, ring_step): one step of the paper's deque buffer and of RareRing on the same batch
    of B images x 8 views, ``flagged`` of them rare; both buffers start full."""
    from oodfast.buffer import RareRing
    from oodfast.detect import DetectorConfig, RareDetector
    from oodfast.paper import PaperMemoryBuffer

    views = [torch.randn(B, 3, 224, 224, device=device, dtype=dtype) for _ in range(2)] + \
            [torch.randn(B, 3, 96, 96, device=device, dtype=dtype) for _ in range(6)]
    paper_buf = PaperMemoryBuffer(C)
    for k in range(C):
        paper_buf.add([v[k % B] for v in views])

    def paper_step():
        for i in range(flagged):
            paper_buf.add([v[i] for v in views])
        return paper_buf.concat_with_batch(views)

    ring = RareRing.for_multicrop(C, batch_size=B, dtype=dtype, device=device)
    det = RareDetector(1, DetectorConfig(), device=device)
    det.fit(torch.arange(100, dtype=torch.float32, device=device).unsqueeze(1))
    emb = torch.zeros(B, 1, device=device)
    emb[:flagged] = 1e3  # exactly `flagged` rows above the threshold
    ids, step = torch.arange(B, device=device), torch.zeros((), dtype=torch.int64, device=device)
    scores, slots = torch.empty(B, device=device), torch.empty(B, dtype=torch.int32, device=device)
    ring.stage(views)

    def ring_step():
        det.enqueue(emb, ring, ids, step, scores=scores, slots=slots)
        ring.write(slots)
        return ring.views()

    return paper_step, ring_step


def _dali_imports() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def bench_step(device: torch.device, quick: bool, workdir: Path) -> list[Row]:
    """Rows per step path on one staged batch (eager, compiled, compiled with random replay, compiled with a
    frozen detector), and the end-to-end row: loader + compiled step per step, with ``limit`` its share of
    the compiled step-only throughput. ``ood_overhead``: a detector mode's step over random replay's at
    equal rows (B + C), minus 1. On a GPU the loader is DALI when it imports, else torchvision (``aug``)."""
    from oodfast.train.config import TrainConfig
    from oodfast.train.trainer import Trainer

    gpu = device.type == "cuda"
    aug = ("dali" if _dali_imports() else "torch") if gpu else TrainConfig.cpu().aug

    def config(**overrides: Any) -> TrainConfig:
        if gpu:
            # 640 synthdrive frames at the default 640x360 (generated once, ~5 s on 16 cores); an epoch
            # of 40 steps cycles through them with fresh permutations
            return TrainConfig.paper(batch_size_per_gpu=64, epochs=1, warmup_epochs=0, epoch_length=64 * (10 if quick else 40),
                                     aug=aug, synthetic_spec={"num_images": 640, "seed": 0},
                                     output_dir=str(workdir / "step"), **overrides)
        return TrainConfig.cpu(batch_size_per_gpu=8, epochs=1, epoch_length=8 * 6, calib_size=16, buffer_size=4,
                               output_dir=str(workdir / "step"), **overrides)

    runs = [(EAGER_STEP, dict(compile=False)), (COMPILED_STEP, dict(compile=True)),
            (RANDOM_REPLAY_STEP, dict(compile=True, replay="random"))]
    if gpu or not quick:  # the frozen detector embeds the global crops with a second ResNet-50
        runs.append((FROZEN_STEP, dict(compile=True, detector="frozen",
                                       detector_weights=str(random_resnet50_weights(workdir)))))
    rows: list[Row] = []
    repeats = 10 if gpu else 3
    end_to_end: Row | None = None
    for name, overrides in runs:
        t = prepared_trainer(Trainer(config(**overrides), device=device, progress=False))
        case = f"{t.cfg.arch} B={t.B}+C={t.cfg.buffer_size}"
        rows.append(_row("step", case, name, time_fn(lambda t=t: train_step(t), device, repeats=repeats), t.B, device,
                         aug=aug))
        if name == COMPILED_STEP:  # end to end on the same compiled trainer: no second compilation
            end_to_end = _end_to_end(t, case, device, aug)
        del t
        _release(device)  # so the next path's peak memory does not count this trainer
    _speedups(rows, EAGER_STEP)
    replay = next(r for r in rows if r["path"] == RANDOM_REPLAY_STEP)
    for r in rows:  # detection's cost at equal rows (B + C), per detector mode
        if r["path"] in (COMPILED_STEP, FROZEN_STEP):
            r["ood_overhead"] = r["us_per_call"] / replay["us_per_call"] - 1
    step_only = next(r for r in rows if r["path"] == COMPILED_STEP)
    assert end_to_end is not None
    end_to_end["limit"] = step_only["us_per_call"] / end_to_end["us_per_call"]  # share of step-only throughput
    return rows + [end_to_end]


def _end_to_end(t: Any, case: str, device: torch.device, aug: str) -> Row:
    """Epochs of loader + step on a prepared trainer, per step (comparable with the step rows)."""
    t.resumed = True
    t.save = lambda *args, **kwargs: None  # loader + step: the per-epoch checkpoint write is not timed

    def epoch() -> None:
        t.step = 0
        t.train()

    timing = time_fn(epoch, device, warmup=1, repeats=2)
    return _per_call(_row("train", case, END_TO_END, timing, t.steps_per_epoch * t.B, device, aug=aug),
                     t.steps_per_epoch)


def _release(device: torch.device) -> None:
    """Free what dropped objects held (a Trainer holds reference cycles through its compiled methods)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_resnet50_weights(workdir: Path) -> Path:
    """A randomly initialised torchvision ResNet-50 state dict: the frozen detector's weights for timing."""
    import torchvision

    path = workdir / "resnet50-random-init.pth"
    if not path.exists():
        torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


# ---- aug: the paper's PIL path vs DALI vs torchvision, decode-only as the limit ---------------------

#: DALI's ``hw_decoder_load`` values an aug run on a GPU sweeps: the share of the JPEGs sent to the
#: hardware JPEG decoder (A100/H100/H200), the rest going to nvJPEG's CUDA decoder. The best share depends
#: on the image size and on how busy the SMs are, so it is measured, not assumed.
HW_DECODER_LOADS = (0.0, 0.35, 0.65, 0.9)
#: oodfast's (and DALI's) default; the row without a load in its path name uses it, and the targets read it.
DEFAULT_HW_DECODER_LOAD = 0.65


def dali_load_path(device: torch.device | str, load: float) -> str:
    """The DALI path name at ``hw_decoder_load=load``: the plain name at the default load."""
    return dali_path(device) if load == DEFAULT_HW_DECODER_LOAD else f"{dali_path(device)}, hw_decoder_load={load}"


def decode_only_path(device: torch.device | str, load: float | None) -> str:
    return "decode only (DALI cpu)" if load is None else f"decode only (DALI mixed, hw_decoder_load={load})"


def bench_aug(device: torch.device, quick: bool, workdir: Path) -> list[Row]:
    """Rows per loader: the paper's PIL path (DataLoader workers = cores), DALI (on a GPU at each
    ``hw_decoder_load`` of :data:`HW_DECODER_LOADS`), torchvision (GPU only), and DALI decode-only. ``limit``
    is the share of decode-only throughput at the same decoder placement and load."""
    from oodfast.data.discover import discover
    from oodfast.data.multicrop import MultiCropConfig, multicrop_loader
    from oodfast.data.synthdrive import ensure_synthdrive

    gpu = device.type == "cuda"
    spec = dict(num_images=128 if quick else 512, seed=0, width=640 if quick and not gpu else 1280,
                height=360 if quick and not gpu else 720)
    root = ensure_synthdrive(workdir / "aug-data", progress=False, **spec)
    files = discover("bdd10k", root, "train", use_default_list=False)
    B = 32 if gpu else 16
    # On a GPU one pass over 512 files at >= 3,000 images/s lasts ~0.2 s, too short to time against the
    # per-epoch costs: the fast loaders cycle through the files 4 times per epoch (fresh permutations).
    # The paper's path keeps one pass (it re-spawns its workers every epoch, as the paper's code does).
    fast_epoch = 4 * len(files.images) if gpu and not quick else None
    loads = (HW_DECODER_LOADS if not quick else (DEFAULT_HW_DECODER_LOAD,)) if gpu else (None,)
    runs: list[tuple[str, str, dict[str, Any], int | None]] = [(SEED_AUG, "paper", {}, None)]
    runs += [(dali_load_path(device, load) if gpu else dali_path(device), "dali",
              {"hw_decoder_load": load} if gpu else {}, fast_epoch) for load in loads]
    if gpu:
        runs.append(("torchvision", "torch", {}, fast_epoch))
    case = f"{spec['width']}x{spec['height']} JPEG, 2x224 + 6x96, batch {B}"
    cfg = MultiCropConfig.dino()
    rows: list[Row] = []
    for name, backend, options, epoch_length in runs:
        loader = multicrop_loader(files, cfg, B, device=device, seed=0, backend=backend, epoch_length=epoch_length,
                                  **options)

        def epoch(loader=loader) -> None:
            for batch in loader:
                batch.views[-1].sum()

        timing = time_fn(epoch, device, warmup=1, repeats=2 if not quick else 1)
        row = _per_call(_row("aug", case, name, timing, len(loader) * B, device), len(loader))
        if backend == "dali":
            row["hw_decoder_load"] = options.get("hw_decoder_load")
        rows.append(row)
        del loader, epoch
        _release(device)  # a DALI pipeline holds its GPU buffers until collected
    decode = {load: _decode_only(files.images, B, device, hw_decoder_load=load) for load in loads}
    for r in rows:
        rate = decode[r.get("hw_decoder_load", DEFAULT_HW_DECODER_LOAD if gpu else None)][1]
        r["limit"] = r["items_per_s"] / rate
        r["decode_only_images_per_s"] = rate
    _speedups(rows, SEED_AUG)
    for load, (t, _, images) in decode.items():  # after the speedups: decode-only decodes, it does not augment
        rows.append(_per_call(_row("aug", case, decode_only_path(device, load), t, images, device,
                                   hw_decoder_load=load), images // B))
    return rows


def _decode_only(paths: list[Path], batch_size: int, device: torch.device,
                 hw_decoder_load: float | None = None) -> tuple[Timing, float, int]:
    """(timing of one pass, images/s, images per pass) of DALI decoding alone, with the pipeline's
    decoder placement (``mixed`` on a GPU, at ``hw_decoder_load``)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    data = [np.fromfile(p, dtype=np.uint8) for p in paths]
    n = len(data) // batch_size * batch_size
    gpu = device.type == "cuda"
    options = {"hw_decoder_load": hw_decoder_load} if gpu and hw_decoder_load is not None else {}

    @pipeline_def(batch_size=batch_size, num_threads=max(1, os.cpu_count() or 1),
                  device_id=(device.index or 0) if gpu else None)
    def decode():
        raw = fn.external_source(source=lambda info: data[info.iteration * batch_size % n:][:batch_size],
                                 batch=True, batch_info=True, dtype=types.UINT8)
        return fn.decoders.image(raw, device="mixed" if gpu else "cpu", **options)

    pipe = decode()
    pipe.build()
    steps = n // batch_size
    timing = time_fn(lambda: [pipe.run() for _ in range(steps)], device, warmup=1, repeats=2)
    del pipe
    _release(device)
    return timing, steps * batch_size / timing.median_s, steps * batch_size


STAGES: dict[str, Callable[..., list[Row]]] = {
    "aug": bench_aug, "detect": bench_detect, "ring": bench_ring, "step": bench_step,
}
#: ``train`` (end to end vs step-only) is measured by the step stage, which needs its compiled step.
ALIASES = {"train": "step"}


def run_stage(name: str, device: torch.device, quick: bool, workdir: Path | None = None) -> list[Row]:
    """Run one stage; ``aug`` and ``step`` work in ``workdir`` (a temporary folder by default)."""
    fn = STAGES[ALIASES.get(name, name)]
    if fn not in (bench_aug, bench_step):
        return fn(device, quick)
    with (contextlib.nullcontext(str(workdir)) if workdir else tempfile.TemporaryDirectory()) as w:
        return fn(device, quick, Path(w))
