"""RareRing: the FIFO memory buffer of rare images, preallocated, with static shapes.

The paper keeps the last 32 rare images (all their crops: 2 global + 6 local) and concatenates the
whole buffer onto every DINO batch. RareRing holds that buffer as device tensors that never change
shape: per resolution group (global views, local views) one tensor ``[V, rows, 3, H, W]``.

Two layouts:

* **tail mode** (``batch_size=B``): ``rows = B + C``. The loader's batch is staged into rows
  ``[0, B)`` and the ring lives in rows ``[B, B + C)``, so ``views()`` hands the model B + C rows per
  view with no concatenation and no allocation. This is what the trainer uses.
* **standalone** (``batch_size=None``): ``rows = C``; crops are copied from caller-owned view
  tensors, and ``mixed(views)`` concatenates (for code that owns its batches, e.g. the drop-in API).

Ring metadata (sample id, score and step per slot) and the ring state (head, count, totals) are
updated on the device by :func:`oodfast.kernels.rare_enqueue.rare_enqueue`; the crops by
:func:`oodfast.kernels.ring_copy.ring_copy`. ``state_dict()`` holds the metadata, the state and the
ring's crops (not the staging rows), so checkpoints keep the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oodfast.kernels.rare_enqueue import STATE_COUNT, STATE_ENQUEUED, STATE_HEAD, STATE_NONFINITE, rare_enqueue
from oodfast.kernels.ring_copy import ring_copy

#: One resolution group: (number of views, crop shape), e.g. (2, (3, 224, 224)).
Group = tuple[int, tuple[int, ...]]
#: A crop size: an int (square) or (height, width), e.g. (512, 1024).
Size = int | Sequence[int]


def hw(size: Size) -> tuple[int, int]:
    """``size`` as (height, width): an int is a square; a pair is (height, width)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class RareRing(nn.Module):
    """A ring of ``capacity`` images x every view, with metadata.

    Args:
        capacity: C, the number of images kept (the paper: 32).
        groups: views grouped by resolution, in view order: e.g. ``[(2, (3, 224, 224)), (6, (3, 96, 96))]``
            (at most two groups; views of one resolution belong together).
        batch_size: B for tail mode (see the module docstring), or None for standalone.
        dtype, device: of the crop storage (the loader's output dtype, e.g. bfloat16 on a GPU).
    """

    def __init__(self, capacity: int, groups: Sequence[Group], *, batch_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= len(groups) <= 2:
            raise ValueError(f"groups must hold one or two resolution groups, got {len(groups)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.capacity = capacity
        self.batch_size = batch_size
        self.groups = [(int(v), tuple(int(s) for s in shape)) for v, shape in groups]
        rows = capacity + (batch_size or 0)
        self._offset = batch_size or 0
        self.storage = [torch.zeros(v, rows, *shape, dtype=dtype, device=device) for v, shape in self.groups]
        self.register_buffer("ring_ids", torch.full((capacity,), -1, dtype=torch.int64, device=device))
        self.register_buffer("ring_scores", torch.full((capacity,), float("nan"), device=device))
        self.register_buffer("ring_steps", torch.full((capacity,), -1, dtype=torch.int64, device=device))
        self.register_buffer("state", torch.zeros(4, dtype=torch.int64, device=device))
        # Cross-program counters of the enqueue kernel: zero between calls, not part of a checkpoint.
        self.register_buffer("scratch", torch.zeros(2, dtype=torch.int32, device=device), persistent=False)

    @classmethod
    def for_multicrop(cls, capacity: int = 32, *, n_global: int = 2, global_size: Size = 224, local_crops_number: int = 6,
                      local_size: Size = 96, channels: int = 3, **kwargs) -> RareRing:
        """A ring for DINO's multi-crop: ``n_global`` views at ``global_size``, ``local_crops_number`` at
        ``local_size`` (each an int, square, or (height, width): crops are [3, height, width])."""
        groups: list[Group] = [(n_global, (channels, *hw(global_size)))]
        if local_crops_number:
            groups.append((local_crops_number, (channels, *hw(local_size))))
        return cls(capacity, groups, **kwargs)

    # ---- views of the storage ----------------------------------------------------------------

    @property
    def num_views(self) -> int:
        return sum(v for v, _ in self.groups)

    def ring_rows(self, group: int) -> torch.Tensor:
        """The ring's crops of one group: [V_g, C, *crop] (slot order)."""
        return self.storage[group][:, self._offset:]

    def staging_rows(self, group: int) -> torch.Tensor:
        """Tail mode: the rows the current batch is staged into, [V_g, B, *crop]."""
        if self.batch_size is None:
            raise RuntimeError("staging rows exist in tail mode only: build the ring with batch_size=B")
        return self.storage[group][:, : self.batch_size]

    def _split(self, views: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        if len(views) != self.num_views:
            raise ValueError(f"expected {self.num_views} views (groups {self.groups}), got {len(views)}")
        out, i = [], 0
        for v, shape in self.groups:
            for t in views[i:i + v]:
                if tuple(t.shape[1:]) != shape:
                    raise ValueError(f"view {i} has crops of shape {list(t.shape[1:])}, expected {list(shape)}")
            out.append(list(views[i:i + v]))
            i += v
        return out

    # ---- state -------------------------------------------------------------------------------

    @property
    def head(self) -> torch.Tensor:
        """0-d int64: the slot the next enqueued image takes."""
        return self.state[STATE_HEAD]

    @property
    def count(self) -> torch.Tensor:
        """0-d int64: occupied slots (C once warm)."""
        return self.state[STATE_COUNT]

    @property
    def enqueued_total(self) -> torch.Tensor:
        return self.state[STATE_ENQUEUED]

    @property
    def nonfinite_total(self) -> torch.Tensor:
        """0-d int64: images whose embedding was non-finite (never enqueued)."""
        return self.state[STATE_NONFINITE]

    @property
    def valid(self) -> torch.Tensor:
        """bool [C]: which slots hold an image (all of them once ``count == C``)."""
        age = (self.head - 1 - torch.arange(self.capacity, device=self.state.device)) % self.capacity
        return age < self.count

    def fifo_order(self) -> torch.Tensor:
        """int64 [C]: slots from the oldest image to the newest (``deque`` order); only the last
        ``count`` entries are valid."""
        return (self.head + torch.arange(self.capacity, device=self.state.device)) % self.capacity

    def is_full(self) -> bool:
        """Host check (synchronises): is every slot occupied? For warm-up loops, not the hot path."""
        return bool(self.count.item() >= self.capacity)

    def bookkeeping(self) -> list[torch.Tensor]:
        """The tensors an enqueue changes (state, ids, scores, steps; not the crops), for a caller that
        must be able to put them back (a skipped training step)."""
        return [self.state, self.ring_ids, self.ring_scores, self.ring_steps]

    def reset(self) -> None:
        """Empty the ring (crops are kept but no longer valid)."""
        self.ring_ids.fill_(-1)
        self.ring_scores.fill_(float("nan"))
        self.ring_steps.fill_(-1)
        self.state.zero_()

    # ---- data movement -----------------------------------------------------------------------

    def enqueue(self, x: torch.Tensor, center: torch.Tensor, proj: torch.Tensor, coef: torch.Tensor,
                alpha: torch.Tensor, threshold: torch.Tensor, sample_ids: torch.Tensor, step: torch.Tensor,
                scores: torch.Tensor, slots: torch.Tensor, metric: int) -> None:
        """Score ``x``, compare with ``threshold`` and give each flagged row the next FIFO slot, writing
        this ring's metadata and state on the device (:func:`~oodfast.kernels.rare_enqueue.rare_enqueue`;
        the crops follow with :meth:`write`).

        Args:
            x: embeddings [B, D] or [V, B, D] (``metric`` score: the scores themselves, [B, 1]).
            center, proj, coef, alpha: the detector's statistics (see :class:`~oodfast.detect.RareDetector`).
            threshold: 0-d fp32; a row is flagged when its score exceeds it.
            sample_ids: int64 [B]; step: 0-d int64: stored with each enqueued image.
            scores, slots: outputs, fp32 [B] and int32 [B] (``slots[b]``: image b's slot, or -1).
            metric: the op's metric id (``METRICS[name]`` or ``SCORE``).
        """
        rare_enqueue(x, center, proj, coef, alpha, threshold, sample_ids, step, scores, slots,
                     self.ring_ids, self.ring_scores, self.ring_steps, self.state, self.scratch, metric)

    def stage(self, views: Sequence[torch.Tensor]) -> None:
        """Tail mode: copy the loader's views (each [B, *crop], global first) into the staging rows; views
        of B + C rows (the re-augmenting replay: new images, then fresh crops of the buffered ones) fill
        the ring's rows too."""
        for g, group_views in enumerate(self._split(views)):
            staging = self.staging_rows(g)
            for i, t in enumerate(group_views):
                if t.shape[0] == self.storage[g].shape[1] != staging.shape[1]:
                    self.storage[g][i].copy_(t, non_blocking=True)
                else:
                    staging[i].copy_(t, non_blocking=True)

    def write(self, slots: torch.Tensor, views: Sequence[torch.Tensor] | None = None) -> None:
        """Copy every row with ``slots[b] >= 0`` into its slot, for all views.

        Tail mode (``views`` None): from the staging rows, both groups in one launch. Standalone:
        from ``views`` (each [B, *crop]), one launch per view.
        """
        if views is None:
            pairs = [(self.staging_rows(g), self.ring_rows(g)) for g in range(len(self.groups))]
            (src0, dst0), (src1, dst1) = pairs[0], pairs[1] if len(pairs) == 2 else (None, None)
            ring_copy(slots, src0, dst0, src1, dst1)
            return
        for g, group_views in enumerate(self._split(views)):
            ring = self.ring_rows(g)
            for i, t in enumerate(group_views):
                ring_copy(slots, t.unsqueeze(0), ring[i:i + 1])

    def append(self, views: Sequence[torch.Tensor], sample_id: int = -1, score: float = float("nan"),
               step: int = -1) -> None:
        """Append one image (its views, each [*crop], global first) at the head: the host-driven path
        for the drop-in ``MemoryBuffer.add`` and warm-up loops; training uses enqueue + ``write``."""
        slot = int(self.head)
        for g, group_views in enumerate(self._split([v.unsqueeze(0) for v in views])):
            ring = self.ring_rows(g)
            for i, t in enumerate(group_views):
                ring[i, slot].copy_(t[0])
        self.ring_ids[slot] = sample_id
        self.ring_scores[slot] = score
        self.ring_steps[slot] = step
        self.state[STATE_HEAD] = (slot + 1) % self.capacity
        self.state[STATE_COUNT] = min(int(self.count) + 1, self.capacity)
        self.state[STATE_ENQUEUED] += 1

    def entry(self, k: int) -> list[torch.Tensor]:
        """The views of the k-th valid image, oldest first (k in [0, count))."""
        n = int(self.count)
        if not 0 <= k < n:
            raise IndexError(f"ring entry {k} out of range for {n} entries")
        slot = int(self.fifo_order()[self.capacity - n + k])
        return [self.ring_rows(g)[i, slot] for g, (v, _) in enumerate(self.groups) for i in range(v)]

    def views(self) -> list[torch.Tensor]:
        """Tail mode: per view, the staged batch followed by the ring, [B + C, *crop] (no copy)."""
        if self.batch_size is None:
            raise RuntimeError("views() needs tail mode; in standalone mode use mixed(views)")
        return [s[i] for s in self.storage for i in range(s.shape[0])]

    def mixed(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per view, ``views[v]`` [B, *crop] followed by the valid ring entries in FIFO order."""
        order = self.fifo_order()[self.capacity - int(self.count.item()):]
        out = []
        for g, group_views in enumerate(self._split(views)):
            ring = self.ring_rows(g)
            out += [torch.cat([t, ring[i].index_select(0, order).to(t.dtype)]) for i, t in enumerate(group_views)]
        return out

    # ---- checkpoints: metadata, state and the ring's crops (not the staging rows) --------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for g in range(len(self.groups)):
            destination[f"{prefix}crops{g}"] = self.ring_rows(g).detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for g in range(len(self.groups)):
            key = f"{prefix}crops{g}"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            crops = state_dict[key]
            ring = self.ring_rows(g)
            if crops.shape != ring.shape:
                error_msgs.append(f"{key}: checkpoint holds ring crops of shape {list(crops.shape)}, this ring "
                                  f"has {list(ring.shape)} (capacity/views/crop size must match)")
                continue
            ring.copy_(crops)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(f"{prefix}crops")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):  # .to(device) / .half() move the crop storage too
        super()._apply(fn, recurse)
        self.storage = [fn(s) for s in self.storage]
        return self

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, groups={self.groups}, batch_size={self.batch_size}"
