"""Swap oodfast's fused detector and buffer into existing DINO code, and back.

For a facebookresearch/dino style ``main_dino.py`` that does, as the paper's code does::

    from ood_detection import OODDetector, MemoryBuffer
    ...
    ood = OODDetector(device)                      # loads weights, computes stats
    memory_buffer = MemoryBuffer(max_size=32)
    ...
    ood_idx = ood.detect([images[0], images[1]])
    for idx in ood_idx:
        memory_buffer.add([v[idx] for v in images])
    images = memory_buffer.concat_with_batch(images)

one call before the training function runs replaces both classes in that module's namespace::

    import main_dino
    from oodfast.patch import apply_oodfast

    revert = apply_oodfast(main_dino, weights_path="dino_resnet50_pretrain.pth")
    main_dino.train_dino(args)
    revert()                                       # the original classes are back

Like Liger-Kernel's ``apply_liger_kernel_to_*``, there is one flag per piece (``detector``,
``buffer``) and a matching revert. The replacements keep the paper's API (see :mod:`oodfast.compat`
for the two deliberate fixes); ``weights_path`` / ``encoder`` / ``metric`` become defaults of the
patched ``OODDetector`` so call sites need not change (the paper's default loaded weights from
torch.hub at run time, which oodfast never does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from oodfast import compat


def _detector_class(default_weights: str | Path | None, default_encoder: nn.Module | None, default_metric: str) -> type:
    class OODDetector(compat.OODDetector):
        __doc__ = compat.OODDetector.__doc__

        def __init__(self, device, weights_path=None, threshold: float = 0.95, **kwargs: Any) -> None:
            if weights_path is None:
                weights_path = default_weights
                kwargs.setdefault("encoder", default_encoder)
            kwargs.setdefault("metric", default_metric)
            super().__init__(device, weights_path if kwargs.get("encoder") is None else None, threshold, **kwargs)

    return OODDetector


def apply_oodfast(target: Any, *, detector: bool = True, buffer: bool = True, weights_path: str | Path | None = None,
                  encoder: nn.Module | None = None, metric: str = "euclidean") -> Callable[[], None]:
    """Replace ``target.OODDetector`` and/or ``target.MemoryBuffer`` with oodfast's drop-ins.

    Args:
        target: the module (or any object) whose namespace the training code looks the names up in,
            e.g. ``main_dino`` after ``from ood_detection import OODDetector, MemoryBuffer``, or the
            ``ood_detection`` module itself when the code uses ``ood_detection.OODDetector``.
        detector, buffer: which of the two to replace.
        weights_path, encoder, metric: defaults for the patched ``OODDetector`` (a call site that
            passes its own ``weights_path`` still wins).

    Returns:
        A function that restores the original attributes.

    Raises:
        AttributeError: ``target`` has no attribute to replace (the message names it).
    """
    replacements: dict[str, Any] = {}
    if detector:
        replacements["OODDetector"] = _detector_class(weights_path, encoder, metric)
    if buffer:
        replacements["MemoryBuffer"] = compat.MemoryBuffer
    missing = [name for name in replacements if not hasattr(target, name)]
    if missing:
        raise AttributeError(f"{getattr(target, '__name__', target)!r} has no {', '.join(missing)} to replace; "
                             "pass the module the training code looks these names up in")
    originals = {name: getattr(target, name) for name in replacements}
    for name, value in replacements.items():
        setattr(target, name, value)

    def revert() -> None:
        for name, value in originals.items():
            setattr(target, name, value)

    return revert


@contextlib.contextmanager
def oodfast_patched(target: Any, **kwargs: Any) -> Iterator[None]:
    """``with oodfast_patched(main_dino, weights_path=...):`` - :func:`apply_oodfast`, reverted on exit."""
    revert = apply_oodfast(target, **kwargs)
    try:
        yield
    finally:
        revert()
