"""How the kernels become torch custom ops."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

import torch
from torch.library import triton_op


def kernel_op(name: str, *, mutates_args: Iterable[str]) -> Callable:
    """Decorator registering a Triton launcher as the torch op ``name``, its mutations declared.

    With a GPU it is ``torch.library.triton_op``: torch.compile sees the Triton kernel and places it
    in its graph (and in CUDA graphs). Without one it is an opaque ``torch.library.custom_op``:
    inductor would otherwise try to compile the kernel for the CPU, which Triton has no backend for,
    and under ``TRITON_INTERPRET=1`` tracing would run the interpreter on fake tensors. Either way
    CPU tensors dispatch to the kernel registered for "cpu" (the pure-torch reference).
    """
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return functools.partial(triton_op, name, mutates_args=tuple(mutates_args))
    return functools.partial(torch.library.custom_op, name, mutates_args=tuple(mutates_args))
