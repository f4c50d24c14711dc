"""Where oodfast keeps what it generates or derives (synthdrive datasets, clean file lists)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The oodfast cache folder: ``$OODFAST_CACHE`` if set, else ``~/.cache/oodfast`` (not created)."""
    env = os.environ.get("OODFAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodfast"
