"""``oodfast evaluate detect`` / ``represent`` end to end through click on a tiny synthdrive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from oodfast.cli import main
from oodfast.data.synthdrive import ensure_synthdrive


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthdrive(tmp_path_factory.mktemp("sd"), progress=False, num_images=48, seed=0, width=128, height=72)


def test_evaluate_detect_writes_the_table(root, tmp_path):
    result = CliRunner().invoke(main, [
        "evaluate", "detect", "--data", "bdd10k", "--data-root", str(root), "--encoder", "random", "--arch", "resnet18",
        "--calib-sizes", "8", "--percentiles", "0.8", "--seeds", "0", "--crop-size", "32",
        "--detectors", "random,euclidean", "--json", str(tmp_path / "d.json"), "--markdown", str(tmp_path / "d.md")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert {r["detector"] for r in report["rows"]} == {"random", "euclidean"}
    assert report["encoder"] == {"source": "random", "arch": "resnet18"}
    assert "| euclidean | 8 | 0.8 |" in (tmp_path / "d.md").read_text()


def test_evaluate_detect_dense_with_pr_png(root, tmp_path):
    """A dense detector on the default layer3, per-object recall, image-level intervals, the Pillow PR plot."""
    from PIL import Image

    result = CliRunner().invoke(main, [
        "evaluate", "detect", "--data", "bdd10k", "--data-root", str(root), "--encoder", "random", "--arch", "resnet18",
        "--calib-sizes", "8", "--percentiles", "0.8", "--seeds", "0", "--crop-size", "32", "--bootstrap", "50",
        "--detectors", "euclidean,dense-euclidean", "--min-object-pixels", "1", "--pr-png", str(tmp_path / "pr.png"),
        "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert [r["detector"] for r in report["rows"]] == ["euclidean", "dense-euclidean"]
    assert report["config"]["layer"] == "layer3" and report["config"]["min_object_pixels"] == 1
    dense = report["rows"][1]
    assert 0.0 <= dense["auroc"] <= 1.0 and len(dense["auroc_ci"]) == 2 and "all" in dense["object_recall"]
    assert "over images, not crops" in result.output and "| dense-euclidean | 8 | 0.8 |" in result.output
    assert Image.open(tmp_path / "pr.png").size[0] > 100


@pytest.mark.parametrize("args, words", [
    (["--layer", "tokens"], ["--layer tokens does not fit --arch resnet18", "layer3"]),
    (["--layer", "layer9"], ["'--layer'", "'layer9'"]),
    (["--detectors", "dense-psychic"], ["'--detectors'", "dense-psychic", "dense-knn"]),
    (["--min-object-pixels", "0"], ["'--min-object-pixels'"]),
])
def test_evaluate_detect_bad_dense_flags_are_one_line(root, args, words):
    result = CliRunner().invoke(main, ["evaluate", "detect", "--data", "bdd10k", "--data-root", str(root),
                                       "--arch", "resnet18", *args])
    assert result.exit_code == 2, result.output
    out = [line for line in result.output.splitlines() if line.strip()]
    assert len(out) == 1 and out[0].startswith("oodfast: error: "), result.output
    for w in words:
        assert w in out[0], out[0]


def test_evaluate_represent_runs(root, tmp_path):
    result = CliRunner().invoke(main, [
        "evaluate", "represent", "--data", "bdd10k", "--data-root", str(root), "--encoder", "random",
        "--arch", "resnet18", "--seeds", "0", "--crops-per-image", "2", "--size", "32", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "dominant" in report and "rare_present" in report
    assert "## dominant" in result.output
    assert report["config"]["tau"] == 0.001 and "auroc" in report["rare_present"]["knn"]
    # --tau sets the rare-presence ground truth: a stricter share, fewer rare crops.
    strict = CliRunner().invoke(main, [
        "evaluate", "represent", "--data", "bdd10k", "--data-root", str(root), "--encoder", "random",
        "--arch", "resnet18", "--seeds", "0", "--crops-per-image", "2", "--size", "32", "--tau", "0.05",
        "--json", str(tmp_path / "s.json")])
    assert strict.exit_code == 0, strict.output
    tight = json.loads((tmp_path / "s.json").read_text())
    assert tight["config"]["tau"] == 0.05
    assert tight["rare_prevalence"]["train"] < report["rare_prevalence"]["train"]


def test_evaluate_needs_masks_and_real_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    result = CliRunner().invoke(main, ["evaluate", "detect", "--data", "folder", "--data-root", str(tmp_path / "imgs")])
    assert result.exit_code != 0 and "masks are needed" in result.output
    result = CliRunner().invoke(main, ["evaluate", "detect", "--data", "bdd10k", "--data-root", str(tmp_path),
                                       "--encoder", str(tmp_path / "missing.pth")])
    assert result.exit_code != 0


def dino_vit_checkpoint(path: Path, arch: str = "vit_tiny", patch_size: int = 16) -> Path:
    """A checkpoint in facebookresearch/dino's format: ``args`` an argparse.Namespace, the DDP student's keys
    ``module.backbone.*`` / ``module.head.*``, the teacher's ``backbone.*``."""
    import argparse

    import torch

    from oodfast.encoders import build_backbone

    torch.manual_seed(0)
    net, dim = build_backbone(arch, patch_size=patch_size)
    backbone = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    head = {"head.mlp.0.weight": torch.zeros(4, dim)}
    torch.save({"student": {f"module.{k}": v for k, v in (backbone | head).items()}, "teacher": backbone | head,
                "optimizer": {}, "epoch": 1, "dino_loss": {},
                "args": argparse.Namespace(arch=arch, patch_size=patch_size, out_dim=4)}, path)
    return path


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory) -> Path:
    return dino_vit_checkpoint(tmp_path_factory.mktemp("vit") / "checkpoint.pth")


def test_evaluate_represent_vit_with_dino_flags(root, vit_ckpt, tmp_path):
    """DINO's eval flags on a DINO-format vit_tiny checkpoint: the kNN is reported for each --nb_knn k."""
    result = CliRunner().invoke(main, [
        "evaluate", "represent", "--data", "bdd10k", "--data-root", str(root), "--pretrained_weights", str(vit_ckpt),
        "--checkpoint_key", "student", "--arch", "vit_tiny", "--patch_size", "16", "--nb_knn", "5", "10",
        "--temperature", "0.1", "--seeds", "0", "--crops-per-image", "2", "--size", "32",
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encoder"] == {"source": str(vit_ckpt), "arch": "vit_tiny", "checkpoint_key": "student",
                                 "patch_size": 16}
    assert report["config"]["nb_knn"] == [5, 10] and report["config"]["T"] == 0.1
    for task in ("dominant", "rare_present"):
        assert set(report[task]["knn_by_k"]) == {"5", "10"}
        assert report[task]["knn_k_used"] == {"5": 5, "10": 10}
    assert 0.0 <= report["dominant"]["knn_by_k"]["10"]["overall"]["accuracy"] <= 1.0
    text = (tmp_path / "r.md").read_text()
    assert "kNN (k=5)" in text and "kNN (k=10)" in text and "(vit_tiny/16)" in text


def test_evaluate_detect_takes_dino_encoder_flags(root, vit_ckpt, tmp_path):
    result = CliRunner().invoke(main, [
        "evaluate", "detect", "--data", "bdd10k", "--data-root", str(root), "--pretrained_weights", str(vit_ckpt),
        "--arch", "vit_tiny", "--patch_size", "16", "--calib-sizes", "8", "--percentiles", "0.8", "--seeds", "0",
        "--crop-size", "32", "--detectors", "euclidean", "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["encoder"] == {"source": str(vit_ckpt), "arch": "vit_tiny", "checkpoint_key": "teacher",
                                 "patch_size": 16}
    assert [r["detector"] for r in report["rows"]] == ["euclidean"]


@pytest.mark.parametrize("args, code, words", [
    (["--arch", "vit_huge"], 2, ["'--arch'", "'vit_huge'", "vit_tiny, vit_small, vit_base"]),
    (["--arch", "vit_tiny", "--patch_size", "14"], 2, ["'--patch_size'", "14", "8 or 16"]),
    (["--arch", "resnet18", "--patch_size", "16"], 2, ["--patch_size applies to ViTs", "--arch resnet18"]),
    (["--arch", "vit_tiny", "--size", "40"], 2, ["--size 40 is not a multiple of --patch_size 16", "32 or 48"]),
    (["--arch", "vit_tiny", "--patch_size", "8", "--size", "36"], 2, ["--size 36", "--patch_size 8", "32 or 40"]),
    (["--nb_knn", "5", "0"], 2, ["'--nb_knn'", "0 is not in the range"]),
    (["--nb_knn", "five"], 2, ["'--nb_knn'", "'five'"]),
    (["--nb_knn"], 2, ["'--nb_knn' requires an argument"]),
    (["--temperature", "0"], 2, ["'--temperature'"]),
    (["--temperature", "nan"], 2, ["'--temperature'", "finite"]),
    (["--pretrained_weights", ""], 2, ["'--pretrained_weights'", "is empty"]),
    (["--pretrained_weights", "/no/such/checkpoint.pth", "--arch", "vit_tiny"], 1,
     ["/no/such/checkpoint.pth does not exist"]),
])
def test_evaluate_represent_bad_flags_are_one_line(root, args, code, words):
    result = CliRunner().invoke(main, ["evaluate", "represent", "--data", "bdd10k", "--data-root", str(root), *args])
    assert result.exit_code == code, result.output
    out = [line for line in result.output.splitlines() if line.strip()]
    assert len(out) == 1 and out[0].startswith("oodfast: error: "), result.output
    for w in words:
        assert w in out[0], out[0]


def test_evaluate_bad_checkpoint_flags_name_the_fix(root, vit_ckpt):
    base = ["evaluate", "represent", "--data", "bdd10k", "--data-root", str(root), "--pretrained_weights", str(vit_ckpt)]
    cases = [(["--arch", "vit_tiny", "--checkpoint_key", "ema"], ["no 'ema' entry", "--checkpoint_key"]),
             (["--arch", "vit_small"], ["do not fit arch 'vit_small'", "arch 'vit_tiny', patch_size 16"]),
             (["--arch", "vit_tiny", "--patch_size", "8"], ["patch_embed.proj.weight", "patch_size 16"])]
    for extra, words in cases:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 1, result.output
        out = [line for line in result.output.splitlines() if line.strip()]
        assert len(out) == 1 and out[0].startswith("oodfast: error: "), result.output
        for w in words:
            assert w in out[0], out[0]
    # detect takes the same encoder flags, with the same one-line refusals
    result = CliRunner().invoke(main, ["evaluate", "detect", "--data", "bdd10k", "--data-root", str(root),
                                       "--arch", "vit_tiny", "--crop-size", "30"])
    assert result.exit_code == 2 and "--crop-size 30 is not a multiple of --patch_size 16" in result.output
