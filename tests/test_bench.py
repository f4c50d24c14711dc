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


def test_time_fn_batches_microsecond_calls_into_samples():
    calls = []
    t = time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=4, min_sample_s=1e-3)
    assert t.calls_per_sample > 10 and len(calls) == 2 + 4 * t.calls_per_sample
    assert t.median_s < 1e-3  # per call, not per sample


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
    cpu_target = next(v for v in report["targets"] if v["target"].startswith("torch scoring"))
    assert cpu_target["status"] in ("met", "not met") and cpu_target["value"] == torch_row["speedup"]
    assert "## targets" in result.output


def test_bad_stage_and_device_are_refused():
    with pytest.raises(ValueError, match="unknown stage"):
        run_bench("cpu", ["detekt"])
    import torch

    if not torch.cuda.is_available():  # oodfast.devices' NoGPUError, a ValueError
        with pytest.raises(ValueError, match="no (CUDA )?GPU"):
            run_bench("cuda", ["detect"])


def test_aug_without_dali_is_refused_before_measuring(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--stages", "ring,aug", "--quick"])
    assert result.exit_code != 0 and "nvidia-dali-cuda130" in result.output
    assert "--stages detect,ring,step" in result.output and "## ring" not in result.output


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


def _report(device_type: str, stages: list[str], rows: list[dict]) -> dict:
    env = {"device": "x", "device_type": device_type, "date": "d", "git_sha": "abc", "torch": "t", "triton": "3",
           "dali": "2"}
    base = {"items_per_s": 1.0, "us_per_call": 1.0, "us_p10": 1.0, "us_p90": 1.0}
    return {"environment": env, "quick": False, "stages": stages, "rows": [{**base, **r} for r in rows]}


def test_targets_met_not_met_and_not_measured():
    from oodfast.bench.targets import check_targets

    report = _report("cuda", ["detect", "step"], [
        {"stage": "detect", "case": "euclidean B=1024 D=2048", "path": "fused (Triton)", "us_per_call": 8.0},
        {"stage": "detect", "case": "mahalanobis B=1024 D=2048", "path": "fused (Triton)", "us_per_call": 31.0},
        {"stage": "detect", "case": "knn B=1024 D=2048", "path": "fused (Triton)", "items_per_s": 4e5},
        {"stage": "detect", "case": "knn B=65536 D=2048", "path": "fused (Triton)", "items_per_s": 2e6},
        {"stage": "step", "case": "resnet50 B=64+C=32", "path": "compiled", "items_per_s": 900.0, "speedup": 1.3,
         "ood_overhead": 0.05},
        {"stage": "train", "case": "resnet50 B=64+C=32", "path": "end to end (loader + step)", "limit": 0.95},
    ])
    verdicts = {v["target"]: v for v in check_targets(report)}
    assert verdicts["fused euclidean, B=1024 bf16, eager"]["status"] == "met"
    assert verdicts["fused euclidean, B=1024 bf16, eager"]["measured"] == "8.0 us"
    assert verdicts["fused mahalanobis, B=1024"]["status"] == "not met"
    knn = verdicts["fused knn against a 100k bank (best B)"]
    assert knn["status"] == "met" and knn["value"] == 2e6  # the best batch size counts
    assert verdicts["ResNet-50 DINO step, compiled (8 crops per image)"]["status"] == "not met"
    assert verdicts["compiled step over eager"]["status"] == "met"
    assert verdicts["teacher-detector OOD overhead at equal rows"]["measured"] == "5.0%"
    assert verdicts["teacher-detector OOD overhead at equal rows"]["status"] == "not met"
    assert verdicts["end to end: share of step-only"]["status"] == "met"
    assert verdicts["fused euclidean, B=1024 bf16, in a CUDA graph"]["status"].startswith("not measured (no such row")
    assert verdicts["DALI GPU multi-crop from 1280x720"]["status"] == "not measured (stage aug did not run)"
    assert verdicts["DALI CPU over the paper's PIL path"]["status"].startswith("not measured (a cpu target")


def test_cpu_targets_from_a_cpu_report():
    from oodfast.bench.targets import check_targets

    report = _report("cpu", ["detect", "aug"], [
        {"stage": "detect", "case": "euclidean B=1024 D=2048", "path": "torch", "speedup": 99.0},
        {"stage": "aug", "case": "640x360 JPEG", "path": "DALI cpu", "speedup": 1.1},
    ])
    verdicts = {v["target"]: v["status"] for v in check_targets(report)}
    assert verdicts["torch scoring over the paper's scipy loop, euclidean B=1024 D=2048"] == "not met"
    assert verdicts["DALI CPU over the paper's PIL path"] == "met"
    assert all(s.startswith("not measured (a cuda target") for t, s in verdicts.items()
               if t not in ("DALI CPU over the paper's PIL path",
                            "torch scoring over the paper's scipy loop, euclidean B=1024 D=2048"))


def test_markdown_shows_first_call_vs_torch_and_targets():
    from oodfast.bench.targets import check_targets

    report = _report("cpu", ["detect"], [
        {"stage": "detect", "case": "euclidean B=1024 D=2048", "path": "seed (scipy loop)", "us_per_call": 200.0,
         "speedup": 1.0, "vs_torch": 0.01, "first_call_s": 0.25},
        {"stage": "detect", "case": "euclidean B=1024 D=2048", "path": "torch", "us_per_call": 2.0,
         "speedup": 100.0, "vs_torch": 1.0, "first_call_s": 3.5},
    ])
    report["targets"] = check_targets(report)
    text = report_markdown(report)
    assert "| first call |" in text and "3.5 s" in text and "| vs torch |" in text
    assert "## targets" in text and "| 100.00x | met |" in text


def test_a_failed_path_is_reported_named_by_its_target_and_fails_the_cli(monkeypatch, tmp_path: Path):
    import oodfast.bench as bench
    from oodfast.bench.stages import FUSED_GRAPH, _failed
    from oodfast.bench.targets import check_targets

    report = _report("cuda", ["detect"], [])
    report["rows"].append(_failed("detect", "euclidean B=1024 D=2048", FUSED_GRAPH, "capture failed: boom"))
    report["targets"] = check_targets(report)
    verdict = next(v for v in report["targets"] if v["target"].endswith("in a CUDA graph"))
    assert verdict["status"] == "not measured (failed: capture failed: boom)"
    assert "**Not measured:** fused (Triton), CUDA graph, euclidean B=1024 D=2048: capture failed: boom" in \
        report_markdown(report)

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: report)
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--stages", "detect",
                                       "--json", str(tmp_path / "b.json")])
    assert result.exit_code != 0 and "could not be measured" in result.output
    assert (tmp_path / "b.json").exists()  # the report is written all the same


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_replays_the_captured_work():
    import torch

    from oodfast.bench.harness import cuda_graphed

    x, out = torch.arange(4.0, device="cuda"), torch.zeros(4, device="cuda")
    replay = cuda_graphed(lambda: torch.mul(x, 2, out=out), "cuda")
    x.copy_(torch.ones(4))
    replay()
    torch.cuda.synchronize()
    assert out.tolist() == [2.0, 2.0, 2.0, 2.0]


def test_gpu_driver_merges_stage_by_stage_and_keeps_what_was_measured(monkeypatch, tmp_path: Path):
    """oodfast.bench.gpu (benchmarks/gpu.sh's report side): each stage lands in STEM.json/md as soon as it
    is measured; a stage stopped at its cap is named and the earlier ones stay; a rerun replaces its rows."""
    import oodfast.bench.gpu as gpu

    stem = tmp_path / "dev-date"
    assert gpu.bench(stem, ["ring"], device="cpu", quick=True) == 0
    first = json.loads((tmp_path / "dev-date.json").read_text())
    ring_rows = [r for r in first["rows"] if r["stage"] == "ring"]
    assert first["stages"] == ["ring"] and len(ring_rows) == 2 and first["targets"]

    real = gpu.run_bench

    def stopped(device, stages, quick=False):
        if stages == ["detect"]:
            raise KeyboardInterrupt  # what `timeout -s INT` delivers at the section's cap
        return real(device, stages, quick=quick)

    monkeypatch.setattr(gpu, "run_bench", stopped)
    assert gpu.bench(stem, ["detect", "ring"], device="cpu", quick=True) == gpu.STOPPED  # ring not reached
    report = json.loads((tmp_path / "dev-date.json").read_text())
    assert report["stages"] == ["ring", "detect"] and "time cap" in report["stage_errors"]["detect"]
    assert [r for r in report["rows"] if r["stage"] == "ring"] == ring_rows  # kept as measured
    verdict = next(v for v in report["targets"] if v["target"].startswith("torch scoring"))
    assert verdict["status"].startswith("not measured (stage detect failed: stopped at its time cap")
    assert "**Stage not measured:** stopped at its time cap" in (tmp_path / "dev-date.md").read_text()

    assert gpu.bench(stem, ["ring"], device="cpu", quick=True) == 0  # a rerun replaces, never duplicates
    again = json.loads((tmp_path / "dev-date.json").read_text())
    assert len([r for r in again["rows"] if r["stage"] == "ring"]) == 2 and "detect" in again["stage_errors"]
    assert not list(tmp_path.glob("*.tmp"))
