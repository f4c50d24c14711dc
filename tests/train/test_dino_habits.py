"""The habits of a facebookresearch/dino user, through the Trainer: ViTs (compiled, with DINO's keys),
--use_fp16's precision choice and loss scaler, --optimizer sgd|lars skipping a bad step, and
--pretrained_weights / --checkpoint_key, --crops paper, --use_bn_in_head.

No GPU here: the precision choice is a pure function of the device's compute capability (tested for a
V100, T4, A100, H100 and the CPU), and the fp16 loss-scaler path runs on the CPU (``torch.autocast("cpu",
float16)`` with ``torch.amp.GradScaler("cpu")``) by making that function answer fp16.
"""

from __future__ import annotations

import logging

import pytest
import torch

import oodfast.train.dino as dino_mod
from oodfast.bench.stages import prepared_trainer as staged  # calibrated, warmed up, one batch staged
from oodfast.train.checkpoint import load_checkpoint
from oodfast.train.config import ConfigError, TrainConfig
from oodfast.train.dino import Precision, choose_precision
from oodfast.train.optim import LARS, SGD
from oodfast.train.trainer import Trainer
from oodfast.vit import build_vit

from _tiny import tiny


# ---- --use_fp16: the precision choice --------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:CUDA is not available", "ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize("device, mixed, capability, expected", [
    ("cuda", True, (7, 0), "fp16"),   # V100: no bf16, DINO's fp16 with a loss scaler
    ("cuda", True, (7, 5), "fp16"),   # T4
    ("cuda", True, (8, 0), "bf16"),   # A100
    ("cuda", True, (9, 0), "bf16"),   # H100 / H200
    ("cuda", False, (9, 0), "fp32"),  # --use_fp16 false
    ("cpu", True, None, "fp32"),      # the CPU never autocasts
])
def test_precision_follows_the_device_capability(device, mixed, capability, expected):
    assert choose_precision(device, mixed, capability) == expected
    p = Precision(expected, device)
    assert (p.grad_scaler() is not None) == (expected == "fp16")
    assert p.crop_dtype == {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[expected]
    assert isinstance(p.autocast(), torch.autocast) == (expected != "fp32")


def test_the_cpu_preset_on_the_cpu_has_no_autocast_and_no_scaler(data_root, tmp_path):
    t = Trainer(tiny(data_root, tmp_path / "fp32"), progress=False)
    assert t.precision.name == "fp32" and t.dino.scaler is None and not isinstance(t.amp, torch.autocast)
    assert "fp16_scaler" not in t.dino.state_dict()


def test_fp16_loss_scaler_skips_a_bad_step_and_is_checkpointed_and_restored(data_root, tmp_path, monkeypatch):
    """fp16 as on a V100, run on the CPU: the loss is scaled, a non-finite step leaves every weight as it was
    and halves the scale, the scaler's state is the checkpoint's fp16_scaler and --resume restores it."""
    monkeypatch.setattr(dino_mod, "choose_precision", lambda *a: "fp16")
    cfg = tiny(data_root, tmp_path / "fp16", bf16=True)
    t = staged(Trainer(cfg, progress=False))
    assert t.precision.name == "fp16" and isinstance(t.dino.scaler, torch.amp.GradScaler)
    assert t.amp.fast_dtype == torch.float16
    t.run_step(log=True)
    assert t.monitor.settle() == 0 and t.monitor.last["loss"] > 0
    scale = t.dino.scaler.get_scale()
    moved = [p.detach().clone() for p in t.dino.student.parameters()]
    original = t.dino.loss.forward
    t.dino.loss.forward = lambda *a, **k: original(*a, **k) * float("inf")
    t.run_step()
    t.dino.loss.forward = original
    assert all(torch.equal(a, b) for a, b in zip(moved, t.dino.student.parameters()))
    assert t.dino.scaler.get_scale() == scale / 2  # the scaler saw the inf gradients and backed off
    t.step = 2
    t.save(0, numbered=False)
    ckpt = load_checkpoint(tmp_path / "fp16" / "checkpoint.pth")
    assert ckpt["fp16_scaler"]["scale"] == scale / 2
    again = Trainer(cfg, progress=False, resume=tmp_path / "fp16" / "checkpoint.pth")
    assert again.dino.scaler.get_scale() == scale / 2


# ---- --optimizer sgd | lars through the step -------------------------------------------------------
@pytest.mark.parametrize("optimizer, cls", [("sgd", SGD), ("lars", LARS)])
def test_sgd_and_lars_skip_a_non_finite_step_on_the_device(data_root, tmp_path, optimizer, cls):
    t = staged(Trainer(tiny(data_root, tmp_path / optimizer, optimizer=optimizer), progress=False))
    assert type(t.dino.optimizer) is cls
    t.run_step()  # the momentum buffers exist
    before = [x.detach().clone() for x in (*t.dino.student.state_dict().values(), *t.dino.teacher.state_dict().values(),
              *(v for s in t.dino.optimizer.state.values() for v in s.values()))]
    original = t.dino.loss.forward
    t.dino.loss.forward = lambda *a, **k: original(*a, **k) * float("nan")
    t.run_step()
    t.dino.loss.forward = original
    after = [x.detach().clone() for x in (*t.dino.student.state_dict().values(), *t.dino.teacher.state_dict().values(),
             *(v for s in t.dino.optimizer.state.values() for v in s.values()))]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert t.monitor.settle() == 0 and t.monitor.bad_in_row == 1
    t.run_step()  # a good step moves the student again
    assert not all(torch.equal(a, b) for a, b in zip(before, t.dino.student.state_dict().values()))


# ---- ViTs ----------------------------------------------------------------------------------------
def test_vit_student_has_drop_path_and_the_teacher_none(data_root, tmp_path):
    t = Trainer(tiny(data_root, tmp_path / "vit", arch="vit_tiny", drop_path_rate=0.2, patch_size=8), progress=False)
    student, teacher = t.dino.student.backbone, t.dino.teacher.backbone
    assert student.patch_embed.patch_size == 8 and student.embed_dim == 192
    assert student.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert all(getattr(b.drop_path, "drop_prob", 0.0) == 0.0 for b in teacher.blocks)  # Identity or rate 0
    names = {id(p): n for n, p in t.dino.student.named_parameters()}
    no_decay = {names[id(p)] for p in t.dino.optimizer.param_groups[1]["params"]}
    decay = {names[id(p)] for p in t.dino.optimizer.param_groups[0]["params"]}
    assert "backbone.blocks.0.norm1.weight" in no_decay and "backbone.blocks.0.attn.qkv.bias" in no_decay
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight"} <= decay  # as DINO


def test_vit_crop_sizes_must_be_whole_patches():
    with pytest.raises(ConfigError) as info:
        TrainConfig.cpu(arch="vit_small", global_size=100)
    assert info.value.fields == ("global_size", "patch_size") and "96 or 112" in str(info.value)
    TrainConfig.cpu(arch="resnet18", global_size=100)  # convnets take any size


@pytest.mark.slow
def test_cpu_preset_with_vit_tiny_runs_compiled_and_its_teacher_loads_into_dinos_vit(data_root, tmp_path):
    out = tmp_path / "vit-compiled"
    cfg = tiny(data_root, out, arch="vit_tiny", compile=True, max_steps=3)
    assert cfg.patch_size == 16 and cfg.drop_path_rate == 0.1
    summary = Trainer(cfg, progress=False).train()
    assert summary["steps"] == 3 and summary["last"]["loss"] > 0
    teacher = load_checkpoint(out / "checkpoint.pth")["teacher"]
    vit = build_vit("vit_tiny", 16)
    vit.load_state_dict({k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")},
                        strict=True)
    assert not any("_orig_mod" in k or "module." in k for k in teacher)


# ---- --pretrained_weights ------------------------------------------------------------------------
def test_pretrained_weights_start_student_and_teacher_and_a_misfit_head_stays_random(data_root, tmp_path, caplog):
    source = Trainer(tiny(data_root, tmp_path / "src", seed=5), progress=False)
    source.save(0, numbered=False)
    ckpt_path = tmp_path / "src" / "checkpoint.pth"
    want = source.dino.teacher.state_dict()

    t = Trainer(tiny(data_root, tmp_path / "a", pretrained_weights=str(ckpt_path)), progress=False)
    for net in (t.dino.student, t.dino.teacher):
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())  # backbone and head
    assert t.step == 0 and not t.resumed  # weights only: no step, optimizer or ring state

    caplog.set_level(logging.INFO, logger="oodfast.train.dino")
    t = Trainer(tiny(data_root, tmp_path / "b", pretrained_weights=str(ckpt_path), out_dim=32), progress=False)
    backbone = t.dino.teacher.backbone.state_dict()
    assert all(torch.equal(v, want[f"backbone.{k}"]) for k, v in backbone.items())
    assert "head does not fit" in caplog.text and "starts random" in caplog.text

    plain = tmp_path / "resnet18.pth"  # a released-style backbone file: torchvision keys, fc included
    torch.save({**{k.removeprefix("backbone."): v for k, v in want.items() if k.startswith("backbone.")},
                "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, plain)
    caplog.clear()
    t = Trainer(tiny(data_root, tmp_path / "c", pretrained_weights=str(plain)), progress=False)
    assert all(torch.equal(v, want[f"backbone.{k}"]) for k, v in t.dino.student.backbone.state_dict().items())
    assert "no head.* weights" in caplog.text


def test_pretrained_weights_that_do_not_fit_name_the_keys(data_root, tmp_path):
    source = Trainer(tiny(data_root, tmp_path / "src"), progress=False)
    source.save(0, numbered=False)
    with pytest.raises(ValueError, match=r"do not fit arch 'resnet34'.*missing.*layer1\.2"):
        Trainer(tiny(data_root, tmp_path / "a", arch="resnet34",
                     pretrained_weights=str(tmp_path / "src" / "checkpoint.pth")), progress=False)
    with pytest.raises(ValueError, match="no 'ema' entry.*--checkpoint_key"):
        Trainer(tiny(data_root, tmp_path / "b", checkpoint_key="ema",
                     pretrained_weights=str(tmp_path / "src" / "checkpoint.pth")), progress=False)


# ---- --crops paper, --use_bn_in_head -------------------------------------------------------------
def test_crops_paper_is_the_papers_bdd10k_augmentation(data_root, tmp_path):
    t = Trainer(tiny(data_root, tmp_path / "paper", crops="paper"), progress=False)
    assert t.crops.global_scale == (0.3, 1.0) and t.crops.local_scale == (0.1, 0.3)
    assert t.crops.global1.blur_p == 0.0 and t.crops.global2.solarize_p == 0.0 and t.crops.global1.jitter_p == 0.0
    assert t.crops.local.blur_p == 0.5 and t.crops.local_crops_number == 2
    d = Trainer(tiny(data_root, tmp_path / "dino"), progress=False)
    assert d.crops.global_scale == (0.4, 1.0) and d.crops.global1.blur_p == 1.0


def test_use_bn_in_head_puts_batchnorm_in_both_heads(data_root, tmp_path):
    t = Trainer(tiny(data_root, tmp_path / "bn", use_bn_in_head=True), progress=False)
    for net in (t.dino.student, t.dino.teacher):
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.head.mlp)
    assert set(t.dino.student.state_dict()) == set(t.dino.teacher.state_dict())
