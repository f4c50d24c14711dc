"""Multi-crop augmentation (DALI CPU mode, the paper's path, torch): shapes, crop distributions, coin-flip
rates, boxes, determinism, sharding, small and corrupt images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms

from oodfast.data.discover import discover
from oodfast.data.multicrop import (
    MultiCropConfig,
    MultiCropDataError,
    ViewAug,
    epoch_plan,
    multicrop_loader,
    resolve_shard,
)
from oodfast.data.synthdrive import SynthConfig, generate

pytest.importorskip("nvidia.dali")

W, H = 160, 96  # source size: smaller than a 224 global crop, so every crop upsamples
MEAN = torch.tensor(MultiCropConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(MultiCropConfig().std).view(1, 3, 1, 1)
# Small outputs keep the statistical tests fast; the crops (boxes) do not depend on output size.
SMALL = MultiCropConfig(global_size=32, local_size=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("multicrop") / "sd"
    generate(root, 48, seed=3, config=SynthConfig(width=W, height=H), val_fraction=0.0, workers=2)
    return list(discover("bdd10k", root, "train", use_default_list=False).images)


def pixels(view: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, h, w] -> [0, 255] float."""
    return (view.float() * STD + MEAN) * 255.0


def first_batch(files: list[Path], config: MultiCropConfig, batch_size: int = 8, **kw):
    return next(iter(multicrop_loader(files, config, batch_size, device="cpu", seed=kw.pop("seed", 0), **kw)))


def run_epoch(files: list[Path], config: MultiCropConfig, **kw):
    kw.setdefault("batch_size", 64)
    ld = multicrop_loader(files, config, kw.pop("batch_size"), device="cpu", seed=kw.pop("seed", 0), **kw)
    return list(ld)


# --------------------------------------------------------------------------------------------------


def test_views_shapes_dtypes_ranges(files: list[Path]) -> None:
    cfg = MultiCropConfig.dino()
    batch = first_batch(files, cfg)
    assert len(batch.views) == 2 + 6
    for k, v in enumerate(batch.views):
        side = 224 if k < 2 else 96
        assert v.shape == (8, 3, side, side) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
        px = pixels(v)
        assert px.min() >= -0.01 and px.max() <= 255.01
        assert v.std() > 0.1
    assert batch.index.dtype == torch.int64 and batch.index.shape == (8,)
    assert batch.boxes.shape == (8, 2, 4) and batch.boxes.dtype == torch.int64
    assert len(set(batch.index.tolist())) == 8 and batch.index.max() < len(files)


def test_config_presets_and_validation() -> None:
    bdd = MultiCropConfig.bdd10k()
    assert bdd.global_scale == (0.3, 1.0) and bdd.local_scale == (0.1, 0.3) and bdd.local_crops_number == 6
    assert bdd.global1.jitter_p == 0 and bdd.local.blur_p == 0.5
    assert MultiCropConfig.dino().global2.solarize_p == 0.2
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 1.2))
    with pytest.raises(ValueError, match="flip_p"):
        ViewAug(flip_p=1.5)
    with pytest.raises(ValueError, match="backend"):
        multicrop_loader([Path("x.jpg")] * 4, None, 2, device="cpu", seed=0, backend="nope")


def test_crop_area_and_ratio_match_torchvision(files: list[Path]) -> None:
    # 32 batches x 64 images: 4096 global and 12288 local crops (boxes straight from the loader).
    cfg = dataclasses.replace(SMALL.without_augmentation(), local_crops_number=3)
    batches = run_epoch(files, cfg, epoch_length=2048, debug=True)
    glob_boxes = torch.cat([b.boxes.reshape(-1, 4) for b in batches]).numpy()
    loc = np.concatenate([np.stack([b.params[k][:, 2:] for k in ("x0", "y0", "x1", "y1")], -1).reshape(-1, 4)
                          for b in batches])
    img = Image.new("RGB", (W, H))
    torch.manual_seed(0)
    for boxes, scale in ((glob_boxes, cfg.global_scale), (loc, cfg.local_scale)):
        assert len(boxes) >= 2000
        ref = np.array([transforms.RandomResizedCrop.get_params(img, list(scale), list(cfg.ratio))
                        for _ in range(3000)])  # (i, j, h, w)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        for ours, theirs in ((w * h / (W * H), ref[:, 3] * ref[:, 2] / (W * H)),
                             (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                             (boxes[:, 0] / W, ref[:, 1] / W)):
            assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


ALL_OFF = SMALL.without_augmentation()


def _only(**per_kind: ViewAug) -> MultiCropConfig:
    return dataclasses.replace(ALL_OFF, **per_kind)


def _observed(kind: str, out: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: did ``kind`` visibly act on ``out`` (vs the un-augmented ``base``), and could it
    have (a solarisation of a crop with no value >= 128 changes nothing)? Two [B] bool."""
    po, pb = pixels(out), pixels(base)
    everywhere = torch.ones(len(out), dtype=torch.bool)
    if kind == "flip":
        assert ((out == base) | (out == base.flip(-1))).flatten(1).all(1).all(), "flip is not an exact mirror"
        return ~(out == base).flatten(1).all(1), ~(base == base.flip(-1)).flatten(1).all(1)
    if kind == "gray":
        spread = lambda x: (x.max(1).values - x.min(1).values).flatten(1).max(1).values  # noqa: E731
        return spread(po) < 1.5, spread(pb) > 1.5
    if kind == "solarize":
        solar = torch.where(pb.round() >= 128, 255 - pb.round(), pb.round())
        hit = (po.round() - solar).abs().flatten(1).max(1).values < 0.5
        same = (po - pb).abs().flatten(1).max(1).values < 0.5
        assert (hit | same).all(), "solarized views are not 255 - x above 128"
        return hit & ~same, (pb.round() >= 128).flatten(1).any(1)
    return (po - pb).abs().flatten(1).amax(1) > 0.5, everywhere  # jitter, blur: any visible change


@pytest.mark.parametrize("kind", ["flip", "jitter", "gray", "blur", "solarize"])
def test_each_augmentation_applied_at_its_probability(files: list[Path], kind: str) -> None:
    dino = MultiCropConfig.dino()
    on = {"flip": lambda a: dataclasses.replace(a.off(), flip_p=a.flip_p),
          "jitter": lambda a: dataclasses.replace(a.off(), jitter_p=a.jitter_p),
          "gray": lambda a: dataclasses.replace(a.off(), grayscale_p=a.grayscale_p),
          # sigma >= 1 makes every blur visible (sigma 0.1 leaves a 32 px crop unchanged)
          "blur": lambda a: dataclasses.replace(a.off(), blur_p=a.blur_p, blur_sigma=(1.0, 2.0)),
          "solarize": lambda a: dataclasses.replace(a.off(), solarize_p=a.solarize_p)}[kind]
    cfg = _only(global1=on(dino.global1), global2=on(dino.global2), local=on(dino.local))
    base = run_epoch(files, ALL_OFF, epoch_length=512)
    test = run_epoch(files, cfg, epoch_length=512, debug=True)
    flag = {"flip": "flip", "jitter": "jitter", "gray": "gray", "blur": "blur", "solarize": "solarize"}[kind]
    for v, (name, aug, _, _) in enumerate(cfg.view_kinds()):
        p = {"flip": aug.flip_p, "jitter": aug.jitter_p, "gray": aug.grayscale_p, "blur": aug.blur_p,
             "solarize": aug.solarize_p}[kind]
        seen, can = (torch.cat(x) for x in zip(*(_observed(kind, t.views[v], b.views[v])
                                                  for t, b in zip(test, base))))
        drawn = torch.cat([torch.from_numpy(t.params[flag][:, v] > 0.5) for t in test])
        assert can.float().mean() > 0.8, f"{kind} on {name}: too few observable images"
        seen, drawn = seen[can], drawn[can]
        assert torch.equal(seen, drawn), f"{kind} on {name}: effect seen != decision drawn"
        n = len(seen)
        sigma = max((p * (1 - p) / n) ** 0.5, 1e-9)
        assert abs(seen.float().mean().item() - p) <= 3 * sigma + 1e-9, f"{kind} on {name}: rate {seen.float().mean():.3f} vs p={p}"


def test_views_of_one_image_differ(files: list[Path]) -> None:
    batch = first_batch(files, SMALL)
    g1, g2 = batch.views[0], batch.views[1]
    assert ((g1 - g2).abs().flatten(1).mean(1) > 0.05).all()
    locs = torch.stack(batch.views[2:], 1)  # [B, 6, 3, h, w]
    diff = (locs[:, :, None] - locs[:, None]).abs().flatten(3).mean(3)  # [B, 6, 6]
    assert (diff + torch.eye(6) > 0.02).all()


def test_same_seed_same_output_and_epochs_reshuffle(files: list[Path]) -> None:
    a = run_epoch(files, SMALL, batch_size=16, seed=7)
    b = run_epoch(files, SMALL, batch_size=16, seed=7)
    c = run_epoch(files, SMALL, batch_size=16, seed=8)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.boxes, y.boxes)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    assert not torch.equal(a[0].index, c[0].index)
    ld = multicrop_loader(files, SMALL, 16, device="cpu", seed=7)
    e0 = torch.cat([x.index for x in ld])
    e1 = torch.cat([x.index for x in ld])
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == sorted(e1.tolist())
    ld.set_epoch(0)
    assert torch.equal(torch.cat([x.index for x in ld]), e0)


def _pil_crop(path: Path, box: list[int], size: int) -> torch.Tensor:
    with Image.open(path) as im:
        crop = im.convert("RGB").resize((size, size), Image.BICUBIC, box=tuple(box))
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()


@pytest.mark.parametrize("backend", ["dali", "paper", "torch"])
def test_boxes_lie_inside_and_match_the_crop(files: list[Path], backend: str) -> None:
    cfg = dataclasses.replace(MultiCropConfig.dino(), global_size=48, local_crops_number=1).without_augmentation()
    kw = {"num_workers": 0} if backend == "paper" else {}
    batch = first_batch(files, cfg, backend=backend, **kw)
    for b in range(8):
        path = files[int(batch.index[b])]
        for v in range(2):
            x0, y0, x1, y1 = batch.boxes[b, v].tolist()
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            out = pixels(batch.views[v][b: b + 1])[0]
            err = (out - _pil_crop(path, [x0, y0, x1, y1], 48)).abs().mean()
            shifted = [x0 + 7, y0, x1 + 7, y1] if x1 + 7 <= W else [x0 - 7, y0, x1 - 7, y1]
            wrong = (out - _pil_crop(path, shifted, 48)).abs().mean()
            tol = 0.6 if backend == "paper" else 4.0  # the paper's path is PIL itself
            assert err < tol and wrong > err + 1.0, f"{backend}: box {b}/{v} err {err:.2f} vs shifted {wrong:.2f}"


def test_torch_backend_shares_the_decisions(files: list[Path]) -> None:
    d = first_batch(files, SMALL, debug=True)
    t = first_batch(files, SMALL, backend="torch", debug=True)
    assert torch.equal(d.index, t.index) and torch.equal(d.boxes, t.boxes)
    assert all(np.array_equal(d.params[k], t.params[k]) for k in d.params)
    assert [v.shape for v in d.views] == [v.shape for v in t.views]


def test_paper_backend_in_workers(files: list[Path]) -> None:
    ld = multicrop_loader(files, SMALL, 8, device="cpu", seed=1, backend="paper", num_workers=2)
    batches = list(ld)
    assert len(batches) == len(ld) == 6
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(48))
    assert all(len(b.views) == 8 and b.views[2].shape == (8, 3, 16, 16) for b in batches)
    again = list(multicrop_loader(files, SMALL, 8, device="cpu", seed=1, backend="paper", num_workers=2))
    assert torch.equal(batches[0].views[0], again[0].views[0])  # seeded workers: reproducible


def test_reference_is_an_alias_of_the_paper_backend(files: list[Path]) -> None:
    from oodfast.data.multicrop.paper_loader import PaperMultiCropLoader

    assert isinstance(multicrop_loader(files, SMALL, 8, device="cpu", seed=1, backend="reference"), PaperMultiCropLoader)


def test_sharded_iterators_cover_the_epoch_once(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    for shard in range(3):
        ld = multicrop_loader(files, SMALL, 4, device="cpu", seed=2, shard_id=shard, num_shards=3)
        assert len(ld) == 48 // 12
        idx = torch.cat([b.index for b in ld]).tolist()
        assert len(idx) == 16
        seen.append(set(idx))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(48))
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_shard(None, None) == (2, 3)
    plan = epoch_plan(50, 4, seed=0, epoch=0, shard_id=1, num_shards=3)  # drop last: 50 // 12 = 4 steps
    assert plan.shape == (4, 4)
    long = epoch_plan(10, 4, seed=0, epoch=0, epoch_length=40)
    assert long.shape == (10, 4) and np.bincount(long.ravel()).tolist() == [4] * 10


def test_images_smaller_than_a_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for k, (w, h) in enumerate([(20, 12), (7, 9), (33, 5), (224, 96)]):
        p = tmp_path / f"tiny{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=95)
        paths.append(p)
    batch = first_batch(paths, MultiCropConfig.dino(), batch_size=4)
    assert batch.views[0].shape == (4, 3, 224, 224) and torch.isfinite(batch.views[0]).all()
    sizes = {0: (20, 12), 1: (7, 9), 2: (33, 5), 3: (224, 96)}
    for b in range(4):
        w, h = sizes[int(batch.index[b])]
        assert (batch.boxes[b, :, 2] <= w).all() and (batch.boxes[b, :, 3] <= h).all()
        assert (batch.boxes[b, :, :2] >= 0).all()


def test_corrupt_file_error_names_the_file(files: list[Path], tmp_path: Path) -> None:
    data = files[0].read_bytes()
    cut = tmp_path / "cut.jpg"  # a readable header, no scan: DALI's decoder rejects it
    cut.write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")
    junk = tmp_path / "junk.jpg"  # not an image at all: caught before DALI
    junk.write_bytes(b"not a jpeg" * 10)
    for bad in (cut, junk):
        paths = list(files[:7]) + [bad]
        with pytest.raises(MultiCropDataError, match=str(bad)) as e:
            for _ in multicrop_loader(paths, SMALL, 8, device="cpu", seed=0):
                pass
        assert "oodfast data check" in str(e.value)


def test_missing_file_and_bad_options_raise_clearly(files: list[Path], tmp_path: Path) -> None:
    gone = tmp_path / "gone.jpg"
    with pytest.raises(MultiCropDataError, match="gone.jpg") as e:
        for _ in multicrop_loader(list(files[:7]) + [gone], SMALL, 8, device="cpu", seed=0):
            pass
    assert "oodfast data check" in str(e.value)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        multicrop_loader(files, SMALL, 8, device="cpu", seed=0, backend="reference", hw_decoder_load=0.5)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        multicrop_loader(files, SMALL, 8, device="cpu", seed=0, hw_decoder_load=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        multicrop_loader(files, SMALL, 64, device="cpu", seed=0)


def test_missing_dali_is_a_clear_error_naming_the_alternatives(files: list[Path], monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as on a machine without DALI
    with pytest.raises(ValueError, match="pip install nvidia-dali-cuda130") as e:
        multicrop_loader(files, SMALL, 8, device="cpu", seed=0)
    assert "--aug torch" in str(e.value)
    assert len(multicrop_loader(files, SMALL, 8, device="cpu", seed=0, backend="torch")) > 0  # others still work


def test_gpu_pipeline_graph_is_valid_without_a_gpu() -> None:
    # The GPU graph is traced (not run): every per-sample argument input must come from the CPU,
    # the decoder must be the mixed one and every view must leave the pipeline on the GPU.
    from oodfast.data.multicrop import build_dali_pipeline

    pipe = build_dali_pipeline(lambda: None, MultiCropConfig.dino(), 4, device_id=0, num_threads=1,
                               out_dtype=torch.float16)
    if not hasattr(pipe, "_build_graph"):
        pytest.skip("this DALI version does not expose graph tracing without a device")
    pipe._build_graph()
    specs = [(type(op._op).__name__ if not hasattr(op._op, "schema_name") else op._op.schema_name, op.spec)
             for op in pipe._ops]
    gpu_args = [(name, s.InputName(i)) for name, s in specs
                for i in range(s.NumRegularInput(), s.NumInput()) if s.InputDevice(i) != "cpu"]
    assert gpu_args == [], f"argument inputs on the GPU: {gpu_args}"
    devices = {name: {s.OutputDevice(i) for i in range(s.NumOutput())} for name, s in specs}
    assert devices["decoders__Image"] == {"gpu"}
    assert devices["CropMirrorNormalize"] == {"gpu"} and devices["Hsv"] == {"gpu"}


def test_colour_jitter_matches_torchvision_factors(files: list[Path]) -> None:
    # Jitter only, on the globals: DALI's output against torchvision's PIL ops with the drawn
    # factors (order B, C, S, H). DALI's hue is a chroma rotation, PIL's an HSV shift, so hue is
    # checked by direction: the drawn shift must fit clearly better than the opposite one (a sign
    # error, or a fraction of the circle passed as degrees, fails this).
    from torchvision.transforms import functional as TF

    jit = dataclasses.replace(ViewAug().off(), jitter_p=1.0)
    cfg = dataclasses.replace(MultiCropConfig(global_size=48, local_crops_number=0).without_augmentation(),
                              global1=jit, global2=jit)
    batch = first_batch(files, cfg, batch_size=16, debug=True)

    def ref(b: int, v: int, hue_sign: float) -> torch.Tensor:
        with Image.open(files[int(batch.index[b])]) as im:
            img = im.convert("RGB").resize((48, 48), Image.BICUBIC, box=tuple(batch.boxes[b, v].tolist()))
        q = {k: float(batch.params[k][b, v]) for k in ("brightness", "contrast", "saturation", "hue_deg")}
        img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, q["brightness"]), q["contrast"]),
                                   q["saturation"])
        img = TF.adjust_hue(img, hue_sign * q["hue_deg"] / 360.0)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()

    err = {1.0: [], -1.0: []}
    for b in range(16):
        for v in range(2):
            out = pixels(batch.views[v][b: b + 1])[0]
            for sign in err:
                err[sign].append(float((out - ref(b, v, sign)).abs().mean()))
    same, opposite = np.mean(err[1.0]), np.mean(err[-1.0])
    assert same < 5.0, f"mean error {same:.2f} levels vs torchvision's jitter"
    assert opposite > 1.2 * same, f"hue: error {same:.2f} with the drawn shift vs {opposite:.2f} with its opposite"


# --------------------------------------------------------------------------------------------------
# The DALI loader's prefetch thread and its views
# --------------------------------------------------------------------------------------------------


def _record_feeder_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Patch the DALI feeder to record (thread id, global step) of every call."""
    import threading

    from oodfast.data.multicrop import dali_loader

    calls: list[tuple[int, int]] = []
    original = dali_loader._Feeder.__call__

    def recording(self):  # noqa: ANN001, ANN202
        calls.append((threading.get_ident(), self.fed))
        return original(self)

    monkeypatch.setattr(dali_loader._Feeder, "__call__", recording)
    return calls


def _wait_for(condition, timeout: float = 20.0) -> bool:  # noqa: ANN001
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("depth", [2, 3])
def test_feeder_runs_on_a_prefetch_thread_depth_batches_ahead(files: list[Path], monkeypatch, depth: int) -> None:
    # A slow consumer: while it holds batch i the feeder has already been called, on another
    # thread, for batch i + depth (i + 2 by default), and no further (the queue is bounded).
    import threading
    import time

    calls = _record_feeder_calls(monkeypatch)
    ld = multicrop_loader(files, SMALL, 8, device="cpu", seed=0, prefetch_queue_depth=depth)
    main = threading.get_ident()
    for i, _ in enumerate(ld):  # 6 batches; the last ones run ahead into the next epoch
        assert _wait_for(lambda: max(step for _, step in calls) >= i + depth), \
            f"holding batch {i}: the feeder reached only batch {max(s for _, s in calls)}, not {i + depth}"
        time.sleep(0.2)  # a slow step: the pipeline must not run unboundedly ahead either
        assert max(step for _, step in calls) == i + depth
    threads = {ident for ident, _ in calls}
    assert main not in threads and len(threads) == 1, "the feeder ran on the consumer's thread"
    assert [step for _, step in calls] == list(range(len(calls))), "feeder calls out of order"


def test_prefetched_batches_equal_the_synchronous_pipeline(files: list[Path]) -> None:
    # The baseline: the same feeder and pipeline, run() in this thread, one batch at a time.
    import time

    from oodfast.data.multicrop import build_dali_pipeline, params_dict
    from oodfast.data.multicrop.dali_loader import _Feeder

    cfg = dataclasses.replace(SMALL, local_crops_number=2)

    def synchronous(start_epoch: int, n: int) -> list[tuple]:
        feeder = _Feeder(files, cfg, 8, 5, 0, 1, None, start_epoch, True)
        pipe = build_dali_pipeline(feeder, cfg, 8, device_id=None, num_threads=1, out_dtype=torch.float32,
                                   prefetch_queue_depth=1, debug=True)
        pipe.build()
        out = []
        for _ in range(n):
            o = pipe.run()
            out.append((np.array(o[0].as_tensor()).reshape(-1), np.array(o[1].as_tensor()),
                        [np.array(o[2 + v].as_tensor()) for v in range(cfg.n_views)],
                        params_dict(np.stack([np.array(o[2 + cfg.n_views + v].as_tensor())
                                              for v in range(cfg.n_views)], axis=1))))
        return out

    def same(batch, ref) -> None:  # noqa: ANN001
        index, boxes, views, params = ref
        assert np.array_equal(batch.index.numpy(), index) and np.array_equal(batch.boxes.numpy(), boxes)
        assert all(np.array_equal(v.numpy(), r) for v, r in zip(batch.views, views, strict=True))
        assert all(np.array_equal(batch.params[k], params[k]) for k in params)

    ref = synchronous(0, 12)  # epochs 0 and 1
    ld = multicrop_loader(files, cfg, 8, device="cpu", seed=5, prefetch_queue_depth=3, num_workers=2, debug=True)
    got = []
    for epoch in range(2):
        for k, batch in enumerate(ld):
            if k % 2:
                time.sleep(0.05)  # an uneven consumer
            got.append(batch)  # views kept past the next request: the default mode's views are the caller's
    assert len(got) == 12
    for batch, r in zip(got, ref, strict=True):
        same(batch, r)
    # Leaving an epoch early stops the thread; the next pass replays that epoch from its start.
    for k, batch in enumerate(ld):
        thread = ld._prefetch.thread
        if k == 1:
            break
    assert not thread.is_alive(), "the prefetch thread outlived the abandoned pass"
    ref2 = synchronous(2, 6)
    for batch, r in zip(list(ld), ref2, strict=True):
        same(batch, r)
    ld.set_epoch(1)  # a jump back
    for batch, r in zip(list(ld), ref[6:], strict=True):
        same(batch, r)


def test_zero_copy_views_are_dali_buffers_in_the_pipeline_dtype(files: list[Path]) -> None:
    # zero_copy: each view is DALI's output buffer itself (same address), in the pipeline's dtype;
    # the consumer's copy_ into its own bfloat16 tensors gives, bit for bit, what the converting
    # loader gives. Without zero_copy the CPU float32 views are DALI's buffers as well (no np.array copy).
    bf16 = dataclasses.replace(SMALL, dtype="bfloat16")
    ld = multicrop_loader(files, bf16, 8, device="cpu", seed=3, zero_copy=True)
    assert ld.view_dtype == torch.float32
    converted = list(multicrop_loader(files, bf16, 8, device="cpu", seed=3))
    plain = multicrop_loader(files, SMALL, 8, device="cpu", seed=3)
    for batch, conv, ref in zip(ld, converted, plain, strict=True):
        assert all(v.dtype == torch.float32 for v in batch.views) and all(v.dtype == torch.bfloat16 for v in conv.views)
        for v, view in enumerate(batch.views):
            assert view.data_ptr() == ld._prefetch.handed[2 + v].as_tensor().data_ptr(), "zero_copy view is a copy"
            staging = torch.empty_like(view, dtype=torch.bfloat16)
            staging.copy_(view)  # the consumer's one conversion
            assert torch.equal(staging.view(torch.int16), conv.views[v].view(torch.int16))
        dali = [plain._prefetch.handed[2 + v].as_tensor().data_ptr() for v in range(len(ref.views))]
        assert [r.data_ptr() for r in ref.views] == dali, "float32 views copied out of DALI"
        assert all(torch.equal(a, b) for a, b in zip(batch.views, ref.views))


def test_feeder_error_surfaces_on_the_consumer_naming_the_file(files: list[Path], tmp_path: Path) -> None:
    # The file that fails sits in the epoch's 4th batch: the batches before it arrive, then the
    # error, raised in this thread as a MultiCropDataError that names the file; the thread is gone.
    plan = epoch_plan(len(files), 8, seed=0, epoch=0)
    paths = list(files)
    junk = tmp_path / "junk_in_batch3.jpg"
    junk.write_bytes(b"not a jpeg" * 10)
    paths[int(plan[3][0])] = junk
    ld = multicrop_loader(paths, SMALL, 8, device="cpu", seed=0)
    seen = []
    with pytest.raises(MultiCropDataError, match=str(junk)) as e:
        for batch in ld:
            seen.append(batch.index.clone())
            thread = ld._prefetch.thread
    assert 1 <= len(seen) <= 3 and all(torch.equal(s, torch.from_numpy(plan[k])) for k, s in enumerate(seen))
    assert "oodfast data check" in str(e.value) and "Exception traceback received" not in str(e.value)
    assert not thread.is_alive()
    gone = tmp_path / "gone.jpg"  # a missing file, read on the prefetch thread, in the first batch
    paths[int(plan[0][0])] = gone
    with pytest.raises(MultiCropDataError, match="gone.jpg"):
        next(iter(multicrop_loader(paths, SMALL, 8, device="cpu", seed=0)))


def test_a_dropped_loader_stops_its_prefetch_thread(files: list[Path]) -> None:
    import gc

    ld = multicrop_loader(files, SMALL, 8, device="cpu", seed=0)
    next(iter(ld))  # the generator is closed at once: the pass is abandoned
    list(ld)  # a full pass: the thread keeps prefetching into the next epoch
    thread = ld._prefetch.thread
    assert thread.is_alive()
    del ld
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive(), 10.0), "a dropped loader left its thread running"


@pytest.mark.parametrize("backend", ["dali", "torch", "paper"])
def test_clean_view_is_the_whole_image_resized_without_augmentation(files: list[Path], backend: str) -> None:
    """``clean_view``: one more view at the end, the whole image resized to the global size (no flip, no
    photometric op) in every backend; the multi-crop views are unchanged."""
    batch = first_batch(files, SMALL, 4, backend=backend, clean_view=True, num_workers=1)
    assert batch.has_clean and len(batch.views) == SMALL.n_views + 1 and len(batch.crops) == SMALL.n_views
    for b, i in enumerate(batch.index.tolist()):
        ref = transforms.functional.pil_to_tensor(Image.open(files[i]).convert("RGB").resize((32, 32), Image.BICUBIC))
        assert (pixels(batch.clean[b : b + 1])[0] - ref.float()).abs().mean() < 4.0, (backend, b)
    if backend != "paper":
        plain = first_batch(files, SMALL, 4, backend=backend, num_workers=1)
        assert plain.clean is None and all(torch.equal(a, b) for a, b in zip(plain.views, batch.crops))


class _Ids:
    """A replay-ids source that records the steps asked for."""

    capacity = 3

    def __init__(self) -> None:
        self.asked: list[int] = []

    def at(self, step: int) -> np.ndarray:
        self.asked.append(step)
        return np.array([5, -1, 7]) if step < 2 else np.array([9, 10, 11])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_replay_ids_add_the_buffered_images_augmented_afresh(files: list[Path], backend: str) -> None:
    """Each batch is B new images then C buffered ones (ids from the source, ``replay_lag`` steps back;
    an empty slot takes a new image), with new crops every step; the new rows are those of a batch
    without them."""
    src = _Ids()
    ld = multicrop_loader(files, SMALL, 4, device="cpu", seed=0, backend=backend, replay_ids=src,
                          clean_view=True, epoch_length=40, num_workers=1)
    batches = [b for _, b in zip(range(6), ld)]
    plain = [b for _, b in zip(range(6), multicrop_loader(files, SMALL, 4, device="cpu", seed=0, backend=backend,
                                                          epoch_length=40, num_workers=1))]
    lag = ld.replay_lag
    assert lag == (2 if backend == "torch" else 4) and sorted(set(src.asked))[:2] == [-lag, 1 - lag]
    for step, (b, p) in enumerate(zip(batches, plain)):
        assert all(v.shape[0] == 7 for v in b.views) and b.boxes.shape == (7, 2, 4)
        assert torch.equal(b.index[:4], p.index) and all(torch.equal(v[:4], w) for v, w in zip(b.crops, p.views))
        want = [5, int(b.index[1]), 7] if step - lag < 2 else [9, 10, 11]
        assert b.index[4:].tolist() == want, step
    assert not torch.equal(batches[0].views[0][4], batches[1].views[0][4]), "the same image, the same crop twice"
    with pytest.raises(ValueError, match=r"--replay-store ids\) need backend 'dali' or 'torch'"):
        multicrop_loader(files, SMALL, 4, device="cpu", seed=0, backend="paper", replay_ids=src)
