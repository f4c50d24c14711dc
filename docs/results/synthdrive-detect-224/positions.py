"""Why an image-level max over positions stays at chance: position-level vs image-level AUROC.

    python docs/results/synthdrive-detect-224/positions.py ENCODER [ARCH] [LAYERS]
    (ENCODER: an oodfast/DINO checkpoint or 'random'; ARCH resnet18; LAYERS layer2,layer3,layer4)

Fixed 224 px crops of synthdrive's cached default (the paper's BDD10K augmentation: area 0.3-1, ratio
3/4-4/3, no photometric op): 1024 calibration crops (one per train image) and 600 evaluation crops (two
per val image), made once and cached next to the dataset. For each layer: the dense euclidean score (distance
of each position to the calibration positions' mean) and the 1-NN cosine distance to 20,000 calibration
positions drawn at random. Two AUROCs each: per position (is a position that holds a rare-class pixel
scored above one that does not?) and per crop (the max over positions, the dense detectors' image score).
Ground truth as `oodfast evaluate detect`: a crop is rare when rare classes cover >= 0.1% of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from oodfast.data.classes import RARE_CLASS_IDS
from oodfast.data.discover import discover
from oodfast.encoders import build_backbone, feature_map, load_encoder

SIZE, TAU, BANK = 224, 0.001, 20_000
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def boxes(rng: np.random.Generator, width: int, height: int, n: int) -> list[tuple[int, int, int, int]]:
    """torchvision's RandomResizedCrop boxes, scale (0.3, 1), ratio (3/4, 4/3); centred square fallback."""
    out = []
    for _ in range(n):
        for _ in range(10):
            area = width * height * rng.uniform(0.3, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if w <= width and h <= height:
                x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                break
        else:
            w = h = min(width, height)
            x0, y0 = (width - w) // 2, (height - h) // 2
        out.append((x0, y0, x0 + w, y0 + h))
    return out


def crops(files, n_images: int, per_image: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(files))[:n_images])
    xs, ms = [], []
    for i in pick:
        image = Image.open(files.images[i]).convert("RGB")
        mask = Image.open(files.masks[i])
        for box in boxes(rng, image.width, image.height, per_image):
            xs.append(np.asarray(image.crop(box).resize((SIZE, SIZE), Image.BILINEAR)))
            ms.append(np.asarray(mask.crop(box).resize((SIZE, SIZE), Image.NEAREST)))
    return {"x": torch.from_numpy(np.stack(xs)), "m": torch.from_numpy(np.stack(ms))}


def cached_crops() -> dict[str, dict[str, torch.Tensor]]:
    train, val = discover("synthetic", None, "train"), discover("synthetic", None, "val")
    path = Path(train.root) / "positions-crops224.pt"
    if not path.exists():
        torch.save({"calib": crops(train, 1024, 1, 0), "val": crops(val, 300, 2, 1)}, path)
    return torch.load(path)


@torch.no_grad()
def maps(encoder, x: torch.Tensor, layer: str) -> torch.Tensor:
    """[N, D, h, w] maps of uint8 crops [N, H, W, 3], in batches of 64."""
    out = []
    for i in range(0, len(x), 64):
        t = ((x[i:i + 64].permute(0, 3, 1, 2).float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        out.append(feature_map(encoder, t, layer))
    return torch.cat(out)


def main(source: str, arch: str = "resnet18", layers: str = "layer2,layer3,layer4") -> None:
    torch.manual_seed(0)
    encoder = build_backbone(arch)[0].eval() if source == "random" else load_encoder(source, arch, "cpu")
    data = cached_crops()
    rare_px = torch.isin(data["val"]["m"], torch.tensor(RARE_CLASS_IDS, dtype=torch.uint8))
    y = (rare_px.float().mean((1, 2)) >= TAU).numpy()
    print(f"encoder {source} ({arch}); {len(y)} val crops, prevalence {y.mean():.3f}")
    print("| layer | positions | dense euclidean: per position | per crop (max) | 1-NN: per position | per crop (max) |")
    print("|---|---:|---:|---:|---:|---:|")
    for layer in layers.split(","):
        calib, val = maps(encoder, data["calib"]["x"], layer), maps(encoder, data["val"]["x"], layer)
        n, d, h, w = val.shape
        cp = calib.permute(0, 2, 3, 1).reshape(-1, d)
        vp = val.permute(0, 2, 3, 1).reshape(n, h * w, d)
        # a position is rare when any rare-class pixel falls in its cell
        pos = F.adaptive_max_pool2d(rare_px.float().unsqueeze(1), (h, w)).flatten(1).numpy().ravel() > 0
        euclid = (vp - cp.mean(0)).norm(dim=2)
        bank = F.normalize(cp[torch.randperm(len(cp), generator=torch.Generator().manual_seed(0))[:BANK]], dim=1)
        vn = F.normalize(vp, dim=2)
        sims = torch.cat([(vn[i:i + 16].reshape(-1, d) @ bank.T).amax(1) for i in range(0, n, 16)])
        nn1 = (2 - 2 * sims).clamp_min(0).sqrt().view(n, h * w)
        cells = [roc_auc_score(pos, euclid.numpy().ravel()), roc_auc_score(y, euclid.amax(1).numpy()),
                 roc_auc_score(pos, nn1.numpy().ravel()), roc_auc_score(y, nn1.amax(1).numpy())]
        print(f"| {layer} | {h}x{w} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
