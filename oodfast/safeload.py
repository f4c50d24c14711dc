"""Reading checkpoint files without running code, facebookresearch/dino's included.

Every checkpoint oodfast reads (``--resume``, ``--pretrained_weights``, ``--detector-weights``,
``evaluate --encoder``) goes through :func:`load_torch_file`: ``torch.load(weights_only=True)`` with
an explicit allow-list, :data:`SAFE_GLOBALS`, of the one Python class a genuine DINO checkpoint holds
besides tensors and plain containers (its ``args``, an ``argparse.Namespace``, which is rebuilt as
data: no constructor or method of it runs). Anything else a pickle asks for is refused unexecuted,
with one line naming the file. Empty, truncated or foreign files are told apart from unsafe ones.

:func:`network_state` applies DINO's loading rule to a checkpoint: pick ``checkpoint_key``
(``teacher`` by default), strip ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and ``backbone.``.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["DINO_KEYS", "SAFE_GLOBALS", "CheckpointError", "check_checkpoint_file", "checkpoint_args",
           "load_checkpoint", "load_torch_file", "network_state"]

#: The keys of a facebookresearch/dino training checkpoint (oodfast's add to them).
DINO_KEYS = ("student", "teacher", "optimizer", "epoch", "args", "dino_loss")

#: Classes a checkpoint may hold besides tensors and plain containers: DINO saves ``args`` as a Namespace.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit this run."""


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


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` allowed, after
    :func:`check_checkpoint_file`.

    Raises:
        CheckpointError: no file, an empty or truncated file, not a torch file, or a pickle that would
            run code (refused unexecuted); one line naming the file.
    """
    path = Path(path).expanduser()
    size = check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A DINO / oodfast training checkpoint (:func:`load_torch_file`, then :data:`DINO_KEYS` checked).

    Raises:
        CheckpointError: as :func:`load_torch_file`, or a file that is not a training checkpoint.
    """
    path = Path(path).expanduser()
    ckpt = load_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in DINO_KEYS):
        raise CheckpointError(f"{path} is not a DINO/oodfast training checkpoint (expected keys {DINO_KEYS})")
    return ckpt


def checkpoint_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``args`` as a dict: DINO's Namespace or oodfast's dict; ``{}`` when absent."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def network_state(ckpt: Any, checkpoint_key: str = "teacher", path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """One network's weights from a training checkpoint or a plain state dict, by DINO's loading rule.

    A training checkpoint (or any dict holding ``checkpoint_key``) gives its ``checkpoint_key`` entry;
    a dict of tensors is taken as it is. ``module.`` and ``_orig_mod.`` prefixes are stripped, then
    ``backbone.``: a teacher's or student's ``backbone.*`` keys become the encoder's, its ``head.*``
    stay as they are.

    Raises:
        CheckpointError: neither a checkpoint with ``checkpoint_key`` nor a state dict of tensors.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], Mapping):
        state = ckpt[checkpoint_key]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        keys = sorted(map(str, ckpt))
        raise CheckpointError(f"{path} has no {checkpoint_key!r} entry and is not a plain state dict of tensors "
                              f"(top-level keys: {', '.join(keys[:8])}); pass --checkpoint_key with one of them")
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = value
    return clean


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
