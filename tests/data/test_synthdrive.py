"""synthdrive: determinism, BDD10K format and layout, the long tail, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodfast.data.classes import CLASS_IDS, IGNORE_ID, NUM_CLASSES, RARE_CLASS_IDS
from oodfast.data.discover import discover
from oodfast.data.synthdrive import (
    MANIFEST_NAME,
    SynthConfig,
    ensure_synthdrive,
    frame_name,
    generate,
    render_frame,
)

SMALL = SynthConfig(width=192, height=108)
VALID_IDS = set(range(NUM_CLASSES)) | {IGNORE_ID}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthdrive") / "sd"
    manifest = generate(root, 24, seed=5, config=SMALL, val_fraction=0.25, workers=2)
    return root, manifest


def test_render_is_deterministic_per_seed_and_index() -> None:
    a_img, a_mask, a_info = render_frame(SMALL, 1, 7)
    b_img, b_mask, b_info = render_frame(SMALL, 1, 7)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask) and a_info == b_info
    c_img, c_mask, _ = render_frame(SMALL, 2, 7)
    assert not np.array_equal(a_mask, c_mask)
    assert np.abs(a_img.astype(int) - c_img.astype(int)).mean() > 5


def test_frames_do_not_depend_on_count_or_workers(tmp_path: Path) -> None:
    generate(tmp_path / "a", 6, seed=3, config=SMALL, workers=1)
    generate(tmp_path / "b", 9, seed=3, config=SMALL, workers=2)
    for i in range(5):  # frames 0..4 are train in both (6 * 0.125 rounds to 1 val frame)
        name = frame_name(3, i)
        for sub, ext in (("images/10k/train", "jpg"), ("labels/sem_seg/masks/train", "png")):
            a = (tmp_path / "a" / sub / f"{name}.{ext}").read_bytes()
            b = (tmp_path / "b" / sub / f"{name}.{ext}").read_bytes()
            assert a == b, f"{sub}/{name}.{ext} differs between runs"


def test_bdd10k_layout_and_mask_format(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    assert manifest["splits"] == {"train": 18, "val": 6}
    for split, n in manifest["splits"].items():
        files = discover("bdd10k", root, split, require_masks=True, use_default_list=False)
        assert len(files) == n
        for image_path, mask_path in zip(files.images, files.masks):
            assert image_path.stem == mask_path.stem
            assert image_path.parent == root / "images" / "10k" / split
            assert mask_path.parent == root / "labels" / "sem_seg" / "masks" / split
            with Image.open(image_path) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (192, 108))
            with Image.open(mask_path) as mk:
                assert (mk.format, mk.mode, mk.size) == ("PNG", "L", (192, 108))
                values = set(np.unique(np.asarray(mk)).tolist())
            assert values <= VALID_IDS, f"{mask_path.name} holds {values - VALID_IDS}"
            assert {CLASS_IDS["road"], CLASS_IDS["sky"]} <= values


def test_manifest_records_counts_and_shares(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    on_disk = json.loads((root / MANIFEST_NAME).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["seed"] == 5 and on_disk["num_images"] == 24 and on_disk["size"] == [192, 108]
    assert sum(on_disk["class_pixel_share"].values()) == pytest.approx(1.0, abs=1e-4)
    frames = [json.loads(line) for line in (root / "synthdrive.jsonl").read_text().splitlines()]
    assert [f["index"] for f in frames] == list(range(24))
    assert on_disk["images_with_rare"] == sum(bool(f["rare_classes"]) for f in frames)
    # The per-frame record agrees with the mask on disk.
    for f in frames[:6]:
        mask = np.asarray(Image.open(root / "labels/sem_seg/masks" / f["split"] / f"{f['name']}.png"))
        present = {int(v) for v in np.unique(mask)} & set(RARE_CLASS_IDS)
        assert len(present) == len(f["rare_classes"])


def test_scenes_vary(tmp_path: Path) -> None:
    infos = [render_frame(SMALL, 0, i)[2] for i in range(40)]
    assert len({i["time_of_day"] for i in infos}) >= 2
    assert len({i["weather"] for i in infos}) >= 2
    assert np.std([i["camera_height"] for i in infos]) > 0.1
    assert np.std([i["horizon"] for i in infos]) > 2


def test_default_tail_matches_the_papers_prevalence(tmp_path: Path) -> None:
    """About 15% of random global crops hold a rare object (BDD10K: 0.158). 400 frames: +-0.05."""
    m = generate(tmp_path / "p", 400, seed=11, config=SynthConfig(width=128, height=72), workers=2)
    prevalence = m["rare_crop_prevalence"]["value"]
    assert 0.10 <= prevalence <= 0.22, prevalence
    shares = m["class_pixel_share"]
    rare_total = sum(shares[n] for n in ("person", "rider", "bicycle", "motorcycle", "traffic sign",
                                         "traffic light", "pole", "train"))
    assert rare_total < 0.01 < shares["car"] + shares["truck"] + shares["bus"]


def test_frequencies_are_configurable(tmp_path: Path) -> None:
    tiny = dict(width=128, height=72)
    none = generate(tmp_path / "none", 40, config=SynthConfig(**tiny, rare_image_prob=0.0), workers=1)
    assert none["images_with_rare"] == 0 and none["rare_crop_prevalence"]["value"] == 0.0
    trains = generate(tmp_path / "trains", 40, workers=1,
                      config=SynthConfig(**tiny, rare_image_prob=1.0, rare_weights={"train": 1.0}))
    assert trains["images_per_rare_class"]["train"] >= 30
    assert trains["images_per_rare_class"]["person"] == 0
    assert trains["rare_crop_prevalence"]["value"] > 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=32), "at least 64x64"),
        (dict(rare_weights={"dog": 1.0}), "unknown rare classes"),
        (dict(rare_image_prob=1.5), "rare_image_prob"),
        (dict(night_prob=0.7, dusk_prob=0.5), "sum to at most 1"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_generate_refuses_to_clobber(tmp_path: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(other, 2, config=SMALL)
    with pytest.raises(FileExistsError, match="something other than a synthdrive dataset"):
        generate(other, 2, config=SMALL, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_ensure_synthdrive_generates_once_and_discovers(tmp_path: Path) -> None:
    spec = dict(num_images=8, seed=2, width=128, height=72)
    root = ensure_synthdrive(tmp_path, progress=False, **spec)
    stamp = (root / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_synthdrive(tmp_path, progress=False, **spec) == root
    assert (root / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
    files = discover("synthetic", tmp_path, "train", require_masks=True, synthetic=spec)
    assert files.kind == "synthetic" and files.root == root.resolve() and len(files) == 7
    with pytest.raises(TypeError, match="unknown spec keys"):
        ensure_synthdrive(tmp_path, frames=3)


def _run_piped(script: str, cwd: Path):
    """Run ``script`` as ``python - < script``: __main__.__file__ is "<stdin>", which spawn cannot re-import."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True, cwd=cwd, timeout=300)


def test_generate_from_a_piped_script_draws_in_process(tmp_path: Path) -> None:
    result = _run_piped(
        "from oodfast.data.synthdrive import SynthConfig, generate\n"
        f"m = generate({str(tmp_path / 'sd')!r}, 4, seed=0, config=SynthConfig(width=96, height=64), workers=2,"
        " progress=False)\n"
        "print('frames', m['num_images'])\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "frames 4" in result.stdout and "cannot be re-imported" in result.stderr


def test_a_dead_worker_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    # Force the pool where workers cannot start: each dies at once, which multiprocessing.Pool would
    # wait on forever.
    result = _run_piped(
        "import oodfast.data.synthdrive.dataset as sd\n"
        "sd._main_reimportable = lambda: True\n"
        f"sd.generate({str(tmp_path / 'sd')!r}, 4, seed=0, config=sd.SynthConfig(width=96, height=64), workers=2,"
        " progress=False)\n", tmp_path)
    assert result.returncode != 0
    assert "RuntimeError: synthdrive: a worker process died" in result.stderr and "workers=1" in result.stderr
