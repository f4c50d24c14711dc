"""One table comparing encoders: ``oodfast evaluate represent`` reports side by side.

The question the paper left open is a comparison: does a teacher trained with OOD replay represent
rare content better than plain DINO, random replay or an oracle buffer? :func:`compare_representations`
reads one or more representation reports per arm (one per pretraining seed) and puts the headline
metrics of every arm in one table. With one report per arm a linear-probe cell carries the interval
over probe seeds from that report (optimisation noise only); with several reports per arm every cell
is the mean over the reports with a Student-t interval over them, i.e. over pretraining seeds, which
is the interval that answers "does this arm train a better encoder".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oodfast.evaluate.probe_metrics import mean_interval

__all__ = ["HEADLINE_METRICS", "compare_representations", "comparison_markdown", "read_report"]

_HOW = "pass the JSON that `oodfast evaluate represent --json PATH` wrote"


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One ``oodfast evaluate represent`` JSON report.

    Raises:
        ValueError: one line naming ``path``: missing or unreadable, not UTF-8 text (e.g. a checkpoint or
            an image passed by mistake), not JSON, or JSON without the report's sections.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read report {path} ({e.strerror or e}); {_HOW}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is a binary file (not UTF-8 text at byte {e.start}), not a JSON report; "
                         f"{_HOW}") from None
    if "\x00" in text:
        raise ValueError(f"{path} is a binary file (a NUL byte at {text.index(chr(0))}), not a JSON report; {_HOW}")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {_HOW}") from None
    if not (isinstance(report, dict) and isinstance(report.get("dominant"), dict)
            and isinstance(report.get("rare_present"), dict)):
        raise ValueError(f"{path} is not an `oodfast evaluate represent` JSON report (no 'dominant'/'rare_present' "
                         f"sections); {_HOW}")
    return report


def _linear(task: str, key: str) -> Callable[[Mapping[str, Any]], dict[str, Any] | None]:
    def get(report: Mapping[str, Any]) -> dict[str, Any] | None:
        return report.get(task, {}).get("linear", {}).get(key)
    return get


def _knn(task: str, *path: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(report: Mapping[str, Any]) -> float | None:
        node: Any = report.get(task, {}).get("knn", {})
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        return node
    return get


#: (column title, extractor) in table order. kNN cells are plain numbers; linear cells are the
#: report's {mean, low, high} over probe seeds. Older reports without a metric give "-".
HEADLINE_METRICS: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("dominant class, kNN acc.", _knn("dominant", "overall", "accuracy")),
    ("dominant class, linear acc.", _linear("dominant", "overall.accuracy")),
    ("middle classes, linear mean-class acc.", _linear("dominant", "middle.mean_class_accuracy")),
    ("tail classes, linear mean-class acc.", _linear("dominant", "tail.mean_class_accuracy")),
    ("rare presence, kNN AUROC", _knn("rare_present", "auroc")),
    ("rare presence, linear AUROC", _linear("rare_present", "auroc")),
    ("rare presence, linear balanced acc.", _linear("rare_present", "balanced_accuracy")),
)


def _value(cell: Any) -> float | None:
    if isinstance(cell, Mapping):
        return cell.get("mean")
    return None if cell is None else float(cell)


#: Report settings that must agree for arms to be comparable (the probe seeds may differ).
_SHARED_CONFIG = ("crops_per_image", "size", "scale", "crop_seed", "rare_classes", "tau", "k", "T", "probe",
                  "probe_C", "probe_max_iter", "probe_epochs", "probe_lr", "probe_weight_decay", "probe_batch_size",
                  "probe_class_weight")


def _shared_config(arms: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The evaluation settings every report shares; ValueError naming the first that differs."""
    shared: dict[str, Any] | None = None
    first = ""
    for label, reports in arms.items():
        for i, report in enumerate(reports):
            config = report.get("config", {})
            mine = {key: config.get(key) for key in _SHARED_CONFIG}
            if shared is None:
                shared, first = mine, f"{label}[0]"
                continue
            for key in _SHARED_CONFIG:
                if mine[key] != shared[key]:
                    raise ValueError(f"reports were made with different evaluation settings: {key} is "
                                     f"{shared[key]!r} in {first} but {mine[key]!r} in {label}[{i}]; compare "
                                     "reports of one `oodfast evaluate represent` protocol")
    return shared or {}


def compare_representations(
    arms: Mapping[str, Sequence[Mapping[str, Any]]], confidence: float = 0.95
) -> dict[str, Any]:
    """Headline metrics of each arm from its representation reports.

    Args:
        arms: arm label -> reports of :func:`oodfast.evaluate.represent.evaluate_representation`
            (one per pretraining seed; at least one).
        confidence: interval level.

    Returns:
        ``metrics`` (column titles), ``interval`` (what the intervals cover), ``config`` (the
        evaluation settings all reports share), ``reports`` (label -> number of reports) and
        ``arms``: label -> {title: {mean, low, high, values, n, interval_over}}, ``interval_over``
        being "probe seeds", "pretraining seeds" or None (no interval). With one report,
        ``low``/``high`` come from that report's probe-seed interval (None for kNN, which is
        deterministic); with several, from a t-interval over the reports' means.

    Raises:
        ValueError: no arms, an arm without reports, or reports made with different evaluation
            settings (crops, size, tau, probe settings, ...: the message names the first).
    """
    if not arms:
        raise ValueError("compare_representations needs at least one arm")
    for label, reports in arms.items():
        if not reports:
            raise ValueError(f"arm {label!r} has no report")
    out: dict[str, Any] = {
        "metrics": [title for title, _ in HEADLINE_METRICS],
        "interval": ("Student-t; an arm with several reports: over its reports (pretraining seeds); an arm "
                     "with one report: over that report's linear-probe seeds (kNN cells are then exact)"),
        "confidence": confidence,
        "config": _shared_config(arms),
        "arms": {},
        "reports": {},
    }
    for label, reports in arms.items():
        row: dict[str, Any] = {}
        for title, get in HEADLINE_METRICS:
            cells = [get(r) for r in reports]
            if len(reports) == 1:
                cell = cells[0]
                if isinstance(cell, Mapping):  # the report's own summary over its probe seeds
                    row[title] = {**cell, "interval_over": "probe seeds" if cell.get("low") is not None else None}
                else:  # kNN: one deterministic value
                    row[title] = {"mean": _value(cell), "low": None, "high": None,
                                  "values": [_value(cell)], "n": 0 if cell is None else 1, "interval_over": None}
            else:
                row[title] = {**mean_interval([_value(c) for c in cells], confidence, bounds=(0.0, 1.0)),
                              "interval_over": "pretraining seeds"}
        out["arms"][label] = row
        out["reports"][label] = len(reports)
    return out


def comparison_markdown(comparison: Mapping[str, Any], title: str = "Representation quality by arm") -> str:
    """The comparison as markdown: one row per arm, ``mean [low, high]`` cells."""
    from oodfast.report import markdown_table

    def fmt(cell: Mapping[str, Any]) -> str:
        if cell["mean"] is None:
            return "-"
        if cell.get("low") is None:
            return f"{cell['mean']:.3f}"
        return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"

    rows = [(label, comparison["reports"][label], *(fmt(row[m]) for m in comparison["metrics"]))
            for label, row in comparison["arms"].items()]
    config = comparison.get("config", {})
    settings = ", ".join(f"{k} {config[k]}" for k in ("size", "crops_per_image", "tau", "k", "T") if k in config)
    return (f"# {title}\n\nIntervals ({comparison['confidence']:.0%}): {comparison['interval']}.\n"
            + (f"Evaluation settings shared by every report: {settings}; the rare-presence probe is "
               "class-balanced.\n" if settings else "")
            + "\n" + markdown_table(["arm", "reports", *comparison["metrics"]], rows))
