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
