"""Reports: one dict per command, written as JSON and as markdown (``--json PATH``, ``--markdown PATH``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oodfast.fileio import atomic_write_text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned, ``|`` in cells escaped."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    numeric = [all(isinstance(r[i], (int, float)) for r in rows) if rows else False for i in range(len(headers))]
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_report(
    report: dict[str, Any],
    markdown: str,
    *,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``report`` as indented JSON and ``markdown`` as text, each only where a path is given."""
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=_jsonable) + "\n")
    if markdown_path is not None:
        atomic_write_text(markdown_path, markdown)
