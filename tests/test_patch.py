"""oodfast.patch swaps the drop-ins into a DINO-style module and reverts them."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from oodfast import compat
from oodfast.patch import apply_oodfast, oodfast_patched
from oodfast.paper import PaperMemoryBuffer, PaperOODDetector


def fake_main_dino() -> types.ModuleType:
    """A module that imported the paper's classes by name, as main_dino.py does."""
    mod = types.ModuleType("main_dino")
    mod.OODDetector, mod.MemoryBuffer = PaperOODDetector, PaperMemoryBuffer

    def train_one_epoch(images, ood, memory_buffer):  # the paper's loop body
        for idx in ood.detect([images[0], images[1]]):
            memory_buffer.add([v[idx] for v in images])
        return memory_buffer.concat_with_batch(images)

    mod.train_one_epoch = train_one_epoch
    return mod


def test_patched_loop_runs_with_the_fused_pieces_and_reverts():
    mod = fake_main_dino()
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 32, stride=32), nn.ReLU())
    revert = apply_oodfast(mod, encoder=enc)
    assert mod.MemoryBuffer is compat.MemoryBuffer and issubclass(mod.OODDetector, compat.OODDetector)

    ood = mod.OODDetector("cpu", threshold=0.5)  # the paper's call site, unchanged
    ood.compute_dataset_stats([torch.rand(3, 64, 64) for _ in range(20)])
    buf = mod.MemoryBuffer(max_size=4)
    images = [torch.rand(6, 3, 32, 32) * 3 for _ in range(2)] + [torch.rand(6, 3, 16, 16) for _ in range(3)]
    mixed = mod.train_one_epoch(images, ood, buf)
    assert len(buf.buffer) > 0
    assert [m.shape[0] for m in mixed] == [6 + len(buf.buffer)] * 5

    revert()
    assert mod.OODDetector is PaperOODDetector and mod.MemoryBuffer is PaperMemoryBuffer


def test_context_manager_flags_and_errors():
    mod = fake_main_dino()
    with oodfast_patched(mod, detector=False):
        assert mod.OODDetector is PaperOODDetector and mod.MemoryBuffer is compat.MemoryBuffer
    assert mod.MemoryBuffer is PaperMemoryBuffer
    with pytest.raises(AttributeError, match="has no OODDetector"):
        apply_oodfast(types.ModuleType("elsewhere"), buffer=False)
    with oodfast_patched(mod):  # no weights and no encoder: the clear error, not a hub download
        with pytest.raises(ValueError, match="dino_resnet50_pretrain.pth"):
            mod.OODDetector("cpu")
