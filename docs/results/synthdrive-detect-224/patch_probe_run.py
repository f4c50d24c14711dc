"""Is each rare class linearly readable where it is? The per-patch probe on synthdrive 224 px crops.

    python docs/results/synthdrive-detect-224/patch_probe_run.py [ENCODER] [LAYERS] [FRAMES]
    (ENCODER: an oodfast/DINO checkpoint or 'random' (default); LAYERS layer3,layer2; FRAMES 2400, the cached default)

A synthdrive of FRAMES frames at 640x360 (its own train / val split), 224 px crops as positions.py makes
them (the paper's BDD10K augmentation): one per train frame (at most 400) to fit, two per val frame to
score. For each layer, oodfast.evaluate.patch_probe: one balanced logistic regression per rare class
on the resnet18 map's positions (30,000 train positions at most, every rare position kept), with AUROC,
AP, recall and precision per class over every val position.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import positions as P  # noqa: E402 - this folder's crops and maps

from oodfast.data.classes import RARE_CLASS_IDS  # noqa: E402
from oodfast.data.discover import discover  # noqa: E402
from oodfast.encoders import build_backbone, load_encoder  # noqa: E402
from oodfast.evaluate.patch_probe import patch_probe, patch_probe_markdown  # noqa: E402


def main(source: str = "random", layers: str = "layer3,layer2", frames: str = "2400") -> None:
    t0 = time.time()
    spec = dict(num_images=int(frames), seed=0, width=640, height=360)
    train, val = discover("synthetic", None, "train", synthetic=spec), discover("synthetic", None, "val", synthetic=spec)
    calib, test = P.crops(train, min(400, len(train.images)), 1, 0), P.crops(val, len(val.images), 2, 1)
    torch.manual_seed(0)
    encoder = build_backbone("resnet18")[0].eval() if source == "random" else load_encoder(source, "resnet18", "cpu")
    print(f"encoder {source} (resnet18); {len(calib['x'])} train crops, {len(test['x'])} val crops "
          f"of a {frames}-frame synthdrive at 640x360")
    for layer in layers.split(","):
        fit, score = P.maps(encoder, calib["x"], layer), P.maps(encoder, test["x"], layer)
        out = patch_probe(fit, calib["m"], score, test["m"], RARE_CLASS_IDS, max_train_positions=30_000)
        print(f"\n## {layer} ({time.time() - t0:.0f} s)\n\n" + patch_probe_markdown(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
