"""``oodfast data {synth,check}``."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Generate the synthdrive dataset and check datasets before training."""
