"""``oodfast data check``: planted bad files are found, the clean list excludes exactly them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from oodfast.data.check import CheckReport, check_dataset, check_file, read_file_list
from oodfast.data.discover import default_file_list_path, discover

SIZE = (64, 48)
IMAGES = Path("images/10k/train")
MASKS = Path("labels/sem_seg/masks/train")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("OODFAST_CACHE", str(cache))
    return cache


def jpeg_bytes(size: tuple[int, int] = SIZE, mode: str = "RGB", seed: int = 0) -> bytes:
    """A noisy JPEG (noise keeps the entropy-coded data long, so cutting it truncates pixels)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def mask_image(size: tuple[int, int] = SIZE, values: tuple[int, ...] = (0, 13, 18, 255)) -> Image.Image:
    """A mode-L mask striped with ``values``."""
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    for i, v in enumerate(values):
        arr[:, i::len(values)] = v
    return Image.fromarray(arr, mode="L")


def add_pair(root: Path, stem: str, image: bytes | None = None, mask: Image.Image | None = None) -> None:
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    (root / MASKS).mkdir(parents=True, exist_ok=True)
    (root / IMAGES / f"{stem}.jpg").write_bytes(jpeg_bytes() if image is None else image)
    (mask if mask is not None else mask_image()).save(root / MASKS / f"{stem}.png")


#: stem -> pattern the reason must match (full match).
PLANTED_BAD = {
    "zero": r"zero-byte file",
    "trunc": r"truncated \(image file is truncated.*\)",
    "noise": r"not an image \(PIL: cannot identify image file\)",
    "small": r"too small \(16x20; each side needs >= 32 px\)",
    "mask_value": r"mask labels/sem_seg/masks/train/mask_value\.png: values outside 0\.\.18 and 255: 77",
    "mask_size": r"mask labels/sem_seg/masks/train/mask_size\.png: size 32x48 differs from the image's 64x48",
    "mask_rgb": r"mask labels/sem_seg/masks/train/mask_rgb\.png: mode RGB, expected single-channel 8-bit \(L or P\)",
    "mask_trunc": r"mask labels/sem_seg/masks/train/mask_trunc\.png: truncated \(.*\)",
}


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A BDD10K train split: 3 good pairs, 1 CMYK image (warning) and one pair per planted defect."""
    root = tmp_path / "bdd10k"
    for stem in ("good1", "good2", "good3"):
        add_pair(root, stem)
    add_pair(root, "cmyk", image=jpeg_bytes(mode="CMYK"))
    add_pair(root, "zero", image=b"")
    add_pair(root, "trunc", image=jpeg_bytes()[: len(jpeg_bytes()) // 2])
    add_pair(root, "noise", image=np.random.default_rng(1).bytes(3000))
    add_pair(root, "small", image=jpeg_bytes((16, 20)), mask=mask_image((16, 20)))
    add_pair(root, "mask_value", mask=mask_image(values=(0, 77, 255)))
    add_pair(root, "mask_size", mask=mask_image((32, 48)))
    add_pair(root, "mask_rgb", mask=mask_image().convert("RGB"))
    add_pair(root, "mask_trunc")
    mask = root / MASKS / "mask_trunc.png"
    full = io.BytesIO()
    mask_image(values=tuple(range(19))).save(full, "PNG", compress_level=0)
    mask.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("workers", [1, 2])
def test_check_finds_planted_files(planted: Path, workers: int) -> None:
    before = snapshot(planted)
    files = discover("bdd10k", planted, "train")
    report = check_dataset(files, workers=workers, progress=False)

    bad = {Path(b.path).stem: b.reason for b in report.bad}
    assert set(bad) == set(PLANTED_BAD)
    for stem, pattern in PLANTED_BAD.items():
        assert re.fullmatch(pattern, bad[stem]), (stem, bad[stem])
    assert all(b.path == (IMAGES / f"{Path(b.path).stem}.jpg").as_posix() for b in report.bad)
    assert [(w.path, w.reason) for w in report.warnings] == [
        ((IMAGES / "cmyk.jpg").as_posix(), "mode CMYK (not RGB; converted when loaded)")]

    assert (report.kind, report.root, report.split) == ("bdd10k", planted.resolve(), "train")
    assert report.n_total == 4 + len(PLANTED_BAD) and report.n_ok == 4
    assert report.file_list == default_file_list_path("bdd10k", planted, "train")
    root, kind, split, rels = read_file_list(report.file_list)
    assert (root, kind, split) == (planted.resolve(), "bdd10k", "train")
    assert rels == [(IMAGES / f"{s}.jpg").as_posix() for s in ("cmyk", "good1", "good2", "good3")]

    # The dataset is only read: same files, same bytes, nothing written under it.
    assert snapshot(planted) == before


def test_discover_then_uses_the_clean_list(planted: Path) -> None:
    check_dataset(discover("bdd10k", planted, "train"), workers=1, progress=False)
    files = discover("bdd10k", planted, "train")
    assert [p.stem for p in files.images] == ["cmyk", "good1", "good2", "good3"]
    assert [p.name for p in files.masks or ()] == ["cmyk.png", "good1.png", "good2.png", "good3.png"]
    # Re-checking sees every file again, not just the listed ones.
    again = check_dataset(discover("bdd10k", planted, "train", use_default_list=False),
                          workers=1, progress=False)
    assert again.n_total == 4 + len(PLANTED_BAD)


def test_check_folder_with_explicit_out(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    (root / "ok.JPG").write_bytes(jpeg_bytes())
    Image.new("RGBA", SIZE).save(root / "sub" / "alpha.png")
    Image.new("P", SIZE).save(root / "sub" / "palette.png")
    Image.new("L", SIZE).save(root / "gray.jpeg", "JPEG")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(full, "PNG")
    (root / "sub" / "cut.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    Image.new("RGB", SIZE).save(root / "anim.jpg", "GIF")  # a GIF in disguise: DALI cannot decode it

    out = tmp_path / "my-list.txt"
    report = check_dataset(discover("folder", root), out=out, progress=False, workers=2)
    assert report.file_list == out and report.split is None
    assert {b.path: b.reason.split(" (")[0] for b in report.bad} == {
        "anim.jpg": "unsupported format GIF", "sub/cut.png": "truncated"}
    assert {w.path: w.reason for w in report.warnings} == {
        "gray.jpeg": "mode L (not RGB; converted when loaded)",
        "sub/alpha.png": "mode RGBA (not RGB; converted when loaded)",
        "sub/palette.png": "mode P (not RGB; converted when loaded)",
    }
    assert read_file_list(out) == (root.resolve(), "folder", None,
                                   ["gray.jpeg", "ok.JPG", "sub/alpha.png", "sub/palette.png"])
    assert not default_file_list_path("folder", root, None).exists()
    assert discover("folder", root, file_list=out).relative() == read_file_list(out)[3]


def test_truncation_detected_even_if_caller_allows_truncated_images(tmp_path: Path) -> None:
    data = jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        status, reason = check_file(str(tmp_path), "cut.jpg")
        assert status == "bad" and reason.startswith("truncated")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.jpg"
    path.write_bytes(jpeg_bytes())
    path.chmod(0)
    try:
        assert check_file(str(tmp_path), "locked.jpg") == ("bad", "unreadable: Permission denied")
    finally:
        path.chmod(0o644)


def test_report_to_dict_is_json(planted: Path) -> None:
    report = check_dataset(discover("bdd10k", planted, "train"), workers=1, progress=False)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["root"] == str(planted.resolve()) and d["file_list"] == str(report.file_list)
    assert d["n_total"] == report.n_total and d["n_ok"] == 4
    assert {"path": (IMAGES / "zero.jpg").as_posix(), "reason": "zero-byte file"} in d["bad"]
    assert isinstance(report, CheckReport) and d["seconds"] >= 0


#: '#' first (v1 read it as a header), the separators str.splitlines() splits at, a newline, a
#: carriage return, spaces and non-ASCII: names the check once crashed on or lists could not hold.
AWKWARD = ["#1.jpg", "a\u2028b.jpg", "c\u2029d.jpg", "e\x85f.jpg", "line\nbreak.jpg", "cr\rlf.jpg",
           "  spaced out .jpg", "ünï 画像.jpg"]


def test_check_and_training_take_any_file_name(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    for name in AWKWARD:
        (root / name).write_bytes(jpeg_bytes())
    (root / "#bad.jpg").write_bytes(b"")
    report = check_dataset(discover("folder", root), workers=2, progress=False)
    assert [b.path for b in report.bad] == ["#bad.jpg"] and report.n_ok == len(AWKWARD)
    assert sorted(read_file_list(report.file_list)[3]) == sorted(AWKWARD)
    # discover applies the list (the '#' names are files, not headers) and every name is found.
    assert sorted(discover("folder", root).relative()) == sorted(AWKWARD)
    # Re-running the check is stable.
    again = check_dataset(discover("folder", root, use_default_list=False), workers=1, progress=False)
    assert read_file_list(again.file_list) == read_file_list(report.file_list)


def test_images_added_after_the_check_warn_with_the_refresh_command(
        planted: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    check_dataset(discover("bdd10k", planted, "train"), workers=1, progress=False)
    with caplog.at_level(logging.INFO, logger="oodfast.data.discover"):
        assert len(discover("bdd10k", planted, "train")) == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # only the known-bad are left out
    add_pair(planted, "later")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="oodfast.data.discover"):
        assert len(discover("bdd10k", planted, "train")) == 4  # still the checked files only
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 image(s) under" in warning and "images/10k/train/later.jpg" in warning
    command = f"oodfast data check --data bdd10k --data-root {planted.resolve()} --split train"
    assert warning.endswith(f"to check them and refresh the list, run: {command}")
    check_dataset(discover("bdd10k", planted, "train", use_default_list=False), workers=1, progress=False)
    assert len(discover("bdd10k", planted, "train")) == 5  # the command's effect


def test_report_keeps_one_row_per_file_whatever_its_name(tmp_path: Path) -> None:
    from oodfast.data.check import report_markdown

    root = tmp_path / "pics"
    root.mkdir()
    (root / "ok.jpg").write_bytes(jpeg_bytes())
    (root / "line\nbreak.jpg").write_bytes(b"")
    (root / "#x\u2028y.jpg").write_bytes(b"")
    text = report_markdown(check_dataset(discover("folder", root), workers=1, progress=False))
    rows = [line for line in text.split("\n") if "zero-byte file" in line]
    assert len(rows) == 2 and any(repr("line\nbreak.jpg") in r for r in rows)
    assert any(repr("#x\u2028y.jpg") in r for r in rows)
