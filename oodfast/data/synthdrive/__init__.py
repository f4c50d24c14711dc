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
Layout (each module imports only those above it):

    config    SynthConfig, GENERATOR_VERSION, the label IDs drawn
    canvas    Canvas (image + label map), Camera (pinhole over flat ground), sprites drawn in perspective
    sprites   palettes and one function per kind of object (cars ... trains, trees)
    grading   exposure, tint, fog, light glows, sensor noise -> uint8
    scene     render_frame: sample the street and its objects, draw them far to near, grade
    dataset   generate (frames -> files, the manifest), ensure_synthdrive (the cached default), reports
"""

from __future__ import annotations

from oodfast.data.synthdrive.config import GENERATOR_VERSION, SynthConfig
from oodfast.data.synthdrive.dataset import (
    DEFAULT_SPEC,
    FRAMES_NAME,
    MANIFEST_NAME,
    _write_frame,
    ensure_synthdrive,
    frame_name,
    generate,
    manifest_markdown,
    split_of,
)
from oodfast.data.synthdrive.scene import render_frame

__all__ = [
    "DEFAULT_SPEC",
    "FRAMES_NAME",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SynthConfig",
    "_write_frame",
    "ensure_synthdrive",
    "frame_name",
    "generate",
    "manifest_markdown",
    "render_frame",
    "split_of",
]
