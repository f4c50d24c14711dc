"""Which device a process runs on: the one place for the default and for the "no GPU" error.

``default_device()`` is CUDA when torch sees a GPU, else the CPU. ``resolve_device(device)`` turns a
user's ``cpu`` / ``cuda`` / ``cuda:N`` / ``None`` into a :class:`torch.device`: ``None`` is the default,
an unindexed ``cuda`` is the GPU of ``LOCAL_RANK`` (under torchrun each process drives its own GPU),
and asking for CUDA where torch sees none raises :class:`NoGPUError` with the same words everywhere.
"""

from __future__ import annotations

import os

import torch

__all__ = ["NoGPUError", "available_devices", "default_device", "resolve_device"]


class NoGPUError(ValueError):
    """CUDA asked for on a machine where torch sees no GPU."""


def no_gpu_message(device: object) -> str:
    return (f"device {str(device)!r} asked for, but torch sees no CUDA GPU (driver missing, or a CPU-only "
            f"torch build); use --device cpu")


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, and ``cuda``, ``cuda:0`` ... when torch sees GPUs."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """The device of this process (see the module docstring).

    Args:
        device: ``None`` (the default device), ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: the GPU an unindexed ``cuda`` means (default: ``LOCAL_RANK``, else 0).

    Raises:
        NoGPUError: CUDA without a GPU. ValueError: a device type other than cpu or cuda.
    """
    dev = torch.device(default_device() if device is None else device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or None, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NoGPUError(no_gpu_message(device))
    if dev.type == "cuda" and dev.index is None:
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        return torch.device("cuda", rank)
    return dev
