"""What the kernels share: the launch-configuration record, the SM count, the custom-op registration,
the argument checks and the backend dispatch (auto / triton / torch)."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

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
    torch path for non-CUDA tensors (:func:`dispatch` does). ``triton`` forces the choice (tests build the GPU-host
    registration on a CPU host with ``triton=True`` to check that branch).
    """
    if triton is None:
        triton = use_triton_op()
    if triton:
        return functools.partial(triton_op, name, mutates_args=tuple(mutates_args))
    return functools.partial(torch.library.custom_op, name, mutates_args=tuple(mutates_args))


# ------------------------------------------------------------------------------------------------
# Argument checks and backend dispatch, shared by every kernel's entry point
# ------------------------------------------------------------------------------------------------

#: The ``backend=`` values every entry point takes.
BACKENDS = ("auto", "triton", "torch")

T = TypeVar("T")


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """``float32, bfloat16 or float16``: dtypes as an error message spells them."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] | None = None,
                 shape: tuple[int, ...] | None = None, ndim: int | tuple[int, ...] | None = None,
                 min_ndim: int | None = None, device: torch.device | None = None, device_of: str = "x",
                 contiguous: bool = False, expect: str | None = None) -> None:
    """Raise ValueError, in one line naming ``name``, unless ``t`` is a tensor as described.

    Metadata only (no host sync), so entry points may call it while torch.compile traces them.

    Args:
        name: the argument's name, as the error message starts.
        t: the value passed.
        dtypes: allowed dtypes; shape: the exact shape; ndim: allowed numbers of dimensions;
            min_ndim: the fewest dimensions.
        device: the device ``t`` must be on, that of the argument ``device_of`` (the message names it).
        contiguous: whether ``t`` must be contiguous.
        expect: the phrase after "must be" when the type, dimensions or dtype are wrong (e.g.
            "an int32 [B] tensor"); without it the message says "must be a tensor" / "must be a 2-D
            tensor" / "must have dtype ...".
    """
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be {expect or 'a tensor'}, got {_describe(t)}")
    if (ndims is not None and t.dim() not in ndims) or (min_ndim is not None and t.dim() < min_ndim):
        if expect is None:
            expect = (f"a {' or '.join(f'{n}-D' for n in ndims)} tensor" if ndims is not None
                      else f"a tensor of at least {min_ndim} dimensions")
        raise ValueError(f"{name} must be {expect}, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = f"be {expect}" if expect is not None else f"have dtype {dtype_names(dtypes)}"
        raise ValueError(f"{name} must {want}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {device_of} is on {device}; put every argument on one device")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()}); call .contiguous()")


def check_backend(backend: object) -> None:
    """Raise ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def dispatch(backend: str, device: torch.device, *, triton_path: Callable[[], T], torch_path: Callable[[], T],
             op: Callable[[], T] | None = None, triton_fits: bool = True) -> T:
    """Run one op the way ``backend`` says: the one dispatch of every kernel.

    * ``"auto"``: ``op`` when given (the registered custom op, which torch.compile sees; its body
      calls ``dispatch("auto", ...)`` again without ``op``), else by device: ``triton_path`` for CUDA
      tensors (when ``triton_fits``: the arguments are within the kernel's limits), ``torch_path``
      otherwise.
    * ``"triton"``: ``triton_path`` (on CPU tensors it needs ``TRITON_INTERPRET=1``).
    * ``"torch"``: ``torch_path``.

    Branches on static metadata only (the device type, Python values), so a traced op body stays
    one graph. The paths are zero-argument callables (closures over the op's arguments) looked up
    when called, so a test can replace a module's launcher.

    Raises:
        ValueError: ``backend`` is none of the three.
    """
    check_backend(backend)
    if backend == "triton":
        return triton_path()
    if backend == "torch":
        return torch_path()
    if op is not None:
        return op()
    if device.type == "cuda" and triton_fits:
        return triton_path()
    return torch_path()
