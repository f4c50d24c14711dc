"""Grading a drawn frame: exposure and tint by time of day, weather, fog, light glows, sensor noise."""

from __future__ import annotations

import functools

import numpy as np

from oodfast.data.synthdrive.canvas import Camera, Canvas, rgb
from oodfast.data.synthdrive.config import SKY

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


def grade(cv: Canvas, cam: Camera, rng: np.random.Generator, time_of_day: str, weather: str) -> np.ndarray:
    """Lighting, fog, lights, sensor noise -> uint8 RGB."""
    H, W = cv.h, cv.w
    img = cv.img
    gain = {"day": 1.0, "dusk": 0.7, "night": 0.28}[time_of_day] * rng.uniform(0.85, 1.15)
    tint = {"day": rgb(1.0, 1.0, 1.0), "dusk": rgb(1.08, 0.92, 0.8), "night": rgb(0.8, 0.85, 1.1)}[time_of_day]
    if weather == "rain":
        tint = tint * rgb(0.9, 0.95, 1.05)
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
        fog = rgb(0.7, 0.72, 0.74) * gain
        img *= 1 - a
        img += a * fog

    for x, y, r, color in cv.lights:
        r = max(r, 1.5)
        win = cv.window(x - 3 * r, y - 3 * r, x + 3 * r + 1, y + 3 * r + 1)
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

