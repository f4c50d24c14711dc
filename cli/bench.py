"""``oodfast bench``: throughput against the paper's path (thin wrapper over oodfast.bench)."""

from __future__ import annotations

from pathlib import Path

import click

from oodfast.cli._options import check_report_paths, report_options


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cuda when available]")
@click.option("--stages", default="aug,detect,ring,step", show_default=True,
              help="Comma-separated: aug, detect, ring, step (train = end to end, measured with step).")
@click.option("--quick", is_flag=True, help="Small sizes: a few minutes on a 2-core CPU.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a bar chart of the speedups (PNG; needs matplotlib).")
@report_options
def bench(device: str | None, stages: str, quick: bool, plot_path: Path | None, json_path: Path | None,
          markdown_path: Path | None) -> None:
    """Measure oodfast's paths against the paper's, stage by stage, in one run."""
    from oodfast.bench import failures, plot_report, report_markdown, require_matplotlib, run_bench
    from oodfast.report import write_report

    if plot_path:
        require_matplotlib()
    check_report_paths(json_path, markdown_path, plot_path)
    report = run_bench(device, [s.strip() for s in stages.split(",") if s.strip()], quick=quick)
    text = report_markdown(report)
    write_report(report, text, json_path=json_path, markdown_path=markdown_path)
    if plot_path:
        plot_report(report, plot_path)
    click.echo(text)
    if failures(report):  # the report is written; the exit status says it is incomplete
        raise click.ClickException("some paths could not be measured (see the report): " + "; ".join(failures(report)))
