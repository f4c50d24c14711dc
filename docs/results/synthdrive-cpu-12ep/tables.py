"""Summary tables of the runs in this folder, as markdown.

    python docs/results/synthdrive-cpu-12ep/tables.py train DIR none-s0 ood-s0 ...
    python docs/results/synthdrive-cpu-12ep/tables.py detect detect-none.json [detect-ood.json ...]

``train``: from each run's NAME-train.json and NAME-log.jsonl in DIR (copies of the run's train.json and
log.jsonl). ``detect``: one row per detector at the larger
calibration size: threshold-free AUROC, and precision / lift at the percentiles 0.95 and 0.80.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from oodfast.report import markdown_table


def train_row(folder: Path, name: str) -> tuple:
    train = json.loads((folder / f"{name}-train.json").read_text())
    epochs = [json.loads(line) for line in (folder / f"{name}-log.jsonl").read_text().splitlines()
              if '"event": "epoch_end"' in line]
    last = epochs[-1]
    flags = [e["flag_rate"] for e in epochs if "flag_rate" in e]
    return (name, train["steps"], f"{epochs[0]['loss']:.3f}", f"{last['loss']:.3f}",
            f"{last['entropy_ratio']:.3f}", f"{sum(flags) / len(flags):.3f}" if flags else "-",
            f"{train['seconds'] / 60:.1f}")


def detect_rows(path: Path) -> list[tuple]:
    report = json.loads(path.read_text())
    calib = max(report["config"]["calib_sizes"])
    rows = []
    for det in report["config"]["detectors"]:
        cells = {r["percentile"]: r for r in report["rows"] if r["detector"] == det and r["calib_size"] == calib}
        any_row = next(iter(cells.values()))
        auroc = "-" if any_row.get("auroc") is None else \
            f"{any_row['auroc']:.3f} [{any_row['auroc_ci'][0]:.3f}, {any_row['auroc_ci'][1]:.3f}]"
        per_p = []
        for p in (0.95, 0.8):
            r = cells[p]
            per_p += [f"{r['precision']:.3f}", f"{r['lift']:.2f} [{r['lift_ci'][0]:.2f}, {r['lift_ci'][1]:.2f}]",
                      f"{r['flag_rate']:.3f}"]
        rows.append((report["encoder"]["source"].split("/")[-2], det, calib, f"{any_row['prevalence']:.3f}", auroc,
                     *per_p))
    return rows


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "train":
        root = Path(args[0])
        print(markdown_table(["run", "steps", "loss, epoch 1", "loss, epoch 12", "teacher entropy / ln(out_dim)",
                              "mean flag rate", "wall minutes"], [train_row(root, name) for name in args[1:]]))
    else:
        rows = [row for path in args for row in detect_rows(Path(path))]
        print(markdown_table(["encoder", "detector", "calibration", "prevalence", "AUROC [95% CI]",
                              "precision p=0.95", "lift p=0.95", "flag rate p=0.95",
                              "precision p=0.8", "lift p=0.8", "flag rate p=0.8"], rows))
