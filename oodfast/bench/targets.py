"""The performance targets of the kernels, the multi-crop loader and the trainer, checked against a bench report.

Each :class:`Target` names the rows it reads (stage, path, case prefix), the figure it takes from them,
and a bound. :func:`check_targets` returns one verdict per target: ``met``, ``not met``, or
``not measured`` with the reason (another device type, a stage that did not run, a case that was not
measured at these sizes). GPU targets are stated for one H100; a report from another GPU is judged
against the same bounds, and the report's header names the device.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from oodfast.bench.stages import COMPILED_STEP, END_TO_END, FUSED, FUSED_GRAPH, TORCH, dali_path

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One bound on one figure of a bench report.

    ``figure`` is a row key (``us_per_call``, ``items_per_s``, ``speedup``, ``limit``, ``ood_overhead``);
    rows are those of ``stage`` whose ``path`` is ``path`` and whose ``case`` starts with ``case``.
    Several matching rows are reduced with ``best`` (e.g. the best batch size for a throughput).
    """

    what: str
    device_type: str  # "cuda" or "cpu": the device the bound is stated for
    stage: str
    path: str
    case: str
    figure: str
    op: str  # ">=", "<=" or ">"
    bound: float
    unit: str = ""
    best: Callable[[Iterable[float]], float] = max

    def rows(self, report: dict[str, Any], *, failed: bool = False) -> list[Row]:
        """The measured rows this target reads (``failed``: the rows of its path that failed instead)."""
        return [r for r in report["rows"] if r["stage"] == self.stage and r["path"] == self.path
                and r["case"].startswith(self.case)
                and (("error" in r) if failed else (r.get(self.figure) is not None))]


OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}

#: The bounds (kernels: detect; multi-crop: aug; trainer: step / train), as stated for one H200.
TARGETS: tuple[Target, ...] = (
    # One H200 (copy 4.3 TB/s, bf16 dense ~790 TFLOP/s measured on this kind of device).
    Target("fused euclidean, B=1024 bf16, eager", "cuda", "detect", FUSED, "euclidean B=1024 ",
           "us_per_call", "<=", 30, " us", best=min),
    Target("fused euclidean, B=1024 bf16, in a CUDA graph", "cuda", "detect", FUSED_GRAPH,
           "euclidean B=1024 ", "us_per_call", "<=", 4, " us", best=min),
    Target("fused euclidean, B=65536: share of the copy bandwidth", "cuda", "detect", FUSED,
           "euclidean B=65536 ", "limit", ">=", 0.85),
    Target("fused mahalanobis, B=1024", "cuda", "detect", FUSED, "mahalanobis B=1024 ",
           "us_per_call", "<=", 20, " us", best=min),
    Target("fused knn against a 100k bank (best B)", "cuda", "detect", FUSED, "knn ",
           "items_per_s", ">=", 1e6, " queries/s"),
    Target("DALI GPU multi-crop from 1280x720", "cuda", "aug", dali_path("cuda"), "1280x720", "items_per_s", ">=", 3000,
           " images/s"),
    Target("DALI GPU over the paper's PIL path (workers = cores)", "cuda", "aug", dali_path("cuda"), "1280x720", "speedup", ">=", 8,
           "x"),
    Target("DALI GPU: share of decode-only", "cuda", "aug", dali_path("cuda"), "1280x720", "limit", ">=", 0.85),
    Target("ResNet-50 DINO step, compiled (8 crops per image)", "cuda", "step", COMPILED_STEP, "resnet50 ",
           "items_per_s", ">=", 1200, " images/s"),
    Target("compiled step over eager", "cuda", "step", COMPILED_STEP, "resnet50 ", "speedup", ">=", 1.15, "x"),
    Target("end to end: share of step-only", "cuda", "train", END_TO_END, "resnet50 ", "limit",
           ">=", 0.95),
    Target("teacher-detector OOD overhead at equal rows", "cuda", "step", COMPILED_STEP, "resnet50 ", "ood_overhead",
           "<=", 0.01, best=min),
    Target("torch scoring over the paper's scipy loop, euclidean B=1024 D=2048", "cpu", "detect", TORCH,
           "euclidean B=1024 D=2048", "speedup", ">=", 100, "x"),
    Target("DALI CPU over the paper's PIL path", "cpu", "aug", dali_path("cpu"), "", "speedup", ">", 1, "x"),
)


def _format(value: float, target: Target) -> str:
    if target.figure in ("limit", "ood_overhead"):
        return f"{value * 100:.1f}%"
    if target.unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.1f}{target.unit}" if value < 1000 else f"{value:,.0f}{target.unit}"


def check_targets(report: dict[str, Any], targets: Iterable[Target] = TARGETS) -> list[dict[str, Any]]:
    """One verdict per target: ``{"target", "device_type", "bound", "measured", "value", "status"}``."""
    device_type = report["environment"]["device_type"]
    stages = {"train" if s == "step" else s for s in report.get("stages", ())} | set(report.get("stages", ()))
    verdicts = []
    for t in targets:
        bound = f"{t.op} {_format(t.bound, t)}"
        verdict = {"target": t.what, "device_type": t.device_type, "bound": bound, "measured": "", "value": None}
        rows = t.rows(report)
        if device_type != t.device_type:
            verdict["status"] = f"not measured (a {t.device_type} target; this report is {device_type})"
        elif t.stage not in stages:
            verdict["status"] = f"not measured (stage {'step' if t.stage == 'train' else t.stage} did not run)"
        elif not rows and report.get("stage_errors", {}).get(stage := "step" if t.stage == "train" else t.stage):
            verdict["status"] = f"not measured (stage {stage} failed: {report['stage_errors'][stage]})"
        elif not rows and t.rows(report, failed=True):
            verdict["status"] = f"not measured (failed: {t.rows(report, failed=True)[0]['error']})"
        elif not rows:
            verdict["status"] = "not measured (no such row at these sizes)"
        else:
            value = t.best(r[t.figure] for r in rows)
            verdict.update(value=value, measured=_format(value, t),
                           status="met" if OPS[t.op](value, t.bound) else "not met")
        verdicts.append(verdict)
    return verdicts
