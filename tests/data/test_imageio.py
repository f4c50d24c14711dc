"""Every PIL mode reaches the model as DALI's 8-bit RGB on every backend; the pixel limit; worker errors.

Each image is one constant colour, so every crop of it, however drawn, is that colour: with the
augmentation off, a view's pixels are the decoded value, whatever the backend's crop boxes.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodfast.data.check import check_dataset, check_file
from oodfast.data.discover import discover
from oodfast.data.imageio import MAX_PIXELS_ENV, ImageFileError, load_rgb8, max_image_pixels
from oodfast.data.multicrop import MultiCropConfig, MultiCropDataError, multicrop_loader

SIZE = (64, 48)
CFG = MultiCropConfig(global_size=24, local_size=12, local_crops_number=1).without_augmentation()
MEAN = torch.tensor(CFG.mean).view(1, 3, 1, 1)
STD = torch.tensor(CFG.std).view(1, 3, 1, 1)
BACKENDS = ["dali", "paper", "torch"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png16_rgb(rgb: tuple[int, int, int], size: tuple[int, int] = SIZE) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), filled with ``rgb``."""
    w, h = size
    row = b"\x00" + np.tile(np.array(rgb, ">u2"), w).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))


def palette_with_transparency() -> bytes:
    im = Image.new("P", SIZE, 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return _save(im, "PNG", transparency=1)  # the only colour used is the transparent one


def i16(value: int) -> Image.Image:
    return Image.fromarray(np.full(SIZE[::-1], value, np.uint16))


#: name -> (file name, encoded bytes, the 8-bit RGB DALI gives, tolerance per backend).
#: 13050 / 257 = 50.8 -> 51 (PIL's convert("RGB") clips it to 255; v >> 8 would give 50).
CASES = {
    "I;16 png": ("g16.png", _save(i16(13050), "PNG"), (51, 51, 51), {}),
    "I;16 tiff": ("g16.tif", _save(i16(13050), "TIFF"), (51, 51, 51), {}),
    # PIL keeps the high byte of 16-bit RGB (v >> 8: 50, 156, 255), one level from DALI's rounding.
    "RGB 16-bit png": ("rgb16.png", png16_rgb((13050, 40000, 65535)), (51, 156, 255), {"paper": 1}),
    "F tiff in [0, 1]": ("f.tif", _save(Image.new("F", SIZE, 0.2), "TIFF"), (51, 51, 51), {}),
    "LA png": ("la.png", _save(Image.new("LA", SIZE, (100, 50)), "PNG"), (100, 100, 100), {}),
    "P + transparency": ("p.png", palette_with_transparency(), (10, 200, 30), {}),
    "CMYK jpeg": ("cmyk.jpg", _save(Image.new("CMYK", SIZE, (10, 60, 200, 20)), "JPEG", quality=95),
                  None, {"dali": 2, "torch": 2}),
    "1 png": ("bw.png", _save(Image.new("1", SIZE, 1), "PNG"), (255, 255, 255), {}),
    "RGBA png": ("rgba.png", _save(Image.new("RGBA", SIZE, (30, 60, 90, 0)), "PNG"), (30, 60, 90), {}),
    "L bmp": ("l.bmp", _save(Image.new("L", SIZE, 77), "BMP"), (77, 77, 77), {}),
    "RGB tiff": ("rgb.tif", _save(Image.new("RGB", SIZE, (5, 6, 7)), "TIFF"), (5, 6, 7), {}),
}


def loader(paths: list[Path], backend: str, batch_size: int = 1, **kw):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    workers = {"paper": 0, "dali": 1}.get(backend)
    kw.setdefault("num_workers", workers)
    return multicrop_loader(paths, CFG, batch_size, device="cpu", seed=0, backend=backend, **kw)


def decoded_rgb(batch) -> torch.Tensor:
    """[V, 3] per-view mean colour, and asserts each view is one colour (it is a crop of one)."""
    means = []
    for v in batch.views:
        px = (v.float() * STD + MEAN) * 255.0
        flat = px[0].reshape(3, -1)
        assert (flat.max(1).values - flat.min(1).values).max() < 1.0, "a constant image gave a non-constant crop"
        means.append(flat.mean(1))
    return torch.stack(means)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_dalis_8bit_rgb(tmp_path: Path, case: str, backend: str) -> None:
    name, data, expected, tol = CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    if expected is None:  # CMYK: PIL's conversion of the decoded JPEG is the expected colour
        expected = tuple(np.asarray(Image.open(path).convert("RGB"))[0, 0].tolist())
    got = decoded_rgb(next(iter(loader([path], backend))))
    err = (got - torch.tensor(expected, dtype=torch.float32)).abs().max().item()
    assert err <= tol.get(backend, 0) + 0.5, f"{case} on {backend}: got {got[0].tolist()}, DALI gives {expected}"


def test_a_16bit_image_in_a_batch_of_8bit_ones(tmp_path: Path) -> None:
    """torch: torchvision returns uint16 for the 16-bit file; it is scaled, not stacked as 0..65535."""
    (tmp_path / "g16.png").write_bytes(CASES["I;16 png"][1])
    Image.new("RGB", SIZE, (51, 51, 51)).save(tmp_path / "rgb.png")
    for backend in ("torch", "paper"):
        batch = next(iter(loader([tmp_path / "g16.png", tmp_path / "rgb.png"], backend, batch_size=2)))
        px = (batch.views[0].float() * STD + MEAN) * 255.0
        assert (px - 51).abs().max() <= 0.5, backend


def int32_tiff() -> bytes:
    return _save(Image.fromarray(np.full(SIZE[::-1], 70000, np.int32), "I"), "TIFF")


@pytest.mark.parametrize("backend", BACKENDS)
def test_32bit_integer_images_are_refused_naming_the_file(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "int32.tif"
    path.write_bytes(int32_tiff())
    with pytest.raises(MultiCropDataError) as e:
        next(iter(loader([path], backend)))
    msg = str(e.value)
    assert str(path) in msg and "32-bit integer" in msg and "oodfast data check" in msg and "\n" not in msg


@pytest.mark.parametrize("backend", ["paper", "torch"])
def test_float_images_outside_0_1_are_refused_not_clipped(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "f255.tif"
    path.write_bytes(_save(Image.new("F", SIZE, 200.0), "TIFF"))
    with pytest.raises(MultiCropDataError, match=r"f255\.tif: float pixels must lie in \[0, 1\].*0\.\.200"):
        next(iter(loader([path], backend)))


def test_data_check_flags_or_refuses_each_mode(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    for name, data, _, _ in CASES.values():
        (root / name).write_bytes(data)
    (root / "int32.tif").write_bytes(int32_tiff())
    (root / "f255.tif").write_bytes(_save(Image.new("F", SIZE, 200.0), "TIFF"))
    # (The folder layout lists .jpg/.jpeg/.png only; BMP and TIFF reach the loaders as explicit paths.)
    result = {p.name: check_file(str(root), p.name) for p in root.iterdir()}
    bad = {name: reason for name, (status, reason) in result.items() if status == "bad"}
    assert set(bad) == {"int32.tif", "f255.tif"}
    assert bad["int32.tif"].startswith("32-bit integer pixels (mode I) have no defined 8-bit scale")
    assert bad["f255.tif"].startswith("mode F: float pixels must lie in [0, 1] (DALI's scale; it clips")
    warn = {name: reason for name, (status, reason) in result.items() if status == "warn"}
    assert warn["g16.png"] == "mode I;16 (16-bit; scaled to 8-bit when loaded)"
    assert warn["f.tif"] == "mode F (32-bit float in [0, 1]; scaled to 8-bit when loaded)"
    assert warn["cmyk.jpg"] == "mode CMYK (not RGB; converted when loaded)"
    assert result["rgb.tif"] == result["rgb16.png"] == ("ok", "")  # 8-bit RGB to PIL
    report = check_dataset(discover("folder", root), out=tmp_path / "l.txt", progress=False, workers=1)
    assert {w.path for w in report.warnings} == {n for n in warn if n.endswith((".png", ".jpg"))}


# --------------------------------------------------------------------------------------------------
# The pixel limit
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    """A 10000 x 10000 PNG (100 MP, over PIL's 89.5 MP warning threshold); tiny as a 1-bit file."""
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(path, optimize=True)
    return path


HUGE = (r"huge\.png is 10000x10000 = 100\.0 MP, over the 89\.5 MP limit: decoding it takes 286 MiB "
        r"\(8-bit RGB\) per copy, in every decoding thread, every epoch; downscale it, or raise the limit "
        r"with OODFAST_MAX_IMAGE_PIXELS=100000000")


def test_data_check_refuses_a_huge_image_without_pils_warning(huge: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        status, reason = check_file(str(huge.parent), huge.name)
    assert status == "bad"
    assert "huge.png is " + reason == HUGE.replace("\\", "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_refuse_a_huge_image_before_decoding(huge: Path, backend: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(MultiCropDataError, match=HUGE) as e:
            next(iter(loader([huge], backend)))
    assert "\n" not in str(e.value)


def test_pixel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", SIZE, (1, 2, 3)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3000")  # 64 x 48 = 3072
    assert max_image_pixels() == 3000
    status, reason = check_file(str(tmp_path), "small.png")
    assert status == "bad" and reason.startswith("64x48 = 0.0 MP, over the 0.0 MP limit")
    with pytest.raises(ImageFileError, match="small.png is 64x48"):
        load_rgb8(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "3072")
    assert check_file(str(tmp_path), "small.png") == ("ok", "")
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="OODFAST_MAX_IMAGE_PIXELS='lots' must be a positive whole number"):
        max_image_pixels()


def test_a_limit_above_pils_own_lets_pil_open_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over twice PIL's threshold PIL raises by itself; a user's higher limit must still apply."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses > 2000 px
    path = tmp_path / "a.png"
    Image.new("RGB", SIZE, (1, 2, 3)).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1500")  # below PIL's hard limit: PIL's own error, our message
    with pytest.raises(ImageFileError, match=r"a\.png is 0\.0 MP, over the 0\.0 MP limit: .*PIXELS=3072$"):
        load_rgb8(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    assert load_rgb8(path).getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------------


def test_a_worker_error_names_the_file_not_the_worker(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", SIZE, (1, 2, 3)).save(good)
    data = (tmp_path / "x.jpg")
    full = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)), "JPEG")
    data.write_bytes(full[: len(full) // 2])  # truncated: the header parses, decoding fails in the worker
    with pytest.raises(MultiCropDataError) as e:
        for _ in multicrop_loader([good, data], CFG, 2, device="cpu", seed=0, backend="paper", num_workers=1):
            pass
    msg = str(e.value)
    assert msg.startswith(f"cannot decode {data}: OSError: image file is truncated"), msg
    assert "DataLoader worker" not in msg and "Traceback" not in msg and "\n" not in msg
    assert msg.endswith("oodfast data check` on the dataset to write a clean file list that leaves it out")
