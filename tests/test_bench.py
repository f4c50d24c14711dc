"""oodfast bench: the quick CPU stages run, report both paths with speedups, and write JSON/markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from oodfast.bench import report_markdown, run_bench
from oodfast.bench.harness import time_fn
from oodfast.cli import main


def test_time_fn_reports_median_and_spread():
    calls = []
    t = time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=5)
    assert len(calls) == 1 + (2 - 1) + 5 and t.repeats == 5  # first call, rest of warm-up, timed
    assert 0 <= t.p10_s <= t.median_s <= t.p90_s


def test_cli_quick_detect_and_ring(tmp_path: Path):
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--stages", "detect,ring", "--quick",
                                       "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["environment"]["device_type"] == "cpu" and report["environment"]["torch"]
    paths = {(r["stage"], r["path"]) for r in report["rows"]}
    assert ("detect", "seed (scipy loop)") in paths and ("detect", "torch") in paths
    assert ("ring", "seed (deque + stack/cat)") in paths and ("ring", "RareRing (enqueue + ring_copy)") in paths
    torch_row = next(r for r in report["rows"] if r["stage"] == "detect" and r["path"] == "torch"
                     and r["case"].startswith("euclidean"))
    assert torch_row["speedup"] > 1 and torch_row["items_per_s"] > 0
    assert "## detect" in (tmp_path / "b.md").read_text() and "## ring" in result.output


def test_bad_stage_and_device_are_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        run_bench("cpu", ["detekt"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            run_bench("cuda", ["detect"])


def test_markdown_has_one_table_per_stage():
    report = {"environment": {"device": "x", "device_type": "cpu", "date": "d", "git_sha": "abc", "torch": "t",
                              "triton": "3", "dali": "2"}, "quick": True, "stages": ["ring"],
              "rows": [{"stage": "ring", "case": "c", "path": "p", "items_per_s": 10.0, "us_per_call": 5.0,
                        "us_p10": 4.0, "us_p90": 6.0, "speedup": 2.0, "limit": None, "peak_mem_gib": None}]}
    text = report_markdown(report)
    assert "## ring" in text and "2.00x" in text and "| c | p |" in text


def test_plot_or_a_clear_error(tmp_path: Path):
    from oodfast.bench import plot_report

    report = {"environment": {"device": "cpu"}, "rows": [
        {"stage": "ring", "case": "c", "path": "p", "speedup": 3.0}]}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'oodfast\[plot\]'"):
            plot_report(report, tmp_path / "b.png")
        result = CliRunner().invoke(main, ["bench", "--stages", "ring", "--plot", str(tmp_path / "b.png")])
        assert result.exit_code != 0 and "matplotlib" in result.output  # refused before measuring
        return
    plot_report(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
