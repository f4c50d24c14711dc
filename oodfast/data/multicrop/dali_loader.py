"""``--aug dali`` (the default): the DALI loader, its external source and DALI-specific errors.

One DALI pipeline (:mod:`oodfast.data.multicrop.dali_pipeline`) fed by :class:`_Feeder`, which
reads the files and the host-drawn decisions of each batch, run ahead of the consumer by
:class:`oodfast.data.multicrop.dali_prefetch._Prefetcher`.
"""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodfast.data.multicrop.config import MultiCropConfig
from oodfast.data.multicrop.dali_pipeline import build_dali_pipeline, pipeline_dtype
from oodfast.data.multicrop.dali_prefetch import _Prefetcher
from oodfast.data.multicrop.files import CHECK_HINT, MultiCropDataError, image_size, read_file_bytes
from oodfast.data.multicrop.plan import (
    REPLAY_LAG,
    MultiCropBatch,
    ReplayIds,
    batch_params,
    boxes_from_params,
    buffered_ids,
    epoch_plan,
    params_dict,
    steps_per_epoch,
)


class _Feeder:
    """The external source: each call returns the next batch of (bytes, index, boxes, params).

    The stream is endless: global step ``g`` is epoch ``start_epoch + g // steps``, step
    ``g % steps`` of :func:`epoch_plan`; the loader reads exactly ``steps`` batches per epoch, so
    DALI's prefetching may run ahead into the next epoch without changing any batch. Every batch is
    a pure function of ``g`` (the plan and :func:`batch_rng` are seeded by (seed, epoch, shard,
    step)), so which thread calls, and how far ahead, changes nothing. DALI calls it from
    ``Pipeline.run`` (``schedule_run``), which :class:`_Prefetcher` runs on its own thread.

    With ``replay_ids`` each batch also carries the C buffered images whose ids
    ``replay_ids.at(g - lag)`` gives (the ring as published ``lag`` steps earlier); their decisions are
    drawn from their own stream (:func:`~oodfast.data.multicrop.plan.batch_params`).
    """

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, seed: int,
                 shard_id: int, num_shards: int, epoch_length: int | None, start_epoch: int,
                 debug: bool, replay_ids: ReplayIds | None = None, lag: int = REPLAY_LAG) -> None:
        self.files, self.config, self.batch_size, self.seed = files, config, batch_size, seed
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.steps = steps_per_epoch(len(files), batch_size, num_shards, epoch_length)
        self.start_epoch, self.debug = start_epoch, debug
        self.replay_ids, self.lag = replay_ids, lag
        self.fed = 0
        self._plan: tuple[int, np.ndarray] | None = None
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=8)
        # (height, width) per file position, parsed from the header on first read: later epochs
        # skip the PIL header parse (about a fifth of this callback's time). Only the prefetch
        # thread calls the feeder, so the cache needs no lock.
        self._sizes: dict[int, tuple[int, int]] = {}

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(len(self.files), self.batch_size, seed=self.seed, epoch=epoch,
                                            shard_id=self.shard_id, num_shards=self.num_shards,
                                            epoch_length=self.epoch_length))
        return self._plan[1]

    def __call__(self) -> tuple[Any, ...]:
        epoch, step = divmod(self.fed, self.steps)
        epoch += self.start_epoch
        self.fed += 1
        idx = new = self.plan(epoch)[step]
        if self.replay_ids is not None:  # the global step of this batch is epoch * steps + step
            idx = np.concatenate([new, buffered_ids(self.replay_ids, epoch * self.steps + step, self.lag, new)])
        self.recent.append(idx)
        data, hw = [], np.empty((len(idx), 2), np.int64)
        for k, i in enumerate(idx):
            path = self.files[i]
            raw = read_file_bytes(path)
            data.append(raw)
            size = self._sizes.get(int(i))
            if size is None:
                size = self._sizes[int(i)] = image_size(path, raw)
            hw[k] = size
        params = batch_params(self.seed, epoch, self.shard_id, step, hw[:, 0], hw[:, 1], self.config, len(new))
        boxes = np.ascontiguousarray(boxes_from_params(params[:, : self.config.n_global]))
        per_view = [np.ascontiguousarray(params[:, v]) for v in range(self.config.n_views)]
        return (data, np.ascontiguousarray(idx.reshape(-1, 1)), boxes, *per_view)


# Each photometric step takes the uint8 HWC view ``x`` and its parameter vector ``p`` (float32
# [len(PARAM_FIELDS)], CPU) and applies its op behind the coin flip drawn on the host. DALI's
# conditionals (enable_conditionals=True) run each branch on the samples that take it only.


class DaliMultiCropLoader:
    """Iterator over multi-crop batches from a DALI pipeline (see :func:`multicrop_loader`).

    The pipeline runs on a background thread (:class:`_Prefetcher`), ``prefetch_queue_depth``
    batches ahead of the consumer: while the consumer works on batch i, the :class:`_Feeder`
    reads and plans batches up to i + depth and DALI decodes them. Every batch is the same as a
    synchronous ``pipe.run()`` loop would give (the plan is a pure function of seed, epoch, shard
    and step).

    Views. ``zero_copy=False`` (default): views in ``config`` 's dtype, the caller's to keep.
    ``zero_copy=True``: each view is DALI's own output buffer, as a DLPack view in the pipeline's
    dtype (:attr:`view_dtype`: float16 on a GPU for a float16/bfloat16 config, float32 on the CPU),
    with no torch-side copy or conversion; for a consumer that copies every batch into persistent
    tensors anyway, whose ``copy_`` then does the one conversion. Contract: such views are valid
    until the next batch is requested; copy (or enqueue the copy of) what you need before asking
    for the next batch. The loader keeps DALI's buffers alive until then, and on CUDA until the work
    the consumer enqueued on its current stream before that request has run (:meth:`_Prefetcher._hold`).

    Writes per crop byte (the normalised float view; DALI's internal uint8 stages not counted), a
    consumer that copies into persistent tensors (the trainer) included: zero_copy=True: 2 (DALI's
    crop_mirror_normalize, the consumer's copy_, which converts float16 -> bfloat16 on the GPU);
    zero_copy=False: 2 when the config's dtype is the pipeline's (float32 on the CPU, float16 on the
    GPU), 3 otherwise (a torch ``.to(dtype)`` in between). Before the prefetch thread, the CPU path
    also copied every view out of DALI (np.array) and the GPU bfloat16 path converted: 3 in both.

    ``replay_ids``: every batch holds B + C rows (the pipeline's batch size), the last C the buffered
    images of :attr:`replay_lag` steps earlier, re-decoded and re-augmented.
    """

    def __init__(self, files: Sequence[Path], config: MultiCropConfig, batch_size: int, *,
                 device: torch.device, seed: int, shard_id: int, num_shards: int,
                 epoch_length: int | None, num_threads: int | None = None,
                 hw_decoder_load: float = 0.65, prefetch_queue_depth: int = 2, debug: bool = False,
                 zero_copy: bool = False, clean_view: bool = False, replay_ids: ReplayIds | None = None) -> None:
        self.files, self.config, self.batch_size = list(files), config, batch_size
        self.device, self.seed = device, seed
        self.shard_id, self.num_shards, self.epoch_length = shard_id, num_shards, epoch_length
        self.num_threads = num_threads or max(1, min(len(os.sched_getaffinity(0)), 16))
        self.hw_decoder_load, self.prefetch_queue_depth, self.debug = hw_decoder_load, prefetch_queue_depth, debug
        self.dtype = config.torch_dtype(device)
        self.pipeline_dtype = pipeline_dtype(self.dtype, device.type == "cuda")
        self.zero_copy, self.clean_view, self.replay_ids = zero_copy, clean_view, replay_ids
        self.epoch = 0
        self._pipe: Any = None
        self._feeder: _Feeder | None = None
        self._prefetch: _Prefetcher | None = None
        self._finalizer: Any = None
        self._consumed = 0  # batches read from the current pipeline

    @property
    def view_dtype(self) -> torch.dtype:
        """The dtype of ``batch.views``: the pipeline's with ``zero_copy``, else the config's."""
        return self.pipeline_dtype if self.zero_copy else self.dtype

    def __len__(self) -> int:
        return steps_per_epoch(len(self.files), self.batch_size, self.num_shards, self.epoch_length)

    @property
    def replay_lag(self) -> int:
        """How many steps the buffered ids of a batch lag its step: the feeder runs
        ``prefetch_queue_depth`` batches ahead of the consumer, plus :data:`REPLAY_LAG`."""
        return self.prefetch_queue_depth + REPLAY_LAG

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (e.g. when resuming from a checkpoint)."""
        self.epoch = epoch

    def _start(self) -> None:
        self._stop()
        device_id = None if self.device.type == "cpu" else (self.device.index or 0)
        self._feeder = _Feeder(self.files, self.config, self.batch_size, self.seed, self.shard_id,
                               self.num_shards, self.epoch_length, self.epoch, self.debug, self.replay_ids,
                               self.replay_lag)
        rows = self.batch_size + (self.replay_ids.capacity if self.replay_ids is not None else 0)
        self._pipe = build_dali_pipeline(
            self._feeder, self.config, rows, device_id=device_id, num_threads=self.num_threads,
            out_dtype=self.dtype, hw_decoder_load=self.hw_decoder_load,
            prefetch_queue_depth=self.prefetch_queue_depth, debug=self.debug, clean=self.clean_view)
        self._pipe.build()
        self._prefetch = _Prefetcher(self._pipe, self.device)
        self._finalizer = weakref.finalize(self, self._prefetch.close)
        self._consumed = 0
        self._start_epoch = self.epoch

    def _stop(self) -> None:
        """Stop the prefetch thread and drop the pipeline (the next iteration starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # _Prefetcher.close, once
        self._prefetch = self._finalizer = self._pipe = None

    def __iter__(self) -> Iterator[MultiCropBatch]:
        steps = len(self)
        if self._pipe is None or self._start_epoch + self._consumed // max(steps, 1) != self.epoch \
                or self._consumed % max(steps, 1):
            self._start()  # first use, set_epoch() jumped, or the last epoch was left unfinished
        epoch = self.epoch
        done = False
        try:
            for _ in range(steps):
                yield self._convert(self._run())
            done = True
        finally:
            if not done:  # left early (break, error): the next pass restarts, so stop the thread now
                self._stop()
        self.epoch = epoch + 1

    def _run(self) -> tuple[Any, ...]:
        try:
            outputs = self._prefetch.get()  # the previous batch's views expire here
        except MultiCropDataError:
            self._stop()
            raise
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses; find the file
            recent = list(self._feeder.recent) if self._feeder is not None else []  # the thread has ended
            self._stop()
            bad = find_undecodable([self.files[i] for batch in recent for i in batch])
            if bad is not None:
                raise MultiCropDataError(f"DALI failed to decode {bad}; {CHECK_HINT}, then train on it "
                                         f"(DALI error: {str(e).strip().splitlines()[-1][:300]})") from e
            raise
        self._consumed += 1
        return outputs

    def _convert(self, outputs: tuple[Any, ...]) -> MultiCropBatch:
        n = self.config.n_views
        m = n + int(self.clean_view)  # the clean view follows the multi-crop views
        index = torch.from_numpy(np.array(outputs[0].as_tensor())).reshape(-1)
        boxes = torch.from_numpy(np.array(outputs[1].as_tensor()))
        views = [_to_torch(outputs[2 + v]) for v in range(m)]
        if not self.zero_copy:
            views = [v.to(self.dtype) for v in views]  # no-op (no copy) when the dtypes agree
        params = None
        if self.debug:
            params = params_dict(np.stack([np.array(outputs[2 + m + v].as_tensor()) for v in range(n)], axis=1))
        return MultiCropBatch(views=views, index=index, boxes=boxes, params=params, has_clean=self.clean_view)


def _to_torch(tl: Any) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor viewing the same memory (no copy), on its device.

    With the dynamic executor each output batch owns its memory, so DLPack hands it to torch as
    ``DALIGenericIterator`` does; called on the consumer's thread, torch's ``from_dlpack`` orders
    it on that thread's current stream (``pipe.run()`` without a stream has already waited for it).
    """
    return torch.from_dlpack(tl.as_tensor())


def find_undecodable(paths: Sequence[Path]) -> Path | None:
    """The first of ``paths`` that DALI's CPU decoder rejects (one small pipeline per attempt), or None."""
    from nvidia.dali import fn, pipeline_def, types

    pending = list(dict.fromkeys(paths))
    while pending:
        chunk: list[Path] = []

        def source() -> list[np.ndarray]:
            path = pending.pop(0)
            chunk.append(path)
            return [np.fromfile(path, dtype=np.uint8)]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def probe() -> Any:
            return fn.decoders.image(fn.external_source(source=source, batch=True), device="cpu",
                                     output_type=types.RGB, adjust_orientation=False)

        pipe = probe()
        pipe.build()
        try:
            while pending:
                pipe.run()
            return None
        except StopIteration:
            return None
        except Exception:  # noqa: BLE001 - any decoder failure marks the file just fed
            return chunk[-1] if chunk else None
    return None


ALTERNATIVE_BACKENDS = ("choose another backend: --aug torch (torchvision on the device) or --aug paper "
                        "(the paper's PIL path)")


def require_dali(alternative: str = ALTERNATIVE_BACKENDS) -> None:
    """Raise a ValueError that says what to do (install DALI, or ``alternative``) when DALI cannot be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: an installed DALI whose shared libraries do not load
        raise ValueError(f"the DALI multi-crop backend needs NVIDIA DALI, which cannot be imported ({e}). "
                         f"Install it with `pip install nvidia-dali-cuda130` (Linux only), or {alternative}") from None
