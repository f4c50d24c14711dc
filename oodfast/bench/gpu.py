"""The report side of benchmarks/gpu.sh: one bench report that grows stage by stage, written as it goes.

    python -m oodfast.bench.gpu env STEM                      # STEM-env.json: device, versions, install
    python -m oodfast.bench.gpu bench STEM STAGE[,STAGE...]   # runs the stages, merging into STEM.{json,md,png}

gpu.sh runs each stage group in its own process under its own time cap; after every stage the merged
report (rows, stages, targets re-judged over everything measured so far) is rewritten in place, so a
process stopped at its cap, or a later stage that fails, leaves every earlier figure in the files. A stage
that raised, or was stopped (SIGINT from ``timeout``), is named in the report under ``stage_errors``
and the exit status is non-zero. A stage run again replaces its earlier rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from oodfast.bench import failures, plot_report, report_markdown, run_bench
from oodfast.bench.harness import environment
from oodfast.bench.targets import check_targets
from oodfast.devices import default_device

#: Exit status of a bench group stopped at its time cap (what ``timeout`` itself returns).
STOPPED = 124


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader (or a kill) never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load(stem: Path) -> dict[str, Any] | None:
    path = Path(f"{stem}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def merge(report: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``report`` with ``new``'s stages: their rows replace any earlier rows of the same stages, the
    environment is ``new``'s, the targets are judged again over all rows."""
    if report is None or report["environment"].get("device") != new["environment"].get("device"):
        merged = {**new, "stage_errors": dict(new.get("stage_errors", {}))}
    else:
        # the step stage also writes the train rows (end to end)
        replaced = set(new["stages"]) | ({"train"} if "step" in new["stages"] else set())
        merged = {**report, "environment": new["environment"], "quick": report["quick"] or new["quick"],
                  "stages": list(dict.fromkeys([*report["stages"], *new["stages"]])),
                  "rows": [r for r in report["rows"] if r["stage"] not in replaced] + new["rows"],
                  "stage_errors": {**{k: v for k, v in report.get("stage_errors", {}).items()
                                      if k not in new["stages"]}, **new.get("stage_errors", {})}}
    merged["targets"] = check_targets(merged)
    return merged


def write(stem: Path, report: dict[str, Any]) -> None:
    """STEM.json, STEM.md, and STEM.png when matplotlib is there."""
    _write(Path(f"{stem}.json"), json.dumps(report, indent=1, default=str) + "\n")
    _write(Path(f"{stem}.md"), report_markdown(report))
    try:
        plot_report(report, Path(f"{stem}.png"))
    except ValueError:  # no matplotlib: the chart is optional
        pass


def bench(stem: Path, stages: list[str], device: str = "cuda", quick: bool = False) -> int:
    """Run ``stages`` one by one, merging each into STEM's report as soon as it is measured."""
    # gpu.sh stops a group at its cap with SIGINT; Python ignores it if the caller's shell did (a
    # background job): take it back so the stage is named as stopped and the report written.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = 0
    for stage in stages:
        start = time.perf_counter()
        print(f"gpu bench: stage {stage} ...", flush=True)
        try:
            new = run_bench(device, [stage], quick=quick)
        except KeyboardInterrupt:
            new, status = _stage_failed(device, stage, quick, "stopped at its time cap (SIGINT)"), STOPPED
        except Exception as e:  # noqa: BLE001 - one stage's failure must not lose the others' figures
            traceback.print_exc()
            new, status = _stage_failed(device, stage, quick, f"{type(e).__name__}: {e}"), status or 1
        report = merge(load(stem), new)
        write(stem, report)
        bad = failures(new)
        if bad:
            status = status or 1
            print("gpu bench: not measured:\n  " + "\n  ".join(bad), flush=True)
        print(f"gpu bench: stage {stage} done in {time.perf_counter() - start:.0f} s -> {stem}.json", flush=True)
        if status == STOPPED:
            break
    return status


def _stage_failed(device: str, stage: str, quick: bool, error: str) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    try:
        env = environment(dev)
    except Exception as e:  # noqa: BLE001 - e.g. no driver: the report still says what failed
        env = {**environment(torch.device("cpu")), "device": f"unknown ({type(e).__name__})", "device_type": dev.type}
    return {"environment": env, "quick": quick, "stages": [stage], "rows": [], "stage_errors": {stage: error}}


def env(stem: Path) -> dict[str, Any]:
    """STEM-env.json: :func:`environment` on CUDA plus nvidia-smi's view and what gpu.sh passed."""
    import torch

    info = environment(torch.device(default_device()))
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,"
             "temperature.gpu,persistence_mode", "--format=csv"], capture_output=True, text=True,
            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    try:
        import nvidia.dali as dali

        info["dali_import"] = f"{dali.__version__} from {Path(dali.__file__).parent}"
    except (ImportError, OSError) as e:
        info["dali_import"] = f"not importable: {e}"
    info["python_executable"] = sys.executable
    info["pythonpath"] = os.environ.get("PYTHONPATH", "")
    info["gpu_sh"] = {k[len("OODFAST_GPU_"):].lower(): v for k, v in os.environ.items() if k.startswith("OODFAST_GPU_")}
    _write(Path(f"{stem}-env.json"), json.dumps(info, indent=1, default=str) + "\n")
    return info


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "env":
        print(json.dumps(env(Path(argv[1])), indent=1, default=str))
        return 0
    if len(argv) >= 3 and argv[0] == "bench":
        quick = "--quick" in argv[3:]
        return bench(Path(argv[1]), [s for s in argv[2].split(",") if s], quick=quick)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
