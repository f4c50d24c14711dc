"""Training summary of the runs in this folder (from each run's train.json and log.jsonl), as markdown.

    python docs/results/synthdrive-cpu-12ep/tables.py RUNS_DIR none ood random oracle none-s1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from oodfast.report import markdown_table


def summary(run: Path) -> tuple:
    train = json.loads((run / "train.json").read_text())
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
              if '"event": "epoch_end"' in line]
    last = epochs[-1]
    flags = [e["flag_rate"] for e in epochs if "flag_rate" in e]
    return (run.name, train["steps"], f"{epochs[0]['loss']:.3f}", f"{last['loss']:.3f}",
            f"{last['entropy_ratio']:.3f}", f"{sum(flags) / len(flags):.3f}" if flags else "-",
            f"{train['seconds'] / 60:.1f}")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    rows = [summary(root / name) for name in sys.argv[2:]]
    print(markdown_table(["run", "steps", "loss, epoch 1", "loss, epoch 12", "teacher entropy / ln(out_dim)",
                          "mean flag rate", "minutes"], rows))
