"""The error every bad dataset input raises (subclassed for images and masks): one line, names the path."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """Bad dataset input; the message names the path and says what to do."""
