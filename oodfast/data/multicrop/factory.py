"""The entry point: :func:`multicrop_loader` checks its arguments and builds the chosen backend's loader."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodfast.data.discover import DatasetFiles
from oodfast.data.multicrop.config import MultiCropConfig
from oodfast.data.multicrop.dali_loader import DaliMultiCropLoader, require_dali
from oodfast.data.multicrop.plan import ReplayIds, resolve_shard, steps_per_epoch
from oodfast.devices import resolve_device

BACKENDS: tuple[str, ...] = ("dali", "paper", "torch")
#: Earlier spellings still accepted.
BACKEND_ALIASES = {"reference": "paper"}


def multicrop_loader(
    files: DatasetFiles | Sequence[str | os.PathLike[str]],
    config: MultiCropConfig | None,
    batch_size: int,
    *,
    device: str | torch.device | None,
    seed: int,
    backend: str = "dali",
    shard_id: int | None = None,
    num_shards: int | None = None,
    epoch_length: int | None = None,
    num_workers: int | None = None,
    debug: bool = False,
    zero_copy: bool = False,
    clean_view: bool = False,
    replay_ids: ReplayIds | None = None,
    **backend_options: Any,
) -> Any:
    """An iterable of :class:`MultiCropBatch` es: one pass = one epoch of ``len(loader)`` batches.

    Args:
        files: a :class:`DatasetFiles` (its ``images``) or image paths; ``index`` refers to them.
        config: the augmentation (None: :meth:`MultiCropConfig.dino`).
        batch_size: images per batch on this shard.
        device: ``"cpu"`` (DALI CPU pipeline with ``device_id=None``), ``"cuda"`` (the GPU of
            ``LOCAL_RANK``), ``"cuda:N"``, or None (CUDA when available, else CPU). CUDA without a GPU raises
            :class:`oodfast.devices.NoGPUError` (a ValueError that names the device).
        seed: every shuffle and random decision derives from it; same seed, same batches.
        backend: ``"dali"``, ``"paper"`` (the paper's PIL pipeline in DataLoader workers; ``"reference"``
            is accepted for it) or
            ``"torch"`` (torchvision.io decode + batched tensor ops).
        shard_id, num_shards: this process's shard; default torchrun's ``RANK`` / ``WORLD_SIZE``.
        epoch_length: images per epoch over all shards (default ``len(files)``); the order
            repeats the files with fresh permutations when longer.
        num_workers: DALI threads / the paper's path's DataLoader workers (default: the CPU count).
        debug: DALI / torch only: also return the random decisions in ``batch.params``.
        zero_copy: for a consumer that copies every batch into its own tensors (the trainer's
            staging rows): DALI yields its output buffers as views in the pipeline's dtype
            (``loader.view_dtype``: float16 on a GPU for a float16/bfloat16 config, float32 on the
            CPU), valid until the next batch is requested, and the consumer's ``copy_`` does the one
            dtype conversion. The torch and paper backends build fresh tensors in the config's
            dtype for every batch, which already satisfies that contract, so they ignore it.
        clean_view: also yield the clean view (the whole image resized to the global size, no flip, no
            photometric op) as the last of ``views`` (``batch.clean``): what a rarity detector scores.
        replay_ids: the re-augmenting replay (DALI / torch): each batch also carries the C buffered
            images whose ids ``replay_ids.at(step - loader.replay_lag)`` gives, decoded and augmented
            afresh, as rows [B, B + C) of every field.
        backend_options: DALI: ``hw_decoder_load`` (share of JPEG decoding on the hardware
            decoder, default 0.65), ``prefetch_queue_depth`` (default 2: batches decoded ahead of
            the one the consumer holds, by a background thread; see :class:`DaliMultiCropLoader`).

    Each pass reshuffles (epoch e uses permutation (seed, e)); drop last: every shard yields
    ``epoch_length // (num_shards * batch_size)`` batches. ``set_epoch(e)`` jumps to epoch e.

    Raises:
        MultiCropDataError: an image cannot be read or decoded; the message names the file.
        ValueError: a bad argument (the message names it), or DALI missing for ``backend="dali"``.
    """
    paths = [Path(p) for p in (files.images if isinstance(files, DatasetFiles) else files)]
    config = config or MultiCropConfig.dino()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    shard_id, num_shards = resolve_shard(shard_id, num_shards)
    dev = resolve_device(device)  # NoGPUError (a ValueError naming the device) for CUDA without a GPU
    _check_backend_options(backend, debug, backend_options)
    if replay_ids is not None and backend == "paper":
        raise ValueError("replay ids (--replay-store ids) need backend 'dali' or 'torch': the paper's loader "
                         "(--aug paper) cannot re-augment buffered images; use --replay-store crops or another --aug")
    if steps_per_epoch(len(paths), batch_size, num_shards, epoch_length) == 0:
        raise ValueError(f"{len(paths) if epoch_length is None else epoch_length} images per epoch make no "
                         f"batch of {batch_size} on each of {num_shards} shard(s); lower batch_size or "
                         f"raise epoch_length")
    common = dict(device=dev, seed=seed, shard_id=shard_id, num_shards=num_shards, epoch_length=epoch_length)
    if backend == "dali":
        require_dali()
        return DaliMultiCropLoader(paths, config, batch_size, num_threads=num_workers, debug=debug,
                                   zero_copy=zero_copy, clean_view=clean_view, replay_ids=replay_ids, **common,
                                   **backend_options)
    if backend == "paper":
        from oodfast.data.multicrop.paper_loader import PaperMultiCropLoader  # lazy: torchvision, PIL

        return PaperMultiCropLoader(paths, config, batch_size, num_workers=num_workers, clean_view=clean_view,
                                    **common)
    from oodfast.data.multicrop.torch_loader import TorchMultiCropLoader  # lazy: torchvision

    return TorchMultiCropLoader(paths, config, batch_size, debug=debug, clean_view=clean_view,
                                replay_ids=replay_ids, **common)


DALI_OPTIONS = frozenset({"hw_decoder_load", "prefetch_queue_depth"})


def _check_backend_options(backend: str, debug: bool, backend_options: dict[str, Any]) -> None:
    """Raise a ValueError naming the option for one ``backend`` does not take or a value out of range."""
    unknown = set(backend_options) - (DALI_OPTIONS if backend == "dali" else set())
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} are not understood by backend={backend!r} "
                         f"(the DALI backend takes {', '.join(sorted(DALI_OPTIONS))})")
    if debug and backend == "paper":
        raise ValueError("debug=True needs backend='dali' or 'torch': the paper's path draws its decisions "
                         "inside torchvision and cannot return them")
    load = backend_options.get("hw_decoder_load", 0.65)
    if not 0.0 <= load <= 1.0:
        raise ValueError(f"hw_decoder_load is the share of JPEGs sent to the hardware decoder, in [0, 1]; got {load}")
    if backend_options.get("prefetch_queue_depth", 2) < 1:
        raise ValueError(f"prefetch_queue_depth must be >= 1, got {backend_options['prefetch_queue_depth']}")
