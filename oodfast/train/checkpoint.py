"""Checkpoints in facebookresearch/dino's format plus oodfast's state, written atomically.

One dict with DINO's keys (``student``, ``teacher``, ``optimizer``, ``epoch``, ``args``,
``dino_loss``; ``fp16_scaler`` where a scaler is used) and ours (``ring``, ``step``, ``rng``,
``detector``, ``config``). ``teacher`` keys are ``backbone.*`` / ``head.*`` from the uncompiled
module, so DINO's eval scripts load it. ``args`` is a plain dict (DINO stores an argparse.Namespace,
which ``torch.load(weights_only=True)`` refuses).

Loading uses ``torch.load(weights_only=True)``: only tensors and plain containers are accepted, and
a file that would execute code on load is refused with a clear error.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.fileio import atomic_path

DINO_KEYS = ("student", "teacher", "optimizer", "epoch", "args", "dino_loss")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit this run."""


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain types and tensors (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    version, internal, gauss = state["python"][1], state["python"][0], state["python"][2]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a partial checkpoint."""
    missing = [k for k in DINO_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks DINO's keys {missing}")
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: no file, not a checkpoint, or a pickle that would run code (refused unexecuted).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass --resume with an existing checkpoint.pth "
                              "(or drop --resume to start from scratch)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe globals, RuntimeError/EOFError for damaged files
        raise CheckpointError(f"refusing to load {path}: it is not a plain-tensor checkpoint that "
                              f"weights_only loading accepts ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "only load checkpoints you trust, and re-save foreign ones as plain state dicts") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in DINO_KEYS):
        raise CheckpointError(f"{path} is not a DINO/oodfast training checkpoint (expected keys {DINO_KEYS})")
    return ckpt
