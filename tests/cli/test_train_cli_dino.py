"""A facebookresearch/dino user's ``main_dino.py`` command works as it is with ``oodfast train``: DINO's
flags in DINO's spellings and meanings, oodfast's hyphenated flags also with underscores, and one-line
errors for contradictions. The trainer is replaced by a recorder (except in the one test that builds the
README's ResNet-50 run for real), so these run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import oodfast.train.trainer as trainer_mod
from oodfast.cli import main


class Recorder:
    built: list = []

    def __init__(self, config, *, device=None, resume=None, progress=True) -> None:
        Recorder.built.append(config)

    def train(self) -> dict:
        return {"steps": 1}


@pytest.fixture
def record(monkeypatch, tmp_path):
    monkeypatch.setattr(trainer_mod, "Trainer", Recorder)
    monkeypatch.setenv("OODFAST_CACHE", str(tmp_path / "cache"))
    for var in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    Recorder.built = []
    return Recorder.built


def invoke(*args: str):
    return CliRunner().invoke(main, ["train", *args])


def one_line_error(result, *words: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    out = [line for line in result.output.splitlines() if line.strip()]
    assert len(out) == 1 and out[0].startswith("oodfast: error: "), result.output
    for w in words:
        assert w in out[0], out[0]
    return out[0]


def image_folder(root: Path, n: int = 12) -> Path:
    """An ImageFolder tree (class folders of JPEGs), as DINO's --data_path expects."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


README_RESNET50 = ["--arch", "resnet50", "--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4",
                   "--weight_decay_end", "1e-4", "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05",
                   "0.14"]


def test_dinos_readme_resnet50_command_parses(record, tmp_path):
    data = image_folder(tmp_path / "train")
    result = invoke(*README_RESNET50, "--data_path", str(data), "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    (cfg,) = record
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.weight_decay_end) == ("resnet50", "sgd", 0.03,
                                                                                         1e-4, 1e-4)
    assert cfg.global_crops_scale == (0.14, 1.0) and cfg.local_crops_scale == (0.05, 0.14)
    assert (cfg.data, cfg.data_root, cfg.output_dir) == ("folder", str(data), str(tmp_path / "out"))


def test_dinos_readme_resnet50_command_builds_a_run(monkeypatch, tmp_path):
    """The real Trainer, built (not trained) from the README's command: an image-folder dataset, a ResNet-50
    student and DINO's SGD with the linearly scaled learning rate and the constant weight decay."""
    from oodfast.train.optim import SGD

    built = []
    monkeypatch.setenv("OODFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trainer_mod.Trainer, "train", lambda self: built.append(self) or {"steps": 0})
    data = image_folder(tmp_path / "train", n=16)
    result = invoke(*README_RESNET50, "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                    "--preset", "cpu", "--out_dim", "64", "--batch_size_per_gpu", "4", "--buffer_size", "2",
                    "--num_workers", "1", "--no-compile")
    assert result.exit_code == 0, result.output
    (t,) = built
    assert len(t.files) == 16 and t.cfg.data == "folder"
    assert type(t.dino.optimizer) is SGD and t.dino.optimizer.defaults["momentum"] == 0.9
    assert t.dino.student.backbone.fc.__class__.__name__ == "Identity"
    assert sum(p.numel() for p in t.dino.student.backbone.parameters()) == 23_508_032  # ResNet-50 without fc
    lr = t.dino.schedules.values(t.dino.schedules.total_steps - 1)
    assert t.dino.schedules.values(0)["weight_decay"] == pytest.approx(1e-4) and lr["weight_decay"] == pytest.approx(1e-4)
    assert max(t.dino.schedules.values(s)["lr"] for s in range(t.dino.schedules.total_steps)) == pytest.approx(
        0.03 * 4 / 256, rel=1e-6)
    assert t.crops.global_scale == (0.14, 1.0) and t.crops.local_scale == (0.05, 0.14)


@pytest.mark.parametrize("args, field, value", [
    (["--use_fp16", "false"], "bf16", False), (["--use_fp16", "TRUE"], "bf16", True), (["--use_fp16"], "bf16", True),
    (["--use_fp16", "0"], "bf16", False), (["--use_fp16=off"], "bf16", False),
    (["--norm_last_layer", "false"], "norm_last_layer", False), (["--use_bn_in_head", "1"], "use_bn_in_head", True),
    (["--arch", "vit_small", "--patch_size", "8"], "patch_size", 8), (["--drop_path_rate", "0.2"], "drop_path_rate", 0.2),
    (["--num_workers", "3"], "num_workers", 3), (["--momentum_teacher", "0.9995"], "momentum_teacher", 0.9995),
    (["--clip_grad", "0"], "clip_grad", 0.0), (["--freeze_last_layer", "2"], "freeze_last_layer", 2),
    (["--warmup_teacher_temp", "0.03"], "warmup_teacher_temp", 0.03),
    (["--warmup_teacher_temp_epochs", "1"], "warmup_teacher_temp_epochs", 1), (["--saveckp_freq", "5"], "saveckp_freq", 5),
    (["--seed", "7"], "seed", 7), (["--min_lr", "1e-5"], "min_lr", 1e-5), (["--warmup_epochs", "1"], "warmup_epochs", 1),
    (["--local_crops_number", "8"], "local_crops_number", 8), (["--out_dim", "4096"], "out_dim", 4096),
    (["--optimizer", "lars"], "optimizer", "lars"), (["--arch", "deit_small"], "arch", "vit_small"),
    (["--pretrained_weights", "W"], "pretrained_weights", "W"), (["--checkpoint_key", "student"], "checkpoint_key", "student"),
    (["--crops", "paper"], "local_crops_scale", (0.1, 0.3)), (["--crops", "paper"], "global_crops_scale", (0.3, 1.0)),
    (["--crops", "paper", "--global_crops_scale", "0.5", "1"], "global_crops_scale", (0.5, 1.0)),
    (["--buffer_size", "4"], "buffer_size", 4), (["--calib_size", "32"], "calib_size", 32),
    (["--ood_percentile", "0.9"], "ood_percentile", 0.9), (["--calib_frac", "0.05"], "calib_frac", 0.05),
    (["--global_size", "96", "--local_size", "48"], "local_size", 48), (["--max_steps", "3"], "max_steps", 3),
    (["--epoch_length", "64"], "epoch_length", 64), (["--no_compile"], "compile", False),
    (["--no_ood"], "replay", "none"), (["--data_root", "R"], "data_root", "R"),
    (["--detector", "frozen", "--detector_weights", "-"], "detector_weights", "-"),
    ([], "replay_store", "crops"), (["--replay-store", "ids"], "replay_store", "ids"),
    (["--replay_store", "ids", "--aug", "torch"], "replay_store", "ids"),
    ([], "dense_layer", None), (["--dense-layer", "layer3"], "dense_layer", "layer3"),
    (["--global_size", "512", "1024"], "global_size", (512, 1024)), (["--global-size", "224"], "global_size", 224),
    (["--global-size=64", "128", "--local_size", "32", "64"], "local_size", (32, 64)),
    (["--global_size", "96", "96"], "global_size", 96), (["--crop-ratio", "1.5", "2.5"], "crop_ratio", (1.5, 2.5)),
    (["--preset", "paper-code"], "global_size", (512, 1024)), (["--preset", "paper-code"], "local_size", (224, 448)),
    (["--preset", "paper-code"], "crop_ratio", (1.5, 2.5)), (["--preset", "paper-code"], "arch", "resnet50"),
    (["--preset", "paper-code", "--global_size", "256", "512"], "global_size", (256, 512)),
    (["--dense_layer", "tokens", "--arch", "vit_small"], "dense_layer", "tokens"),
])
def test_dino_flags_and_underscore_spellings_reach_the_config(record, tmp_path, args, field, value):
    if field == "pretrained_weights" or field == "detector_weights":  # an existing, valid checkpoint file
        import torch

        weights = tmp_path / "w.pth"
        torch.save({"x": torch.zeros(1)}, weights)
        args = [a if a not in ("W", "-") else str(weights) for a in args]
        value = str(weights)
    result = invoke(*args, "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert getattr(record[0], field) == value


def test_dinos_launcher_flags_are_accepted_and_a_consistent_local_rank_ignored(record, tmp_path, monkeypatch):
    out = ["--output_dir", str(tmp_path / "out")]
    assert invoke("--dist_url", "env://", "--local_rank", "0", *out).exit_code == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert invoke("--local_rank=1", *out).exit_code == 0  # torch.distributed.launch's spelling
    one_line_error(invoke("--local_rank", "0", *out), "--local_rank 0 contradicts LOCAL_RANK=1")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher that passes --local_rank only
    assert invoke("--local_rank", "1", *out).exit_code == 0 and os.environ["LOCAL_RANK"] == "1"
    assert invoke("--dist_url", "tcp://10.0.0.1:29500", *out).exit_code == 0
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "29500")
    one_line_error(invoke("--dist_url", "file:///tmp/x", *out), "--dist_url", "env://")


@pytest.mark.parametrize("args, words", [
    (["--data", "bdd10k", "--data_path", "D"], ["--data_path D", "--data says bdd10k"]),
    (["--data-root", "A", "--data_path", "D"], ["--data_path D and --data-root A name different folders"]),
    (["--data_root", "A", "--data_path", "D"], ["--data_root A"]),
    (["--arch", "vit_small", "--global_size", "100"], ["--global_size (100) must be a multiple of --patch_size (16)",
                                                       "vit_small", "96 or 112"]),
    (["--arch", "vit_small", "--patch_size", "8", "--local-size", "36"], ["--local-size (36)", "--patch_size (8)"]),
    (["--arch", "vit_tiny", "--patch_size", "14"], ["--patch_size must be 8 or 16"]),
    (["--use_fp16", "maybe"], ["--use_fp16", "'maybe' is not a boolean"]),
    (["--optimizer", "adam"], ["--optimizer"]),
    (["--calib_size", "-5"], ["--calib_size must be", "integer >= 1"]),
    (["--buffer_size", "0"], ["--buffer_size must be"]),
    (["--drop_path_rate", "1.5"], ["--drop_path_rate must be"]),
    (["--global_crops_scale", "0.5", "0.2"], ["--global_crops_scale must be (low, high)"]),
    (["--replay-store", "pixels"], ["--replay-store", "'pixels'", "crops", "ids"]),
    (["--replay_store", "ids", "--aug", "paper"], ["--replay_store ids needs --aug dali or torch"]),
    (["--dense-layer", "layer5"], ["--dense-layer", "'layer5'", "layer3", "tokens"]),
    (["--global_size", "4", "64"], ["--global_size must be an integer >= 8 or [height, width] of them"]),
    (["--local-size", "abc"], ["--local-size", "'abc' is not a crop size", "512 1024"]),
    (["--global_size", "512", "1024", "3"], ["unexpected extra argument (3)"]),
    (["--crop_ratio", "2", "1"], ["--crop_ratio must be (low, high) aspect ratios"]),
    (["--arch", "vit_small", "--global_size", "100", "224"], ["--global_size (100 x 224) must be multiples of "
                                                              "--patch_size (16)", "use (96 or 112) x 224"]),
    (["--dense_layer", "layer3", "--arch", "vit_small"], ["--dense_layer layer3", "use --dense_layer tokens"]),
    (["--dense-layer", "tokens"], ["--dense-layer tokens is for DINO's ViTs", "--arch resnet"]),
    (["--dense-layer", "layer3", "--replay", "random"], ["--dense-layer scores feature maps for --replay ood"]),
])
def test_contradictions_and_bad_values_are_one_line_errors_in_the_spelling_typed(record, tmp_path, args, words):
    one_line_error(invoke(*args, "--output_dir", str(tmp_path / "out")), *words)
    assert record == []


def test_a_missing_pretrained_weights_file_is_named_before_any_work(record, tmp_path):
    one_line_error(invoke("--pretrained_weights", "missing.pth", "--output_dir", str(tmp_path / "out")),
                   "--pretrained_weights", "missing.pth", code=1)  # a file mishap: status 1, as --resume
    assert record == []


def test_the_same_field_named_by_both_spellings_is_consistent(record, tmp_path):
    data = image_folder(tmp_path / "imgs", n=2)
    result = invoke("--data-root", str(data), "--data_path", str(data), "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert record[0].data == "folder"
