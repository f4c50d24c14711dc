"""The library side of ``oodfast data check``: decode every file once and write a clean file list.

DALI cannot skip a corrupt JPEG in the middle of an epoch (the pipeline raises and training stops),
so bad files must never reach it. :func:`check_dataset` fully decodes every image (and mask) once in
a process pool, collects what is wrong with each bad one, and writes the good ones to a clean file
list that :func:`oodfast.data.discover.discover` then applies automatically. Dataset files are only
read, never modified or deleted.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from oodfast.data.crops import mask_header_problem, mask_values_problem
from oodfast.data.discover import (
    DatasetFiles,
    default_file_list_path,
    read_file_list,
    write_file_list,
)
from oodfast.data.imageio import (
    bomb_reason,
    float_problem,
    max_image_pixels,
    strict_decoding,
    too_large,
    unsupported_mode,
)

__all__ = [
    "BadFile",
    "CheckReport",
    "MIN_SIDE",
    "check_dataset",
    "check_file",
    "read_file_list",
    "report_markdown",
    "write_file_list",
]

#: Images with a side shorter than this many pixels are bad: too small for DINO's multi-crop.
MIN_SIDE = 32
#: PIL format names of the files DALI's image decoder reads (it has no GIF decoder, for one).
DALI_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})


@dataclass
class BadFile:
    """A file that failed a check (or passed with a warning); ``path`` is relative to the root."""

    path: str
    reason: str


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`.

    ``n_ok`` counts the files in the clean list (warnings included); ``bad`` are left out of it.
    """

    kind: str
    root: Path
    split: str | None
    n_total: int
    n_ok: int
    bad: list[BadFile] = field(default_factory=list)
    warnings: list[BadFile] = field(default_factory=list)
    seconds: float = 0.0
    file_list: Path | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (paths as strings)."""
        d = asdict(self)
        d["root"] = str(self.root)
        d["file_list"] = None if self.file_list is None else str(self.file_list)
        return d


# --------------------------------------------------------------------------------------------------
# One file (runs in the worker processes)
# --------------------------------------------------------------------------------------------------


def _decode(path: Path, limit: int) -> tuple[Image.Image | None, str | None]:
    """Open and fully decode ``path``; returns (image, None) or (None, reason).

    The pixel limit and the pixel mode are checked from the header, before anything is decoded.
    """
    try:
        if path.stat().st_size == 0:
            return None, "zero-byte file"
        with open(path, "rb") as f:  # our own handle: closing it keeps the decoded pixels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit speaks
                im = Image.open(f)
                big = too_large(im.width, im.height, limit)
                if big is not None:
                    return None, big
                why = unsupported_mode(im)
                if why is not None:
                    return None, why
                im.load()
        return im, None
    except UnidentifiedImageError:
        return None, "not an image (PIL: cannot identify image file)"
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        return None, f"unreadable: {e.strerror or e}"
    except Image.DecompressionBombError as e:
        return None, bomb_reason(e, limit)
    except OSError as e:
        if "truncated" in str(e).lower():
            return None, f"truncated ({e})"
        return None, f"decode error: {e}"
    except Exception as e:  # PIL raises SyntaxError, ValueError, ...
        return None, f"decode error: {type(e).__name__}: {e}"


#: Warnings for images that load correctly but are not stored as 8-bit RGB.
_MODE_NOTES = {"I;16": "16-bit; scaled to 8-bit when loaded", "F": "32-bit float in [0, 1]; scaled to "
               "8-bit when loaded"}


def check_file(
    root: str, image: str, mask: str | None = None, min_side: int = MIN_SIDE,
    max_pixels: int | None = None,
) -> tuple[str, str]:
    """Check one image (and its mask), both given relative to ``root``.

    Args:
        max_pixels: the pixel limit (default :func:`oodfast.data.imageio.max_image_pixels`).

    Returns:
        ``(status, reason)`` with status ``"ok"``, ``"warn"`` (usable; reason says why it is odd)
        or ``"bad"`` (must be left out; reason says why).
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    with strict_decoding():
        im, reason = _decode(Path(root, image), limit)
        if im is None:
            return "bad", reason or "decode error"
        if im.format not in DALI_FORMATS:
            return "bad", f"unsupported format {im.format} (DALI reads JPEG, PNG, BMP, TIFF, WebP)"
        if min(im.size) < min_side:
            return "bad", f"too small ({im.width}x{im.height}; each side needs >= {min_side} px)"
        if im.mode == "F":
            why = float_problem(np.asarray(im, dtype=np.float32))
            if why is not None:
                return "bad", f"mode F: {why}"
        mode = "I;16" if im.mode.startswith("I;16") else im.mode
        warning = None if mode == "RGB" else (
            f"mode {im.mode} ({_MODE_NOTES.get(mode, 'not RGB; converted when loaded')})")
        if mask is None:
            return ("warn", warning) if warning else ("ok", "")

        mk, reason = _decode(Path(root, mask), limit)
        if mk is None:
            return "bad", f"mask {mask}: {reason}"
        why = mask_header_problem(mk, im.size) or mask_values_problem(np.asarray(mk))
        if why is not None:
            return "bad", f"mask {mask}: {why}"
        return ("warn", warning) if warning else ("ok", "")


def _check_chunk(args: tuple[str, list[tuple[str, str | None]], int, int]) -> list[tuple[str, str]]:
    root, pairs, min_side, max_pixels = args
    return [check_file(root, image, mask, min_side, max_pixels) for image, mask in pairs]


# --------------------------------------------------------------------------------------------------
# A whole dataset
# --------------------------------------------------------------------------------------------------


def check_dataset(
    files: DatasetFiles,
    *,
    workers: int | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    min_side: int = MIN_SIDE,
    max_pixels: int | None = None,
) -> CheckReport:
    """Decode every image (and mask) of ``files`` once and write the clean file list.

    Args:
        files: the dataset as found by ``discover(..., use_default_list=False)`` (all files).
        workers: decoding processes; default ``os.cpu_count()``. 1 decodes in this process.
        out: where to write the clean list; default :func:`default_file_list_path`.
        progress: show a tqdm progress bar.
        min_side: images with a shorter side are bad.
        max_pixels: images with more pixels are bad (default
            :func:`oodfast.data.imageio.max_image_pixels`: ``$OODFAST_MAX_IMAGE_PIXELS`` or 89.5 MP).

    Returns:
        A :class:`CheckReport`; ``bad`` files are absent from the list written to ``file_list``.
    """
    start = time.perf_counter()
    workers = max(1, workers or os.cpu_count() or 1)
    root = str(files.root)
    rels = files.relative()
    masks = ([m.relative_to(files.root).as_posix() for m in files.masks]
             if files.masks is not None else [None] * len(rels))
    pairs = list(zip(rels, masks))
    # Chunks amortise inter-process overhead yet stay small enough to balance and to move the bar.
    size = max(1, min(64, len(pairs) // (workers * 8) or 1))
    limit = max_image_pixels() if max_pixels is None else max_pixels
    chunks = [(root, pairs[i:i + size], min_side, limit) for i in range(0, len(pairs), size)]

    results: list[tuple[str, str]] = []
    with tqdm(total=len(pairs), desc=f"check {files.kind}", unit="img", disable=not progress) as bar:
        if workers == 1 or len(chunks) <= 1:
            outputs: Iterator[list[tuple[str, str]]] = map(_check_chunk, chunks)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)))
            outputs = pool.map(_check_chunk, chunks)
        try:
            for chunk_result in outputs:
                results.extend(chunk_result)
                bar.update(len(chunk_result))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    bad = [BadFile(rel, reason) for rel, (status, reason) in zip(rels, results) if status == "bad"]
    warnings = [BadFile(rel, reason) for rel, (status, reason) in zip(rels, results)
                if status == "warn"]
    clean = [rel for rel, (status, _) in zip(rels, results) if status != "bad"]
    path = Path(out) if out is not None else default_file_list_path(files.kind, files.root,
                                                                    files.split)
    written = write_file_list(path, files.root, files.kind, files.split, clean,
                              excluded=[b.path for b in bad])
    return CheckReport(
        kind=files.kind, root=files.root, split=files.split, n_total=len(rels), n_ok=len(clean),
        bad=bad, warnings=warnings, seconds=time.perf_counter() - start, file_list=written,
    )


def _shown(path: str) -> str:
    """A file name for one table cell: repr() when it holds line breaks or other unprintables."""
    return path if path.isprintable() else repr(path)


def report_markdown(report: CheckReport) -> str:
    """A markdown summary of a check: counts, the clean list, then every bad file with its reason."""
    from oodfast.report import markdown_table

    split = f" split {report.split}" if report.split else ""
    text = (
        f"# data check: {report.kind}{split}\n\n"
        f"- root: `{report.root}`\n"
        f"- {report.n_total} files decoded in {report.seconds:.1f} s: {report.n_ok} usable, "
        f"{len(report.bad)} bad, {len(report.warnings)} with warnings\n"
        f"- clean file list: `{report.file_list}` (applied automatically by `--data {report.kind}`)\n"
    )
    if report.bad:
        text += "\n## Bad files (left out of the clean list)\n\n"
        text += markdown_table(["file", "reason"], [(_shown(b.path), b.reason) for b in report.bad])
    if report.warnings:
        text += "\n## Warnings (kept)\n\n"
        text += markdown_table(["file", "reason"], [(_shown(b.path), b.reason) for b in report.warnings])
    return text
