"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click


def report_options(fn):
    """``--json PATH`` and ``--markdown PATH``: every command that produces a report takes both."""
    fn = click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
                      help="Write the report as markdown.")(fn)
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                        help="Write the report as JSON.")(fn)
