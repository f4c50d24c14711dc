"""The drop-in OODDetector / MemoryBuffer against the paper's behaviour (oodfast.paper)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

from oodfast.compat import MemoryBuffer, OODDetector, load_resnet50_trunk
from oodfast.paper import PaperMemoryBuffer, PaperOODDetector


def tiny_encoder() -> nn.Module:
    """A fixed random conv trunk: [N, 3, 224, 224] -> feature map [N, 16, 7, 7]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 32, stride=32), nn.ReLU()).eval()


def images(n: int, seed: int, size=(3, 96, 128)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=gen) * (1 + 2 * (k % 5 == 0)) for k in range(n)]


@pytest.fixture(scope="module")
def detectors() -> tuple[OODDetector, PaperOODDetector]:
    enc = tiny_encoder()
    ours, paper = OODDetector("cpu", threshold=0.9, encoder=enc), PaperOODDetector(enc, "cpu", threshold=0.9)
    calib = images(60, seed=1) + images(20, seed=2, size=(3, 150, 100))
    ours.compute_dataset_stats(calib)
    paper.compute_dataset_stats(calib)
    return ours, paper


def test_statistics_match_the_papers(detectors):
    ours, paper = detectors
    torch.testing.assert_close(ours.mean_vector, paper.mean_vector, rtol=1e-5, atol=1e-6)
    assert ours.threshold_value == pytest.approx(paper.threshold_value, rel=1e-5)


def test_detect_returns_the_papers_indices(detectors):
    ours, paper = detectors
    for trial in range(4):
        batch = torch.stack(images(48, seed=10 + trial))
        other = torch.stack(images(48, seed=50 + trial))
        got, want = ours.detect([batch, other]), paper.detect([batch, other])
        assert got.dtype == torch.int64 and got.device.type == "cpu"
        assert got.tolist() == want.tolist()
        assert len(want) > 0


def test_non_finite_images_are_not_flagged_unlike_the_papers(detectors):
    ours, paper = detectors
    batch = torch.stack(images(8, seed=3))
    batch[5] = float("nan")
    assert 5 in paper.detect([batch, batch]).tolist()  # the paper's code maps NaN to 1e6 and replays it
    assert 5 not in ours.detect([batch, batch]).tolist()


def test_extract_features_matches(detectors):
    ours, paper = detectors
    im = images(1, seed=4)[0]
    f_ours, f_paper = ours.extract_features(im), paper.extract_features(TF_resize(im))
    assert f_ours.shape == f_paper.shape == (16,)
    assert abs(f_ours - f_paper).max() < 1e-5


def TF_resize(im):
    from torchvision.transforms import functional as TF

    return TF.resize(im, [224, 224])


def entry(k: int) -> list[torch.Tensor]:
    return [torch.full((3, 8, 8), 100.0 * k + v) for v in range(2)] + [torch.full((3, 4, 4), 100.0 * k + v) for v in range(2, 8)]


def test_memory_buffer_keeps_the_papers_fifo():
    ours, paper = MemoryBuffer(32), PaperMemoryBuffer(32)
    for k in range(45):
        ours.add(entry(k))
        paper.add(entry(k))
    assert len(ours.buffer) == len(paper.buffer) == 32
    for a, b in zip(ours.get(), paper.get()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ours.clear()
    assert len(ours.buffer) == 0 and ours.get() == []


def test_concat_keeps_positive_pairs_which_the_paper_breaks():
    ours, paper = MemoryBuffer(32), PaperMemoryBuffer(32)
    for k in range(32):
        ours.add(entry(k))
        paper.add(entry(k))
    B = 4
    batch = [torch.zeros(B, 3, 8, 8)] * 2 + [torch.zeros(B, 3, 4, 4)] * 6
    mixed, broken = ours.concat_with_batch(batch), paper.concat_with_batch(batch)
    assert [m.shape for m in mixed] == [b.shape for b in broken]  # same shapes as the paper's
    image_of = lambda t: (t[B:, 0, 0, 0] // 100).long()  # noqa: E731 - which buffer entry each row holds
    for v in range(8):
        assert image_of(mixed[v]).tolist() == list(range(32)), f"view {v}: row B + k must hold entry k"
    # The paper's code: global view 1 row B + k holds entry k // 2 (view k % 2), view 2 entries 16.. - the bug.
    assert image_of(broken[0]).tolist()[:4] == [0, 0, 1, 1]
    assert image_of(broken[1]).tolist()[:4] == [16, 16, 17, 17]


def test_concat_works_for_any_buffer_size():
    ours = MemoryBuffer(5)
    batch = [torch.zeros(2, 3, 8, 8)] * 2 + [torch.zeros(2, 3, 4, 4)] * 6
    assert [m.shape[0] for m in ours.concat_with_batch(batch)] == [2] * 8  # empty: unchanged
    for k in range(3):
        ours.add(entry(k))
    assert [m.shape[0] for m in ours.concat_with_batch(batch)] == [5] * 8


def test_missing_weights_say_where_to_get_them(tmp_path: Path):
    with pytest.raises(ValueError, match="dino_resnet50_pretrain.pth"):
        OODDetector("cpu")
    with pytest.raises(FileNotFoundError, match="dino_resnet50_pretrain.pth"):
        OODDetector("cpu", weights_path=tmp_path / "nope.pth")


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"teacher": exploit}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_resnet50_trunk(bad)
    assert not marker.exists()


def test_dino_checkpoint_teacher_backbone_loads(tmp_path: Path):
    torch.manual_seed(1)
    resnet = models.resnet50()
    teacher = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    teacher["head.last_layer.weight_g"] = torch.ones(3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 3}, path)
    trunk = load_resnet50_trunk(path)
    torch.testing.assert_close(trunk.conv1.weight, resnet.conv1.weight)
    assert trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
