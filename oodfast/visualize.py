"""What a person looks at after a run: the buffer's images, the training curves, a short summary.

- :func:`contact_sheet` draws crops (the buffer's first global view of each entry, say) in a grid
  with a caption under each (score, rare classes) into a PNG.
- :func:`draw_curves` draws panels of scalars against the step (loss, teacher entropy / ln(out_dim),
  flag rate, threshold) from ``log.jsonl`` records into a PNG.
- :func:`collapse_warning` reads the entropy ratio of the last steps: DINO collapses either to a
  uniform output (ratio stays near 1) or to one dimension (ratio near 0).

Pillow only (a dependency of torchvision), so every install draws them; nothing here imports torch
at module level or knows about the trainer.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["collapse_warning", "contact_sheet", "denormalize", "draw_curves"]

_BG, _FG, _GRID, _LINE = (255, 255, 255), (30, 30, 30), (225, 225, 225), (31, 119, 180)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def denormalize(crops: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [N, 3, H, W] crops (a tensor or an array, any float dtype) as uint8 [N, H, W, 3]."""
    x = np.asarray(crops.float().cpu() if hasattr(crops, "float") else crops, dtype=np.float32)
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(np.nan_to_num(x), 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def contact_sheet(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike[str], *,
                  title: str = "", columns: int = 8, min_cell: int = 128) -> Path:
    """Write ``images`` (uint8 [N, H, W, 3]) in a grid, each with its caption lines below it.

    Small crops are scaled up (nearest) to at least ``min_cell`` pixels wide so they can be seen;
    captions are wrapped to the cell's width. An empty ``images`` writes a sheet that says the buffer
    is empty.
    """
    path = Path(path)
    font = _font()
    n = len(images)
    h, w = (images.shape[1], images.shape[2]) if n else (min_cell, min_cell)
    scale = max(1, math.ceil(min_cell / w))
    cw, ch = w * scale, h * scale
    chars = max(8, cw // 6)  # the default font is about 6 px a character
    captions = ["\n".join(part for line in c.split("\n") for part in (textwrap.wrap(line, chars) or [""]))
                for c in captions]
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    pad, text_h, head = 6, 12 * lines + 4, 22 if title else 4
    sheet = Image.new("RGB", (cols * (cw + pad) + pad, head + rows * (ch + text_h + pad) + pad), _BG)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 5), title, fill=_FG, font=font)
    if not n:
        draw.text((pad, head + ch // 2), "the buffer is empty", fill=_FG, font=font)
    for i in range(n):
        x0 = pad + (i % cols) * (cw + pad)
        y0 = head + (i // cols) * (ch + text_h + pad)
        tile = Image.fromarray(images[i]).resize((cw, ch), Image.NEAREST)
        sheet.paste(tile, (x0, y0))
        draw.multiline_text((x0, y0 + ch + 2), captions[i] if i < len(captions) else "", fill=_FG,
                            font=font, spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if v == v else "nan"


def _digits(lo: float, hi: float) -> int:
    """Significant digits that tell ``lo`` from ``hi`` apart (3 at least, 8 at most)."""
    return next((d for d in range(3, 9) if _fmt(lo, d) != _fmt(hi, d)), 8)


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], name: str,
           xs: Sequence[float], ys: Sequence[float], font: ImageFont.ImageFont) -> None:
    """One chart: frame, title, min / max labels of both axes, the line; NaN points are gaps."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=_FG)
    draw.text((x0 + 4, y0 - 14), name, fill=_FG, font=font)
    pts = [(x, y) for x, y in zip(xs, ys) if y == y and math.isfinite(y)]
    if not pts:
        draw.text((x0 + 8, (y0 + y1) // 2), "not logged", fill=_FG, font=font)
        return
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    xa, xb = min(xs), max(xs)
    xb = xb if xb > xa else xa + 1
    for k in range(1, 4):
        gy = y0 + (y1 - y0) * k / 4
        draw.line([(x0 + 1, gy), (x1 - 1, gy)], fill=_GRID)
    digits = _digits(lo, hi)
    draw.text((x1 + 4, y0), _fmt(hi, digits), fill=_FG, font=font)
    draw.text((x1 + 4, y1 - 10), _fmt(lo, digits), fill=_FG, font=font)
    draw.text((x0, y1 + 3), _fmt(xa), fill=_FG, font=font)
    draw.text((x1 - 6 * len(_fmt(xb)), y1 + 3), _fmt(xb), fill=_FG, font=font)
    draw.text(((x0 + x1) // 2 - 12, y1 + 3), "step", fill=_FG, font=font)

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xa) / (xb - xa) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    seg: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if y == y and math.isfinite(y):
            seg.append(at(x, y))
            continue
        if len(seg) > 1:
            draw.line(seg, fill=_LINE, width=2)
        seg = []
    if len(seg) > 1:
        draw.line(seg, fill=_LINE, width=2)
    elif len(seg) == 1:
        draw.ellipse([seg[0][0] - 2, seg[0][1] - 2, seg[0][0] + 2, seg[0][1] + 2], fill=_LINE)


def draw_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                keys: Sequence[tuple[str, str]] = (("loss", "loss"),
                                                   ("entropy_ratio", "teacher entropy / ln(out_dim)"),
                                                   ("flag_rate", "flag rate"), ("threshold", "threshold")),
                *, title: str = "") -> Path:
    """Panels of ``records[key]`` against ``records["step"]``; records without a ``step`` (events,
    epoch summaries) are skipped, a key never logged says so in its panel."""
    path = Path(path)
    rows = [r for r in records if isinstance(r.get("step"), (int, float)) and "event" not in r and "loss" in r]
    font = _font()
    pw, ph, mx, my = 420, 150, 16, 40  # panel size, margins (the right margin holds the value labels)
    cols = 2
    nrows = math.ceil(len(keys) / cols)
    img = Image.new("RGB", (cols * (pw + 2 * mx + 40), 24 + nrows * (ph + my + 14)), _BG)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((mx, 5), title, fill=_FG, font=font)
    xs = [float(r["step"]) for r in rows]
    for i, (key, name) in enumerate(keys):
        ys = [float(r[key]) if isinstance(r.get(key), (int, float)) else float("nan") for r in rows]
        bx = mx + (i % cols) * (pw + 2 * mx + 40)
        by = 24 + my // 2 + (i // cols) * (ph + my + 14)
        _panel(draw, (bx, by, bx + pw, by + ph), name, xs, ys, font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def collapse_warning(records: Sequence[Mapping[str, Any]], *, tail: float = 0.25, high: float = 0.98,
                     low: float = 0.02, min_steps: int = 20) -> str | None:
    """A warning when the teacher's entropy ratio over the last ``tail`` of the logged steps stays
    above ``high`` (uniform collapse) or below ``low`` (one-dimension collapse); ``None`` otherwise
    or when fewer than ``min_steps`` steps were logged."""
    ratios = [float(r["entropy_ratio"]) for r in records
              if isinstance(r.get("entropy_ratio"), (int, float)) and math.isfinite(r["entropy_ratio"])]
    if len(ratios) < 2 or (records and max((r.get("step") or 0) for r in records) < min_steps):
        return None
    last = ratios[-max(1, int(len(ratios) * tail)):]
    if min(last) > high:
        return (f"the teacher's entropy stayed at {min(last):.3f}-{max(last):.3f} of ln(out_dim) over the last "
                f"{len(last)} logged steps: its output is close to uniform (collapse, or training has not "
                f"started to learn); lower --teacher_temp or train longer")
    if max(last) < low:
        return (f"the teacher's entropy stayed at {min(last):.3f}-{max(last):.3f} of ln(out_dim) over the last "
                f"{len(last)} logged steps: it puts its mass on one dimension (collapse); raise the centring "
                f"(lower --momentum_teacher) or --teacher_temp")
    return None
