"""Checkpoints in facebookresearch/dino's format plus oodfast's state, written atomically.

One dict with DINO's keys (``student``, ``teacher``, ``optimizer``, ``epoch``, ``args``,
``dino_loss``; ``fp16_scaler`` where a scaler is used) and ours (``ring``, ``step``, ``rng``,
``detector``, ``config``). ``teacher`` keys are ``backbone.*`` / ``head.*`` from the uncompiled
module, so DINO's eval scripts load it. oodfast writes ``args`` as a plain dict; DINO's own
checkpoints hold an ``argparse.Namespace`` there, which loading allows.

Reading files is :mod:`oodfast.safeload` (``weights_only=True`` with an explicit allow-list; a file
that would execute code on load is refused); its names are re-exported here.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.fileio import atomic_path
from oodfast.safeload import DINO_KEYS, CheckpointError, check_checkpoint_file, load_checkpoint  # noqa: F401 (re-exported)
from oodfast.train.config import DINO_CROP_RATIO


#: Settings that may change when a run is continued: where and how it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"output_dir", "data_root", "num_workers", "log_every", "tensorboard", "max_steps",
                               "max_bad_steps", "saveckp_freq", "compile", "deterministic"})

#: Config keys of earlier checkpoints, mapped to their name now (``threshold`` was the threshold mode).
RENAMED_CONFIG_KEYS = {"threshold": "threshold_mode"}

#: Settings added since earlier checkpoints, with the value such a run had: a stored config without one
#: ran with it (so resuming a pooled run with a dense detector is refused like any other change).
ADDED_CONFIG_KEYS: dict[str, Any] = {"dense_layer": None, "crop_ratio": list(DINO_CROP_RATIO)}


class OutputDirError(OSError):
    """An output folder that is a file, cannot be created, or cannot be written (``errno`` kept)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def check_writable_dir(path: str | os.PathLike[str], what: str = "--output_dir") -> Path:
    """Create ``path`` if needed and prove it writable (a temporary file made and removed), before any
    work is spent on a run whose checkpoint could not be saved.

    Args:
        path: the folder.
        what: how the message calls it (the CLI flag, or the config field).

    Returns:
        The folder (``~`` expanded).

    Raises:
        OutputDirError: ``path`` (or a parent) is a file, or the folder cannot be created or written
            (read-only file system, no permission, full disk): one line naming the folder and the cause.
    """
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is inside {blocker}, which is a file"
        raise OutputDirError(f"{what} {path} {where}, not a folder; pass a folder path (it is created if missing)",
                             errno.ENOTDIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{what} {path} cannot be created ({e.strerror or e}); choose a folder you can write "
                             "to", e.errno) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".oodfast-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"{what} {path} is not writable ({e.strerror or e}); choose a folder you can write to "
                             "or fix its permissions", e.errno) from None
    return path


def stored_config(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's ``config`` with the keys of earlier versions renamed (:data:`RENAMED_CONFIG_KEYS`)."""
    if not isinstance(stored, dict):
        return None
    config = dict(stored)
    for old, new in RENAMED_CONFIG_KEYS.items():
        if old in config and new not in config:
            config[new] = config.pop(old)
    return config


def check_same_run(stored: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """Raise ValueError naming every setting of ``current`` (a ``TrainConfig.to_dict()``) that
    contradicts the run stored in ``path`` (its checkpoint's ``config``, earlier key names accepted,
    settings added since read as :data:`ADDED_CONFIG_KEYS`), except those in :data:`RESUMABLE_CHANGES`. A checkpoint without a stored config (e.g.
    facebookresearch/dino's own) is not checked."""
    stored = stored_config(stored)
    if stored is None:
        return
    stored = {**ADDED_CONFIG_KEYS, **stored}
    differ = [f"{key}: {stored[key]!r} in the run, {current[key]!r} now" for key in current
              if key in stored and key not in RESUMABLE_CHANGES and stored[key] != current[key]]
    if differ:
        raise ValueError(f"{path} holds a run with other settings ({'; '.join(differ)}); use the run's settings "
                         "to continue it, or a new --output_dir to start another")


def to_cpu(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


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
        try:
            torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as e:  # a full disk surfaces as RuntimeError "unexpected pos ..."
            raise _write_error(Path(path), tmp, checkpoint, e) from e
    return Path(path)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (about its size on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _write_error(path: Path, tmp: Path, checkpoint: dict[str, Any], e: BaseException) -> OSError:
    """One line for a failed ``torch.save``: a full disk named as such (ENOSPC), else the cause."""
    need = _nbytes(checkpoint)
    try:
        free = shutil.disk_usage(tmp.parent).free + (tmp.stat().st_size if tmp.exists() else 0)
    except OSError:
        free = None
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < need):
        space = f" ({free / 2**20:.0f} MiB free, the checkpoint needs about {need / 2**20:.0f} MiB)" if free is not None else ""
        return OSError(errno.ENOSPC, f"no space left on the device to write {path}{space}: free space there or "
                                     f"choose another --output_dir{kept}", str(path))
    reason = (getattr(e, "strerror", None) or str(e).strip().splitlines() or [type(e).__name__])
    reason = reason if isinstance(reason, str) else reason[0]
    return OSError(getattr(e, "errno", None) or errno.EIO, f"cannot write checkpoint {path} ({reason}){kept}", str(path))
