"""Rectangular crops end to end (the paper's code trained BDD100K on 512 x 1024 global and 224 x 448
local crops, aspect ratio 1.5-2.5): sizes as (height, width) through the config, the loader, the ring,
the compiled step, the checkpoint and its resume; and the ``paper-code`` preset."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from oodfast.train.checkpoint import load_checkpoint
from oodfast.train.config import PRESETS, ConfigError, TrainConfig
from oodfast.train.trainer import Trainer

from _tiny import tiny


B, C = 4, 2  # tiny()'s batch and buffer
RECT = dict(global_size=(32, 64), local_size=(16, 32), crop_ratio=(1.5, 2.5))


@pytest.mark.slow
def test_a_rectangular_run_trains_through_the_compiled_step_and_resume_refuses_another_size(data_root, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    out = tmp_path / "rect"
    t = Trainer(tiny(data_root, out, compile=True, max_steps=3, **RECT), progress=False)
    assert t.crops.ratio == (1.5, 2.5) and [k[2] for k in t.crops.view_kinds()] == [(32, 64)] * 2 + [(16, 32)] * 2
    assert t.ring.groups == [(2, (3, 32, 64)), (2, (3, 16, 32))]
    assert [tuple(s.shape) for s in t.ring.storage] == [(2, B + C, 3, 32, 64), (2, B + C, 3, 16, 32)]
    assert tuple(t.replay.clean.shape) == (B, 3, 32, 64)
    batch = next(iter(t.loader))
    assert [tuple(v.shape[1:]) for v in batch.views] == [(3, 32, 64)] * 2 + [(3, 16, 32)] * 2 + [(3, 32, 64)]
    box = batch.boxes.double()
    aspect = (box[..., 2] - box[..., 0]) / (box[..., 3] - box[..., 1])  # width / height of the global crops
    assert ((aspect > 1.5 * 0.9) & (aspect < 2.5 * 1.1)).all(), aspect  # the ratio range, to the pixel
    t.calibrate()
    t.warm_up()
    assert t.ring.is_full()
    t.resumed = True  # calibrated and warmed up: keep them out of the recompile check
    with torch._dynamo.config.patch(error_on_recompile=True):
        summary = t.train()
    assert summary["steps"] == 3 and t.monitor.last["loss"] > 0
    stored = load_checkpoint(out / "checkpoint.pth")
    assert stored["config"]["global_size"] == [32, 64] and stored["config"]["crop_ratio"] == [1.5, 2.5]
    assert tuple(stored["ring"]["crops0"].shape) == (2, C, 3, 32, 64)  # the ring's own rows, not the staging ones
    assert tuple(stored["ring"]["crops1"].shape) == (2, C, 3, 16, 32)
    for changes, words in ((dict(global_size=(64, 32)), "global_size: [32, 64] in the run, [64, 32] now"),
                           (dict(global_size=32), "global_size: [32, 64] in the run, 32 now"),
                           (dict(crop_ratio=(0.75, 4 / 3)), "crop_ratio: [1.5, 2.5] in the run")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            Trainer(tiny(data_root, out, max_steps=4, **{**RECT, **changes}), progress=False)


def test_sizes_are_an_int_or_height_width_stored_json_safe():
    c = TrainConfig.cpu(**RECT)
    assert (c.global_size, c.local_size, c.crop_ratio) == ((32, 64), (16, 32), (1.5, 2.5))
    stored = c.to_dict()
    assert (stored["global_size"], stored["local_size"], stored["crop_ratio"]) == ([32, 64], [16, 32], [1.5, 2.5])
    assert TrainConfig(**stored) == c  # a checkpoint's config loads back
    assert TrainConfig.cpu(global_size=[48, 48]).global_size == 48  # a square pair is its int
    assert TrainConfig().crop_ratio == (0.75, 4 / 3)  # DINO's
    assert TrainConfig.cpu(arch="vit_tiny", global_size=(32, 64), local_size=(16, 48)).local_size == (16, 48)


@pytest.mark.parametrize("changes, words", [
    (dict(global_size=(4, 64)), "global_size must be an integer >= 8 or [height, width] of them, got (4, 64)"),
    (dict(local_size=(16, 32, 3)), "local_size must be an integer >= 8 or [height, width] of them"),
    (dict(local_size="16x32"), "local_size must be an integer >= 8 or [height, width] of them"),
    (dict(crop_ratio=(2.5, 1.5)), "crop_ratio must be (low, high) aspect ratios"),
    (dict(crop_ratio=(0.0, 1.0)), "crop_ratio must be (low, high) aspect ratios"),
    (dict(arch="vit_tiny", global_size=(32, 60)), "global_size (32 x 60) must be multiples of patch_size (16) for "
                                                  "vit_tiny: use 32 x (48 or 64)"),
])
def test_bad_sizes_and_ratios_are_refused_by_name(changes, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig.cpu(**changes)
    assert info.value.field == next(iter(k for k in changes if k != "arch")) and words in str(info.value)


def test_the_paper_code_preset_is_the_paper_recipe_with_its_codes_crops():
    code, paper = PRESETS["paper-code"](), TrainConfig.paper()
    assert (code.global_size, code.local_size, code.crop_ratio) == ((512, 1024), (224, 448), (1.5, 2.5))
    assert code.replace(global_size=224, local_size=96, crop_ratio=(0.75, 4 / 3)) == paper
    crops = code.multicrop()
    assert crops.ratio == (1.5, 2.5) and crops.view_kinds()[0][2] == (512, 1024) and crops.view_kinds()[2][2] == (224, 448)
    assert crops.global1.blur_p == 1.0  # DINO's photometric recipe, as the paper's code's DataAugmentationDINO
