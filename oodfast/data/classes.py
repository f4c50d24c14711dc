"""The 19 BDD100K / BDD10K semantic-segmentation train IDs (the Cityscapes set) and the rare classes.

BDD10K masks (``labels/sem_seg/masks/{train,val}/NAME.png``) are one-channel 8-bit PNGs whose pixel
values are these train IDs, with 255 for pixels that belong to no class (ignored in evaluation).
"""

from __future__ import annotations

IGNORE_ID: int = 255

#: Train ID -> class name, in BDD's order (identical to Cityscapes' 19 evaluation classes).
CLASS_NAMES: tuple[str, ...] = (
    "road",           # 0
    "sidewalk",       # 1
    "building",       # 2
    "wall",           # 3
    "fence",          # 4
    "pole",           # 5
    "traffic light",  # 6
    "traffic sign",   # 7
    "vegetation",     # 8
    "terrain",        # 9
    "sky",            # 10
    "person",         # 11
    "rider",          # 12
    "car",            # 13
    "truck",          # 14
    "bus",            # 15
    "train",          # 16
    "motorcycle",     # 17
    "bicycle",        # 18
)
NUM_CLASSES: int = len(CLASS_NAMES)
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

#: The classes the project treats as rare by default: the small road users and street furniture that
#: long-tailed driving data under-represents (the paper's "pedestrians, traffic signs").
RARE_CLASS_NAMES: tuple[str, ...] = (
    "person", "rider", "bicycle", "motorcycle", "traffic sign", "traffic light", "pole", "train",
)
RARE_CLASS_IDS: tuple[int, ...] = tuple(sorted(CLASS_IDS[n] for n in RARE_CLASS_NAMES))

#: Cityscapes' palette, for visualising masks.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def class_ids(names: str | list[str] | tuple[str, ...]) -> tuple[int, ...]:
    """Train IDs for class names given as a list or a comma-separated string.

    Raises:
        ValueError: a name is not one of the 19 BDD classes (the message lists the valid names).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLASS_IDS]
    if unknown:
        raise ValueError(
            f"unknown class name(s) {unknown}; valid BDD classes are: {', '.join(CLASS_NAMES)}"
        )
    return tuple(sorted({CLASS_IDS[n] for n in names}))
