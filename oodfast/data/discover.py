"""Find the image (and mask) files of a dataset: BDD100K, BDD10K, a plain folder, or synthdrive.

``discover(kind, root, split)`` returns a :class:`DatasetFiles` with the image paths in a stable
order (sorted by their path relative to the dataset root) and, where the layout has them, the
segmentation masks aligned with them. Layouts::

    bdd100k   ROOT/images/100k/{train,val,test}/NAME.jpg                       (no masks)
    bdd10k    ROOT/images/10k/{train,val,test}/NAME.jpg
              ROOT/labels/sem_seg/masks/{train,val}/NAME.png
      older:  ROOT/seg/images/{train,val,test}/NAME.jpg
              ROOT/seg/labels/{train,val}/NAME_train_id.png
    folder    any tree of .jpg/.jpeg/.png files (hidden files and folders skipped; no masks)
    synthetic the synthdrive dataset, generated once into the cache, in the bdd10k layout

For the BDD layouts ``ROOT`` may be the ``bdd100k``/``bdd10k`` folder itself, the folder that
contains it, or the ``images/100k`` (``images/10k``) folder: the root reported is always the
dataset folder, so the same dataset gets the same clean file list whichever level was given.

Clean file lists (written by ``oodfast data check``) exclude files that would crash DALI. When
one exists at :func:`default_file_list_path` it is applied automatically; one can also be given
explicitly. This module never downloads, modifies or deletes anything in a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oodfast.data.cache import cache_dir
from oodfast.data.errors import DatasetError
from oodfast.fileio import atomic_write_text

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("synthetic", "bdd100k", "bdd10k", "folder")
BDD_SPLITS: tuple[str, ...] = ("train", "val", "test")
BDD_DOWNLOAD_URL = "https://doc.bdd100k.com/download.html"

#: Image suffixes accepted by the ``folder`` layout (compared case-insensitively).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
#: Image suffixes accepted inside the BDD split folders (the archives hold JPEGs only).
JPEG_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg"})

#: The first line of a v1 (plain text) clean file list; still read, no longer written.
FILE_LIST_MAGIC = "# oodfast clean file list v1"
#: The format :func:`write_file_list` writes (JSON lines).
FILE_LIST_VERSION = 2

_SHOW = 5  # how many unmatched names an error message lists


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one split of a dataset.

    Attributes:
        kind: ``"bdd100k"``, ``"bdd10k"``, ``"folder"`` or ``"synthetic"``.
        root: the resolved dataset root; every path below lies under it.
        split: the split (``"train"``, ``"val"``, ``"test"``), or None for ``"folder"``.
        images: absolute image paths, sorted by their posix path relative to ``root``.
        masks: absolute mask paths aligned with ``images``, or None when the layout has none.
    """

    kind: str
    root: Path
    split: str | None
    images: tuple[Path, ...]
    masks: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and len(self.masks) != len(self.images):
            raise ValueError(
                f"masks ({len(self.masks)}) and images ({len(self.images)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.images)

    def relative(self) -> list[str]:
        """Image paths relative to ``root``, posix style, in the order of ``images``."""
        return [p.relative_to(self.root).as_posix() for p in self.images]


# --------------------------------------------------------------------------------------------------
# Cache and clean file lists
# --------------------------------------------------------------------------------------------------


def default_file_list_path(kind: str, root: str | os.PathLike[str], split: str | None) -> Path:
    """Where ``oodfast data check`` writes, and :func:`discover` looks for, the clean file list.

    ``<cache_dir>/filelists/<kind>-<sha1(resolved root)[:12]>-<split or "all">.txt``.
    """
    digest = hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "filelists" / f"{kind}-{digest}-{split or 'all'}.txt"


@dataclass(frozen=True)
class FileList:
    """A clean file list as read from disk.

    Attributes:
        root, kind, split: the dataset it was written for (``split`` None for a folder dataset).
        paths: the clean files, posix paths relative to ``root``.
        excluded: the files the check left out (bad), or None for a v1 list, which did not record them.
        version: 2 (JSON lines) or 1 (the old text format, still read).
    """

    root: Path
    kind: str
    split: str | None
    paths: list[str]
    excluded: list[str] | None
    version: int


def write_file_list(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    kind: str,
    split: str | None,
    relative_paths: Iterable[str],
    *,
    excluded: Iterable[str] = (),
) -> Path:
    """Write a clean file list atomically (temp file in the same folder, then ``os.replace``).

    Format (v2, JSON lines, so any file name fits: ``#``, line and paragraph separators, newlines,
    non-UTF-8 bytes): a header object ``{"oodfast_file_list": 2, "root": ..., "kind": ...,
    "split": ... or null, "count": N, "excluded": [...]}``, then one JSON string per line, each a
    posix path relative to the root. ``excluded`` are the files the check left out, so that files
    added later can be told apart from known-bad ones. JSON escapes every control character and
    ``ensure_ascii`` every non-ASCII one, so the only line breaks in the file are the record ends.
    Returns the path written.
    """
    path = Path(path).expanduser()
    rels = list(relative_paths)
    header = {"oodfast_file_list": FILE_LIST_VERSION, "root": str(Path(root).expanduser().resolve()),
              "kind": kind, "split": split, "count": len(rels), "excluded": list(excluded)}
    lines = [json.dumps(header)] + [json.dumps(r) for r in rels]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_file_list(path: str | os.PathLike[str]) -> tuple[Path, str, str | None, list[str]]:
    """Read a clean file list written by :func:`write_file_list` (v2, or the older v1 text format).

    Returns:
        ``(root, kind, split, relative_paths)``; ``split`` is None for a folder dataset. See
        :func:`read_file_list_full` for the excluded files and the format version.

    Raises:
        DatasetError: the file is missing, is not a clean file list, or is incomplete.
    """
    full = read_file_list_full(path)
    return full.root, full.kind, full.split, full.paths


def read_file_list_full(path: str | os.PathLike[str]) -> FileList:
    """Read a clean file list (see :func:`read_file_list`) into a :class:`FileList`."""
    path = Path(path).expanduser()
    redo = "re-run `oodfast data check` to write it again"
    try:
        # Records end at "\n" only: str.splitlines() would also split at U+2028, U+0085, \x1c...,
        # which are valid in file names (and in v1 lists, which stored names as they are).
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise DatasetError(f"file list {path} does not exist; {redo}, or drop the option") from None
    except OSError as e:
        raise DatasetError(f"cannot read file list {path}: {e}; {redo}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = lines[0] if lines else ""
    if first.strip() == FILE_LIST_MAGIC:
        return _read_v1(path, lines, redo)
    try:
        header = json.loads(first) if first.startswith("{") else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or "oodfast_file_list" not in header:
        raise DatasetError(f"{path} is not an oodfast clean file list (its first line must be a JSON "
                           f"header with \"oodfast_file_list\", or {FILE_LIST_MAGIC!r}); {redo}")
    if header["oodfast_file_list"] != FILE_LIST_VERSION:
        raise DatasetError(f"file list {path} has format version {header['oodfast_file_list']!r}, this "
                           f"oodfast reads {FILE_LIST_VERSION} (and 1); {redo}")
    missing = [k for k in ("root", "kind", "split", "count") if k not in header]
    if missing:
        raise DatasetError(f"file list {path} lacks header field(s) {missing}; {redo}")
    try:
        rels = [json.loads(line) for line in lines[1:]]
    except ValueError as e:
        raise DatasetError(f"file list {path} is damaged ({e}); {redo}") from None
    excluded = header.get("excluded", [])
    if (not all(isinstance(r, str) for r in rels) or not isinstance(excluded, list)
            or not all(isinstance(r, str) for r in excluded)):
        raise DatasetError(f"file list {path} is damaged (a record is not a file name); {redo}")
    if header["count"] != len(rels):
        raise DatasetError(f"file list {path} is incomplete: header says {header['count']} files, "
                           f"it holds {len(rels)}; {redo}")
    return FileList(Path(header["root"]), header["kind"], header["split"], rels, excluded, 2)


def _read_v1(path: Path, lines: list[str], redo: str) -> FileList:
    """The v1 text format: 5 header lines (magic, root, kind, split, count), then one name a line.

    The header is exactly those 5 lines (the v1 reader took any ``#`` line for a header, so an image
    named ``#1.jpg`` made every list "incomplete"); every line after them is a file name.
    """
    fields: dict[str, str] = {}
    for line in lines[1:5]:
        key, sep, value = line[1:].partition(":")
        if line.startswith("#") and sep:
            fields[key.strip()] = value.strip()
    missing = [k for k in ("root", "kind", "split", "count") if k not in fields]
    if missing:
        raise DatasetError(f"file list {path} lacks header field(s) {missing}; {redo}")
    rels = [line for line in lines[5:] if line.strip()]
    if not fields["count"].isdigit() or int(fields["count"]) != len(rels):
        raise DatasetError(f"file list {path} is incomplete: header says {fields['count']} files, "
                           f"it holds {len(rels)}; {redo}")
    split = None if fields["split"] == "-" else fields["split"]
    return FileList(Path(fields["root"]), fields["kind"], split, rels, None, 1)


def check_command(files: DatasetFiles, out: str | os.PathLike[str] | None = None) -> str:
    """The exact ``oodfast data check`` command that (re)writes the clean file list of ``files``.

    ``out``: the list's path when it is not the default one (then ``--out`` is added).
    """
    # synthetic: --data-root is the folder the dataset is generated into (the root's parent).
    root = files.root.parent if files.kind == "synthetic" else files.root
    parts = ["oodfast", "data", "check", "--data", files.kind, "--data-root", shlex.quote(str(root))]
    if files.split is not None and files.kind != "folder":
        parts += ["--split", files.split]
    if out is not None and Path(out).expanduser().resolve() != default_file_list_path(
            files.kind, files.root, files.split).resolve():
        parts += ["--out", shlex.quote(str(out))]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def discover(
    kind: str,
    root: str | os.PathLike[str] | None,
    split: str = "train",
    *,
    require_masks: bool = False,
    file_list: str | os.PathLike[str] | None = None,
    use_default_list: bool = True,
    synthetic: Mapping[str, Any] | None = None,
) -> DatasetFiles:
    """Find the images (and masks) of one split of a dataset.

    Args:
        kind: one of ``synthetic``, ``bdd100k``, ``bdd10k``, ``folder``.
        root: the dataset folder (``--data-root``); for ``synthetic`` the folder to generate the
            dataset into and reuse from (None: the oodfast cache, see :func:`oodfast.data.cache.cache_dir`).
        split: ``train``, ``val`` or ``test``; ignored for ``folder``.
        require_masks: raise unless every image has a segmentation mask (evaluation needs them).
        file_list: a clean file list from ``oodfast data check``: the result holds exactly its files.
        use_default_list: when ``file_list`` is None, apply the list at
            :func:`default_file_list_path` if one exists. ``data check`` passes False to see all files.
        synthetic: for ``synthetic``, the synthdrive spec (``num_images``, ``seed``, ``width``,
            ``height``; defaults ``oodfast.data.synthdrive.DEFAULT_SPEC``).

    Raises:
        DatasetError: unknown kind, missing or malformed dataset, missing masks, a file list that
            does not belong to this dataset or names missing files.
    """
    if kind == "synthetic":
        files = synthetic_dataset(root, split, require_masks, **(synthetic or {}))
    elif kind in ("bdd100k", "bdd10k", "folder"):
        if root is None:
            raise DatasetError(_root_needed_message(kind))
        base = _existing_dir(root)
        if kind == "bdd100k":
            files = _discover_bdd100k(base, split, require_masks)
        elif kind == "bdd10k":
            files = _discover_bdd10k(base, split, require_masks)
        else:
            files = _discover_folder(base, require_masks)
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds are: {', '.join(KINDS)}")
    log.debug("%s %s: %d images under %s", files.kind, files.split, len(files), files.root)

    if file_list is not None:
        return apply_file_list(files, file_list)
    if use_default_list:
        default = default_file_list_path(files.kind, files.root, files.split)
        if default.is_file():
            return apply_file_list(files, default)
    return files


def synthetic_dataset(
    root: str | os.PathLike[str] | None, split: str, require_masks: bool, **spec: Any
) -> DatasetFiles:
    """Hook for ``kind="synthetic"``: make sure synthdrive exists, then read it as BDD10K.

    ``ensure_synthdrive(cache_root=root, **spec)`` generates the dataset on first use (``root``
    None: in the default cache) and returns its root in the BDD10K layout.
    """
    from oodfast.data.synthdrive import ensure_synthdrive  # lazy: only this kind needs it

    cache_root = Path(root).expanduser() if root is not None else None
    data_root = Path(ensure_synthdrive(cache_root=cache_root, **spec))
    return replace(_discover_bdd10k(data_root, split, require_masks), kind="synthetic")


def apply_file_list(files: DatasetFiles, file_list: str | os.PathLike[str]) -> DatasetFiles:
    """Restrict ``files`` to the files named in a clean file list, keeping masks aligned.

    Files of the dataset that the list neither holds nor excludes (added after the check) are left
    out with a warning (``logging.warning``) that gives the command refreshing the list; files the
    check left out as bad are reported at INFO level.

    Raises:
        DatasetError: the list was written for another root, kind or split, or names files that
            are not part of ``files`` (missing on disk, or in another split).
    """
    listed = read_file_list_full(file_list)
    redo = f"re-run `{check_command(files, file_list)}`"
    if listed.root.expanduser().resolve() != files.root:
        raise DatasetError(f"file list {file_list} was written for root {listed.root}, not for "
                           f"{files.root}; pass the list made for this dataset or {redo}")
    if (listed.kind, listed.split) != (files.kind, files.split):
        raise DatasetError(f"file list {file_list} is for {listed.kind} split {listed.split}, not "
                           f"{files.kind} split {files.split}; pass the matching list or {redo}")
    rels = files.relative()
    index = {rel: i for i, rel in enumerate(rels)}
    unknown = [r for r in listed.paths if r not in index]
    if unknown:
        gone = [r for r in unknown if not (files.root / r).exists()]
        what = (f"{len(gone)} listed file(s) do not exist under {files.root} (first: "
                f"{_names(gone)})" if gone else
                f"{len(unknown)} listed file(s) are not images of this split (first: "
                f"{_names(unknown)})")
        raise DatasetError(f"file list {file_list}: {what}; {redo}")
    keep = sorted({index[r] for r in listed.paths})
    kept = replace(
        files,
        images=tuple(files.images[i] for i in keep),
        masks=None if files.masks is None else tuple(files.masks[i] for i in keep),
    )
    in_list = set(listed.paths)
    left_out = [r for r in rels if r not in in_list]
    known_bad = set(listed.excluded or ())
    new = [r for r in left_out if r not in known_bad]
    if listed.version == 1 and left_out:
        log.warning("clean file list %s leaves out %d of %d %s files, bad when it was checked or added "
                    "since (its old v1 format does not record which); to check new files and refresh "
                    "the list, run: %s", file_list, len(left_out), len(files), files.kind,
                    check_command(files, file_list))
    elif new:
        log.warning("%d image(s) under %s were added after the clean file list %s was written and are "
                    "NOT used (first: %s); to check them and refresh the list, run: %s", len(new),
                    files.root, file_list, _names(new), check_command(files, file_list))
    if left_out and len(left_out) > len(new):
        log.info("clean file list %s excludes %d of %d %s files that `oodfast data check` found bad",
                 file_list, len(left_out) - len(new), len(files), files.kind)
    return kept


def _names(rels: Sequence[str]) -> str:
    """The first few names, each repr()'d when it holds characters that would garble a one-line message."""
    return ", ".join(r if r.isprintable() else repr(r) for r in rels[:_SHOW])


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def _root_needed_message(kind: str) -> str:
    if kind == "folder":
        return ("--data folder needs --data-root PATH: pass a folder of .jpg/.jpeg/.png images "
                "(or use --data synthetic, which needs no download)")
    return (f"--data {kind} needs --data-root PATH pointing at the extracted {kind} folder; "
            f"download from the BDD100K site ({BDD_DOWNLOAD_URL}) — oodfast never downloads "
            "datasets — or use --data synthetic, which needs no download")


def _existing_dir(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset root {path} does not exist; check --data-root")
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} is not a directory; pass the dataset folder as "
                           "--data-root")
    return path.resolve()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images_in(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Non-hidden files directly in ``folder`` with one of ``suffixes`` (any case), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if _visible(p) and p.suffix.lower() in suffixes and p.is_file()),
        key=lambda p: p.name,
    )


def _candidate_bases(root: Path, names: Sequence[str], images_sub: str) -> list[Path]:
    """Folders that may be the dataset folder when the user pointed at ``root``.

    ``root`` itself, ``root/<name>`` for each of ``names``, and, when ``root`` is
    ``.../images/<images_sub>``, the folder two levels up.
    """
    bases = [root, *(root / n for n in names)]
    if root.name == images_sub and root.parent.name == "images":
        bases.append(root.parent.parent)
    return bases


def _split_dir(images_dir: Path, split: str) -> Path:
    """``images_dir/split``, or a DatasetError listing the splits that do exist."""
    split_dir = images_dir / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and _visible(p))
        raise DatasetError(f"split {split!r} not found: {split_dir} is not a directory; splits "
                           f"present in {images_dir}: {', '.join(found) or 'none'} (pass --split)")
    return split_dir


def _discover_bdd100k(root: Path, split: str, require_masks: bool) -> DatasetFiles:
    for base in _candidate_bases(root, ["bdd100k"], "100k"):
        if (base / "images" / "100k").is_dir():
            break
    else:
        raise DatasetError(
            f"no BDD100K images under {root}: expected {root}/images/100k/{{train,val,test}}/*.jpg "
            f"(or a bdd100k/ folder holding that); point --data-root at the extracted bdd100k "
            f"folder (download from the BDD100K site: {BDD_DOWNLOAD_URL})")
    if require_masks:
        raise DatasetError(f"the BDD100K 100k images under {base} have no segmentation masks, "
                           "which are needed here (e.g. for evaluation); use --data bdd10k "
                           "with the BDD10K semantic-segmentation release")
    split_dir = _split_dir(base / "images" / "100k", split)
    images = _images_in(split_dir, JPEG_SUFFIXES)
    if not images:
        raise DatasetError(f"no images (*.jpg) in {split_dir}; check the extraction of the "
                           "BDD100K images archive")
    return DatasetFiles("bdd100k", base, split, tuple(images), None)


def _discover_bdd10k(root: Path, split: str, require_masks: bool) -> DatasetFiles:
    root = root.resolve()
    bases = _candidate_bases(root, ["bdd10k", "bdd100k"], "10k")
    if root.name == "seg":  # pointed at the older layout's seg/ folder
        bases.append(root.parent)
    for base in bases:
        if (base / "images" / "10k").is_dir():  # current layout
            images_dir = base / "images" / "10k"
            mask_dir = base / "labels" / "sem_seg" / "masks" / split
            mask_suffix = ".png"
            break
        if (base / "seg" / "images").is_dir():  # older layout
            images_dir = base / "seg" / "images"
            mask_dir = base / "seg" / "labels" / split
            mask_suffix = "_train_id.png"
            break
    else:
        raise DatasetError(
            f"no BDD10K images under {root}: expected {root}/images/10k/{{train,val,test}}/*.jpg "
            f"with masks in labels/sem_seg/masks/{{train,val}}/ (or the older seg/images/ + "
            f"seg/labels/ layout, or a bdd10k/ or bdd100k/ folder holding either); point "
            f"--data-root at it (download from the BDD100K site: {BDD_DOWNLOAD_URL})")

    split_dir = _split_dir(images_dir, split)
    images = _images_in(split_dir, JPEG_SUFFIXES)
    if not images:
        raise DatasetError(f"no images (*.jpg) in {split_dir}; check the extraction of the "
                           "BDD10K images archive")
    if not mask_dir.is_dir():
        if require_masks:
            raise DatasetError(f"segmentation masks are needed here (e.g. for evaluation) but "
                               f"{mask_dir} does not exist; extract the BDD10K sem_seg masks "
                               f"there (expected NAME{mask_suffix} for each NAME.jpg in {split_dir})")
        return DatasetFiles("bdd10k", base, split, tuple(images), None)

    masks_by_stem = {
        p.name[: -len(mask_suffix)]: p
        for p in mask_dir.iterdir()
        if _visible(p) and p.name.endswith(mask_suffix) and p.is_file()
    }
    stems = [p.stem for p in images]
    no_mask = [s for s in stems if s not in masks_by_stem]
    no_image = sorted(set(masks_by_stem) - set(stems))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} of {len(images)} images in {split_dir} have no mask "
                         f"(first: {', '.join(no_mask[:_SHOW])})")
        if no_image:
            parts.append(f"{len(no_image)} of {len(masks_by_stem)} masks in {mask_dir} have no "
                         f"image (first: {', '.join(no_image[:_SHOW])})")
        raise DatasetError("images and masks do not match: " + "; ".join(parts) +
                           f". Each NAME.jpg needs a mask NAME{mask_suffix}: restore the missing "
                           "files (re-extract the BDD10K archives)")
    masks = tuple(masks_by_stem[s] for s in stems)
    return DatasetFiles("bdd10k", base, split, tuple(images), masks)


def _discover_folder(root: Path, require_masks: bool) -> DatasetFiles:
    if require_masks:
        raise DatasetError(f"segmentation masks are needed here (e.g. for evaluation) but a "
                           f"folder dataset ({root}) has none; use --data bdd10k (or synthetic)")
    images: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images.extend(
            Path(dirpath, f) for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    if not images:
        raise DatasetError(f"no images (.jpg, .jpeg, .png) found in {root} or its subfolders; "
                           "check --data-root")
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return DatasetFiles("folder", root, None, tuple(images), None)
