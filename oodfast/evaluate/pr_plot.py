"""Precision-recall curves of ``oodfast evaluate detect`` as a PNG, drawn with Pillow.

:func:`oodfast.visualize.draw_curves` draws training logs (one scalar per panel against the step, and
only for records with a ``loss``), so it cannot hold several (recall, precision) curves on shared
axes; this draws them in one panel, both axes fixed to [0, 1], with a legend and the chance line
(precision = prevalence). Pillow only, as :mod:`oodfast.visualize`: no matplotlib needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_pr_curves"]

_BG, _FG, _GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
#: Ten distinguishable line colours (matplotlib's tab10).
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def draw_pr_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike[str], *,
                   chance: float | None = None, title: str = "") -> Path:
    """Write one panel of precision (y) against recall (x) per curve.

    Args:
        curves: name -> (recall [n], precision [n]) (the report's ``pr_curves``); an empty curve is
            listed in the legend as "no positives".
        chance: the prevalence, drawn as a dashed horizontal line (None: none).

    Returns:
        ``path``.
    """
    path = Path(path)
    font = ImageFont.load_default()
    x0, y0, side = 56, 30, 420
    legend_w = 230
    img = Image.new("RGB", (x0 + side + 24 + legend_w, y0 + side + 44), _BG)
    draw = ImageDraw.Draw(img)
    x1, y1 = x0 + side, y0 + side
    if title:
        draw.text((x0, 8), title, fill=_FG, font=font)

    def at(recall: float, precision: float) -> tuple[float, float]:
        return x0 + recall * side, y1 - precision * side

    for k in range(0, 11, 2):
        v = k / 10
        gx, gy = at(v, v)
        draw.line([(gx, y0), (gx, y1)], fill=_GRID)
        draw.line([(x0, gy), (x1, gy)], fill=_GRID)
        draw.text((gx - 8, y1 + 4), f"{v:.1f}", fill=_FG, font=font)
        draw.text((x0 - 28, gy - 6), f"{v:.1f}", fill=_FG, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=_FG)
    draw.text(((x0 + x1) // 2 - 16, y1 + 20), "recall", fill=_FG, font=font)
    draw.text((4, y0 - 16), "precision", fill=_FG, font=font)
    if chance is not None and 0 <= chance <= 1:
        _, cy = at(0, chance)
        for sx in range(x0, x1, 10):
            draw.line([(sx, cy), (min(sx + 5, x1), cy)], fill=_FG)
    legend = [(f"chance ({chance:.3f})", _FG)] if chance is not None else []
    for i, (name, (recall, precision)) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [at(float(r), float(p)) for r, p in zip(recall, precision)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        legend.append((name if points else f"{name} (no positives)", colour))
    for i, (name, colour) in enumerate(legend):
        ly = y0 + 4 + 14 * i
        draw.line([(x1 + 14, ly + 6), (x1 + 34, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 40, ly), name, fill=_FG, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
