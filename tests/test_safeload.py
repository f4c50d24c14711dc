"""Genuine facebookresearch/dino checkpoints load through weights_only; code-running pickles do not."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from oodfast.encoders import build_backbone, load_encoder
from oodfast.safeload import CheckpointError, checkpoint_args, load_checkpoint, network_state
from oodfast.train.head import DINOHead, MultiCropWrapper


def dino_checkpoint(path: Path, arch: str, **args) -> MultiCropWrapper:  # noqa: ANN003
    """A checkpoint laid out as main_dino.py saves it: ``args`` a Namespace, the DDP student's keys under
    ``module.``, the teacher (DDP too when it has BatchNorm), an fp16 scaler's state."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(arch)
    teacher = MultiCropWrapper(backbone, DINOHead(dim, 64))
    prefixed = {f"module.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({
        "student": prefixed, "teacher": prefixed if arch.startswith("resnet") else teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
        "args": argparse.Namespace(arch=arch, patch_size=16, out_dim=64, global_crops_scale=(0.4, 1.0),
                                   data_path="/imagenet/train", **args),
        "dino_loss": {"center": torch.zeros(1, 64)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 0},
    }, path)
    return teacher


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_a_dino_checkpoint_loads_and_its_teacher_is_the_encoder(tmp_path: Path, arch: str) -> None:
    teacher = dino_checkpoint(tmp_path / "checkpoint.pth", arch)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint_args(ckpt)["arch"] == arch and ckpt["fp16_scaler"]["scale"] == 65536.0
    enc = load_encoder(tmp_path / "checkpoint.pth", arch, "cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), teacher.backbone.eval()(x))
    student = load_encoder(tmp_path / "checkpoint.pth", arch, "cpu", checkpoint_key="student")
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), enc.state_dict().values()))


def test_dinos_loading_rule_strips_module_and_backbone(tmp_path: Path) -> None:
    state = {"module.backbone.conv1.weight": torch.ones(1), "module.head.last_layer.weight": torch.ones(2)}
    assert set(network_state({"teacher": state})) == {"conv1.weight", "head.last_layer.weight"}
    assert set(network_state({"a.weight": torch.ones(1)})) == {"a.weight"}  # a plain state dict as it is
    with pytest.raises(CheckpointError, match="no 'teacher' entry .* --checkpoint_key"):
        network_state({"model": {"a": 1}, "epoch": 3})


def test_the_wrong_arch_names_the_arch_the_checkpoint_was_trained_with(tmp_path: Path) -> None:
    dino_checkpoint(tmp_path / "c.pth", "vit_tiny")
    with pytest.raises(ValueError, match="the checkpoint says arch 'vit_tiny'"):
        load_encoder(tmp_path / "c.pth", "vit_small", "cpu")


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"student": {}, "teacher": {}, "optimizer": {}, "epoch": 0, "dino_loss": {},
                "args": argparse.Namespace(hook=_RunsCode())}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth"):
        load_checkpoint(path)
