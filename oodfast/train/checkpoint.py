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

import errno
import os
import pickle
import pickletools
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.fileio import atomic_path

DINO_KEYS = ("student", "teacher", "optimizer", "epoch", "args", "dino_loss")

#: Settings that may change when a run is continued: where and how it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"output_dir", "data_root", "num_workers", "log_every", "tensorboard", "max_steps",
                               "max_bad_steps", "saveckp_freq", "compile", "deterministic"})

#: Config keys of earlier checkpoints, mapped to their name now (``threshold`` was the threshold mode).
RENAMED_CONFIG_KEYS = {"threshold": "threshold_mode"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit this run."""


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
    contradicts the run stored in ``path`` (its checkpoint's ``config``, earlier key names accepted),
    except those in :data:`RESUMABLE_CHANGES`. A checkpoint without a stored config (e.g.
    facebookresearch/dino's own) is not checked."""
    stored = stored_config(stored)
    if stored is None:
        return
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


def check_checkpoint_file(path: str | Path, what: str | None = None) -> int:
    """Cheap checks of a checkpoint file before any work depends on it: it exists, is not empty, and is
    not a cut-off zip (torch's format ends with the zip directory, so a truncated file has none).

    Args:
        path: the file.
        what: the option that named it (e.g. ``--resume``), to start the message with.

    Returns:
        Its size in bytes.

    Raises:
        CheckpointError: one line naming the file and what to do.
    """
    path = Path(path).expanduser()
    what = f"{what}: " if what else ""
    if not path.is_file():
        state = "a folder, not a file" if path.is_dir() else "missing"
        raise CheckpointError(f"{what}no checkpoint at {path} ({state}); pass an existing checkpoint file (for "
                              "--resume: OUTPUT_DIR/checkpoint.pth of an earlier run, or drop --resume to start "
                              "from scratch)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{what}cannot read checkpoint {path} ({e.strerror or e})") from None
    if size == 0:
        raise CheckpointError(f"{what}checkpoint {path} is empty (0 bytes), e.g. an interrupted copy or download; "
                              "copy it again (oodfast's own writes are atomic and never leave an empty checkpoint)")
    # torch files are zips (PK...) or, in the legacy format, open with a pickle's PROTO opcode (0x80)
    if (head.startswith(b"PK") and not zipfile.is_zipfile(path)) or not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(what + _damaged(path, size))
    return size


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: no file, an empty or truncated file, not a checkpoint, or a pickle that would
            run code (refused unexecuted); one line naming the file.
    """
    path = Path(path).expanduser()
    size = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _intact_container(path):  # a whole file whose pickle asks for more than tensors and plain containers
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects that weights_only loading does not accept "
                f"({_unpickler_reason(e)}), and unpickling them could run code; only load checkpoints you trust, "
                "and re-save foreign ones as plain state dicts") from None
        raise CheckpointError(_damaged(path, size)) from None
    except (EOFError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        raise CheckpointError(_damaged(path, size)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror or e})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in DINO_KEYS):
        raise CheckpointError(f"{path} is not a DINO/oodfast training checkpoint (expected keys {DINO_KEYS})")
    return ckpt


def _damaged(path: Path, size: int) -> str:
    return (f"checkpoint {path} ({size} bytes) is truncated or not a torch checkpoint: copy it again, or point at "
            "another checkpoint (an interrupted oodfast run keeps its last complete checkpoint.pth)")


def _intact_container(path: Path) -> bool:
    """Whether ``path`` is a complete torch file (a valid zip, or a legacy file that opens with a whole
    protocol >= 2 pickle), judged without unpickling anything: then a weights_only refusal is about its
    content, not damage."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        except (zipfile.BadZipFile, OSError, RuntimeError):
            return False
    try:
        with open(path, "rb") as f:
            ops = pickletools.genops(f)
            first = next(ops)
            if first[0].name != "PROTO":
                return False
            return any(op.name == "STOP" for op, _, _ in ops)
    except Exception:  # any parse failure: not a whole pickle  # noqa: BLE001
        return False


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's weights_only message that says what was refused."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"the Python global {found.group(1)}"
    found = re.search(r"Unsupported (operand|class) [^\n.]+", text)
    return found.group(0) if found else type(e).__name__
