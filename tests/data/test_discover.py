"""Dataset discovery: every layout, stable order, each error, clean file lists."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from oodfast.data.cache import cache_dir
from oodfast.data.discover import (
    BDD_DOWNLOAD_URL,
    KINDS,
    DatasetError,
    DatasetFiles,
    default_file_list_path,
    discover,
    read_file_list,
    read_file_list_full,
    write_file_list,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the user's real cache (and its clean file lists)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OODFAST_CACHE", str(cache))
    return cache


def jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, "JPEG")
    return path


def png_mask(path: Path, size: tuple[int, int] = (64, 48), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path, "PNG")
    return path


def make_bdd100k(base: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """``base/bdd100k/images/100k/<split>/<name>.jpg``; returns the bdd100k folder."""
    root = base / "bdd100k"
    for split, names in (splits or {"train": ["c", "a", "b"], "val": ["v"]}).items():
        for name in names:
            jpeg(root / "images" / "100k" / split / f"{name}.jpg")
    return root


def make_bdd10k(base: Path, name: str = "bdd10k", stems: tuple[str, ...] = ("b", "a", "c"),
                old: bool = False) -> Path:
    """A BDD10K tree (train + val with masks, test without); returns the dataset folder."""
    root = base / name
    for split in ("train", "val", "test"):
        for stem in stems:
            if old:
                jpeg(root / "seg" / "images" / split / f"{stem}.jpg")
                if split != "test":
                    png_mask(root / "seg" / "labels" / split / f"{stem}_train_id.png")
            else:
                jpeg(root / "images" / "10k" / split / f"{stem}.jpg")
                if split != "test":
                    png_mask(root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png")
    return root


def assert_aligned(files: DatasetFiles, suffix: str) -> None:
    assert files.masks is not None and len(files.masks) == len(files.images)
    for image, mask in zip(files.images, files.masks):
        assert mask.name == image.stem + suffix
        assert mask.is_file()


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["dataset", "parent", "images/100k"])
def test_bdd100k_any_root_level(tmp_path: Path, level: str) -> None:
    root = make_bdd100k(tmp_path)
    given = {"dataset": root, "parent": tmp_path, "images/100k": root / "images" / "100k"}[level]
    files = discover("bdd100k", given, "train")
    assert files.kind == "bdd100k" and files.split == "train"
    assert files.root == root.resolve()
    assert files.relative() == [f"images/100k/train/{n}.jpg" for n in "abc"]
    assert files.masks is None
    assert len(files) == 3
    assert all(p.is_absolute() and p.is_file() for p in files.images)
    assert discover("bdd100k", given, "val").relative() == ["images/100k/val/v.jpg"]


@pytest.mark.parametrize("level", ["dataset", "parent", "images/10k"])
def test_bdd10k_current_layout(tmp_path: Path, level: str) -> None:
    root = make_bdd10k(tmp_path)
    given = {"dataset": root, "parent": tmp_path, "images/10k": root / "images" / "10k"}[level]
    files = discover("bdd10k", given, "val")
    assert files.root == root.resolve() and files.split == "val"
    assert files.relative() == [f"images/10k/val/{s}.jpg" for s in "abc"]
    assert_aligned(files, ".png")
    assert all(m.parent == root.resolve() / "labels/sem_seg/masks/val" for m in files.masks or ())


def test_bdd10k_inside_bdd100k_folder(tmp_path: Path) -> None:
    """The official archives extract the 10k images into bdd100k/images/10k."""
    root = make_bdd10k(tmp_path, name="bdd100k")
    files = discover("bdd10k", tmp_path, "train")
    assert files.root == root.resolve()
    assert_aligned(files, ".png")


@pytest.mark.parametrize("level", ["dataset", "parent", "seg"])
def test_bdd10k_older_layout(tmp_path: Path, level: str) -> None:
    root = make_bdd10k(tmp_path, old=True)
    given = {"dataset": root, "parent": tmp_path, "seg": root / "seg"}[level]
    files = discover("bdd10k", given, "train")
    assert files.root == root.resolve()
    assert files.relative() == [f"seg/images/train/{s}.jpg" for s in "abc"]
    assert_aligned(files, "_train_id.png")


def test_bdd10k_split_without_masks(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path)
    files = discover("bdd10k", root, "test")
    assert files.masks is None and len(files) == 3
    expected = re.escape(str(root.resolve() / "labels" / "sem_seg" / "masks" / "test"))
    with pytest.raises(DatasetError, match=f"masks are needed.*evaluation.*{expected}"):
        discover("bdd10k", root, "test", require_masks=True)


def test_bdd10k_unmatched_stems(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path)
    jpeg(root / "images" / "10k" / "train" / "lonely_image.jpg")
    png_mask(root / "labels" / "sem_seg" / "masks" / "train" / "lonely_mask.png")
    png_mask(root / "labels" / "sem_seg" / "masks" / "train" / "other_mask.png")
    with pytest.raises(DatasetError) as err:
        discover("bdd10k", root, "train")
    msg = str(err.value)
    assert "1 of 4 images" in msg and "lonely_image" in msg
    assert "2 of 5 masks" in msg and "lonely_mask" in msg and "other_mask" in msg
    assert str(root.resolve() / "images" / "10k" / "train") in msg
    assert "restore the missing files" in msg


def test_folder_flat_and_nested(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for rel in ["b.JPG", "a.png", "a/z.Jpeg", "a/y/x.jpeg", "c/d.PNG"]:
        jpeg(root / rel) if not rel.lower().endswith("png") else png_mask(root / rel)
    jpeg(root / ".hidden.jpg")
    jpeg(root / ".thumbs" / "t.jpg")
    jpeg(root / "a" / ".secret" / "s.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "c" / "e.gif").write_bytes(b"GIF89a")
    files = discover("folder", root, "ignored-split")
    assert files.kind == "folder" and files.split is None and files.masks is None
    assert files.root == root.resolve()
    # Sorted by posix relative path: "a.png" < "a/..." because "." < "/".
    assert files.relative() == ["a.png", "a/y/x.jpeg", "a/z.Jpeg", "b.JPG", "c/d.PNG"]

    flat = tmp_path / "flat"
    for name in ["3.jpg", "1.jpg", "2.JPG"]:
        jpeg(flat / name)
    assert discover("folder", flat).relative() == ["1.jpg", "2.JPG", "3.jpg"]


def test_order_is_stable_across_calls(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path, stems=tuple(f"img{i:03d}" for i in (7, 3, 11, 0, 5)))
    first = discover("bdd10k", root, "train")
    assert first == discover("bdd10k", root, "train")
    assert first.relative() == sorted(first.relative())


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_unknown_kind_lists_valid_kinds(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'") as err:
        discover("imagenet", tmp_path)
    assert all(kind in str(err.value) for kind in KINDS)


@pytest.mark.parametrize("kind", ["bdd100k", "bdd10k", "folder"])
def test_root_required(kind: str) -> None:
    with pytest.raises(DatasetError, match=f"--data {kind} needs --data-root PATH"):
        discover(kind, None)


def test_root_required_points_at_bdd_download() -> None:
    with pytest.raises(DatasetError, match=re.escape(f"download from the BDD100K site ({BDD_DOWNLOAD_URL})")):
        discover("bdd100k", None)


def test_root_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"{re.escape(str(missing))} does not exist.*--data-root"):
        discover("bdd100k", missing)


def test_root_not_a_directory(tmp_path: Path) -> None:
    file = jpeg(tmp_path / "one.jpg")
    with pytest.raises(DatasetError, match=f"{re.escape(str(file))} is not a directory"):
        discover("folder", file)


@pytest.mark.parametrize("kind", ["bdd100k", "bdd10k"])
def test_layout_not_found(tmp_path: Path, kind: str) -> None:
    jpeg(tmp_path / "random" / "x.jpg")
    with pytest.raises(DatasetError, match=f"no {kind.upper()} images under {re.escape(str(tmp_path))}"):
        discover(kind, tmp_path)


def test_split_missing_lists_present_splits(tmp_path: Path) -> None:
    root = make_bdd100k(tmp_path, {"train": ["a"], "val": ["b"]})
    with pytest.raises(DatasetError, match="split 'tain' not found") as err:
        discover("bdd100k", root, "tain")
    assert "splits present" in str(err.value) and "train, val" in str(err.value)
    assert str(root.resolve() / "images" / "100k" / "tain") in str(err.value)


def test_empty_split(tmp_path: Path) -> None:
    root = make_bdd100k(tmp_path, {"train": ["a"]})
    empty = root / "images" / "100k" / "val"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"no images .* in {re.escape(str(empty.resolve()))}"):
        discover("bdd100k", root, "val")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    jpeg(tmp_path / "empty" / ".hidden" / "x.jpg")
    with pytest.raises(DatasetError, match="no images .* found in"):
        discover("folder", tmp_path / "empty")


def test_masks_required_where_layout_has_none(tmp_path: Path) -> None:
    root = make_bdd100k(tmp_path)
    with pytest.raises(DatasetError, match="no segmentation masks.*--data bdd10k"):
        discover("bdd100k", root, require_masks=True)
    with pytest.raises(DatasetError, match="masks are needed.*folder dataset.*--data bdd10k"):
        discover("folder", root, require_masks=True)


# --------------------------------------------------------------------------------------------------
# Clean file lists
# --------------------------------------------------------------------------------------------------


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("OODFAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "oodfast"


def test_default_file_list_path_is_per_dataset(tmp_path: Path) -> None:
    root = make_bdd100k(tmp_path)
    path = default_file_list_path("bdd100k", root, "train")
    assert path.parent == tmp_path / "cache" / "filelists"
    assert re.fullmatch(r"bdd100k-[0-9a-f]{12}-train\.txt", path.name)
    # The same folder spelled differently maps to the same list; another split or root does not.
    assert default_file_list_path("bdd100k", root / "images" / "..", "train") == path
    assert default_file_list_path("bdd100k", root, "val") != path
    assert default_file_list_path("bdd100k", tmp_path, "train") != path
    assert default_file_list_path("folder", root, None).name.endswith("-all.txt")


@pytest.mark.parametrize("split", ["train", None])
def test_file_list_round_trip(tmp_path: Path, split: str | None) -> None:
    rels = ["images/a b.jpg", "x/ünï.jpg", "z.png"]
    out = tmp_path / "lists" / "clean.txt"
    assert write_file_list(out, tmp_path, "folder", split, rels, excluded=["bad.jpg"]) == out
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1 + 3 + 1
    assert json.loads(lines[0]) == {"oodfast_file_list": 2, "root": str(tmp_path.resolve()), "kind": "folder",
                                    "split": split, "count": 3, "excluded": ["bad.jpg"]}
    assert [json.loads(line) for line in lines[1:-1]] == rels
    assert read_file_list(out) == (tmp_path.resolve(), "folder", split, rels)
    full = read_file_list_full(out)
    assert (full.excluded, full.version) == (["bad.jpg"], 2)
    assert [p.name for p in out.parent.iterdir()] == ["clean.txt"]  # no temp file left behind


#: Names a file list must hold: a leading '#' (read as a header by v1), the line and paragraph
#: separators and other characters str.splitlines() splits at, a newline, a carriage return,
#: spaces, non-ASCII, a quote and a backslash, and a byte that is not UTF-8 (a surrogate escape).
AWKWARD = ["#1.jpg", "# count: 9.jpg", "a\u2028b.jpg", "c\u2029d.jpg", "e\x85f.jpg", "g\x1ch.jpg",
           "line\nbreak.jpg", "cr\rlf.jpg", "  two  spaces .jpg", "ünï cødé 画像.jpg", 'q"uote\\.jpg',
           "bad\udcffbyte.jpg"]


def test_file_list_holds_any_file_name(tmp_path: Path) -> None:
    out = write_file_list(tmp_path / "l.txt", tmp_path, "folder", None, AWKWARD)
    assert read_file_list(out)[3] == AWKWARD
    assert out.read_bytes().isascii() and out.read_bytes().count(b"\n") == 1 + len(AWKWARD)


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any byte in a name")
def test_folder_of_awkward_names_round_trips_through_the_default_list(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    for name in AWKWARD:
        jpeg(Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(name)))))
    everything = discover("folder", root)
    assert sorted(everything.relative()) == sorted(AWKWARD)
    write_file_list(default_file_list_path("folder", root, None), root, "folder", None, everything.relative())
    assert discover("folder", root).relative() == everything.relative()


def test_v1_lists_are_still_read_and_a_hash_name_no_longer_blocks(tmp_path: Path) -> None:
    """A v1 list (the old text format) holding ``#1.jpg`` and a U+2028 name: the v1 reader called it
    incomplete forever (the '#' line was taken for a header, splitlines() split the other)."""
    root = tmp_path / "pics"
    for name in ("#1.jpg", "a\u2028b.jpg", "plain.jpg"):
        jpeg(root / name)
    v1 = default_file_list_path("folder", root, None)
    v1.parent.mkdir(parents=True)
    v1.write_text("\n".join(["# oodfast clean file list v1", f"# root: {root.resolve()}", "# kind: folder",
                             "# split: -", "# count: 2", "#1.jpg", "a\u2028b.jpg"]) + "\n", encoding="utf-8")
    assert read_file_list(v1) == (root.resolve(), "folder", None, ["#1.jpg", "a\u2028b.jpg"])
    assert read_file_list_full(v1).version == 1
    assert discover("folder", root).relative() == ["#1.jpg", "a\u2028b.jpg"]


def test_read_file_list_rejects_bad_lists(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*oodfast data check"):
        read_file_list(tmp_path / "missing.txt")
    other = tmp_path / "other.txt"
    other.write_text("a.jpg\nb.jpg\n")
    with pytest.raises(DatasetError, match="is not an oodfast clean file list"):
        read_file_list(other)
    cut = write_file_list(tmp_path / "cut.txt", tmp_path, "folder", None, ["a.jpg", "b.jpg"])
    cut.write_text(cut.read_text().replace('"b.jpg"\n', ""))
    with pytest.raises(DatasetError, match="incomplete: header says 2 files, it holds 1"):
        read_file_list(cut)
    damaged = write_file_list(tmp_path / "d.txt", tmp_path, "folder", None, ["a.jpg"])
    damaged.write_text(damaged.read_text().replace('"a.jpg"', '"a.jpg'))
    with pytest.raises(DatasetError, match="d.txt is damaged"):
        read_file_list(damaged)
    future = tmp_path / "f.txt"
    future.write_text('{"oodfast_file_list": 3}\n')
    with pytest.raises(DatasetError, match="format version 3"):
        read_file_list(future)


def test_explicit_file_list_selects_files_and_keeps_masks_aligned(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path, stems=("a", "b", "c", "d"))
    everything = discover("bdd10k", root, "train")
    keep = ["images/10k/train/d.jpg", "images/10k/train/b.jpg"]
    lst = write_file_list(tmp_path / "l.txt", everything.root, "bdd10k", "train", keep)
    files = discover("bdd10k", root, "train", file_list=lst)
    assert files.relative() == sorted(keep)
    assert_aligned(files, ".png")
    assert [m.stem for m in files.masks or ()] == ["b", "d"]


def test_file_list_for_another_root_or_split(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path)
    elsewhere = write_file_list(tmp_path / "e.txt", tmp_path / "elsewhere", "bdd10k", "train", [])
    with pytest.raises(DatasetError, match="was written for root .*elsewhere.*oodfast data check"):
        discover("bdd10k", root, "train", file_list=elsewhere)
    val = write_file_list(tmp_path / "v.txt", root, "bdd10k", "val", [])
    with pytest.raises(DatasetError, match="is for bdd10k split val, not bdd10k split train"):
        discover("bdd10k", root, "train", file_list=val)


def test_file_list_naming_missing_file(tmp_path: Path) -> None:
    root = make_bdd10k(tmp_path)
    lst = write_file_list(tmp_path / "l.txt", root, "bdd10k", "train",
                          ["images/10k/train/a.jpg", "images/10k/train/gone.jpg"])
    with pytest.raises(DatasetError, match=r"1 listed file\(s\) do not exist .*gone\.jpg.*oodfast data check"):
        discover("bdd10k", root, "train", file_list=lst)
    other_split = write_file_list(tmp_path / "o.txt", root, "bdd10k", "train", ["images/10k/val/a.jpg"])
    with pytest.raises(DatasetError, match="not images of this split"):
        discover("bdd10k", root, "train", file_list=other_split)


def test_default_file_list_is_applied(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_bdd100k(tmp_path, {"train": ["a", "b", "c", "d"], "val": ["v", "w"]})
    default = default_file_list_path("bdd100k", root, "train")
    write_file_list(default, root, "bdd100k", "train",
                    ["images/100k/train/a.jpg", "images/100k/train/c.jpg"],
                    excluded=["images/100k/train/b.jpg", "images/100k/train/d.jpg"])
    with caplog.at_level(logging.INFO, logger="oodfast.data.discover"):
        files = discover("bdd100k", tmp_path, "train")  # any root level finds the same list
    assert files.relative() == ["images/100k/train/a.jpg", "images/100k/train/c.jpg"]
    assert "excludes 2 of 4" in caplog.text and str(default) in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # known-bad files: no warning
    # `data check` needs every file: it opts out of the default list.
    assert len(discover("bdd100k", root, "train", use_default_list=False)) == 4
    # Lists are per split: val is untouched.
    assert len(discover("bdd100k", root, "val")) == 2


def test_images_added_after_the_check_are_a_warning_with_the_command(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_bdd10k(tmp_path / "my data", stems=("a", "b"))
    write_file_list(default_file_list_path("bdd10k", root, "train"), root, "bdd10k", "train",
                    ["images/10k/train/a.jpg"], excluded=["images/10k/train/b.jpg"])
    for stem in ("new1", "new2"):
        jpeg(root / "images" / "10k" / "train" / f"{stem}.jpg")
        png_mask(root / "labels" / "sem_seg" / "masks" / "train" / f"{stem}.png")
    with caplog.at_level(logging.INFO, logger="oodfast.data.discover"):
        files = discover("bdd10k", root, "train")
    assert files.relative() == ["images/10k/train/a.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    command = f"oodfast data check --data bdd10k --data-root '{root.resolve()}' --split train"
    assert warnings[0].startswith("2 image(s) under ") and "NOT used" in warnings[0]
    assert "new1.jpg" in warnings[0] and warnings[0].endswith(f"run: {command}")
    # An explicit list that is not the default one: the command writes to it.
    explicit = write_file_list(tmp_path / "mine.txt", root, "bdd10k", "train", ["images/10k/train/a.jpg"])
    caplog.clear()
    discover("bdd10k", root, "train", file_list=explicit)
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage().endswith(f"run: {command} --out {explicit}")


def test_v1_list_warns_that_it_cannot_tell_new_files_from_bad(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_bdd100k(tmp_path, {"train": ["a", "b"]})
    v1 = default_file_list_path("bdd100k", root, "train")
    v1.parent.mkdir(parents=True)
    v1.write_text(f"# oodfast clean file list v1\n# root: {root.resolve()}\n# kind: bdd100k\n# split: train\n"
                  "# count: 1\nimages/100k/train/a.jpg\n")
    with caplog.at_level(logging.WARNING, logger="oodfast.data.discover"):
        assert len(discover("bdd100k", root, "train")) == 1
    assert "old v1 format" in caplog.text
    assert f"oodfast data check --data bdd100k --data-root {root.resolve()} --split train" in caplog.text
