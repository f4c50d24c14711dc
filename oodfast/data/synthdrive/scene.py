"""One synthdrive frame: sample a street scene from ``(seed, index)`` and draw it, far to near.

:func:`render_frame` draws, in painter's order: the sky, a distant skyline, the ground (terrain,
sidewalks, road, lane marks, sometimes a zebra crossing), roadside structures, the objects (common
vehicles and trees, and in some frames rare objects) sorted far to near, the ego vehicle's bonnet,
and then grades the frame (:mod:`oodfast.data.synthdrive.grading`). All randomness comes from one
generator seeded by ``(seed, index, GENERATOR_VERSION)``, drawn in a fixed order: changing that
order changes the pixels, which needs a new ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodfast.data.classes import IGNORE_ID
from oodfast.data.synthdrive.canvas import Camera, Canvas, Part, draw_sprite, rgb
from oodfast.data.synthdrive.config import (
    BUILDING,
    BUS,
    CAR,
    FENCE,
    GENERATOR_VERSION,
    ROAD,
    SIDEWALK,
    SKY,
    TERRAIN,
    TRUCK,
    VEG,
    WALL,
    SynthConfig,
)
from oodfast.data.synthdrive.grading import grade
from oodfast.data.synthdrive.sprites import (
    CAR_COLORS,
    bicycle,
    bus_rear,
    bus_side,
    car_rear,
    car_side,
    motorcycle,
    person,
    pick,
    pole,
    rider,
    traffic_light,
    traffic_sign,
    train,
    tram_rear,
    tree,
    truck_rear,
    truck_side,
)

#: How far the ground polygons reach, metres.
Z_FAR = 250.0

def _scene_style(rng: np.random.Generator, cfg: SynthConfig) -> tuple[str, str]:
    t = rng.random()
    time_of_day = "night" if t < cfg.night_prob else "dusk" if t < cfg.night_prob + cfg.dusk_prob else "day"
    w = rng.random()
    weather = ("overcast" if w < cfg.overcast_prob else
               "fog" if w < cfg.overcast_prob + cfg.fog_prob else
               "rain" if w < cfg.overcast_prob + cfg.fog_prob + cfg.rain_prob else "clear")
    return time_of_day, weather


SKY_TOP = {"day": rgb(0.25, 0.45, 0.8), "dusk": rgb(0.25, 0.2, 0.45), "night": rgb(0.01, 0.015, 0.04)}
SKY_LOW = {"day": rgb(0.7, 0.8, 0.92), "dusk": rgb(0.95, 0.55, 0.3), "night": rgb(0.06, 0.06, 0.1)}


def render_frame(cfg: SynthConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw frame ``index`` of ``seed``.

    Returns:
        image: uint8 [H, W, 3] RGB.
        mask: uint8 [H, W] BDD train IDs (255 = ignore).
        info: the frame's scene attributes (time of day, weather, camera, object counts).
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    cv = Canvas(cfg.height, cfg.width)
    time_of_day, weather = _scene_style(rng, cfg)
    cam = _sample_camera(rng, cfg.width, cfg.height)
    _draw_sky(cv, cam, time_of_day, weather)
    street = _sample_street(rng)
    _draw_skyline(cv, rng, int(cam.horizon))
    _draw_ground(cv, cam, rng, street)
    # Roadside structures along each side, far to near: facades, walls/fences, hedges.
    _roadside(cv, cam, rng, street.bld_l, side=-1)
    _roadside(cv, cam, rng, street.bld_r, side=+1)
    objects = _Objects(rng)
    _place_common_objects(objects, rng, cfg, street)
    _place_rare_objects(objects, rng, cfg, street)
    _draw_objects(cv, cam, objects.items, time_of_day)
    if rng.random() < cfg.hood_prob:  # the ego vehicle's bonnet, ignored in BDD's masks
        ry = cfg.height * rng.uniform(0.08, 0.16)
        cv.ellipse(cam.cx, cfg.height + ry * 0.35, cfg.width * 0.75, ry, IGNORE_ID, pick(rng, CAR_COLORS) * 0.6)
    image = grade(cv, cam, rng, time_of_day, weather)
    info = {"time_of_day": time_of_day, "weather": weather, "camera_height": round(cam.h, 3),
            "focal": round(cam.f, 1), "horizon": round(cam.horizon, 1), "objects": objects.counts}
    return image, cv.lab, info


# ----------------------------------------------------------------------------------------------------
# Sampling the scene
# ----------------------------------------------------------------------------------------------------

@dataclass
class Street:
    """The street across the view (metres, x right of the camera): lanes, sidewalks, building lines."""

    lane_w: float
    n_lanes: int
    road_l: float
    road_r: float
    sw_l: float    # sidewalk widths (0: none on that side)
    sw_r: float
    bld_l: float   # where the roadside structures stand
    bld_r: float

    @property
    def lanes_x(self) -> np.ndarray:
        """float64 [n_lanes]: the centre of each lane."""
        return self.road_l + (np.arange(self.n_lanes) + 0.5) * self.lane_w


def _sample_camera(rng: np.random.Generator, width: int, height: int) -> Camera:
    """Focal length, height, principal point and pitch (the horizon row) of this frame's camera."""
    return Camera(f=width * rng.uniform(0.7, 0.95), h=rng.uniform(1.2, 1.9),
                  cx=width * rng.uniform(0.47, 0.53), horizon=height * rng.uniform(0.4, 0.55))


def _sample_street(rng: np.random.Generator) -> Street:
    """Lanes, the ego lane, sidewalks and building lines."""
    lane_w = rng.uniform(3.0, 3.7)
    n_lanes = int(rng.integers(2, 5))
    ego = int(rng.integers(n_lanes))
    road_l = -(ego + 0.5) * lane_w + rng.normal(0, 0.3)
    road_r = road_l + n_lanes * lane_w
    sw_l, sw_r = rng.uniform(1.5, 4.0, 2) * (rng.random(2) < 0.85)
    bld_l = road_l - sw_l - rng.uniform(0, 6) * (rng.random() < 0.5)
    bld_r = road_r + sw_r + rng.uniform(0, 6) * (rng.random() < 0.5)
    return Street(lane_w, n_lanes, road_l, road_r, sw_l, sw_r, bld_l, bld_r)


class _Objects:
    """The objects placed in a frame, each (depth, x, parts, mirror, lights), and a count per name."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.items: list[tuple[float, float, list[Part], bool, list]] = []
        self.counts: dict[str, int] = {}

    def add(self, name: str, z: float, x: float, parts: list[Part], lights: list | None = None) -> None:
        self.items.append((z, x, parts, bool(self.rng.random() < 0.5), lights or []))
        self.counts[str(name)] = self.counts.get(str(name), 0) + 1


def _place_common_objects(objects: _Objects, rng: np.random.Generator, cfg: SynthConfig, st: Street) -> None:
    """Cars, trucks and buses in the lanes or at the curb, and rows of street trees."""
    add, road_l, road_r, n_lanes, lanes_x = objects.add, st.road_l, st.road_r, st.n_lanes, st.lanes_x
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


def _place_rare_objects(objects: _Objects, rng: np.random.Generator, cfg: SynthConfig, st: Street) -> None:
    """In a share ``cfg.rare_image_prob`` of frames, one or more rare objects, classes by ``cfg.rare_weights``."""
    add, road_l, road_r, n_lanes, lanes_x = objects.add, st.road_l, st.road_r, st.n_lanes, st.lanes_x
    n_rare = 0
    if rng.random() < cfg.rare_image_prob:
        n_rare = 1 + rng.poisson(cfg.rare_extra_mean)
    names = list(cfg.rare_weights)
    weights = np.array([cfg.rare_weights[n] for n in names], np.float64)
    weights /= weights.sum()

    def on_sidewalk() -> float:
        if rng.random() < 0.5:
            return road_l - rng.uniform(0.3, max(st.sw_l, 1.0))
        return road_r + rng.uniform(0.3, max(st.sw_r, 1.0))

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


# ----------------------------------------------------------------------------------------------------
# Drawing the scene
# ----------------------------------------------------------------------------------------------------

def _draw_sky(cv: Canvas, cam: Camera, time_of_day: str, weather: str) -> None:
    """Sky: a vertical gradient down to the horizon (greyed by cloud), over the whole frame."""
    top, low = SKY_TOP[time_of_day].copy(), SKY_LOW[time_of_day].copy()
    if weather in ("overcast", "rain", "fog"):
        grey = rgb(0.62, 0.64, 0.67) if time_of_day == "day" else rgb(0.2, 0.2, 0.22)
        top, low = 0.3 * top + 0.7 * grey, 0.2 * low + 0.8 * grey
    t = np.clip(np.arange(cv.h, dtype=np.float32) / max(cam.horizon, 1.0), 0, 1)[:, None]
    cv.img[:] = ((1 - t) * top + t * low)[:, None, :]
    cv.lab[:] = SKY


def _draw_skyline(cv: Canvas, rng: np.random.Generator, hz: int) -> None:
    """A distant skyline of buildings and tree crowns just above the horizon row ``hz``."""
    H, W = cv.h, cv.w
    x = 0.0
    while x < W:
        wd = W * rng.uniform(0.03, 0.1)
        if rng.random() < 0.6:
            cv.rect(x, hz - H * rng.uniform(0.02, 0.12), x + wd, hz + 1, BUILDING, rgb(*rng.uniform(0.35, 0.55, 3)))
        else:
            r = wd * 0.6
            cv.ellipse(x + wd / 2, hz, r, H * rng.uniform(0.02, 0.06), VEG, rgb(0.22, 0.32, 0.18) * rng.uniform(0.8, 1.2))
        x += wd


def _ground_quad(cam: Camera, xl: float, xr: float, z0: float = 0.5, z1: float = Z_FAR) -> np.ndarray:
    """float32 [4, 2] pixel corners of the ground strip xl <= x <= xr, z0 <= z <= z1."""
    u, v = cam.project(np.array([xl, xr, xr, xl]), 0.0, np.array([z0, z0, z1, z1]))
    return np.stack([u, v], axis=1).astype(np.float32)


def _draw_ground(cv: Canvas, cam: Camera, rng: np.random.Generator, st: Street) -> None:
    """Terrain, then sidewalks and road as polygons between lines through the vanishing point, then marks."""
    hz = int(cam.horizon)
    cv.rect(0, hz + 1, cv.w, cv.h, TERRAIN, rgb(0.42, 0.45, 0.25) * rng.uniform(0.8, 1.15))
    walk = rgb(0.62, 0.6, 0.58) * rng.uniform(0.85, 1.1)
    if st.sw_l > 0:
        cv.polygon(_ground_quad(cam, st.road_l - st.sw_l, st.road_l), SIDEWALK, walk)
    if st.sw_r > 0:
        cv.polygon(_ground_quad(cam, st.road_r, st.road_r + st.sw_r), SIDEWALK, walk)
    asphalt = rgb(0.33, 0.33, 0.35) * rng.uniform(0.75, 1.15)
    cv.polygon(_ground_quad(cam, st.road_l, st.road_r), ROAD, asphalt)
    _draw_road_marks(cv, cam, rng, st)


def _draw_road_marks(cv: Canvas, cam: Camera, rng: np.random.Generator, st: Street) -> None:
    """Lane marks: dashed lines in world coordinates, rasterised per row (still label road, as in BDD);
    solid edge lines; sometimes a zebra crossing."""
    road_l, road_r = st.road_l, st.road_r
    rows = np.arange(int(cam.horizon) + 2, cv.h, dtype=np.float32) + 0.5
    zr = cam.ground_z(rows)
    dash_phase = rng.uniform(0, 9)
    for k in range(1, st.n_lanes):
        xm = road_l + k * st.lane_w
        dashed = ((zr + dash_phase) % 9.0) < 3.0
        _ground_stripe(cv, cam, rows, zr, xm, 0.12, dashed, rgb(0.9, 0.9, 0.88))
    for edge in (road_l + 0.25, road_r - 0.25):
        _ground_stripe(cv, cam, rows, zr, edge, 0.12, np.ones_like(zr, bool), rgb(0.85, 0.85, 0.8))
    if rng.random() < 0.15:  # zebra crossing
        zc = rng.uniform(8, 30)
        for k in range(int((road_r - road_l) / 1.0)):
            xa = road_l + 0.3 + k * 1.0
            quad = cam.project(np.array([xa, xa + 0.5, xa + 0.5, xa]), 0.0, np.array([zc, zc, zc + 3, zc + 3]))
            cv.polygon(np.stack(quad, axis=1).astype(np.float32), ROAD, rgb(0.88, 0.88, 0.86))


def _draw_objects(cv: Canvas, cam: Camera, objects: list[tuple[float, float, list[Part], bool, list]],
                  time_of_day: str) -> None:
    """Draw the objects far to near; queue their lights (and vehicles' tail lights at night) for grading."""
    objects.sort(key=lambda o: -o[0])
    for z, x, parts, mirror, lights in objects:
        draw_sprite(cv, cam, x, z, parts, mirror)
        s = cam.f / z
        u0, v0 = cam.project(x, 0.0, z)
        for lx, ly, lr, color in lights:
            cv.lights.append((u0 + (-s if mirror else s) * lx, v0 - s * ly, s * lr, color))
        if time_of_day == "night" and parts and parts[0][-2] in (CAR, TRUCK, BUS) and parts[0][0] == "rect":
            # Tail lights of vehicles seen from behind glow at night.
            for px in (-0.7, 0.7):
                cv.lights.append((u0 + s * px, v0 - s * 0.74, s * 0.35, rgb(1.0, 0.15, 0.1)))


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
    cv.paint((x0, y0, x1, y0 + len(rows)), mask, ROAD, color)


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
        base = {"building": rgb(*rng.uniform(0.35, 0.75, 3)) * rgb(1.0, 0.95, 0.9),
                "wall": rgb(0.6, 0.58, 0.55), "fence": rgb(0.45, 0.4, 0.35), "hedge": rgb(0.2, 0.35, 0.15)}[kind]
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
    win = cv.window(quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max() + 1, quad[:, 1].max() + 1)
    if win is None:
        return
    x0, y0, x1, y1 = win
    period_y = max(abs(quad[0, 1] - quad[3, 1]) / max(rng.integers(2, 9), 1), 4.0)
    period_x = max(period_y * rng.uniform(0.6, 1.2), 3.0)
    yy = (np.arange(y0, y1) - y0) % period_y < period_y * 0.55
    xx = (np.arange(x0, x1) - x0) % period_x < period_x * 0.5
    mask = yy[:, None] & xx[None, :] & (cv.lab[y0:y1, x0:x1] == BUILDING)
    cv.paint(win, mask, None, np.clip(wall * 0.45 + rgb(0.05, 0.07, 0.1), 0, 1))


def _slats(cv: Canvas, quad: np.ndarray, rng: np.random.Generator, color: np.ndarray) -> None:
    win = cv.window(quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max() + 1, quad[:, 1].max() + 1)
    if win is None:
        return
    x0, y0, x1, y1 = win
    period = rng.uniform(3, 8)
    gaps = ((np.arange(x0, x1) - x0) % period) < period * 0.35
    mask = gaps[None, :] & (cv.lab[y0:y1, x0:x1] == FENCE)
    cv.paint(win, mask, None, color * 0.55)
