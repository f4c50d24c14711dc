"""The objects of a street scene as sprites: colour palettes and one function per kind of object.

Each function draws its random shape and colours from ``rng`` and returns a list of :data:`Part` s
(metres, relative to the object's ground contact point; see :mod:`oodfast.data.synthdrive.canvas`).
"""

from __future__ import annotations

import numpy as np

from oodfast.data.synthdrive.canvas import Part, rgb
from oodfast.data.synthdrive.config import (
    BICYCLE,
    BUS,
    CAR,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    SIGN,
    TRAIN,
    TRUCK,
    VEG,
)

TIRE = rgb(0.06, 0.06, 0.07)
GLASS = rgb(0.12, 0.15, 0.19)
POLE_GREY = rgb(0.42, 0.43, 0.45)
CAR_COLORS = np.array([
    (0.85, 0.85, 0.86), (0.08, 0.08, 0.09), (0.55, 0.56, 0.58), (0.62, 0.08, 0.07), (0.12, 0.2, 0.45),
    (0.75, 0.72, 0.62), (0.2, 0.35, 0.25), (0.9, 0.75, 0.1), (0.35, 0.36, 0.4), (0.95, 0.95, 0.96),
], np.float32)
CLOTHES = np.array([
    (0.1, 0.1, 0.12), (0.2, 0.25, 0.45), (0.6, 0.1, 0.1), (0.8, 0.8, 0.78), (0.3, 0.45, 0.3),
    (0.85, 0.55, 0.1), (0.45, 0.3, 0.2), (0.9, 0.3, 0.5), (0.15, 0.5, 0.75),
], np.float32)
SKIN = np.array([(0.95, 0.8, 0.68), (0.8, 0.6, 0.45), (0.55, 0.38, 0.27), (0.36, 0.24, 0.17)], np.float32)


def pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 0.04) -> np.ndarray:
    c = palette[rng.integers(len(palette))]
    return np.clip(c + rng.normal(0, jitter, 3).astype(np.float32), 0, 1)


# ---- common vehicles -------------------------------------------------------------------------------

def car_rear(rng: np.random.Generator) -> list[Part]:
    w, ht = rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.65)
    body = pick(rng, CAR_COLORS)
    tail = rgb(0.75, 0.05, 0.05)
    return [
        ("rect", -w / 2 + 0.08, 0.0, -w / 2 + 0.38, 0.4, CAR, TIRE),
        ("rect", w / 2 - 0.38, 0.0, w / 2 - 0.08, 0.4, CAR, TIRE),
        ("rect", -w / 2, 0.2, w / 2, 0.92, CAR, body),
        ("poly", [(-w / 2 + 0.08, 0.92), (w / 2 - 0.08, 0.92), (w / 2 - 0.28, ht), (-w / 2 + 0.28, ht)], CAR, body * 0.9),
        ("poly", [(-w / 2 + 0.2, 0.97), (w / 2 - 0.2, 0.97), (w / 2 - 0.34, ht - 0.08), (-w / 2 + 0.34, ht - 0.08)], CAR, GLASS),
        ("rect", -w / 2 + 0.05, 0.66, -w / 2 + 0.36, 0.82, CAR, tail),
        ("rect", w / 2 - 0.36, 0.66, w / 2 - 0.05, 0.82, CAR, tail),
        ("rect", -0.26, 0.36, 0.26, 0.5, CAR, rgb(0.9, 0.9, 0.85)),
    ]


def car_side(rng: np.random.Generator) -> list[Part]:
    ln, ht = rng.uniform(4.0, 4.8), rng.uniform(1.4, 1.6)
    body = pick(rng, CAR_COLORS)
    return [
        ("rect", -ln / 2, 0.25, ln / 2, 0.95, CAR, body),
        ("poly", [(-ln / 2 + 0.9, 0.95), (ln / 2 - 0.7, 0.95), (ln / 2 - 1.3, ht), (-ln / 2 + 1.5, ht)], CAR, body * 0.92),
        ("poly", [(-ln / 2 + 1.05, 1.0), (ln / 2 - 0.85, 1.0), (ln / 2 - 1.35, ht - 0.07), (-ln / 2 + 1.6, ht - 0.07)], CAR, GLASS),
        ("ell", -ln / 2 + 0.85, 0.33, 0.33, 0.33, CAR, TIRE),
        ("ell", ln / 2 - 0.85, 0.33, 0.33, 0.33, CAR, TIRE),
    ]


def truck_rear(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(3.0, 3.9)
    box = pick(rng, np.array([(0.9, 0.9, 0.88), (0.75, 0.2, 0.15), (0.2, 0.3, 0.6), (0.6, 0.6, 0.55)], np.float32))
    return [
        ("rect", -1.15, 0.0, -0.75, 0.55, TRUCK, TIRE), ("rect", 0.75, 0.0, 1.15, 0.55, TRUCK, TIRE),
        ("rect", -1.25, 0.45, 1.25, 0.7, TRUCK, rgb(0.15, 0.15, 0.15)),
        ("rect", -1.25, 0.7, 1.25, ht, TRUCK, box),
        ("rect", -0.02, 0.75, 0.02, ht - 0.05, TRUCK, box * 0.7),
        ("rect", -1.2, 0.5, -0.95, 0.65, TRUCK, rgb(0.8, 0.1, 0.05)),
        ("rect", 0.95, 0.5, 1.2, 0.65, TRUCK, rgb(0.8, 0.1, 0.05)),
    ]


def truck_side(rng: np.random.Generator) -> list[Part]:
    ln, ht = rng.uniform(6.5, 10.0), rng.uniform(3.0, 3.9)
    box = pick(rng, np.array([(0.9, 0.9, 0.88), (0.75, 0.2, 0.15), (0.2, 0.3, 0.6)], np.float32))
    cab = pick(rng, CAR_COLORS)
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
    body = pick(rng, BUS_COLORS)
    return [
        ("rect", -1.15, 0.0, -0.75, 0.5, BUS, TIRE), ("rect", 0.75, 0.0, 1.15, 0.5, BUS, TIRE),
        ("rect", -1.27, 0.3, 1.27, 3.1, BUS, body),
        ("rect", -1.1, 1.8, 1.1, 2.8, BUS, GLASS),
        ("rect", -1.2, 0.6, -0.9, 0.9, BUS, rgb(0.8, 0.1, 0.05)),
        ("rect", 0.9, 0.6, 1.2, 0.9, BUS, rgb(0.8, 0.1, 0.05)),
    ]


def bus_side(rng: np.random.Generator) -> list[Part]:
    ln = rng.uniform(10.0, 13.0)
    body = pick(rng, BUS_COLORS)
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
    top, legs, skin = pick(rng, CLOTHES), pick(rng, CLOTHES), pick(rng, SKIN, 0.02)
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
        parts.append(("ell", lean, shoulder + 1.5 * head_r + 0.03, head_r * 0.9, head_r * 0.55, label, pick(rng, CLOTHES)))
    return parts


def bicycle(rng: np.random.Generator, label: int = BICYCLE) -> list[Part]:
    r = rng.uniform(0.31, 0.36)
    frame = pick(rng, CAR_COLORS, 0.08)
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
    body = pick(rng, CAR_COLORS, 0.06)
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
        ("rect", arm - 0.35, ht + 0.05, arm + 0.25, ht + 0.3, POLE, rgb(0.3, 0.3, 0.32)),
    ]


def traffic_sign(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(2.0, 2.8)
    r = rng.uniform(0.3, 0.45)
    parts: list[Part] = [("rect", -0.04, 0.0, 0.04, ht, POLE, POLE_GREY)]
    style = rng.integers(4)
    if style == 0:  # prohibitory: red ring on white
        parts += [("ell", 0.0, ht + r, r, r, SIGN, rgb(0.95, 0.95, 0.95)),
                  ("ell", 0.0, ht + r, r, r, 0.75, SIGN, rgb(0.8, 0.05, 0.05))]
    elif style == 1:  # warning triangle
        parts += [("poly", [(-r * 1.1, ht), (r * 1.1, ht), (0.0, ht + 1.9 * r)], SIGN, rgb(0.85, 0.1, 0.08)),
                  ("poly", [(-r * 0.75, ht + 0.12 * r), (r * 0.75, ht + 0.12 * r), (0.0, ht + 1.45 * r)], SIGN, rgb(0.95, 0.95, 0.9))]
    elif style == 2:  # mandatory: blue disc
        parts += [("ell", 0.0, ht + r, r, r, SIGN, rgb(0.1, 0.3, 0.75)),
                  ("seg", 0.0, ht + 0.5 * r, 0.0, ht + 1.5 * r, 0.08, SIGN, rgb(0.95, 0.95, 0.95))]
    else:  # information panel
        parts += [("rect", -1.6 * r, ht, 1.6 * r, ht + 1.4 * r, SIGN, rgb(0.1, 0.45, 0.25)),
                  ("rect", -1.3 * r, ht + 0.5 * r, 1.3 * r, ht + 0.7 * r, SIGN, rgb(0.9, 0.9, 0.9))]
    return parts


def traffic_light(rng: np.random.Generator, lit: list) -> list[Part]:
    ht = rng.uniform(2.6, 3.4)
    on = rng.integers(3)
    colors = [rgb(0.9, 0.1, 0.05), rgb(0.95, 0.7, 0.05), rgb(0.1, 0.85, 0.35)]
    parts: list[Part] = [("rect", -0.06, 0.0, 0.06, ht, POLE, POLE_GREY),
                         ("rect", -0.18, ht, 0.18, ht + 0.95, LIGHT, rgb(0.08, 0.08, 0.08))]
    for k in range(3):
        cy = ht + 0.8 - 0.3 * k
        c = colors[k] if k == on else colors[k] * 0.25
        parts.append(("ell", 0.0, cy, 0.11, 0.11, LIGHT, c))
    lit.append((0.0, ht + 0.8 - 0.3 * on, 0.35, colors[on]))
    return parts


def train(rng: np.random.Generator) -> list[Part]:
    ln = rng.uniform(18.0, 40.0)
    body = pick(rng, np.array([(0.85, 0.85, 0.8), (0.8, 0.15, 0.1), (0.15, 0.35, 0.6), (0.9, 0.75, 0.2)], np.float32))
    parts: list[Part] = [("rect", -ln / 2, 0.0, ln / 2, 0.6, TRAIN, rgb(0.12, 0.12, 0.12)),
                         ("rect", -ln / 2, 0.5, ln / 2, 3.8, TRAIN, body),
                         ("seg", -1.0, 3.8, 0.0, 4.6, 0.08, TRAIN, POLE_GREY)]
    n = int(ln / 2.2)
    for k in range(n):
        x = -ln / 2 + 0.6 + k * (ln - 1.2) / n
        parts.append(("rect", x, 2.0, x + (ln - 1.2) / n - 0.4, 3.1, TRAIN, GLASS))
    return parts


def tram_rear(rng: np.random.Generator) -> list[Part]:
    body = pick(rng, np.array([(0.85, 0.85, 0.8), (0.8, 0.15, 0.1), (0.9, 0.75, 0.2)], np.float32))
    return [("rect", -1.3, 0.2, 1.3, 3.6, TRAIN, body), ("rect", -1.1, 1.9, 1.1, 3.1, TRAIN, GLASS),
            ("rect", -1.3, 0.0, 1.3, 0.3, TRAIN, rgb(0.1, 0.1, 0.1)),
            ("seg", -0.6, 3.6, 0.0, 4.3, 0.07, TRAIN, POLE_GREY)]


def tree(rng: np.random.Generator) -> list[Part]:
    ht = rng.uniform(4.0, 9.0)
    green = np.clip(rgb(0.2, 0.38, 0.15) + rng.normal(0, 0.05, 3).astype(np.float32), 0, 1)
    rad = ht * rng.uniform(0.25, 0.38)
    parts: list[Part] = [("rect", -0.15, 0.0, 0.15, ht * 0.55, VEG, rgb(0.3, 0.22, 0.15))]
    for _ in range(4):
        parts.append(("ell", rng.normal(0, rad * 0.35), ht - rad + rng.normal(0, rad * 0.25),
                      rad * rng.uniform(0.6, 0.9), rad * rng.uniform(0.55, 0.85), VEG,
                      green * rng.uniform(0.8, 1.15)))
    return parts

