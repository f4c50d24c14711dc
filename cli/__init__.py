"""The ``oodfast`` command line (import name ``oodfast.cli``): thin click wrappers over the library."""

from __future__ import annotations

import logging

import click

from oodfast import __version__
from oodfast.cli.bench import bench
from oodfast.cli.data import data
from oodfast.cli.evaluate import evaluate
from oodfast.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="oodfast")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """oodfast: fast OOD-enhanced DINO self-supervised pretraining."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(bench)
main.add_command(data)
main.add_command(evaluate)
main.add_command(train)
