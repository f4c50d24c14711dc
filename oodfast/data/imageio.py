"""Opening images the way every loader must: the file named in each error, 8-bit RGB out, a pixel limit.

Every path that reads pixels (``data check``, ``--aug paper``, ``--aug torch``'s fallback for
formats torchvision cannot decode, the header parse of ``--aug dali`` / ``torch``) goes through
here, so they agree on what each PIL mode means in 8-bit RGB (the values DALI's decoder gives):

    mode                     8-bit RGB value                      DALI (checked, CPU decoder)
    RGB, L, 1, CMYK, YCbCr   PIL ``convert("RGB")``               the same
    RGBA, LA, PA, RGBX, ...  alpha dropped (not composited)       the same
    P (with transparency)    the palette colours                  the same
    I;16 (16-bit grey)       round(v * 255 / 65535)               the same (PIL's convert clips to 255)
    F (32-bit float)         round(clip(v, 0, 1) * 255); refused  [0, 1] -> [0, 255], clipped
                             by ``data check`` when v > 1 or < 0
    I (32-bit integer)       refused (no defined 8-bit scale)     fails to decode
    other (LAB, HSV, I;32)   refused

16-bit RGB(A) PNGs open in PIL as 8-bit RGB(A) (PIL keeps the high byte, ``v >> 8``), at most one
level from DALI's rounding; torchvision decodes them to uint16, which :func:`uint16_to_uint8`
scales as DALI does.

Pixel limit. An image over :func:`max_image_pixels` (default PIL's own decompression-bomb
threshold, 89.5 MP; set ``OODFAST_MAX_IMAGE_PIXELS`` to change it) is refused from its header,
before anything is decoded, with a one-line error giving its size, the limit and what decoding it
would cost; PIL's ``DecompressionBombWarning`` is not shown.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from oodfast.data.errors import DatasetError

__all__ = [
    "ImageFileError",
    "MAX_PIXELS_ENV",
    "bomb_reason",
    "check_pixel_limit",
    "float_problem",
    "load_rgb8",
    "max_image_pixels",
    "open_image",
    "strict_decoding",
    "too_large",
    "to_rgb8",
    "uint16_to_uint8",
    "unsupported_mode",
]

MAX_PIXELS_ENV = "OODFAST_MAX_IMAGE_PIXELS"
#: PIL's decompression-bomb warning threshold (``Image.MAX_IMAGE_PIXELS`` as PIL ships it).
DEFAULT_MAX_PIXELS = 89_478_485

#: Modes whose 8-bit RGB is PIL's ``convert("RGB")`` (alpha, where there is one, dropped).
_CONVERTIBLE = frozenset({"1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_UINT16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_CONVERT_HINT = "convert it to 8-bit RGB (e.g. PIL: Image.open(p).convert('RGB').save(q)) or leave it out"


class ImageFileError(DatasetError):
    """An image that cannot be read, decoded or converted; the message names the file."""


def max_image_pixels() -> int:
    """The pixel limit (width x height): ``$OODFAST_MAX_IMAGE_PIXELS``, else PIL's 89,478,485."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} must be a positive whole number of pixels "
                         f"(e.g. {DEFAULT_MAX_PIXELS}); unset it for the default")
    return value


def too_large(width: int, height: int, limit: int | None = None) -> str | None:
    """Why a ``width`` x ``height`` image is over the pixel limit (its size, the limit, the cost), or None."""
    limit = max_image_pixels() if limit is None else limit
    pixels = width * height
    if pixels <= limit:
        return None
    return (f"{width}x{height} = {pixels / 1e6:.1f} MP, over the {limit / 1e6:.1f} MP limit: decoding it "
            f"takes {pixels * 3 / 2**20:.0f} MiB (8-bit RGB) per copy, in every decoding thread, every "
            f"epoch; downscale it, or raise the limit with {MAX_PIXELS_ENV}={pixels}")


def check_pixel_limit(path: str | os.PathLike[str], width: int, height: int, limit: int | None = None) -> None:
    """Raise :class:`ImageFileError` naming ``path`` when ``width * height`` is over the limit."""
    why = too_large(width, height, limit)
    if why is not None:
        raise ImageFileError(f"{path} is {why}")


def bomb_reason(error: Exception, limit: int) -> str:
    """:func:`too_large`'s reason for an image PIL itself refused (its error gives only the pixel count)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS) + 1
    return (too_large(pixels, 1, limit) or "").replace(f"{pixels}x1 = ", "", 1)


def unsupported_mode(im: Image.Image) -> str | None:
    """Why ``im``'s pixel mode (known from the header) has no 8-bit RGB value, or None if it has one."""
    if im.mode in _CONVERTIBLE or im.mode in _UINT16 or im.mode == "F":
        return None
    if im.mode == "I":
        return ("32-bit integer pixels (mode I) have no defined 8-bit scale and DALI cannot decode "
                f"them; {_CONVERT_HINT}")
    return f"pixel mode {im.mode} is not supported; {_CONVERT_HINT}"


def float_problem(v: np.ndarray) -> str | None:
    """Why float pixels ``v`` have no faithful 8-bit value (outside [0, 1] or NaN), or None."""
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if finite.size == v.size and lo >= 0.0 and hi <= 1.0:
        return None
    extra = "" if finite.size == v.size else f", {v.size - finite.size} not finite"
    return (f"float pixels must lie in [0, 1] (DALI's scale; it clips the rest, e.g. to white), these "
            f"span {lo:g}..{hi:g}{extra}; {_CONVERT_HINT}")


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files (a process-wide switch: restored afterwards)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def open_image(source: str | os.PathLike[str] | bytes | np.ndarray | IO[bytes],
               path: str | os.PathLike[str] | None = None, *, limit: int | None = None) -> Image.Image:
    """``Image.open`` (lazy: the header only) with the pixel limit and the file named in every error.

    Args:
        source: a path, the encoded bytes (bytes or a uint8 array), or an open binary file.
        path: the name for messages (default: ``source`` when it is a path).
        limit: the pixel limit (default :func:`max_image_pixels`).

    Raises:
        ImageFileError: not an image, unreadable, over the limit, or a mode with no 8-bit RGB.
    """
    name = path if path is not None else source
    limit = max_image_pixels() if limit is None else limit
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        # The user raised our limit past PIL's hard one (twice its warning threshold): raise PIL's
        # too, or Image.open would still refuse. (A process-wide PIL setting, asked for by the user.)
        Image.MAX_IMAGE_PIXELS = limit
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        source = io.BytesIO(memoryview(source))  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit speaks instead
            im = Image.open(source)  # type: ignore[arg-type]
    except Image.DecompressionBombError as e:  # over twice PIL's threshold, so over ours too
        raise ImageFileError(f"{name} is {bomb_reason(e, limit)}") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{name} is not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageFileError(f"cannot read the image header of {name}: {e}") from None
    check_pixel_limit(name, im.width, im.height, limit)
    why = unsupported_mode(im)
    if why is not None:
        im.close()
        raise ImageFileError(f"{name}: {why}")
    return im


def to_rgb8(im: Image.Image, path: str | os.PathLike[str] | None = None) -> Image.Image:
    """Decode ``im`` (if not yet loaded) and return it as 8-bit RGB, with DALI's values (module doc).

    Raises:
        ImageFileError: a decode failure, a float image outside [0, 1], or an unsupported mode.
    """
    name = path if path is not None else getattr(im, "filename", "") or "<image>"
    why = unsupported_mode(im)
    if why is not None:
        raise ImageFileError(f"{name}: {why}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        if im.mode in _UINT16:
            grey = _round_scale(np.asarray(im).astype(np.uint32), 65535)
            return Image.fromarray(grey, "L").convert("RGB")
        if im.mode == "F":
            v = np.asarray(im, dtype=np.float32)
            why = float_problem(v)
            if why is not None:
                raise ImageFileError(f"{name}: {why}")
            grey = np.rint(v.astype(np.float64) * 255.0).astype(np.uint8)
            return Image.fromarray(grey, "L").convert("RGB")
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")  # palette (and its transparency) -> colours; alpha dropped below
        return im if im.mode == "RGB" else im.convert("RGB")
    except ImageFileError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ImageFileError(f"cannot decode {name}: {type(e).__name__}: {e}") from None


def load_rgb8(path: str | os.PathLike[str], *, limit: int | None = None) -> Image.Image:
    """Open, check and decode the file at ``path`` into an 8-bit RGB PIL image (see the module doc)."""
    try:
        with open(path, "rb") as f:  # our own handle: closing it keeps the decoded pixels
            return to_rgb8(open_image(f, path, limit=limit), path)
    except OSError as e:
        raise ImageFileError(f"cannot read {path}: {e.strerror or e}") from None


def _round_scale(v: np.ndarray, top: int) -> np.ndarray:
    """round(v * 255 / top) in integers (exact; ``top`` odd, so no value falls on a half)."""
    return ((v * 255 + top // 2) // top).astype(np.uint8)


def uint16_to_uint8(x: Any) -> Any:
    """A 16-bit image tensor (torch uint16) -> uint8 as DALI scales it: round(v * 255 / 65535)."""
    import torch

    return ((x.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


