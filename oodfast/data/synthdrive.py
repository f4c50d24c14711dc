"""synthdrive: procedurally drawn street scenes with BDD10K-format masks and a long tail of rare objects.

Real BDD100K cannot be shipped, so every part of oodfast (training, detection quality, benchmarks,
tests) runs on this embedded stand-in. Each frame is a pinhole-camera view of a street: sky, road with
lane marks (and sometimes a zebra crossing), sidewalks, terrain, building facades, trees, fences and
walls, cars, trucks and buses (common), and, in a minority of frames, rare objects: person, rider,
bicycle, motorcycle, traffic sign, traffic light, pole, train. Time of day, weather, camera height,
pitch and focal length vary per frame. The masks carry the 19 BDD train IDs (255 = the ego vehicle's
bonnet, as in BDD), so evaluation has exact ground truth.

Output, in the real BDD10K layout so the same loaders read both::

    OUT/images/10k/{train,val}/NAME.jpg
    OUT/labels/sem_seg/masks/{train,val}/NAME.png     one-channel 8-bit train IDs, same stem
    OUT/synthdrive.json                               manifest: seed, counts, class pixel shares, ...
    OUT/synthdrive.jsonl                              one line per frame: scene attributes, rare classes

Frame ``i`` of seed ``s`` depends only on ``(s, i)`` and the generator version, so the output is the
same whatever the number of frames or workers. Drawing is vectorised numpy over bounding-box windows
(scanline spans for convex polygons): no per-pixel Python.

The long tail is set by ``SynthConfig.rare_image_prob``; the default puts a rare object in ~15% of
random global crops (RandomResizedCrop scale 0.4-1.0, rare share >= ``DEFAULT_RARE_TAU``), the
prevalence the paper measured on BDD10K (random-detector precision 0.158). The manifest records the
measured figure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oodfast.data.classes import CLASS_NAMES, IGNORE_ID, RARE_CLASS_IDS
from oodfast.data.crops import DEFAULT_RARE_TAU, GLOBAL_SCALE, rare_shares, sample_resized_crop_boxes
from oodfast.data.cache import cache_dir
from oodfast.fileio import atomic_write_text

log = logging.getLogger(__name__)

#: Bump when a change alters the pixels drawn for a given (seed, index): cached datasets are keyed on it.
GENERATOR_VERSION = 1
MANIFEST_NAME = "synthdrive.json"
FRAMES_NAME = "synthdrive.jsonl"

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that shapes a synthdrive frame. Defaults give BDD-like frames and the paper's tail.

    Attributes:
        width, height: frame size in pixels (BDD: 1280x720).
        rare_image_prob: probability that a frame holds at least one rare object.
        rare_extra_mean: mean number of further rare objects in such a frame (Poisson).
        rare_weights: relative frequency of each rare class among rare objects (long-tailed itself).
        cars_mean, trucks_mean, buses_mean: mean count per frame (Poisson) of the common vehicles.
        night_prob, dusk_prob: time of day; the rest is daytime.
        overcast_prob, fog_prob, rain_prob: weather; the rest is clear.
        hood_prob: probability that the ego vehicle's bonnet is visible (label 255, as in BDD).
        jpeg_quality: JPEG quality of the written frames.
        crops_per_image: random global crops per frame used to measure the rare prevalence.
        rare_tau: rare-pixel share that makes a crop rare when measuring the prevalence.
    """

    width: int = 1280
    height: int = 720
    rare_image_prob: float = 0.25
    rare_extra_mean: float = 0.35
    rare_weights: dict[str, float] = field(
        default_factory=lambda: {
            "person": 0.28, "traffic sign": 0.18, "traffic light": 0.14, "pole": 0.12,
            "bicycle": 0.09, "rider": 0.08, "motorcycle": 0.07, "train": 0.04,
        }
    )
    cars_mean: float = 3.0
    trucks_mean: float = 0.45
    buses_mean: float = 0.25
    night_prob: float = 0.2
    dusk_prob: float = 0.12
    overcast_prob: float = 0.25
    fog_prob: float = 0.08
    rain_prob: float = 0.07
    hood_prob: float = 0.4
    jpeg_quality: int = 90
    crops_per_image: int = 16
    rare_tau: float = DEFAULT_RARE_TAU

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"synthdrive frames must be at least 64x64, got {self.width}x{self.height}")
        unknown = set(self.rare_weights) - {CLASS_NAMES[i] for i in RARE_CLASS_IDS}
        if unknown:
            raise ValueError(
                f"rare_weights names unknown rare classes {sorted(unknown)}; rare classes are "
                f"{[CLASS_NAMES[i] for i in RARE_CLASS_IDS]}"
            )
        if not self.rare_weights or min(self.rare_weights.values()) < 0 or sum(self.rare_weights.values()) <= 0:
            raise ValueError(f"rare_weights must be non-negative with a positive sum, got {self.rare_weights}")
        for name in ("rare_image_prob", "night_prob", "dusk_prob", "overcast_prob", "fog_prob",
                     "rain_prob", "hood_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.night_prob + self.dusk_prob > 1 or self.overcast_prob + self.fog_prob + self.rain_prob > 1:
            raise ValueError("time-of-day and weather probabilities must each sum to at most 1")


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

    def _window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
        ix0, iy0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
        ix1, iy1 = min(int(math.ceil(x1)), self.w), min(int(math.ceil(y1)), self.h)
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        return ix0, iy0, ix1, iy1

    def _paint(self, win: tuple[int, int, int, int], mask: np.ndarray | None, label: int | None,
               color: np.ndarray) -> None:
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
        win = self._window(round(x0), round(y0), round(x1), round(y1))
        if win is not None:
            self._paint(win, None, label, color)

    def polygon(self, pts: np.ndarray, label: int | None, color: np.ndarray) -> None:
        """Convex polygon [n, 2] (x, y): per-row spans from the edges, filled at pixel centres."""
        win = self._window(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1)
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
        self._paint(win, mask, label, color)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, label: int | None, color: np.ndarray,
                hole: float = 0.0) -> None:
        """Filled ellipse, or a ring when ``hole`` (inner radius as a fraction of the outer) > 0."""
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        win = self._window(cx - rx, cy - ry, cx + rx + 1, cy + ry + 1)
        if win is None:
            return
        x0, y0, x1, y1 = win
        dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx) ** 2
        dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry) ** 2
        r2 = dy[:, None] + dx[None, :]
        mask = r2 <= 1.0
        if hole > 0:
            mask &= r2 >= hole * hole
        self._paint(win, mask, label, color)

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


def _draw_sprite(cv: Canvas, cam: Camera, x: float, z: float, parts: list[Part], mirror: bool = False) -> None:
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


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, np.float32)


TIRE = _rgb(0.06, 0.06, 0.07)
GLASS = _rgb(0.12, 0.15, 0.19)
POLE_GREY = _rgb(0.42, 0.43, 0.45)
CAR_COLORS = np.array([
    (0.85, 0.85, 0.86), (0.08, 0.08, 0.09), (0.55, 0.56, 0.58), (0.62, 0.08, 0.07), (0.12, 0.2, 0.45),
    (0.75, 0.72, 0.62), (0.2, 0.35, 0.25), (0.9, 0.75, 0.1), (0.35, 0.36, 0.4), (0.95, 0.95, 0.96),
], np.float32)
CLOTHES = np.array([
    (0.1, 0.1, 0.12), (0.2, 0.25, 0.45), (0.6, 0.1, 0.1), (0.8, 0.8, 0.78), (0.3, 0.45, 0.3),
    (0.85, 0.55, 0.1), (0.45, 0.3, 0.2), (0.9, 0.3, 0.5), (0.15, 0.5, 0.75),
], np.float32)
SKIN = np.array([(0.95, 0.8, 0.68), (0.8, 0.6, 0.45), (0.55, 0.38, 0.27), (0.36, 0.24, 0.17)], np.float32)


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 0.04) -> np.ndarray:
    c = palette[rng.integers(len(palette))]
    return np.clip(c + rng.normal(0, jitter, 3).astype(np.float32), 0, 1)


# ---- common vehicles -------------------------------------------------------------------------------

def car_rear(rng: np.random.Generator) -> list[Part]:
    w, ht = rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.65)
    body = _pick(rng, CAR_COLORS)
    tail = _rgb(0.75, 0.05, 0.05)
    return [
        ("rect", -w / 2 + 0.08, 0.0, -w / 2 + 0.38, 0.4, CAR, TIRE),
        ("rect", w / 2 - 0.38, 0.0, w / 2 - 0.08, 0.4, CAR, TIRE),
        ("rect", -w / 2, 0.2, w / 2, 0.92, CAR, body),
        ("poly", [(-w / 2 + 0.08, 0.92), (w / 2 - 0.08, 0.92), (w / 2 - 0.28, ht), (-w / 2 + 0.28, ht)], CAR, body * 0.9),
        ("poly", [(-w / 2 + 0.2, 0.97), (w / 2 - 0.2, 0.97), (w / 2 - 0.34, ht - 0.08), (-w / 2 + 0.34, ht - 0.08)], CAR, GLASS),
        ("rect", -w / 2 + 0.05, 0.66, -w / 2 + 0.36, 0.82, CAR, tail),
        ("rect", w / 2 - 0.36, 0.66, w / 2 - 0.05, 0.82, CAR, tail),
        ("rect", -0.26, 0.36, 0.26, 0.5, CAR, _rgb(0.9, 0.9, 0.85)),
    ]


def car_side(rng: np.random.Generator) -> list[Part]:
    ln, ht = rng.uniform(4.0, 4.8), rng.uniform(1.4, 1.6)
    body = _pick(rng, CAR_COLORS)
    return [
        ("rect", -ln / 2, 0.25, ln / 2, 0.95, CAR, body),
        ("poly", [(-ln / 2 + 0.9, 0.95), (ln / 2 - 0.7, 0.95), (ln / 2 - 1.3, ht), (-ln / 2 + 1.5, ht)], CAR, body * 0.92),
        ("poly", [(-ln / 2 + 1.05, 1.0), (ln / 2 - 0.85, 1.0), (ln / 2 - 1.35, ht - 0.07), (-ln / 2 + 1.6, ht - 0.07)], CAR, GLASS),
        ("ell", -ln / 2 + 0.85, 0.33, 0.33, 0.33, CAR, TIRE),
        ("ell", ln / 2 - 0.85, 0.33, 0.33, 0.33, CAR, TIRE),
    ]


def truck_rear(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(3.0, 3.9)
    box = _pick(rng, np.array([(0.9, 0.9, 0.88), (0.75, 0.2, 0.15), (0.2, 0.3, 0.6), (0.6, 0.6, 0.55)], np.float32))
    return [
        ("rect", -1.15, 0.0, -0.75, 0.55, TRUCK, TIRE), ("rect", 0.75, 0.0, 1.15, 0.55, TRUCK, TIRE),
        ("rect", -1.25, 0.45, 1.25, 0.7, TRUCK, _rgb(0.15, 0.15, 0.15)),
        ("rect", -1.25, 0.7, 1.25, ht, TRUCK, box),
        ("rect", -0.02, 0.75, 0.02, ht - 0.05, TRUCK, box * 0.7),
        ("rect", -1.2, 0.5, -0.95, 0.65, TRUCK, _rgb(0.8, 0.1, 0.05)),
        ("rect", 0.95, 0.5, 1.2, 0.65, TRUCK, _rgb(0.8, 0.1, 0.05)),
    ]


def truck_side(rng: np.random.Generator) -> list[Part]:
    ln, ht = rng.uniform(6.5, 10.0), rng.uniform(3.0, 3.9)
    box = _pick(rng, np.array([(0.9, 0.9, 0.88), (0.75, 0.2, 0.15), (0.2, 0.3, 0.6)], np.float32))
    cab = _pick(rng, CAR_COLORS)
    return [
        ("rect", -ln / 2, 0.6, ln / 2 - 2.2, ht, TRUCK, box),
        ("rect", ln / 2 - 2.1, 0.5, ln / 2, 2.9, TRUCK, cab),
        ("rect", ln / 2 - 1.2, 1.7, ln / 2 - 0.1, 2.6, TRUCK, GLASS),
        ("ell", -ln / 2 + 1.1, 0.5, 0.5, 0.5, TRUCK, TIRE),
        ("ell", -ln / 2 + 2.2, 0.5, 0.5, 0.5, TRUCK, TIRE),
        ("ell", ln / 2 - 1.1, 0.5, 0.5, 0.5, TRUCK, TIRE),
    ]


BUS_COLORS = np.array([(0.85, 0.15, 0.1), (0.95, 0.75, 0.1), (0.2, 0.4, 0.7), (0.9, 0.9, 0.9)], np.float32)


def bus_rear(rng: np.random.Generator) -> list[Part]:
    body = _pick(rng, BUS_COLORS)
    return [
        ("rect", -1.15, 0.0, -0.75, 0.5, BUS, TIRE), ("rect", 0.75, 0.0, 1.15, 0.5, BUS, TIRE),
        ("rect", -1.27, 0.3, 1.27, 3.1, BUS, body),
        ("rect", -1.1, 1.8, 1.1, 2.8, BUS, GLASS),
        ("rect", -1.2, 0.6, -0.9, 0.9, BUS, _rgb(0.8, 0.1, 0.05)),
        ("rect", 0.9, 0.6, 1.2, 0.9, BUS, _rgb(0.8, 0.1, 0.05)),
    ]


def bus_side(rng: np.random.Generator) -> list[Part]:
    ln = rng.uniform(10.0, 13.0)
    body = _pick(rng, BUS_COLORS)
    parts: list[Part] = [("rect", -ln / 2, 0.35, ln / 2, 3.1, BUS, body)]
    n = int(ln / 1.5)
    for k in range(n):
        x = -ln / 2 + 0.4 + k * (ln - 0.8) / n
        parts.append(("rect", x, 1.6, x + (ln - 0.8) / n - 0.15, 2.7, BUS, GLASS))
    parts += [("ell", -ln / 2 + 2.2, 0.5, 0.5, 0.5, BUS, TIRE), ("ell", ln / 2 - 2.5, 0.5, 0.5, 0.5, BUS, TIRE)]
    return parts


# ---- rare objects ------------------------------------------------------------------------------------

def person(rng: np.random.Generator, label: int = PERSON, seated: bool = False, lift: float = 0.0) -> list[Part]:
    """A pedestrian seen from the front or side; ``seated`` for riders (legs bent, ``lift`` metres up)."""
    ht = rng.uniform(1.55, 1.9)
    top, legs, skin = _pick(rng, CLOTHES), _pick(rng, CLOTHES), _pick(rng, SKIN, 0.02)
    hip = 0.5 * ht + lift
    head_r = 0.11 * ht / 1.75
    shoulder = 0.82 * ht + lift - (0.15 if seated else 0.0)
    parts: list[Part] = []
    if seated:
        parts += [("seg", 0.0, hip, 0.35, hip - 0.3, 0.16, label, legs),
                  ("seg", 0.35, hip - 0.3, 0.3, lift - 0.1, 0.13, label, legs)]
    else:
        stride = rng.uniform(0.0, 0.25)
        parts += [("seg", -0.07, hip, -0.07 - stride, 0.0, 0.15, label, legs),
                  ("seg", 0.07, hip, 0.07 + stride, 0.0, 0.15, label, legs)]
    lean = 0.25 if seated else 0.0
    parts += [
        ("poly", [(-0.2, hip), (0.2, hip), (0.22 + lean, shoulder), (-0.22 + lean, shoulder)], label, top),
        ("seg", -0.21 + lean, shoulder - 0.02, -0.26 + 2 * lean, hip + 0.05, 0.1, label, top),
        ("seg", 0.21 + lean, shoulder - 0.02, 0.26 + 2 * lean, hip + 0.05, 0.1, label, top),
        ("ell", lean, shoulder + head_r + 0.03, head_r * 0.85, head_r, label, skin),
    ]
    if rng.random() < 0.3:  # a hat, helmet or hair
        parts.append(("ell", lean, shoulder + 1.5 * head_r + 0.03, head_r * 0.9, head_r * 0.55, label, _pick(rng, CLOTHES)))
    return parts


def bicycle(rng: np.random.Generator, label: int = BICYCLE) -> list[Part]:
    r = rng.uniform(0.31, 0.36)
    frame = _pick(rng, CAR_COLORS, 0.08)
    wb = 0.52
    return [
        ("ell", -wb, r, r, r, 0.82, label, TIRE),
        ("ell", wb, r, r, r, 0.82, label, TIRE),
        ("seg", -wb, r, -0.05, r, 0.05, label, frame),
        ("seg", -0.05, r, 0.35, r + 0.5, 0.05, label, frame),
        ("seg", -wb, r, -0.12, r + 0.5, 0.05, label, frame),
        ("seg", -0.12, r + 0.5, 0.35, r + 0.5, 0.05, label, frame),
        ("seg", 0.35, r + 0.5, wb, r, 0.05, label, frame),
        ("seg", -0.17, r + 0.55, -0.02, r + 0.55, 0.07, label, TIRE),
        ("seg", 0.3, r + 0.65, 0.45, r + 0.68, 0.05, label, TIRE),
    ]


def motorcycle(rng: np.random.Generator, label: int = MOTORCYCLE) -> list[Part]:
    body = _pick(rng, CAR_COLORS, 0.06)
    r = rng.uniform(0.3, 0.34)
    return [
        ("ell", -0.72, r, r, r, label, TIRE),
        ("ell", 0.72, r, r, r, label, TIRE),
        ("poly", [(-0.55, r + 0.1), (0.5, r + 0.1), (0.6, r + 0.45), (-0.3, r + 0.55)], label, body),
        ("rect", -0.45, r + 0.5, 0.05, r + 0.62, label, TIRE),
        ("seg", 0.5, r + 0.35, 0.72, r, 0.08, label, POLE_GREY),
        ("seg", 0.5, r + 0.45, 0.42, r + 0.8, 0.06, label, TIRE),
    ]


def rider(rng: np.random.Generator) -> list[Part]:
    if rng.random() < 0.55:
        vehicle, lift = bicycle(rng), 0.55
    else:
        vehicle, lift = motorcycle(rng), 0.55
    return vehicle + person(rng, label=RIDER, seated=True, lift=lift)


def pole(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(6.5, 9.0)
    arm = rng.uniform(1.2, 2.4)
    return [
        ("rect", -0.09, 0.0, 0.09, ht, POLE, POLE_GREY),
        ("seg", 0.0, ht - 0.1, arm, ht + 0.25, 0.1, POLE, POLE_GREY),
        ("rect", arm - 0.35, ht + 0.05, arm + 0.25, ht + 0.3, POLE, _rgb(0.3, 0.3, 0.32)),
    ]


def traffic_sign(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(2.0, 2.8)
    r = rng.uniform(0.3, 0.45)
    parts: list[Part] = [("rect", -0.04, 0.0, 0.04, ht, POLE, POLE_GREY)]
    style = rng.integers(4)
    if style == 0:  # prohibitory: red ring on white
        parts += [("ell", 0.0, ht + r, r, r, SIGN, _rgb(0.95, 0.95, 0.95)),
                  ("ell", 0.0, ht + r, r, r, 0.75, SIGN, _rgb(0.8, 0.05, 0.05))]
    elif style == 1:  # warning triangle
        parts += [("poly", [(-r * 1.1, ht), (r * 1.1, ht), (0.0, ht + 1.9 * r)], SIGN, _rgb(0.85, 0.1, 0.08)),
                  ("poly", [(-r * 0.75, ht + 0.12 * r), (r * 0.75, ht + 0.12 * r), (0.0, ht + 1.45 * r)], SIGN, _rgb(0.95, 0.95, 0.9))]
    elif style == 2:  # mandatory: blue disc
        parts += [("ell", 0.0, ht + r, r, r, SIGN, _rgb(0.1, 0.3, 0.75)),
                  ("seg", 0.0, ht + 0.5 * r, 0.0, ht + 1.5 * r, 0.08, SIGN, _rgb(0.95, 0.95, 0.95))]
    else:  # information panel
        parts += [("rect", -1.6 * r, ht, 1.6 * r, ht + 1.4 * r, SIGN, _rgb(0.1, 0.45, 0.25)),
                  ("rect", -1.3 * r, ht + 0.5 * r, 1.3 * r, ht + 0.7 * r, SIGN, _rgb(0.9, 0.9, 0.9))]
    return parts


def traffic_light(rng: np.random.Generator, lit: list) -> list[Part]:
    ht = rng.uniform(2.6, 3.4)
    on = rng.integers(3)
    colors = [_rgb(0.9, 0.1, 0.05), _rgb(0.95, 0.7, 0.05), _rgb(0.1, 0.85, 0.35)]
    parts: list[Part] = [("rect", -0.06, 0.0, 0.06, ht, POLE, POLE_GREY),
                         ("rect", -0.18, ht, 0.18, ht + 0.95, LIGHT, _rgb(0.08, 0.08, 0.08))]
    for k in range(3):
        cy = ht + 0.8 - 0.3 * k
        c = colors[k] if k == on else colors[k] * 0.25
        parts.append(("ell", 0.0, cy, 0.11, 0.11, LIGHT, c))
    lit.append((0.0, ht + 0.8 - 0.3 * on, 0.35, colors[on]))
    return parts


def train(rng: np.random.Generator) -> list[Part]:
    ln = rng.uniform(18.0, 40.0)
    body = _pick(rng, np.array([(0.85, 0.85, 0.8), (0.8, 0.15, 0.1), (0.15, 0.35, 0.6), (0.9, 0.75, 0.2)], np.float32))
    parts: list[Part] = [("rect", -ln / 2, 0.0, ln / 2, 0.6, TRAIN, _rgb(0.12, 0.12, 0.12)),
                         ("rect", -ln / 2, 0.5, ln / 2, 3.8, TRAIN, body),
                         ("seg", -1.0, 3.8, 0.0, 4.6, 0.08, TRAIN, POLE_GREY)]
    n = int(ln / 2.2)
    for k in range(n):
        x = -ln / 2 + 0.6 + k * (ln - 1.2) / n
        parts.append(("rect", x, 2.0, x + (ln - 1.2) / n - 0.4, 3.1, TRAIN, GLASS))
    return parts


def tram_rear(rng: np.random.Generator) -> list[Part]:
    body = _pick(rng, np.array([(0.85, 0.85, 0.8), (0.8, 0.15, 0.1), (0.9, 0.75, 0.2)], np.float32))
    return [("rect", -1.3, 0.2, 1.3, 3.6, TRAIN, body), ("rect", -1.1, 1.9, 1.1, 3.1, TRAIN, GLASS),
            ("rect", -1.3, 0.0, 1.3, 0.3, TRAIN, _rgb(0.1, 0.1, 0.1)),
            ("seg", -0.6, 3.6, 0.0, 4.3, 0.07, TRAIN, POLE_GREY)]


def tree(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(4.0, 9.0)
    green = np.clip(_rgb(0.2, 0.38, 0.15) + rng.normal(0, 0.05, 3).astype(np.float32), 0, 1)
    rad = ht * rng.uniform(0.25, 0.38)
    parts: list[Part] = [("rect", -0.15, 0.0, 0.15, ht * 0.55, VEG, _rgb(0.3, 0.22, 0.15))]
    for _ in range(4):
        parts.append(("ell", rng.normal(0, rad * 0.35), ht - rad + rng.normal(0, rad * 0.25),
                      rad * rng.uniform(0.6, 0.9), rad * rng.uniform(0.55, 0.85), VEG,
                      green * rng.uniform(0.8, 1.15)))
    return parts


# ----------------------------------------------------------------------------------------------------
# The scene
# ----------------------------------------------------------------------------------------------------

def _scene_style(rng: np.random.Generator, cfg: SynthConfig) -> tuple[str, str]:
    t = rng.random()
    time_of_day = "night" if t < cfg.night_prob else "dusk" if t < cfg.night_prob + cfg.dusk_prob else "day"
    w = rng.random()
    weather = ("overcast" if w < cfg.overcast_prob else
               "fog" if w < cfg.overcast_prob + cfg.fog_prob else
               "rain" if w < cfg.overcast_prob + cfg.fog_prob + cfg.rain_prob else "clear")
    return time_of_day, weather


SKY_TOP = {"day": _rgb(0.25, 0.45, 0.8), "dusk": _rgb(0.25, 0.2, 0.45), "night": _rgb(0.01, 0.015, 0.04)}
SKY_LOW = {"day": _rgb(0.7, 0.8, 0.92), "dusk": _rgb(0.95, 0.55, 0.3), "night": _rgb(0.06, 0.06, 0.1)}


def render_frame(cfg: SynthConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw frame ``index`` of ``seed``.

    Returns:
        image: uint8 [H, W, 3] RGB.
        mask: uint8 [H, W] BDD train IDs (255 = ignore).
        info: the frame's scene attributes (time of day, weather, camera, object counts).
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    H, W = cfg.height, cfg.width
    cv = Canvas(H, W)
    time_of_day, weather = _scene_style(rng, cfg)

    cam = Camera(f=W * rng.uniform(0.7, 0.95), h=rng.uniform(1.2, 1.9),
                 cx=W * rng.uniform(0.47, 0.53), horizon=H * rng.uniform(0.4, 0.55))
    hz = int(cam.horizon)

    # Sky: a vertical gradient down to the horizon.
    top, low = SKY_TOP[time_of_day].copy(), SKY_LOW[time_of_day].copy()
    if weather in ("overcast", "rain", "fog"):
        grey = _rgb(0.62, 0.64, 0.67) if time_of_day == "day" else _rgb(0.2, 0.2, 0.22)
        top, low = 0.3 * top + 0.7 * grey, 0.2 * low + 0.8 * grey
    t = np.clip(np.arange(H, dtype=np.float32) / max(cam.horizon, 1.0), 0, 1)[:, None]
    cv.img[:] = ((1 - t) * top + t * low)[:, None, :]
    cv.lab[:] = SKY

    # Street geometry (metres): lanes, the ego lane, sidewalks, building line.
    lane_w = rng.uniform(3.0, 3.7)
    n_lanes = int(rng.integers(2, 5))
    ego = int(rng.integers(n_lanes))
    road_l = -(ego + 0.5) * lane_w + rng.normal(0, 0.3)
    road_r = road_l + n_lanes * lane_w
    sw_l, sw_r = rng.uniform(1.5, 4.0, 2) * (rng.random(2) < 0.85)
    bld_l = road_l - sw_l - rng.uniform(0, 6) * (rng.random() < 0.5)
    bld_r = road_r + sw_r + rng.uniform(0, 6) * (rng.random() < 0.5)
    z_far = 250.0

    # Distant skyline just above the horizon.
    x = 0.0
    while x < W:
        wd = W * rng.uniform(0.03, 0.1)
        if rng.random() < 0.6:
            cv.rect(x, hz - H * rng.uniform(0.02, 0.12), x + wd, hz + 1, BUILDING, _rgb(*rng.uniform(0.35, 0.55, 3)))
        else:
            r = wd * 0.6
            cv.ellipse(x + wd / 2, hz, r, H * rng.uniform(0.02, 0.06), VEG, _rgb(0.22, 0.32, 0.18) * rng.uniform(0.8, 1.2))
        x += wd

    # Ground: terrain, then sidewalks and road as polygons between lines through the vanishing point.
    cv.rect(0, hz + 1, W, H, TERRAIN, _rgb(0.42, 0.45, 0.25) * rng.uniform(0.8, 1.15))

    def ground_quad(xl: float, xr: float, z0: float = 0.5, z1: float = z_far) -> np.ndarray:
        u, v = cam.project(np.array([xl, xr, xr, xl]), 0.0, np.array([z0, z0, z1, z1]))
        return np.stack([u, v], axis=1).astype(np.float32)

    walk = _rgb(0.62, 0.6, 0.58) * rng.uniform(0.85, 1.1)
    if sw_l > 0:
        cv.polygon(ground_quad(road_l - sw_l, road_l), SIDEWALK, walk)
    if sw_r > 0:
        cv.polygon(ground_quad(road_r, road_r + sw_r), SIDEWALK, walk)
    asphalt = _rgb(0.33, 0.33, 0.35) * rng.uniform(0.75, 1.15)
    cv.polygon(ground_quad(road_l, road_r), ROAD, asphalt)

    # Lane marks: dashed lines in world coordinates, rasterised per row (still label road, as in BDD).
    rows = np.arange(hz + 2, H, dtype=np.float32) + 0.5
    zr = cam.ground_z(rows)
    dash_phase = rng.uniform(0, 9)
    for k in range(1, n_lanes):
        xm = road_l + k * lane_w
        dashed = ((zr + dash_phase) % 9.0) < 3.0
        _ground_stripe(cv, cam, rows, zr, xm, 0.12, dashed, _rgb(0.9, 0.9, 0.88))
    for edge in (road_l + 0.25, road_r - 0.25):
        _ground_stripe(cv, cam, rows, zr, edge, 0.12, np.ones_like(zr, bool), _rgb(0.85, 0.85, 0.8))
    if rng.random() < 0.15:  # zebra crossing
        zc = rng.uniform(8, 30)
        for k in range(int((road_r - road_l) / 1.0)):
            xa = road_l + 0.3 + k * 1.0
            quad = cam.project(np.array([xa, xa + 0.5, xa + 0.5, xa]), 0.0, np.array([zc, zc, zc + 3, zc + 3]))
            cv.polygon(np.stack(quad, axis=1).astype(np.float32), ROAD, _rgb(0.88, 0.88, 0.86))

    # Roadside structures along each side, far to near: facades, walls/fences, hedges.
    _roadside(cv, cam, rng, bld_l, side=-1)
    _roadside(cv, cam, rng, bld_r, side=+1)

    # Objects: (depth, x, parts, mirror, lights) drawn far to near.
    objects: list[tuple[float, float, list[Part], bool, list]] = []
    counts: dict[str, int] = {}

    def add(name: str, z: float, x: float, parts: list[Part], lights: list | None = None) -> None:
        objects.append((z, x, parts, bool(rng.random() < 0.5), lights or []))
        counts[str(name)] = counts.get(str(name), 0) + 1

    lanes_x = road_l + (np.arange(n_lanes) + 0.5) * lane_w
    for _ in range(rng.poisson(cfg.cars_mean * rng.uniform(0.3, 1.7))):
        if rng.random() < 0.8:
            add("car", rng.uniform(5, 90), lanes_x[rng.integers(n_lanes)] + rng.normal(0, 0.25), car_rear(rng))
        else:  # parked at a curb or crossing at a junction
            add("car", rng.uniform(6, 60), rng.choice([road_l + 1.1, road_r - 1.1, rng.uniform(road_l, road_r)]), car_side(rng))
    for _ in range(rng.poisson(cfg.trucks_mean)):
        rear = rng.random() < 0.7
        add("truck", rng.uniform(8, 90), lanes_x[rng.integers(n_lanes)], truck_rear(rng) if rear else truck_side(rng))
    for _ in range(rng.poisson(cfg.buses_mean)):
        rear = rng.random() < 0.6
        add("bus", rng.uniform(10, 90), lanes_x[rng.integers(n_lanes)], bus_rear(rng) if rear else bus_side(rng))
    for side, curb in ((-1, road_l - 0.6), (1, road_r + 0.6)):
        if rng.random() < 0.45:
            for z in np.arange(rng.uniform(6, 14), 90, rng.uniform(8, 16)):
                add("tree", z, curb + side * rng.uniform(0, 0.5), tree(rng))

    n_rare = 0
    if rng.random() < cfg.rare_image_prob:
        n_rare = 1 + rng.poisson(cfg.rare_extra_mean)
    names = list(cfg.rare_weights)
    weights = np.array([cfg.rare_weights[n] for n in names], np.float64)
    weights /= weights.sum()

    def on_sidewalk() -> float:
        if rng.random() < 0.5:
            return road_l - rng.uniform(0.3, max(sw_l, 1.0))
        return road_r + rng.uniform(0.3, max(sw_r, 1.0))

    for name in rng.choice(names, size=n_rare, p=weights):
        if name == "person":
            x = on_sidewalk() if rng.random() < 0.7 else rng.uniform(road_l, road_r)
            add(name, rng.uniform(5, 35), x, person(rng))
        elif name == "rider":
            add(name, rng.uniform(6, 35), rng.choice([road_r - 0.8, lanes_x[rng.integers(n_lanes)]]), rider(rng))
        elif name == "bicycle":
            add(name, rng.uniform(4, 30), on_sidewalk(), bicycle(rng))
        elif name == "motorcycle":
            add(name, rng.uniform(5, 35), rng.choice([road_r - 0.7, road_l + 0.7, lanes_x[rng.integers(n_lanes)]]), motorcycle(rng))
        elif name == "traffic sign":
            add(name, rng.uniform(6, 40), rng.choice([road_l - 0.4, road_r + 0.4]), traffic_sign(rng))
        elif name == "traffic light":
            lit: list = []
            add(name, rng.uniform(8, 45), rng.choice([road_l - 0.4, road_r + 0.4]), traffic_light(rng, lit), lit)
        elif name == "pole":
            add(name, rng.uniform(5, 40), rng.choice([road_l - 0.3, road_r + 0.3]), pole(rng))
        elif name == "train":
            if rng.random() < 0.5:
                add(name, rng.uniform(20, 60), rng.uniform(road_l, road_r), train(rng))
            else:
                add(name, rng.uniform(10, 40), lanes_x[rng.integers(n_lanes)], tram_rear(rng))

    objects.sort(key=lambda o: -o[0])
    for z, x, parts, mirror, lights in objects:
        _draw_sprite(cv, cam, x, z, parts, mirror)
        s = cam.f / z
        u0, v0 = cam.project(x, 0.0, z)
        for lx, ly, lr, color in lights:
            cv.lights.append((u0 + (-s if mirror else s) * lx, v0 - s * ly, s * lr, color))
        if time_of_day == "night" and parts and parts[0][-2] in (CAR, TRUCK, BUS) and parts[0][0] == "rect":
            # Tail lights of vehicles seen from behind glow at night.
            for px in (-0.7, 0.7):
                cv.lights.append((u0 + s * px, v0 - s * 0.74, s * 0.35, _rgb(1.0, 0.15, 0.1)))

    if rng.random() < cfg.hood_prob:  # the ego vehicle's bonnet, ignored in BDD's masks
        ry = H * rng.uniform(0.08, 0.16)
        cv.ellipse(cam.cx, H + ry * 0.35, W * 0.75, ry, IGNORE_ID, _pick(rng, CAR_COLORS) * 0.6)

    image = _grade(cv, cam, rng, time_of_day, weather)
    info = {"time_of_day": time_of_day, "weather": weather, "camera_height": round(cam.h, 3),
            "focal": round(cam.f, 1), "horizon": round(cam.horizon, 1), "objects": counts}
    return image, cv.lab, info


def _ground_stripe(cv: Canvas, cam: Camera, rows: np.ndarray, zr: np.ndarray, xm: float, width: float,
                   on: np.ndarray, color: np.ndarray) -> None:
    """Paint a painted line on the road at lateral ``xm`` (label road) where ``on`` is true per row."""
    ul = cam.cx + cam.f * (xm - width / 2) / zr
    ur = cam.cx + cam.f * (xm + width / 2) / zr
    ur = np.maximum(ur, ul + 1.0)  # keep distant marks at least one pixel wide
    x0, x1 = max(int(ul.min()), 0), min(int(math.ceil(ur.max())) + 1, cv.w)
    if x1 <= x0:
        return
    y0 = int(rows[0])
    xc = np.arange(x0, x1, dtype=np.float32) + 0.5
    mask = (xc[None, :] >= ul[:, None]) & (xc[None, :] < ur[:, None]) & on[:, None]
    mask &= cv.lab[y0:y0 + len(rows), x0:x1] == ROAD
    cv._paint((x0, y0, x1, y0 + len(rows)), mask, ROAD, color)


def _roadside(cv: Canvas, cam: Camera, rng: np.random.Generator, xb: float, side: int) -> None:
    """Facades, walls, fences and hedges along the line x = xb, drawn far to near."""
    segs = []
    z = rng.uniform(2.0, 6.0)
    while z < 160:
        ln = rng.uniform(8, 35)
        segs.append((z, z + ln))
        z += ln + rng.uniform(0, 6) * (rng.random() < 0.3)
    for z0, z1 in reversed(segs):
        kind = rng.choice(["building", "building", "building", "wall", "fence", "hedge", "none"])
        if kind == "none":
            continue
        ht = {"building": rng.uniform(6, 30), "wall": rng.uniform(1.0, 2.5), "fence": rng.uniform(1.0, 2.0),
              "hedge": rng.uniform(1.0, 2.5)}[kind]
        label = {"building": BUILDING, "wall": WALL, "fence": FENCE, "hedge": VEG}[kind]
        base = {"building": _rgb(*rng.uniform(0.35, 0.75, 3)) * _rgb(1.0, 0.95, 0.9),
                "wall": _rgb(0.6, 0.58, 0.55), "fence": _rgb(0.45, 0.4, 0.35), "hedge": _rgb(0.2, 0.35, 0.15)}[kind]
        # Side-facing facades get darker with the sun from one side.
        color = np.clip(base * (0.85 if side < 0 else 1.0) * rng.uniform(0.85, 1.1), 0, 1)
        u, v = cam.project(np.array([xb, xb, xb, xb]), np.array([0.0, 0.0, ht, ht]), np.array([z0, z1, z1, z0]))
        quad = np.stack([u, v], axis=1).astype(np.float32)
        cv.polygon(quad, label, color)
        if kind == "building":
            _windows(cv, quad, rng, color)
        elif kind == "fence":
            _slats(cv, quad, rng, color)


def _windows(cv: Canvas, quad: np.ndarray, rng: np.random.Generator, wall: np.ndarray) -> None:
    """A grid of windows over a facade: periodic in screen space, clipped to the facade (label building)."""
    win = cv._window(quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max() + 1, quad[:, 1].max() + 1)
    if win is None:
        return
    x0, y0, x1, y1 = win
    period_y = max(abs(quad[0, 1] - quad[3, 1]) / max(rng.integers(2, 9), 1), 4.0)
    period_x = max(period_y * rng.uniform(0.6, 1.2), 3.0)
    yy = (np.arange(y0, y1) - y0) % period_y < period_y * 0.55
    xx = (np.arange(x0, x1) - x0) % period_x < period_x * 0.5
    mask = yy[:, None] & xx[None, :] & (cv.lab[y0:y1, x0:x1] == BUILDING)
    cv._paint(win, mask, None, np.clip(wall * 0.45 + _rgb(0.05, 0.07, 0.1), 0, 1))


def _slats(cv: Canvas, quad: np.ndarray, rng: np.random.Generator, color: np.ndarray) -> None:
    win = cv._window(quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max() + 1, quad[:, 1].max() + 1)
    if win is None:
        return
    x0, y0, x1, y1 = win
    period = rng.uniform(3, 8)
    gaps = ((np.arange(x0, x1) - x0) % period) < period * 0.35
    mask = gaps[None, :] & (cv.lab[y0:y1, x0:x1] == FENCE)
    cv._paint(win, mask, None, color * 0.55)


_NOISE_PAD = 64


@functools.lru_cache(maxsize=4)
def _noise_tile(height: int, width: int) -> np.ndarray:
    """A fixed field of luminance noise (8-bit units, +0.5 for rounding); frames take random windows of
    it, which is as random per frame as fresh noise at a fraction of the cost of drawing normals."""
    rng = np.random.default_rng(0x5EED)
    tile = rng.standard_normal((height + _NOISE_PAD, width + _NOISE_PAD, 1), dtype=np.float32)
    tile *= 255.0 * 0.015
    tile += 0.5
    return tile


def _grade(cv: Canvas, cam: Camera, rng: np.random.Generator, time_of_day: str, weather: str) -> np.ndarray:
    """Lighting, fog, lights, sensor noise -> uint8 RGB."""
    H, W = cv.h, cv.w
    img = cv.img
    gain = {"day": 1.0, "dusk": 0.7, "night": 0.28}[time_of_day] * rng.uniform(0.85, 1.15)
    tint = {"day": _rgb(1.0, 1.0, 1.0), "dusk": _rgb(1.08, 0.92, 0.8), "night": _rgb(0.8, 0.85, 1.1)}[time_of_day]
    if weather == "rain":
        tint = tint * _rgb(0.9, 0.95, 1.05)
        gain *= 0.8
    tint = tint * (1 + rng.normal(0, 0.04, 3)).astype(np.float32)
    img *= (gain * tint).astype(np.float32)
    if time_of_day == "night":  # the sky does not take the same exposure as the lit street
        img[cv.lab == SKY] *= 0.6

    if weather == "fog":
        # Exponential fog by ground depth per row; everything at or above the horizon is far.
        rows = np.arange(H, dtype=np.float32) + 0.5
        depth = np.where(rows > cam.horizon + 1, cam.ground_z(rows), 1e4)
        vis = rng.uniform(25, 70)
        a = (1 - np.exp(-depth / vis)).astype(np.float32)[:, None, None]
        fog = _rgb(0.7, 0.72, 0.74) * gain
        img *= 1 - a
        img += a * fog

    for x, y, r, color in cv.lights:
        r = max(r, 1.5)
        win = cv._window(x - 3 * r, y - 3 * r, x + 3 * r + 1, y + 3 * r + 1)
        if win is None:
            continue
        x0, y0, x1, y1 = win
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - x) / r
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - y) / r
        glow = np.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2))[..., None]
        strength = 1.0 if time_of_day == "night" else 0.35
        img[y0:y1, x0:x1] += strength * glow * color

    # Sensor noise, luminance only; scaled straight to 8-bit units to save full-frame passes.
    img *= 255.0
    oy, ox = rng.integers(0, _NOISE_PAD, 2)
    img += _noise_tile(H, W)[oy:oy + H, ox:ox + W]
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------------

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
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; choose another --out or pass --overwrite")
        if not (root / MANIFEST_NAME).exists() and not (root / "images" / "10k").exists():
            raise FileExistsError(f"{root} holds something other than a synthdrive dataset; refusing to overwrite it")
        shutil.rmtree(root)
    splits = [split_of(i, num_images, val_fraction) for i in range(num_images)]
    for split in set(splits):
        (root / "images" / "10k" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / "sem_seg" / "masks" / split).mkdir(parents=True, exist_ok=True)

    jobs = [(cfg, seed, i, splits[i], str(root)) for i in range(num_images)]
    workers = max(1, min(workers or os.cpu_count() or 1, num_images))
    if workers > 1 and not _main_reimportable():
        log.warning("synthdrive: the main script (%s) cannot be re-imported by spawned workers (piped on stdin?); "
                    "drawing in this process", getattr(sys.modules.get("__main__"), "__file__", None))
        workers = 1
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=num_images, unit="img", desc="synthdrive", disable=not progress)
    records: list[dict[str, Any]] = []
    if workers == 1:
        for job in jobs:
            records.append(_write_frame(job))
            bar.update()
    else:
        # spawn: safe whatever the parent imported (torch, CUDA); the workers only need numpy and PIL.
        # A ProcessPoolExecutor, unlike multiprocessing.Pool, raises when a worker dies instead of waiting forever.
        chunksize = max(1, min(16, num_images // (4 * workers)))
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
    seconds = time.perf_counter() - t0
    records.sort(key=lambda r: r["index"])

    pixels = np.sum([r.pop("pixels") for r in records], axis=0)
    labelled = pixels[: len(CLASS_NAMES)].sum()
    crops = cfg.crops_per_image * num_images
    manifest = {
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
    with open(root / FRAMES_NAME, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    log.info("synthdrive: %d frames at %dx%d in %.1f s (%.1f img/s), rare crop prevalence %.3f",
             num_images, cfg.width, cfg.height, seconds, num_images / seconds,
             manifest["rare_crop_prevalence"]["value"])
    return manifest


#: The embedded default dataset that ``--data synthetic`` generates once and reuses: sized so that a
#: 2-core CPU generates it in well under a minute and a CPU training preset sees varied frames.
DEFAULT_SPEC: dict[str, Any] = {"num_images": 2400, "seed": 0, "width": 640, "height": 360}


def _main_reimportable() -> bool:
    """Whether spawned processes can re-import ``__main__`` (they run its file again; an interactive
    session has no file and is fine; ``python - < script.py`` names a file "<stdin>" that does not exist)."""
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
