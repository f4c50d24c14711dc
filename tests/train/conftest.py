"""Fixtures of the trainer tests: a tiny synthdrive dataset, generated once per test module."""

from __future__ import annotations

import pytest

from _tiny import SPEC


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A synthdrive root of :data:`_tiny.SPEC` (64 frames at 128x72) with its masks and manifest."""
    from oodfast.data.synthdrive import ensure_synthdrive

    root = tmp_path_factory.mktemp("synth")
    ensure_synthdrive(root, progress=False, **SPEC)
    return str(root)
