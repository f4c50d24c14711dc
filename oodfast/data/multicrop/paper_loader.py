"""``--aug paper``: the paper's multi-crop, PIL + torchvision in DataLoader workers.

This is facebookresearch/dino's ``DataAugmentationDINO`` as the paper's code (OOD_Enhanced_Dino_Vision,
``code/main_dino.py``) runs it: per view ``RandomResizedCrop`` (bicubic) -> ``RandomHorizontalFlip``
-> ``RandomApply([ColorJitter], p)`` -> ``RandomGrayscale`` -> DINO's ``GaussianBlur`` (PIL,
``random.random() <= p``, radius ~ U(0.1, 2.0)) -> DINO's ``Solarization`` (``random.random() < p``)
-> ``ToTensor`` -> ``Normalize``, on PIL images in DataLoader worker processes. Randomness comes
from torch's and Python's generators as the DataLoader seeds them per worker, exactly as in the
paper's code. It is kept deliberately unoptimised: it is the parity oracle and the benchmark baseline.

Two changes, both behaviour-preserving: every setting comes from :class:`MultiCropConfig` (the paper's
code hard-codes them), and the crop is drawn with ``RandomResizedCrop.get_params`` followed by
``F.resized_crop`` (what ``RandomResizedCrop.forward`` does) so the global boxes can be returned.

Not reproduced from the paper's code: its own ``main_dino.py`` edits DINO's crops to
``RandomResizedCrop((512, 1024), ratio=(1.5, 2.5))`` globals and ``(224, 448)`` locals; that is
``MultiCropConfig(global_size=(512, 1024), local_size=(224, 448), ratio=(1.5, 2.5))`` here. The
BDD10K class's nested, ``random.seed(42)``-placed crops are not reproduced (see
:meth:`MultiCropConfig.bdd10k`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from oodfast.data.imageio import ImageFileError, load_rgb8
from oodfast.data.multicrop.config import MultiCropConfig, ViewAug
from oodfast.data.multicrop.files import CHECK_HINT, MultiCropDataError
from oodfast.data.multicrop.plan import MultiCropBatch, epoch_plan, steps_per_epoch


class PILGaussianBlur:
    """DINO's ``utils.GaussianBlur``: with probability p (``random.random() <= p``), PIL blur."""

    def __init__(self, p: float, radius_min: float, radius_max: float) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))
        return img


class PILSolarization:
    """DINO's ``utils.Solarization``: with probability p (``random.random() < p``), PIL solarize."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class BoxedRandomResizedCrop(transforms.RandomResizedCrop):
    """``RandomResizedCrop`` that also reports its box (x0, y0, x1, y1); same draws, same output."""

    def __call__(self, img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:  # type: ignore[override]
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return F.resized_crop(img, i, j, h, w, self.size, self.interpolation, antialias=True), (j, i, j + w, i + h)


class DataAugmentationDINO:
    """The paper's per-image multi-crop on a PIL image -> (list of [3, H, W] float32, [2, 4] boxes);
    with ``clean_view`` the list ends with the whole image resized to the global size (bicubic), with no
    flip or photometric op (what the other backends' clean view is)."""

    def __init__(self, config: MultiCropConfig, clean_view: bool = False) -> None:
        self.config, self.clean_view = config, clean_view
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(config.mean, config.std)])
        self.normalize = normalize
        self.views = []
        for _, aug, size, scale in config.view_kinds():
            crop = BoxedRandomResizedCrop(size, scale=scale, ratio=config.ratio,
                                          interpolation=InterpolationMode.BICUBIC)
            self.views.append((crop, self._photometric(aug, normalize)))

    @staticmethod
    def _photometric(aug: ViewAug, normalize: Any) -> transforms.Compose:
        # Same order and classes as the paper's flip_and_color_jitter + GaussianBlur (+ Solarization).
        steps: list[Any] = [
            transforms.RandomHorizontalFlip(p=aug.flip_p),
            transforms.RandomApply([transforms.ColorJitter(brightness=aug.brightness, contrast=aug.contrast,
                                                           saturation=aug.saturation, hue=aug.hue)], p=aug.jitter_p),
            transforms.RandomGrayscale(p=aug.grayscale_p),
            PILGaussianBlur(aug.blur_p, *aug.blur_sigma),
        ]
        if aug.solarize_p > 0:
            steps.append(PILSolarization(aug.solarize_p))
        steps.append(normalize)
        return transforms.Compose(steps)

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        crops, boxes = [], []
        for crop, photometric in self.views:
            img, box = crop(image)
            crops.append(photometric(img))
            boxes.append(box)
        if self.clean_view:
            size = list(self.config.view_kinds()[0][2])
            crops.append(self.normalize(F.resize(image, size, InterpolationMode.BICUBIC, antialias=True)))
        return crops, torch.tensor(boxes[: self.config.n_global], dtype=torch.int64)


class _Images(Dataset):
    def __init__(self, files: Sequence[Path], transform: DataAugmentationDINO) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, torch.Tensor]:
        path = self.files[i]
        try:
            # The paper's Image.open(path).convert("RGB"), except that 16-bit and float images are
            # scaled to 8 bits (convert clips them to white) and the pixel limit applies.
            image = load_rgb8(path)
        except ImageFileError as e:
            raise MultiCropDataError(f"{e}; {CHECK_HINT}") from None
        try:
            views, boxes = self.transform(image)
        except Exception as e:  # noqa: BLE001 - name the file; in a worker, the type is all that travels
            raise MultiCropDataError(f"the paper's augmentation failed on {path}: {type(e).__name__}: "
                                     f"{e}") from None
        return views, i, boxes


def _worker_error(error: BaseException) -> MultiCropDataError:
    """The original one-line message of a :class:`MultiCropDataError` re-raised from a DataLoader worker.

    torch re-raises a worker's exception as ``type(msg)`` with ``msg`` = "Caught ... in DataLoader
    worker process N" plus the worker's whole traceback, whose last line is the original
    ``...MultiCropDataError: <message>``.
    """
    text = str(error)
    marker = "MultiCropDataError: "
    at = text.rfind(marker)
    return MultiCropDataError(text[at + len(marker):].rstrip() if at >= 0 and "DataLoader worker" in text else text)


class _PlanSampler(Sampler[list[int]]):
    def __init__(self, loader: PaperMultiCropLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[int]]:
        ld = self.loader
        plan = epoch_plan(len(ld.files), ld.batch_size, seed=ld.seed, epoch=ld.epoch, shard_id=ld.shard_id,
                          num_shards=ld.num_shards, epoch_length=ld.epoch_length)
        return iter(plan.tolist())


class PaperMultiCropLoader:
    """The paper's loader: a DataLoader over PIL images with :class:`DataAugmentationDINO` in workers.

    Same epoch plan as the DALI backend (so ``index`` matches batch for batch); the augmentation's
    randomness is torch's and Python's, seeded by the DataLoader per worker from ``(seed, epoch)``.
    """

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, *,
                 device: torch.device, seed: int, shard_id: int, num_shards: int,
                 epoch_length: int | None, num_workers: int | None = None, clean_view: bool = False) -> None:
        self.files, self.config, self.batch_size = list(files), config, batch_size
        self.device, self.seed = device, seed
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.num_workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
        self.dtype = config.torch_dtype(device)
        self.epoch = 0
        self.clean_view = clean_view
        self.dataset = _Images(self.files, DataAugmentationDINO(config, clean_view))

    def __len__(self) -> int:
        return steps_per_epoch(len(self.files), self.batch_size, self.num_shards, self.epoch_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[MultiCropBatch]:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.shard_id])
                                                .generate_state(1)[0]))
        if self.num_workers == 0:  # in-process: seed the generators the workers would have seeded
            base = int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())
            torch.manual_seed(base)
            random.seed(base)
        loader = DataLoader(self.dataset, batch_sampler=_PlanSampler(self), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=gen,
                            persistent_workers=False)
        batches = iter(loader)
        while True:
            try:
                views, index, boxes = next(batches)
            except StopIteration:
                break
            except MultiCropDataError as e:  # from a worker: its message, not the worker's traceback
                raise _worker_error(e) from None
            yield MultiCropBatch(
                views=[v.to(self.device, self.dtype, non_blocking=True) for v in views],
                index=index.to(torch.int64), boxes=boxes, has_clean=self.clean_view)
        self.epoch += 1
