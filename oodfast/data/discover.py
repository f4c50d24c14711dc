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
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oodfast.fileio import atomic_write_text

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("synthetic", "bdd100k", "bdd10k", "folder")
BDD_SPLITS: tuple[str, ...] = ("train", "val", "test")
BDD_DOWNLOAD_URL = "https://doc.bdd100k.com/download.html"

#: Image suffixes accepted by the ``folder`` layout (compared case-insensitively).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
#: Image suffixes accepted inside the BDD split folders (the archives hold JPEGs only).
JPEG_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg"})

FILE_LIST_MAGIC = "# oodfast clean file list v1"

_SHOW = 5  # how many unmatched names an error message lists


class DatasetError(ValueError):
    """Bad dataset input; the message names the path and says what to do."""


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


def cache_dir() -> Path:
    """The oodfast cache folder: ``$OODFAST_CACHE`` if set, else ``~/.cache/oodfast`` (not created)."""
    env = os.environ.get("OODFAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodfast"


def default_file_list_path(kind: str, root: str | os.PathLike[str], split: str | None) -> Path:
    """Where ``oodfast data check`` writes, and :func:`discover` looks for, the clean file list.

    ``<cache_dir>/filelists/<kind>-<sha1(resolved root)[:12]>-<split or "all">.txt``.
    """
    digest = hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "filelists" / f"{kind}-{digest}-{split or 'all'}.txt"


def write_file_list(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    kind: str,
    split: str | None,
    relative_paths: Iterable[str],
) -> Path:
    """Write a clean file list atomically (temp file in the same folder, then ``os.replace``).

    Format: header lines ``# oodfast clean file list v1``, ``# root: <absolute path>``,
    ``# kind: <kind>``, ``# split: <split or ->``, ``# count: <N>``, then one posix path relative
    to the root per line. Returns the path written.
    """
    path = Path(path).expanduser()
    rels = list(relative_paths)
    bad = [r for r in rels if "\n" in r or "\r" in r]
    if bad:
        raise ValueError(f"file names with line breaks cannot go in a file list: {bad[:_SHOW]}")
    header = [
        FILE_LIST_MAGIC,
        f"# root: {Path(root).expanduser().resolve()}",
        f"# kind: {kind}",
        f"# split: {split if split is not None else '-'}",
        f"# count: {len(rels)}",
    ]
    return atomic_write_text(path, "\n".join(header + rels) + "\n")


def read_file_list(path: str | os.PathLike[str]) -> tuple[Path, str, str | None, list[str]]:
    """Read a clean file list written by :func:`write_file_list`.

    Returns:
        ``(root, kind, split, relative_paths)``; ``split`` is None for a folder dataset.

    Raises:
        DatasetError: the file is missing, is not a clean file list, or is incomplete.
    """
    path = Path(path).expanduser()
    redo = "re-run `oodfast data check` to write it again"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"file list {path} does not exist; {redo}, or drop the option") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read file list {path}: {e}; {redo}") from None
    if not lines or lines[0].strip() != FILE_LIST_MAGIC:
        raise DatasetError(f"{path} is not an oodfast clean file list (first line must be "
                           f"{FILE_LIST_MAGIC!r}); {redo}")
    fields: dict[str, str] = {}
    rels: list[str] = []
    for line in lines[1:]:
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            fields[key.strip()] = value.strip()
        elif line.strip():
            rels.append(line)
    missing = [k for k in ("root", "kind", "split", "count") if k not in fields]
    if missing:
        raise DatasetError(f"file list {path} lacks header field(s) {missing}; {redo}")
    if not fields["count"].isdigit() or int(fields["count"]) != len(rels):
        raise DatasetError(f"file list {path} is incomplete: header says {fields['count']} files, "
                           f"it holds {len(rels)}; {redo}")
    split = None if fields["split"] == "-" else fields["split"]
    return Path(fields["root"]), fields["kind"], split, rels


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
            dataset into and reuse from (None: the oodfast cache, see :func:`cache_dir`).
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
            kept = apply_file_list(files, default)
            log.info("clean file list %s excludes %d of %d %s files (re-run `oodfast data check` "
                     "after changing the dataset)", default, len(files) - len(kept), len(files),
                     files.kind)
            return kept
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

    Raises:
        DatasetError: the list was written for another root, kind or split, or names files that
            are not part of ``files`` (missing on disk, or in another split).
    """
    list_root, list_kind, list_split, rels = read_file_list(file_list)
    redo = (f"re-run `oodfast data check --data {files.kind} --data-root {files.root}"
            + (f" --split {files.split}`" if files.split else "`"))
    if list_root.expanduser().resolve() != files.root:
        raise DatasetError(f"file list {file_list} was written for root {list_root}, not for "
                           f"{files.root}; pass the list made for this dataset or {redo}")
    if (list_kind, list_split) != (files.kind, files.split):
        raise DatasetError(f"file list {file_list} is for {list_kind} split {list_split}, not "
                           f"{files.kind} split {files.split}; pass the matching list or {redo}")
    index = {rel: i for i, rel in enumerate(files.relative())}
    unknown = [r for r in rels if r not in index]
    if unknown:
        gone = [r for r in unknown if not (files.root / r).exists()]
        what = (f"{len(gone)} listed file(s) do not exist under {files.root} (first: "
                f"{', '.join(gone[:_SHOW])})" if gone else
                f"{len(unknown)} listed file(s) are not images of this split (first: "
                f"{', '.join(unknown[:_SHOW])})")
        raise DatasetError(f"file list {file_list}: {what}; {redo}")
    keep = sorted({index[r] for r in rels})
    return replace(
        files,
        images=tuple(files.images[i] for i in keep),
        masks=None if files.masks is None else tuple(files.masks[i] for i in keep),
    )


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
