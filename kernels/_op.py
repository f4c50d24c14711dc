"""How the kernels become torch custom ops, and the launch-configuration record they share."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.library import triton_op


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One kernel launch as a launcher would issue it, computed by a pure function of the shapes,
    dtypes and device properties (``launch_config`` in each kernel module), so the real-compiler
    test (tests/kernels/test_compile.py) compiles exactly the configurations the launchers use.

    kernel: the @triton.jit function's name in its module; grid: the launch grid; constexprs: the
    tl.constexpr arguments; params: the runtime scalars the launcher derives (e.g. rows per split).
    """

    kernel: str
    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 off CUDA (the interpreter: more programs only cost time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_triton_op() -> bool:
    """Whether :func:`kernel_op` registers ``triton_op`` (a GPU, not the interpreter) or ``custom_op``."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def kernel_op(name: str, *, mutates_args: Iterable[str], triton: bool | None = None) -> Callable:
    """Decorator registering a Triton launcher as the torch op ``name``, its mutations declared.

    With a GPU it is ``torch.library.triton_op``: torch.compile sees the Triton kernel and places it
    in its graph (and in CUDA graphs). Without one it is an opaque ``torch.library.custom_op``:
    inductor would otherwise try to compile the kernel for the CPU, which Triton has no backend for,
    and under ``TRITON_INTERPRET=1`` tracing would run the interpreter on fake tensors.

    A triton_op's body is traced by torch.compile for every device, bypassing
    ``register_kernel("cpu")``: every op body must therefore branch (on static metadata only) to the
    pure-torch reference for non-CUDA tensors. ``triton`` forces the choice (tests build the GPU-host
    registration on a CPU host with ``triton=True`` to check that branch).
    """
    if triton is None:
        triton = use_triton_op()
    if triton:
        return functools.partial(triton_op, name, mutates_args=tuple(mutates_args))
    return functools.partial(torch.library.custom_op, name, mutates_args=tuple(mutates_args))
