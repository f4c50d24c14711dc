"""Writing synthdrive datasets: frames to files in the BDD10K layout, the manifest, and the cached default."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oodfast.data.cache import cache_dir
from oodfast.data.classes import CLASS_NAMES, IGNORE_ID, RARE_CLASS_IDS
from oodfast.data.crops import GLOBAL_SCALE, rare_shares, sample_resized_crop_boxes
from oodfast.data.synthdrive.config import GENERATOR_VERSION, SynthConfig
from oodfast.data.synthdrive.scene import render_frame
from oodfast.fileio import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_NAME = "synthdrive.json"
FRAMES_NAME = "synthdrive.jsonl"


def frame_name(seed: int, index: int) -> str:
    """The file stem of frame ``index`` of ``seed`` (unique across seeds, so datasets can be merged)."""
    return f"synthdrive-s{seed}-{index:07d}"


def split_of(index: int, num_images: int, val_fraction: float) -> str:
    """Frames [0, n_train) are train, the rest val (n_val = round(num_images * val_fraction))."""
    return "train" if index < num_images - round(num_images * val_fraction) else "val"


def _write_frame(args: tuple[SynthConfig, int, int, str, str]) -> dict[str, Any]:
    cfg, seed, index, split, out = args
    image, mask, info = render_frame(cfg, seed, index)
    name = frame_name(seed, index)
    root = Path(out)
    Image.fromarray(image, "RGB").save(root / "images" / "10k" / split / f"{name}.jpg",
                                       quality=cfg.jpeg_quality)
    # compress_level 1: masks are mostly flat regions, and level 1 is ~5x faster than the default.
    Image.fromarray(mask, "L").save(root / "labels" / "sem_seg" / "masks" / split / f"{name}.png",
                                    compress_level=1)
    # Rare prevalence over random global crops, with its own stream so it does not move the drawing.
    crop_rng = np.random.default_rng([seed, index, GENERATOR_VERSION, 1])
    boxes = sample_resized_crop_boxes(crop_rng, cfg.crops_per_image, cfg.height, cfg.width, GLOBAL_SCALE)
    shares = rare_shares(mask, boxes)
    pixels = np.bincount(mask.ravel(), minlength=256)
    rare_present = [CLASS_NAMES[i] for i in RARE_CLASS_IDS if pixels[i] > 0]
    return {"name": name, "split": split, "index": index, **info, "rare_classes": rare_present,
            "rare_crops": int((shares >= cfg.rare_tau).sum()), "pixels": pixels}


def generate(
    out: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    *,
    val_fraction: float = 0.125,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate a synthdrive dataset in the BDD10K layout under ``out``.

    Args:
        out: the dataset root to create.
        num_images: frames in total; ``round(num_images * val_fraction)`` of them form the val split
            (BDD10K's 7000/1000 is 0.125).
        seed: frame i of seed s is the same image whatever ``num_images`` or ``workers`` are.
        config: frame size, frequencies, probabilities (``SynthConfig()``: 1280x720, the paper's tail).
        workers: processes drawing in parallel (default: all cores).
        progress: show a progress bar.
        overwrite: replace an existing synthdrive dataset at ``out``; anything else there is refused.

    Returns:
        The manifest, also written to ``out/synthdrive.json`` last (its presence marks a complete set).
    """
    cfg = config or SynthConfig()
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(out)
    splits = [split_of(i, num_images, val_fraction) for i in range(num_images)]
    _prepare_root(root, set(splits), overwrite)
    jobs = [(cfg, seed, i, splits[i], str(root)) for i in range(num_images)]
    workers = max(1, min(workers or os.cpu_count() or 1, num_images))
    if workers > 1 and not _main_reimportable():
        log.warning("synthdrive: the main script (%s) cannot be re-imported by spawned workers (piped on stdin?); "
                    "drawing in this process", getattr(sys.modules.get("__main__"), "__file__", None))
        workers = 1
    t0 = time.perf_counter()
    records = _write_frames(jobs, workers, root, progress)
    seconds = time.perf_counter() - t0
    manifest = _manifest(cfg, seed, splits, val_fraction, records, seconds, workers)
    with open(root / FRAMES_NAME, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    log.info("synthdrive: %d frames at %dx%d in %.1f s (%.1f img/s), rare crop prevalence %.3f",
             num_images, cfg.width, cfg.height, seconds, num_images / seconds,
             manifest["rare_crop_prevalence"]["value"])
    return manifest


def _prepare_root(root: Path, splits: set[str], overwrite: bool) -> None:
    """Make the split folders under ``root``; clear an earlier synthdrive set there only with ``overwrite``."""
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; choose another --out or pass --overwrite")
        if not (root / MANIFEST_NAME).exists() and not (root / "images" / "10k").exists():
            raise FileExistsError(f"{root} holds something other than a synthdrive dataset; refusing to overwrite it")
        shutil.rmtree(root)
    for split in splits:
        (root / "images" / "10k" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / "sem_seg" / "masks" / split).mkdir(parents=True, exist_ok=True)


def _write_frames(jobs: list[tuple[SynthConfig, int, int, str, str]], workers: int, root: Path,
                  progress: bool) -> list[dict[str, Any]]:
    """Run :func:`_write_frame` over ``jobs`` in this process or ``workers`` spawned ones; records by index."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="img", desc="synthdrive", disable=not progress)
    records: list[dict[str, Any]] = []
    if workers == 1:
        for job in jobs:
            records.append(_write_frame(job))
            bar.update()
    else:
        # spawn: safe whatever the parent imported (torch, CUDA); the workers only need numpy and PIL.
        # A ProcessPoolExecutor, unlike multiprocessing.Pool, raises when a worker dies instead of waiting forever.
        chunksize = max(1, min(16, len(jobs) // (4 * workers)))
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for rec in pool.map(_write_frame, jobs, chunksize=chunksize):
                    records.append(rec)
                    bar.update()
        except BrokenProcessPool as e:
            bar.close()
            raise RuntimeError(
                f"synthdrive: a worker process died while writing {root} ({e}). A worker killed for memory "
                f"dies this way; so do spawned workers that cannot re-import the parent's main script (one "
                f"piped on stdin, or one that calls this without an `if __name__ == \"__main__\":` guard). "
                f"Retry with workers=1 (oodfast data synth --workers 1)") from None
    bar.close()
    records.sort(key=lambda r: r["index"])
    return records


def _manifest(cfg: SynthConfig, seed: int, splits: list[str], val_fraction: float, records: list[dict[str, Any]],
              seconds: float, workers: int) -> dict[str, Any]:
    """The dataset's manifest; pops each record's ``pixels`` (class pixel counts) into the totals."""
    num_images = len(records)
    pixels = np.sum([r.pop("pixels") for r in records], axis=0)
    labelled = pixels[: len(CLASS_NAMES)].sum()
    crops = cfg.crops_per_image * num_images
    return {
        "generator": "synthdrive",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_images": num_images,
        "size": [cfg.width, cfg.height],
        "splits": {s: splits.count(s) for s in ("train", "val") if s in splits},
        "val_fraction": val_fraction,
        "config": dataclasses.asdict(cfg),
        "class_pixel_share": {CLASS_NAMES[i]: round(float(pixels[i] / labelled), 6) for i in range(len(CLASS_NAMES))},
        "ignore_pixel_share": round(float(pixels[IGNORE_ID] / pixels.sum()), 6),
        "images_with_rare": sum(1 for r in records if r["rare_classes"]),
        "images_per_rare_class": {CLASS_NAMES[i]: sum(CLASS_NAMES[i] in r["rare_classes"] for r in records)
                                  for i in RARE_CLASS_IDS},
        "rare_crop_prevalence": {
            "value": round(sum(r["rare_crops"] for r in records) / crops, 4),
            "crops": crops,
            "scale": list(GLOBAL_SCALE),
            "tau": cfg.rare_tau,
            "definition": "share of RandomResizedCrop(scale=(0.4, 1.0)) boxes whose rare-class pixel share >= tau",
        },
        "seconds": round(seconds, 2),
        "images_per_second": round(num_images / seconds, 1),
        "workers": workers,
    }


#: The embedded default dataset that ``--data synthetic`` generates once and reuses: sized so that a
#: 2-core CPU generates it in well under a minute and a CPU training preset sees varied frames.
DEFAULT_SPEC: dict[str, Any] = {"num_images": 2400, "seed": 0, "width": 640, "height": 360}


def _main_reimportable() -> bool:
    """Whether spawned processes can re-import ``__main__`` (they run its file again; an interactive
    interpreter has no file and is fine; ``python - < script.py`` names a file "<stdin>" that does not exist)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or os.path.exists(path)


def ensure_synthdrive(cache_root: Path | None = None, *, progress: bool = True, **spec: Any) -> Path:
    """Return the root of the cached synthdrive dataset for ``spec``, generating it on first use.

    Args:
        cache_root: where cached datasets live (default: ``oodfast.data.cache.cache_dir()``).
        spec: ``num_images``, ``seed``, ``width``, ``height`` (defaults: ``DEFAULT_SPEC``).

    Generation goes to a temporary sibling directory that is renamed into place when complete, so an
    interrupted run or several processes starting at once (torchrun ranks) never see a partial set.
    """
    unknown = set(spec) - set(DEFAULT_SPEC)
    if unknown:
        raise TypeError(f"ensure_synthdrive got unknown spec keys {sorted(unknown)}; valid: {sorted(DEFAULT_SPEC)}")
    s = {**DEFAULT_SPEC, **spec}
    if cache_root is None:
        cache_root = cache_dir()
    name = f"synthdrive-v{GENERATOR_VERSION}-s{s['seed']}-n{s['num_images']}-{s['width']}x{s['height']}"
    root = Path(cache_root) / name
    if (root / MANIFEST_NAME).exists():
        return root
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_root) / f".{name}.tmp-{os.getpid()}"
    log.warning("generating the synthdrive dataset (%d frames, %dx%d) into %s; this happens once",
                s["num_images"], s["width"], s["height"], root)
    try:
        generate(tmp, s["num_images"], s["seed"], SynthConfig(width=s["width"], height=s["height"]),
                 progress=progress, overwrite=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MANIFEST_NAME).exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The manifest as a short markdown report: counts, speed, rare prevalence, class pixel shares."""
    from oodfast.report import markdown_table

    prev = manifest["rare_crop_prevalence"]
    w, h = manifest["size"]
    head = (
        f"# synthdrive: {manifest['num_images']} frames at {w}x{h}, seed {manifest['seed']}\n\n"
        f"- splits: {', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}\n"
        f"- generated in {manifest['seconds']} s with {manifest['workers']} worker(s) "
        f"({manifest['images_per_second']} images/s)\n"
        f"- frames holding a rare object: {manifest['images_with_rare']}\n"
        f"- rare global-crop prevalence: **{prev['value']:.3f}** over {prev['crops']} crops "
        f"(scale {prev['scale'][0]}-{prev['scale'][1]}, rare share >= {prev['tau']}; "
        f"BDD10K in the paper: 0.158)\n\n"
    )
    rare = {CLASS_NAMES[i] for i in RARE_CLASS_IDS}
    rows = [(name, "rare" if name in rare else "", share * 100, manifest["images_per_rare_class"].get(name, ""))
            for name, share in manifest["class_pixel_share"].items()]
    return head + markdown_table(["class", "", "pixel share %", "frames (rare classes)"], rows)
