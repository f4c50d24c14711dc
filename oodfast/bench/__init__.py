"""``oodfast bench``: throughput of oodfast's paths against the paper's code path, stage by stage.

``run_bench(device, stages, quick)`` returns a report dict: the environment (device, driver, library
versions, git SHA, date), one row per (stage, case, path), and the verdict on each performance target
(:mod:`oodfast.bench.targets`). ``report_markdown`` renders it; ``plot_report`` draws a bar chart of
the speedups (matplotlib, optional).

Layout:

    __init__.py   run_bench, the markdown report, the plot (this file)
    harness.py    timing (time_fn: warm-up, median and spread, peak memory), CUDA-graph replay, the
                  copy bandwidth, the environment a committed report carries
    stages.py     the stages detect, ring, aug, step (train = end to end, measured with step): each
                  runs the paper's path and oodfast's in the same process and returns rows
    targets.py    the performance bounds and their verdicts on a report
    gpu.py        the report side of benchmarks/gpu.sh: stage by stage, merged and written as it goes

The pytest-benchmark suites in benchmarks/ (bench_<stage>.py) time the same cases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodfast.bench.harness import environment
from oodfast.bench.stages import ALIASES, COMPILED_STEP, STAGES, run_stage
from oodfast.bench.targets import check_targets
from oodfast.devices import resolve_device

log = logging.getLogger(__name__)
STAGE_NAMES = tuple(STAGES) + tuple(ALIASES)


def run_bench(device: str | torch.device | None, stages: Sequence[str], *, quick: bool = False,
              workdir: Path | None = None) -> dict[str, Any]:
    """Measure ``stages`` on ``device`` (None: the default device); the paper's path and oodfast's run
    in the same process.

    Raises:
        ValueError: an unknown stage; :class:`oodfast.devices.NoGPUError` (a ValueError): ``cuda``
            without a GPU.
    """
    dev = resolve_device(device)
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGE_NAMES)}")
    todo = list(dict.fromkeys(ALIASES.get(s, s) for s in stages))  # train is measured by step
    if "aug" in todo:
        from oodfast.data.multicrop import require_dali

        require_dali("leave the aug stage out: --stages detect,ring,step")
    rows: list[dict[str, Any]] = []
    for stage in todo:
        log.info("bench: stage %s on %s%s", stage, dev, " (quick)" if quick else "")
        rows += run_stage(stage, dev, quick, workdir)
    report = {"environment": environment(dev), "quick": quick, "stages": todo, "rows": rows}
    report["targets"] = check_targets(report)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """One line per path that could not be measured."""
    return [f"{r['stage']}: {r['path']}, {r['case']}: {r['error']}" for r in report["rows"] if "error" in r]


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: environment, then one table per stage."""
    from oodfast.report import markdown_table

    env = report["environment"]
    head = (f"# oodfast bench: {env['device']} ({env['device_type']})\n\n"
            f"{env['date']}, git {str(env.get('git_sha'))[:10]}, torch {env['torch']}, triton {env['triton']}, "
            f"DALI {env['dali']}" + (f", driver {env.get('driver')}" if env.get("driver") else "")
            + (", quick sizes" if report["quick"] else "") + "\n")
    text = head
    errors = report.get("stage_errors", {})
    for stage in report["stages"]:
        rows = [r for r in report["rows"] if r["stage"] in (stage, "train" if stage == "step" else stage)]
        if stage in errors and not rows:  # a stage that raised or was stopped (oodfast.bench.gpu)
            text += f"\n## {stage}\n\n**Stage not measured:** {errors[stage]}\n"
            continue
        failed = [r for r in rows if "error" in r]
        rows = [r for r in rows if "error" not in r]
        vs_torch = any(r.get("vs_torch") is not None for r in rows)
        table = [(r["case"], r["path"], round(r["items_per_s"], 1), round(r["us_per_call"], 1),
                  f"{r['us_p10']:.0f}-{r['us_p90']:.0f}", _fmt(r.get("speedup"), "x"))
                 + ((_fmt(r.get("vs_torch"), "x"),) if vs_torch else ())
                 + (_fmt(r.get("limit"), "%"), _fmt(r.get("peak_mem_gib"), " GiB"), _fmt(r.get("first_call_s"), " s"))
                 for r in rows]
        unit = "rows/s" if stage == "detect" else "images/s"
        text += f"\n## {stage}\n\n" + markdown_table(
            ["case", "path", unit, "us/call", "p10-p90 us", "speedup"] + (["vs torch"] if vs_torch else [])
            + ["of limit", "peak mem", "first call"], table)
        text += f"\n{COLUMNS.get(stage, COLUMNS['*'])}\n"
        for r in failed:
            text += f"\n**Not measured:** {r['path']}, {r['case']}: {r['error']}\n"
        for r in rows:
            if r.get("ood_overhead") is not None:
                mode = "teacher detector" if r["path"] == COMPILED_STEP else r["path"].removeprefix("compiled, ")
                text += (f"\nDetection overhead at equal rows ({mode} vs random replay, compiled): "
                         f"{r['ood_overhead'] * 100:+.1f}%\n")
    if report.get("targets"):
        text += "\n## targets\n\n" + markdown_table(
            ["target", "device", "bound", "measured", "status"],
            [(v["target"], v["device_type"], v["bound"], v["measured"], v["status"]) for v in report["targets"]])
    return text


_COMMON = ("speedup: over the stage's baseline in the same case (the paper's path; eager for the step). first call: "
           "the first, untimed call (compilation, autotuning, worker start-up; for a CUDA graph its capture), apart "
           "from the steady state. peak mem (CUDA only): the torch allocator's peak while the path ran, tensors "
           "alive before it included; DALI's own GPU memory is not counted.")
#: The column notes under each stage's table (what "of limit" means there).
COLUMNS = {
    "aug": "of limit: share of DALI decode-only throughput (same decoder placement). " + _COMMON,
    "detect": ("of limit: share of the HBM bandwidth of a device-to-device copy measured in the same run (GPU only). "
               "vs torch: over the torch path. " + _COMMON),
    "step": "of limit (end to end row): share of the compiled step-only throughput. " + _COMMON,
    "*": _COMMON,
}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "%":
        return f"{value * 100:.0f}%"
    if unit == " s":
        return f"{value:.1f} s" if value >= 1 else f"{value * 1e3:.1f} ms"
    return f"{value:.2f}{unit}"


def require_matplotlib() -> None:
    """Raise a clear ValueError now (before any measuring) if ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'oodfast[plot]'") from None


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Bar chart of speedups over each stage's baseline, one bar per (case, path); needs matplotlib."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["rows"] if r.get("speedup") is not None]
    labels = [f"{r['stage']}: {r['case']}\n{r['path']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the paper's path (eager for the step; log)")
    ax.set_title(f"oodfast bench on {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
