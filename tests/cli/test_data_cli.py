"""``oodfast data synth`` and ``oodfast data check`` end to end through click."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from oodfast.cli import main
from oodfast.data.discover import discover


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODFAST_CACHE", str(tmp_path / "cache"))


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_synth_then_check_finds_planted_corrupt_file(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    code, out = run("data", "synth", "--out", str(root), "--num-images", "8", "--size", "128x72",
                    "--seed", "4", "--workers", "1", "--json", str(tmp_path / "m.json"),
                    "--markdown", str(tmp_path / "m.md"))
    assert code == 0, out
    assert "rare global-crop prevalence" in out
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 8
    assert (tmp_path / "m.md").read_text().startswith("# synthdrive: 8 frames at 128x72")

    victim = sorted((root / "images/10k/train").glob("*.jpg"))[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncate it

    code, out = run("data", "check", "--data", "bdd10k", "--data-root", str(root), "--workers", "1",
                    "--json", str(tmp_path / "c.json"), "--strict")
    assert code == 1, out
    report = json.loads((tmp_path / "c.json").read_text())
    assert [b["path"] for b in report["bad"]] == [f"images/10k/train/{victim.name}"]
    assert report["bad"][0]["reason"].startswith("truncated")
    assert report["n_total"] == 7 and report["n_ok"] == 6
    # Training-side discovery now applies the clean list by itself.
    files = discover("bdd10k", root, "train")
    assert len(files) == 6 and victim not in files.images


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "check", "--data", "bdd100k"], "needs --data-root PATH"),
        (["data", "check", "--data", "folder", "--data-root", "/nonexistent/x"], "/nonexistent/x does not exist"),
        (["data", "synth", "--out", "x", "--size", "big"], "is not WIDTHxHEIGHT"),
        (["data", "synth", "--out", "x", "--rare-weights", "person"], "is not CLASS=WEIGHT"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output


def test_version_and_help() -> None:
    code, out = run("--help")
    assert code == 0 and "data" in out
    code, out = run("--version")
    assert code == 0 and "oodfast" in out
