"""Reading the image files of a batch: bytes, header size, and the error that names the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from oodfast.data.imageio import ImageFileError, open_image

#: What an error about an unreadable image tells the user to do.
CHECK_HINT = "run `oodfast data check` on the dataset to write a clean file list that leaves it out"


class MultiCropDataError(ImageFileError):
    """An image the augmentation cannot read or decode; the message names the file."""


def read_file_bytes(path: str | os.PathLike[str]) -> np.ndarray:
    """The file's bytes as uint8; a clear error naming the file if it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise MultiCropDataError(f"cannot read {path}: {e}; {CHECK_HINT}") from None


def image_size(path: Path, data: bytes | np.ndarray) -> tuple[int, int]:
    """(height, width) from the encoded header, without decoding; raises naming the file.

    Also refuses, from the header alone, an image over the pixel limit and a pixel mode with no
    8-bit RGB value (:func:`oodfast.data.imageio.open_image`).
    """
    try:
        with open_image(data, path) as im:
            w, h = im.size
    except ImageFileError as e:
        raise MultiCropDataError(f"{e}; {CHECK_HINT}") from None
    return h, w

