"""The pictures and the summary a run leaves for a person: ``buffer.png``, ``curves.png``, a few lines.

- :func:`draw_buffer`: the ring's images (first global crop of each entry, oldest first) with their
  score, the step they entered and, on data with BDD10K-format masks, the rare classes their image
  holds (pixel share of each, from the mask).
- :func:`draw_run_curves`: loss, teacher entropy / ln(out_dim), flag rate and threshold against the
  step, from ``log.jsonl``.
- :func:`format_summary`: the end of ``oodfast train``'s output, including the collapse warning.

Drawing happens after training (it reads the ring once, with a host copy); nothing here is on the
training path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oodfast.buffer import RareRing
from oodfast.data.classes import CLASS_NAMES, RARE_CLASS_IDS
from oodfast.visualize import collapse_warning, contact_sheet, denormalize, draw_curves

log = logging.getLogger(__name__)

__all__ = ["draw_buffer", "draw_run_curves", "format_summary", "rare_classes_of", "read_log", "run_pictures"]


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (lines that do not parse are skipped: a log cut by a kill)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def rare_classes_of(mask_path: str | os.PathLike[str] | None, *, min_share: float = 1e-3) -> str:
    """"person 0.8%, pole 0.2%": the rare classes of a train-ID mask, largest first ("" without a mask,
    "no rare class" when it holds none)."""
    if mask_path is None:
        return ""
    from oodfast.data.crops import read_mask

    try:
        mask = read_mask(mask_path)
    except (OSError, ValueError) as e:
        return f"mask unreadable ({type(e).__name__})"
    counts = np.bincount(mask.ravel(), minlength=256)
    total = max(1, int(counts[: len(CLASS_NAMES)].sum()))
    shares = sorted(((counts[c] / total, CLASS_NAMES[c]) for c in RARE_CLASS_IDS if counts[c] / total >= min_share),
                    reverse=True)
    return ", ".join(f"{n} {s:.1%}" for s, n in shares[:3]) or "no rare class"


def draw_buffer(ring: RareRing, path: str | os.PathLike[str], *, mean: Sequence[float], std: Sequence[float],
                images: Sequence[Any], masks: Sequence[Any] | None = None, title: str = "") -> Path:
    """Write the contact sheet of ``ring``'s images (see the module docstring)."""
    count = int(ring.count.item())
    order = ring.fifo_order()[ring.capacity - count:] if count else ring.fifo_order()[:0]
    crops = ring.ring_rows(0)[0].index_select(0, order)  # group 0 = the global crops; view 0
    ids = ring.ring_ids.index_select(0, order).tolist()
    scores = ring.ring_scores.index_select(0, order).float().tolist()
    steps = ring.ring_steps.index_select(0, order).tolist()
    captions = []
    for sid, score, step in zip(ids, scores, steps):
        head = f"score {score:.3g}" if score == score else "random pick"
        where = f"step {step}" if step >= 0 else "warm-up"
        name = _short(Path(str(images[sid])).stem) if 0 <= sid < len(images) else "?"
        rare = rare_classes_of(masks[sid]) if masks is not None and 0 <= sid < len(masks) else ""
        captions.append("\n".join(x for x in (f"{head}, {where}", name, rare) if x))
    return contact_sheet(denormalize(crops, mean, std), captions, path,
                         title=title or f"buffer: {count} of {ring.capacity} images, oldest first")


def _short(stem: str, keep: int = 24) -> str:
    """A file name for a caption: whole when short, else its end behind ".." (the end tells frames apart)."""
    return stem if len(stem) <= keep else ".." + stem[-(keep - 2):]


def draw_run_curves(log_path: str | os.PathLike[str], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """``curves.png`` from ``log.jsonl``."""
    return draw_curves(read_log(log_path), path, title=title)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few readable lines: what ran, how the loss moved, the buffer, the files, any collapse warning."""
    first, last = summary.get("first") or {}, summary.get("last") or {}
    lines = [f"oodfast train: {summary.get('steps', 0)} steps ({summary.get('epochs_done', 0):.2f} epochs) in "
             f"{summary.get('seconds', 0)} s on {summary.get('device', '?')} "
             f"(preset {summary.get('preset', '?')}; first step with compilation {summary.get('compile_seconds', 0)} s)"]
    if "loss" in first and "loss" in last:
        lines.append(f"  loss {first['loss']:.3f} -> {last['loss']:.3f}; teacher entropy "
                     f"{first.get('entropy_ratio', float('nan')):.3f} -> {last.get('entropy_ratio', float('nan')):.3f} "
                     f"of ln(out_dim); {last.get('images_per_s', 0):.1f} images/s")
    if "buffer" in last:
        lines.append(f"  buffer {last['buffer']} images; flag rate {last.get('flag_rate', 0):.3f}; threshold "
                     f"{last.get('threshold', float('nan')):.4g}")
    for key in ("checkpoint", "log", "log_txt", "buffer_png", "curves_png"):
        if summary.get(key):
            lines.append(f"  {key.replace('_', '.'):<10} {summary[key]}")
    if summary.get("collapse_warning"):
        lines.append(f"  warning: {summary['collapse_warning']}")
    return "\n".join(lines)


def run_pictures(out: Path, records: list[dict[str, Any]], ring: RareRing | None, **buffer: Any) -> dict[str, Any]:
    """Draw ``curves.png`` (and ``buffer.png`` with a ring) into ``out``; returns their paths and the
    collapse warning. A drawing that fails is logged, never fatal: the run is done and saved."""
    result: dict[str, Any] = {"collapse_warning": collapse_warning(records)}
    if result["collapse_warning"]:
        log.warning("%s", result["collapse_warning"])
    try:
        result["curves_png"] = str(draw_curves(records, out / "curves.png"))
        if ring is not None:
            result["buffer_png"] = str(draw_buffer(ring, out / "buffer.png", **buffer))
    except Exception as e:  # noqa: BLE001 - a picture must never lose a finished run
        log.warning("could not draw the run's pictures in %s: %s: %s", out, type(e).__name__, e)
    return result
