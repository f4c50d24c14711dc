"""The DALI multi-crop pipeline: one decode per image, then per view a resized ROI and the photometric ops.

Each photometric step takes the uint8 HWC view ``x`` and its parameter vector ``p`` (float32
[len(PARAM_FIELDS)], CPU, drawn on the host by :func:`oodfast.data.multicrop.plan.sample_view_params`)
and applies its op behind the coin flip; DALI's conditionals (``enable_conditionals=True``) run
each branch on the samples that take it only. DALI is imported inside the functions, so this
module imports without it.
"""

from __future__ import annotations

from typing import Any

import torch

from oodfast.data.multicrop.config import MultiCropConfig
from oodfast.data.multicrop.plan import PARAM_INDEX as _P


def _brightness_contrast(x: Any, p: Any, gpu: bool) -> Any:
    """torchvision brightness (x * b) and contrast (c * x + (1 - c) * mean of the grayscale image).

    DALI's own contrast centres on 128 (half the uint8 range) by default, not on the image's mean,
    so the mean is computed here (rounded to an integer like PIL's ImageEnhance.Contrast) and both
    are fused into b * (mean + c * (x - mean)): contrast then brightness, and equally brightness then
    contrast, since the mean scales with b.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    if p[_P["jitter"]] > 0.5:
        ch = fn.reductions.mean(x, axes=[0, 1])
        m = dmath.floor(ch[0] * 0.299 + ch[1] * 0.587 + ch[2] * 0.114 + 0.5)
        b, c = p[_P["brightness"]], p[_P["contrast"]]
        if gpu:
            # On the GPU the mean is a GPU value, and argument inputs must live on the CPU: use
            # fused arithmetic instead (its operands must share the device).
            y = b.gpu() * (m + c.gpu() * (fn.cast(x, dtype=types.FLOAT) - m))
            x = fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)
        else:
            # brightness_contrast computes b * (center + c * (x - center)) in uint8, ~2x faster
            # on the CPU than the float arithmetic above.
            x = fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=m, dtype=types.UINT8)
    return x


def _saturation_hue_gray(x: Any, p: Any) -> Any:
    """Saturation, hue and grayscale in one linear op (DALI ``hsv``).

    DALI's hsv keeps the luma (0.299, 0.587, 0.114) and scales the chroma, which is exactly PIL's
    saturation blend with its "L" image; saturation 0 is PIL's ``convert("L")`` in 3 channels, so
    RandomGrayscale after the jitter is the jitter's hsv with saturation x 0 (hue then has no effect).
    Hue differs: torchvision (PIL) shifts H in HSV space by hue x 360 degrees; DALI rotates the
    chroma around the grey axis by that angle (a linear approximation of the HSV shift that keeps the
    luma where PIL keeps max(R, G, B)). DALI takes degrees where torchvision takes a fraction of the
    circle: the feeder converts. Order: torchvision applies the four jitter ops in a random order;
    here brightness and contrast come first, then saturation and hue. All four are linear maps that
    commute (contrast's mean scales with brightness; hsv keeps luma), so the order only matters
    through clipping to [0, 255] between steps.
    """
    from nvidia.dali import fn, types

    if p[_P["color"]] > 0.5:
        x = fn.hsv(x, saturation=p[_P["saturation"]], hue=p[_P["hue_deg"]], dtype=types.UINT8)
    return x


def _gaussian_blur(x: Any, p: Any) -> Any:
    """DINO's GaussianBlur: PIL ``ImageFilter.GaussianBlur(radius=sigma)``, sigma ~ U(0.1, 2.0).

    PIL approximates the Gaussian with three box blurs; DALI convolves with a sampled Gaussian of
    window 2 * ceil(3 sigma) + 1; both have standard deviation sigma.
    """
    from nvidia.dali import fn

    if p[_P["blur"]] > 0.5:
        x = fn.gaussian_blur(x, sigma=p[_P["sigma"]])
    return x


_SOLARIZE_KEYS = list(range(256))
_SOLARIZE_VALUES = [k if k < 128 else 255 - k for k in _SOLARIZE_KEYS]


def _solarize(x: Any, p: Any) -> Any:
    """PIL ``ImageOps.solarize(threshold=128)``: invert every value >= 128 (a uint8 lookup table)."""
    from nvidia.dali import fn, types

    if p[_P["solarize"]] > 0.5:
        x = fn.lookup_table(x, keys=_SOLARIZE_KEYS, values=_SOLARIZE_VALUES, dtype=types.UINT8)
    return x


def build_dali_pipeline(feeder: Any, config: MultiCropConfig, batch_size: int, *, device_id: int | None,
                        num_threads: int, out_dtype: torch.dtype, hw_decoder_load: float = 0.65,
                        prefetch_queue_depth: int = 2, debug: bool = False, clean: bool = False) -> Any:
    """The multi-crop DALI pipeline (built, not started).

    Outputs: index [B, 1] int64, boxes [B, 2, 4] int64, then one [B, 3, H, W] per view (CHW,
    normalised, :func:`pipeline_dtype`: float16 on GPU for a float16/bfloat16 ``out_dtype``, else
    float32), then with ``clean`` the clean view (the whole image resized to the global size, no flip,
    no photometric op), then with ``debug`` the per-view parameter vectors. ``device_id=None`` gives a
    CPU-only pipeline.

    The dynamic executor (``exec_dynamic=True``, DALI's default since 1.4x, asked for explicitly):
    every iteration's outputs own their memory (reference counted; ``release_outputs`` does not
    invalidate them), which is what lets :class:`_Prefetcher` run ahead while the consumer still
    holds earlier batches, and lets the loader hand out DLPack views without a copy.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    dali_dtype = types.FLOAT16 if pipeline_dtype(out_dtype, gpu) == torch.float16 else types.FLOAT
    mean = [255.0 * m for m in config.mean]
    std = [255.0 * s for s in config.std]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  enable_conditionals=True, prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True)
    def multicrop() -> tuple[Any, ...]:
        encoded, index, boxes, *params = fn.external_source(
            source=feeder, num_outputs=3 + config.n_views, batch=True)
        # adjust_orientation=False: boxes are in the stored pixel grid, like PIL's Image.open (the
        # paper's code) and like the BDD10K masks, which carry no EXIF orientation.
        if gpu:
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                      adjust_orientation=False, hw_decoder_load=hw_decoder_load)
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        views = []
        for v, (_, aug, size, _) in enumerate(config.view_kinds()):
            p = params[v]
            # RandomResizedCrop: the box is the resize's region of interest, in (y, x) tensor order
            # and pixel-edge coordinates (the ROI [y0, y1) x [x0, x1) of the integer box), so no
            # intermediate crop is copied. Cubic with antialiasing when shrinking, as PIL's BICUBIC
            # resize (DALI's cubic kernel and PIL's differ by at most a few levels on edges).
            x = fn.resize(image, roi_start=p[0:2], roi_end=p[2:4], roi_relative=False, size=list(size),
                          interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
            # The horizontal flip is done last, by crop_mirror_normalize: every op in between is
            # pixel-wise, uses a whole-image mean, or (blur) a symmetric kernel, so it commutes
            # with the mirror and the result equals torchvision's flip-first order.
            # Python-level ifs drop ops a view never uses; the DALI ifs inside are the coin flips.
            if aug.jitter_p > 0:
                x = _brightness_contrast(x, p, gpu)
            if aug.jitter_p > 0 or aug.grayscale_p > 0:
                x = _saturation_hue_gray(x, p)
            if aug.blur_p > 0:
                x = _gaussian_blur(x, p)
            if aug.solarize_p > 0:
                x = _solarize(x, p)
            views.append(fn.crop_mirror_normalize(
                x, mirror=fn.cast(p[_P["flip"]], dtype=types.INT32), mean=mean, std=std,
                dtype=dali_dtype, output_layout="CHW"))
        if clean:  # the seed's detector input: a plain resize of the whole image (as TF.resize(image, [G, G]))
            whole = fn.resize(image, size=list(config.view_kinds()[0][2]), interp_type=types.INTERP_CUBIC,
                              antialias=True, dtype=types.UINT8)
            views.append(fn.crop_mirror_normalize(whole, mean=mean, std=std, dtype=dali_dtype, output_layout="CHW"))
        return (index, boxes, *views, *(params if debug else []))

    return multicrop()


def pipeline_dtype(out_dtype: torch.dtype, gpu: bool) -> torch.dtype:
    """The dtype the DALI pipeline writes its views in: float16 on a GPU for a float16/bfloat16
    ``out_dtype`` (DALI has no bfloat16), else float32."""
    return torch.float16 if gpu and out_dtype in (torch.float16, torch.bfloat16) else torch.float32

