"""``--aug torch``: torchvision.io decode (on the GPU when there is one) plus batched tensor ops.

For users without DALI (DALI ships Linux wheels only). The random decisions are the DALI backend's
(:func:`oodfast.data.multicrop.plan.sample_view_params`: same seed, same boxes and coin flips); the ops
follow torchvision's tensor semantics:

- crop: ``torchvision.transforms.v2.functional.resized_crop`` (bicubic, antialias) per image, since
  every image has its own box; everything after it runs on the whole [B, 3, H, W] view at once,
  with per-image factors broadcast and ``torch.where`` for the coin flips.
- jitter: brightness, contrast (blend with the grayscale mean), saturation, hue (an HSV shift, as
  torchvision), each clamped to [0, 1] like torchvision, in the fixed order B, C, S, H
  (torchvision draws a random order per image; the ops commute except through that clamping).
- grayscale: ITU-R 601 luma in 3 channels; blur: a separable Gaussian with per-image sigma
  (window 2 * ceil(3 * max sigma) + 1, reflect padding), where DINO uses PIL's box approximation;
  solarize: invert values >= 128/255.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as tnf
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from oodfast.data.imageio import ImageFileError, open_image, to_rgb8, uint16_to_uint8
from oodfast.data.multicrop.config import MultiCropConfig
from oodfast.data.multicrop.files import CHECK_HINT, MultiCropDataError, image_size, read_file_bytes
from oodfast.data.multicrop.plan import PARAM_INDEX as _P
from oodfast.data.multicrop.plan import (
    REPLAY_LAG,
    MultiCropBatch,
    ReplayIds,
    batch_params,
    boxes_from_params,
    buffered_ids,
    epoch_plan,
    params_dict,
    steps_per_epoch,
)

_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    return (x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2])


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's tensor ``adjust_hue`` with a per-image shift ``hue`` [B] (fraction of the circle)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    cr_div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + hue[:, None, None], 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, -1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    return torch.stack([(mask * a).sum(1) for a in (a1, a2, a3)], 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with per-image ``sigma`` [B], reflect padding."""
    B, C, H, W = x.shape
    radius = int(math.ceil(3.0 * sigma_max))
    radius = min(radius, H - 1, W - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, K]
    y = x.reshape(1, B * C, H, W)
    y = tnf.conv2d(tnf.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=B * C)
    y = tnf.conv2d(tnf.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def augment_view(images: Sequence[torch.Tensor], p: torch.Tensor, size: tuple[int, int],
                 config: MultiCropConfig, sigma_max: float, p_host: np.ndarray | None = None) -> torch.Tensor:
    """One view of a batch.

    Args:
        images: B decoded uint8 [3, H_i, W_i] images on the device.
        p: float32 [B, len(PARAM_FIELDS)] decisions of this view, on the device.
        size: output (height, width).
        p_host: the same decisions on the host (numpy); the crop boxes and the "any blur" shortcut
            are read from it, so a CUDA batch never waits on the device (default: ``p`` copied back).

    Returns:
        [B, 3, height, width] float32, normalised.
    """
    host = p.cpu().numpy() if p_host is None else p_host
    boxes = host[:, [_P["y0"], _P["x0"], _P["y1"], _P["x1"]]].astype(np.int64).tolist()
    x = torch.stack([
        F.resized_crop(img, y0, x0, y1 - y0, x1 - x0, list(size), InterpolationMode.BICUBIC, antialias=True)
        for img, (y0, x0, y1, x1) in zip(images, boxes)
    ]).float().div_(255.0)

    def where(flag: str, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(p[:, _P[flag], None, None, None] > 0.5, new, old)

    col = lambda name: p[:, _P[name], None, None, None]  # noqa: E731 - per-image factor, broadcast
    x = where("flip", x.flip(-1), x)
    jit = (x * col("brightness")).clamp_(0, 1)
    m = _gray(jit).mean((1, 2, 3), keepdim=True)
    jit = (col("contrast") * jit + (1 - col("contrast")) * m).clamp_(0, 1)
    # saturation column is 0 for grayscale images; use the jitter's own factor here (1 when not jittered)
    sat = torch.where(p[:, _P["gray"]] > 0.5, torch.ones_like(p[:, 0]), p[:, _P["saturation"]])[:, None, None, None]
    g = _gray(jit)
    jit = (sat * jit + (1 - sat) * g).clamp_(0, 1)
    jit = _adjust_hue(jit, p[:, _P["hue_deg"]] / 360.0)
    x = where("jitter", jit, x)
    x = where("gray", _gray(x).expand_as(x), x)
    if (host[:, _P["blur"]] > 0.5).any():
        x = where("blur", _gaussian_blur(x, p[:, _P["sigma"]], sigma_max), x)
    x = where("solarize", torch.where(x >= 128 / 255, 1.0 - x, x), x)
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clean_view(images: Sequence[torch.Tensor], size: tuple[int, int], config: MultiCropConfig) -> torch.Tensor:
    """The clean view of B decoded uint8 images: each whole image resized to ``size`` (bicubic,
    antialias), no flip, no photometric op, normalised: [B, 3, height, width] float32."""
    x = torch.stack([F.resize(img, list(size), InterpolationMode.BICUBIC, antialias=True) for img in images])
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def _decode_one(data: torch.Tensor, path: Path) -> torch.Tensor:
    """One encoded image -> uint8 [3, H, W] on the CPU, with DALI's values for every mode.

    torchvision decodes JPEG, PNG and WebP; it returns 16-bit PNGs as uint16, scaled here as DALI
    scales them. Formats it cannot read (BMP, TIFF, which DALI and ``data check`` accept) and the
    float and palette modes go through PIL with :func:`oodfast.data.imageio.to_rgb8`.
    """
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        image = None
    if image is not None and image.dtype == torch.uint16:
        return uint16_to_uint8(image)
    if image is not None and image.dtype == torch.uint8:
        return image
    try:
        rgb = to_rgb8(open_image(data.numpy(), path), path)
    except ImageFileError as e:
        raise MultiCropDataError(f"{e}; {CHECK_HINT}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class TorchMultiCropLoader:
    """Multi-crop with torchvision.io decode and batched tensor ops (see the module doc).

    Batches are made when asked for, on the consumer's thread (no prefetch): with ``replay_ids`` the
    buffered ids of batch g are those published after step ``g - REPLAY_LAG`` (:attr:`replay_lag`).
    """

    replay_lag = REPLAY_LAG

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, *,
                 device: torch.device, seed: int, shard_id: int, num_shards: int,
                 epoch_length: int | None, debug: bool = False, clean_view: bool = False,
                 replay_ids: ReplayIds | None = None) -> None:
        self.files, self.config, self.batch_size = list(files), config, batch_size
        self.device, self.seed, self.debug = device, seed, debug
        self.clean_view, self.replay_ids = clean_view, replay_ids
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.dtype = config.torch_dtype(device)
        self.epoch = 0

    def __len__(self) -> int:
        return steps_per_epoch(len(self.files), self.batch_size, self.num_shards, self.epoch_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, idx: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray]:
        raw, hw = [], np.empty((len(idx), 2), np.int64)
        for k, i in enumerate(idx):
            path = self.files[i]
            data = read_file_bytes(path)
            hw[k] = image_size(path, data)  # also refuses oversized images and modes with no 8-bit RGB
            raw.append(torch.from_numpy(data))
        if self.device.type == "cuda" and all(bytes(r[:2].tolist()) == b"\xff\xd8" for r in raw):
            try:
                return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device), hw
            except RuntimeError:
                pass  # find the file, or decode the odd one (e.g. CMYK) on the CPU, below
        return [_decode_one(r, self.files[i]).to(self.device) for r, i in zip(raw, idx)], hw

    def __iter__(self) -> Iterator[MultiCropBatch]:
        epoch = self.epoch
        plan = epoch_plan(len(self.files), self.batch_size, seed=self.seed, epoch=epoch, shard_id=self.shard_id,
                          num_shards=self.num_shards, epoch_length=self.epoch_length)
        sigma_max = max(a.blur_sigma[1] for a in (self.config.global1, self.config.global2, self.config.local))
        for step, new in enumerate(plan):
            idx = new
            if self.replay_ids is not None:
                idx = np.concatenate([new, buffered_ids(self.replay_ids, epoch * len(plan) + step, self.replay_lag,
                                                        new)])
            images, hw = self._decode(idx)
            params = batch_params(self.seed, epoch, self.shard_id, step, hw[:, 0], hw[:, 1], self.config, len(new))
            p_dev = torch.from_numpy(params).to(self.device)
            kinds = self.config.view_kinds()
            views = [augment_view(images, p_dev[:, v], size, self.config, sigma_max, params[:, v]).to(self.dtype)
                     for v, (_, _, size, _) in enumerate(kinds)]
            if self.clean_view:
                views.append(clean_view(images, kinds[0][2], self.config).to(self.dtype))
            yield MultiCropBatch(views=views, index=torch.from_numpy(idx.copy()),
                                 boxes=torch.from_numpy(boxes_from_params(params[:, : self.config.n_global])),
                                 params=params_dict(params) if self.debug else None, has_clean=self.clean_view)
        self.epoch = epoch + 1
