"""The summary table of this folder: per detector, AUROC and lift at p = 0.95 for each encoder's report.

    python docs/results/synthdrive-detect-224/tables.py NAME=REPORT.json [NAME=REPORT.json ...]
"""

from __future__ import annotations

import json
import sys

from oodfast.report import markdown_table


def cell(value: float | None, ci: list[float] | None) -> str:
    return "-" if value is None else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def main(args: list[str]) -> None:
    reports = {name: json.load(open(path)) for name, path in (a.split("=", 1) for a in args)}
    detectors = list(dict.fromkeys(r["detector"] for rep in reports.values() for r in rep["rows"]))
    rows = []
    for det in detectors:
        row = [det]
        for rep in reports.values():
            at = {r["percentile"]: r for r in rep["rows"] if r["detector"] == det}
            top = at.get(0.95) or next(iter(at.values()))
            row += [cell(top.get("auroc"), top.get("auroc_ci")), cell(top["lift"], top["lift_ci"])]
        rows.append(row)
    head = ["detector"] + [f"{n}: {what}" for n in reports for what in ("AUROC", "lift @ p=0.95")]
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
