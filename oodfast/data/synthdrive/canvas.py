"""Drawing primitives: :class:`Canvas` (an image and its label map), :class:`Camera` (a pinhole over flat
ground) and sprites (objects as lists of parts in metres, drawn with perspective)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from oodfast.data.classes import IGNORE_ID


def rgb(*c: float) -> np.ndarray:
    """A colour (or any small vector) as float32 [len(c)]."""
    return np.array(c, np.float32)


# ----------------------------------------------------------------------------------------------------
# Canvas: an image and its label map, drawn into through bounding-box windows
# ----------------------------------------------------------------------------------------------------

class Canvas:
    """A float32 RGB image [H, W, 3] in [0, 1] and its uint8 label map [H, W], painter's-order fills."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), np.float32)
        self.lab = np.full((height, width), IGNORE_ID, np.uint8)
        self.lights: list[tuple[float, float, float, np.ndarray]] = []  # x, y, radius, rgb: drawn after grading

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
        """The integer pixel window (x0, y0, x1, y1), half-open, covering a box and clipped to the frame; None if empty."""
        ix0, iy0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
        ix1, iy1 = min(int(math.ceil(x1)), self.w), min(int(math.ceil(y1)), self.h)
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        return ix0, iy0, ix1, iy1

    def paint(self, win: tuple[int, int, int, int], mask: np.ndarray | None, label: int | None,
              color: np.ndarray) -> None:
        """Fill ``win`` (where ``mask`` [h, w] is true, or all of it) with ``color`` (rgb, or an image of the
        window's size) and, unless ``label`` is None, the label."""
        x0, y0, x1, y1 = win
        img = self.img[y0:y1, x0:x1]
        if mask is None:
            img[...] = color
            if label is not None:
                self.lab[y0:y1, x0:x1] = label
            return
        img[mask] = color if color.ndim == 1 else np.broadcast_to(color, img.shape)[mask]
        if label is not None:
            self.lab[y0:y1, x0:x1][mask] = label

    def rect(self, x0: float, y0: float, x1: float, y1: float, label: int | None, color: np.ndarray) -> None:
        """Axis-aligned rectangle with pixel centres in [x0, x1) x [y0, y1)."""
        win = self.window(round(x0), round(y0), round(x1), round(y1))
        if win is not None:
            self.paint(win, None, label, color)

    def polygon(self, pts: np.ndarray, label: int | None, color: np.ndarray) -> None:
        """Convex polygon [n, 2] (x, y): per-row spans from the edges, filled at pixel centres."""
        win = self.window(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1)
        if win is None:
            return
        x0, y0, x1, y1 = win
        yc = np.arange(y0, y1, dtype=np.float32) + 0.5
        a, b = pts, np.roll(pts, -1, axis=0)
        dy = b[:, 1] - a[:, 1]
        flat = np.abs(dy) < 1e-9
        t = (yc[:, None] - a[None, :, 1]) / np.where(flat, 1.0, dy)[None, :]
        hit = (t >= 0) & (t <= 1) & ~flat[None, :]
        xs = a[None, :, 0] + t * (b[None, :, 0] - a[None, :, 0])
        left = np.where(hit, xs, np.inf).min(axis=1)
        right = np.where(hit, xs, -np.inf).max(axis=1)
        xc = np.arange(x0, x1, dtype=np.float32) + 0.5
        mask = (xc[None, :] >= left[:, None]) & (xc[None, :] < right[:, None])
        self.paint(win, mask, label, color)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, label: int | None, color: np.ndarray,
                hole: float = 0.0) -> None:
        """Filled ellipse, or a ring when ``hole`` (inner radius as a fraction of the outer) > 0."""
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        win = self.window(cx - rx, cy - ry, cx + rx + 1, cy + ry + 1)
        if win is None:
            return
        x0, y0, x1, y1 = win
        dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx) ** 2
        dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry) ** 2
        r2 = dy[:, None] + dx[None, :]
        mask = r2 <= 1.0
        if hole > 0:
            mask &= r2 >= hole * hole
        self.paint(win, mask, label, color)

    def segment(self, xa: float, ya: float, xb: float, yb: float, width: float, label: int | None,
                color: np.ndarray) -> None:
        """A thick line segment, drawn as a quad."""
        d = np.array([xb - xa, yb - ya], np.float32)
        n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6) * max(width, 1.0) / 2
        a, b = np.array([xa, ya], np.float32), np.array([xb, yb], np.float32)
        self.polygon(np.stack([a + n, b + n, b - n, a - n]), label, color)


# ----------------------------------------------------------------------------------------------------
# Camera: a pinhole at height h over flat ground, looking down the road
# ----------------------------------------------------------------------------------------------------

@dataclass
class Camera:
    f: float        # focal length, pixels
    h: float        # camera height above the ground, metres
    cx: float       # principal point column
    horizon: float  # row of the horizon (pitch moves it)

    def project(self, x: np.ndarray | float, y: np.ndarray | float, z: np.ndarray | float):
        """World (x right, y up, z forward; metres, ground at y=0) -> pixel (u, v)."""
        return self.cx + self.f * np.asarray(x) / z, self.horizon + self.f * (self.h - np.asarray(y)) / z

    def ground_z(self, v: np.ndarray) -> np.ndarray:
        """Depth of the ground seen at row centre(s) v below the horizon."""
        return self.f * self.h / np.maximum(v - self.horizon, 1e-3)


# A sprite part, in metres relative to the object's ground contact point (x right, y up):
#   ("rect", x0, y0, x1, y1) | ("ell", cx, cy, rx, ry[, hole]) | ("poly", [(x, y), ...])
#   | ("seg", xa, ya, xb, yb, width); each followed by its label and colour in the tuple's tail.
Part = tuple


def draw_sprite(cv: Canvas, cam: Camera, x: float, z: float, parts: list[Part], mirror: bool = False) -> None:
    """Draw parts of an object standing at world (x, 0, z), scaled by perspective."""
    s = cam.f / z
    u0, v0 = cam.project(x, 0.0, z)
    sx = -s if mirror else s
    for part in parts:
        kind, label, color = part[0], part[-2], part[-1]
        if kind == "rect":
            _, a, b, c, d = part[:5]
            xs = sorted((u0 + sx * a, u0 + sx * c))
            cv.rect(xs[0], v0 - s * d, xs[1], v0 - s * b, label, color)
        elif kind == "ell":
            _, cxm, cym, rxm, rym = part[:5]
            hole = part[5] if len(part) == 8 else 0.0
            cv.ellipse(u0 + sx * cxm, v0 - s * cym, s * rxm, s * rym, label, color, hole)
        elif kind == "poly":
            pts = np.asarray(part[1], np.float32)
            cv.polygon(np.stack([u0 + sx * pts[:, 0], v0 - s * pts[:, 1]], axis=1), label, color)
        elif kind == "seg":
            _, xa, ya, xb, yb, wm = part[:6]
            cv.segment(u0 + sx * xa, v0 - s * ya, u0 + sx * xb, v0 - s * yb, s * wm, label, color)
        else:  # pragma: no cover - a programming error in a sprite table
            raise ValueError(f"unknown sprite part {kind!r}")

