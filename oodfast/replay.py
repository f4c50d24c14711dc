"""Replay: the OOD replay buffer of a training run, as one object.

:class:`Replay` owns what the paper adds to DINO: the detector (the teacher's own features, or a
separate frozen encoder), the ring of rare images (:class:`~oodfast.buffer.RareRing`, tail mode: the
staged batch in rows [0, B), the ring in rows [B, B + C)), calibration, warm-up, and "score, enqueue,
copy crops" as one call (:meth:`Replay.add_`). It is given what it works on (features, batches, the
teacher module) and never reaches into the trainer.

Modes (``replay``): ``ood`` (a :class:`~oodfast.detect.RareDetector` fills the buffer), ``random``
(:class:`~oodfast.detect.RandomDetector`: replay without detection) and ``oracle``
(:class:`~oodfast.detect.OracleDetector`: images whose global crops hold rare-class pixels, read from
the masks; ``oracle-matched`` flags them at the other modes' rate instead of the data's prevalence).
The percentile is checked once, by :class:`~oodfast.detect.DetectorConfig`, and its flag rate
(``DetectorConfig.rate``) is the one every mode uses.

What the detector scores (:meth:`Replay.features`, the one place that chooses it): the CLEAN global
view of each new image (the loader's ``clean_view``: the whole image resized to the global size, no
flip, no photometric op), embedded with the scoring module (the teacher's backbone, or the frozen
encoder) in eval mode, so BatchNorm uses its running statistics and a score depends on the image
alone, not on its batch-mates or its augmentation. Calibration embeds the same kind of rows.

Dense rarity (``dense_layer``: ``layer2|layer3|layer4`` of a ResNet, ``tokens`` of a ViT): the
detector is a :class:`~oodfast.dense.DenseRareDetector` on :func:`~oodfast.encoders.feature_map` of
the same module, same rows, same mode; what it scores is the map's :func:`~oodfast.dense.position_view`
[P, B, D] (no copy: the positions are the fused enqueue's views axis) and an image is flagged when
the max over its positions is rare. Calibration maps are kept in fp16 on a GPU and capped at
:data:`CALIB_MAP_ELEMENTS` values (images beyond it are left out, with a warning).

Stores (``store``): ``crops`` (the paper's: an enqueued image's crops are copied into the ring and
replayed as they are) or ``ids`` (the ring's sample ids are published to the host each step,
asynchronously, through :class:`HostRingIds`; the loader decodes and augments the buffered images
afresh, so the C ring rows get new crops every step).

Nothing here synchronises with the host on the training path (:meth:`add_`, :meth:`step_input`,
:meth:`publish`); calibration and warm-up do, before training.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from oodfast.buffer import RareRing, Size
from oodfast.data.crops import DEFAULT_RARE_TAU, rare_shares, read_mask
from oodfast.dense import DenseRareDetector, position_view
from oodfast.detect import DetectorConfig, OracleDetector, RandomDetector, RareDetector, ScoreDetector
from oodfast.encoders import dense_dim, feature_map, load_encoder

log = logging.getLogger(__name__)

#: Where the detector's embeddings come from.
DETECTOR_SOURCES = ("teacher", "frozen")
#: The frozen detector's encoder (the paper's: a DINO ResNet-50 trunk) and its embedding size.
FROZEN_ARCH, FROZEN_DIM = "resnet50", 2048

#: What the ring keeps of an image: its crops (the paper's), or its sample id (re-augmented each step).
REPLAY_STORES = ("crops", "ids")

#: The most values (images x positions x channels) of dense calibration maps fitted at once: 2**28
#: (512 MiB in fp16, 1 GiB as the fp32 rows the fit makes of them), e.g. 1024 images of a 14 x 14
#: layer3 (1024 channels) map fit, 2048 x 1024 of a 512 x 1024 crop keep 128 images.
CALIB_MAP_ELEMENTS = 2**28

FROZEN_WEIGHTS_HELP = ("--detector frozen needs --detector-weights PATH: a torchvision/DINO ResNet-50 state dict "
                       "such as dino_resnet50_pretrain.pth (linked from the facebookresearch/dino README) or an "
                       "oodfast/DINO checkpoint; or use --detector teacher, which needs no weights")


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode inside (BatchNorm on its running statistics, which it then leaves alone;
    no dropout or drop path), every submodule's own mode restored after. Host-side flags only: no
    device work. An object without modules (a stand-in) is left as it is."""
    if not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class HostRingIds:
    """The ring's sample ids on the host, for a loader that re-augments the buffered images.

    After each training step :meth:`publish` enqueues a copy of ``ring.ring_ids`` into a pinned host
    slot (``non_blocking=True``) and records a CUDA event; nothing waits for it. A loader (any thread)
    asks :meth:`at` for the ids published after a given step and gets the newest completed copy
    published at or before it, else the seed (the ring as warm-up or a checkpoint left it:
    :meth:`reset`). The loader asks for step ``g - loader.replay_lag``, whose copy the training loop has
    already waited for, so which ids a batch gets does not depend on timing.

    Args:
        ring: the ring whose ``ring_ids`` [C] are published.
        history: host slots kept (more than any loader's lag).
    """

    def __init__(self, ring: RareRing, history: int = 32) -> None:
        self.ring, self.capacity = ring, ring.capacity
        self.cuda = ring.ring_ids.device.type == "cuda"
        self._host = torch.full((history, ring.capacity), -1, dtype=torch.int64, pin_memory=self.cuda)
        self._tags: list[int | None] = [None] * history
        self._events: list[Any] = [None] * history
        self._seed = np.full(ring.capacity, -1, np.int64)
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget what was published and seed with the ring's ids as they are now (reads the device:
        before training only)."""
        seed = self.ring.ring_ids.cpu().numpy().copy()
        with self._lock:
            self._seed, self._tags = seed, [None] * len(self._tags)

    def publish(self, step: int) -> None:
        """Enqueue the copy of the ring's ids after training step ``step``; no host synchronisation."""
        k = step % len(self._tags)
        with self._lock:
            self._tags[k] = None  # no reader takes the slot while the device writes it
        self._host[k].copy_(self.ring.ring_ids, non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        with self._lock:
            self._tags[k], self._events[k] = step, event

    def at(self, step: int) -> np.ndarray:
        """int64 [C]: the newest completed copy published after a step <= ``step``, else the seed."""
        with self._lock:
            ready = sorted(((t, k) for k, t in enumerate(self._tags) if t is not None and t <= step), reverse=True)
            for _, k in ready:
                event = self._events[k]
                if event is None or event.query():
                    return self._host[k].numpy().copy()
            return self._seed.copy()


@torch.no_grad()
def prime_norms(batches: Iterable[Sequence[torch.Tensor]], teacher: nn.Module, amp: Any = None) -> bool:
    """Set the teacher backbone's BatchNorm running statistics to their cumulative mean over
    ``batches`` (each the global views [n, 3, H, W], as the teacher's training forward sees them);
    returns whether it had any (ViTs have none: a no-op).

    A new teacher's running statistics are the initial 0 / 1, which its training forward (train
    mode: batch statistics) never reads but replaces within some tens of steps (momentum 0.1); an
    eval-mode detector calibrated on them would see its embeddings move under it as they do. Primed,
    they are what training keeps them near from the first step. Training itself is unchanged: the
    train-mode forward does not read them."""
    norms = [m for m in teacher.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    try:
        for views in batches:
            with amp if amp is not None else contextlib.nullcontext():
                teacher.forward_backbone(list(views))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return True


@torch.no_grad()
def calibration_maps(embed: Callable[[torch.Tensor], torch.Tensor], rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """A dense detector's calibration maps [P, n, D], ``embed`` (rows [b, 3, H, W] -> [P, b, D]) of each
    of ``rows``: fp16 on a GPU (fp32 for a batch whose map overflows it), at most
    :data:`CALIB_MAP_ELEMENTS` values (the images after that are left out, with a warning)."""
    maps: list[torch.Tensor] = []
    n, limit = 0, 0
    for batch in rows:
        m = embed(batch)
        if m.is_cuda:
            half = m.half()
            m = half if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(m).all()) else m
        limit = limit or max(2, CALIB_MAP_ELEMENTS // (m.shape[0] * m.shape[2]))
        maps.append(m[:, : limit - n])
        n += maps[-1].shape[1]
        if n >= limit:
            log.warning("dense calibration: maps of %d positions x %d channels; fitting on the first %d images "
                        "(CALIB_MAP_ELEMENTS = %d values)", m.shape[0], m.shape[2], n, CALIB_MAP_ELEMENTS)
            break
    return torch.cat(maps, dim=1)


def build_detector(mode: str, config: DetectorConfig, *, batch_size: int, device: torch.device,
                   source: str = "teacher", embed_dim: int, frozen_weights: str | None = None,
                   dense_layer: str | None = None, arch: str | None = None,
                   ) -> tuple[RareDetector | ScoreDetector, nn.Module | None]:
    """The detector of a replay mode and the frozen encoder it scores with (None: the teacher's
    features); the arguments are :meth:`Replay.build`'s."""
    if mode == "random":
        det: RareDetector | ScoreDetector = RandomDetector(config.rate, device=device)
    elif mode in ("oracle", "oracle-matched"):
        det = OracleDetector(batch_size, DEFAULT_RARE_TAU, config.rate, matched=mode == "oracle-matched",
                             device=device)
    elif mode != "ood":
        raise ValueError(f"replay mode must be ood, random, oracle or oracle-matched, got {mode!r}")
    if mode != "ood":
        if dense_layer is not None:
            raise ValueError(f"dense_layer {dense_layer!r} (--dense-layer) scores feature maps for --replay ood; "
                             f"the {mode} replay scores none: drop it")
        return det, None
    encoder, dim, scoring = None, embed_dim, arch
    if source == "frozen":
        if not frozen_weights:
            raise ValueError(FROZEN_WEIGHTS_HELP)
        encoder, dim, scoring = load_encoder(frozen_weights, FROZEN_ARCH, device), FROZEN_DIM, FROZEN_ARCH
    if dense_layer is None:
        return RareDetector(dim, config, device=device), encoder
    if scoring is None:
        raise ValueError("a dense teacher detector needs the teacher's arch (Replay.build(arch=...))")
    return DenseRareDetector(dense_dim(scoring, dense_layer), config, device=device), encoder


class Replay:
    """The detector and the ring of one process, with the step's persistent inputs.

    Args:
        ring: the buffer, in tail mode (``batch_size`` B).
        detector: flags images into ``ring``.
        encoder: the frozen detector's encoder ([N, 3, H, W] -> [N, D]), or None: the teacher's
            features are used.
        masks, images: the dataset's mask and image paths (oracle mode reads the staged images' masks).
        amp: the autocast context the embeddings are computed in.
        store: ``crops`` or ``ids`` (see the module docstring).
        dense_layer: the feature map a :class:`~oodfast.dense.DenseRareDetector` ``detector`` scores
            (:func:`~oodfast.encoders.feature_map`'s ``layer``), or None: pooled embeddings.

    Persistent tensors, written in place every step: ``ids`` int64 [B] (the staged images' dataset
    positions), ``step`` 0-d int64 (stored with each enqueued image), ``scores`` fp32 [B], ``slots``
    int32 [B], ``clean`` [B, 3, H, W] (the staged images' clean views; None for the random and oracle
    modes, which embed nothing). ``host_ids``: the :class:`HostRingIds` of the ``ids`` store, else None.
    """

    def __init__(self, ring: RareRing, detector: RareDetector | ScoreDetector, *, encoder: nn.Module | None = None,
                 masks: Sequence[Any] | None = None, images: Sequence[Any] | None = None,
                 amp: Any = None, store: str = "crops", dense_layer: str | None = None) -> None:
        if ring.batch_size is None:
            raise ValueError("Replay needs a ring in tail mode: build it with batch_size=B")
        if store not in REPLAY_STORES:
            raise ValueError(f"replay store (--replay-store) must be crops or ids, got {store!r}")
        if (dense_layer is not None) != isinstance(detector, DenseRareDetector):
            raise ValueError("a dense_layer goes with a DenseRareDetector (and a DenseRareDetector with a dense_layer)")
        self.ring, self.detector, self.encoder, self.dense_layer = ring, detector, encoder, dense_layer
        self.masks, self.images = masks, images
        self.amp = amp if amp is not None else contextlib.nullcontext()
        self.B = B = ring.batch_size
        device = ring.state.device
        self.ids = torch.zeros(B, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.scores = torch.zeros(B, device=device)
        self.slots = torch.full((B,), -1, dtype=torch.int32, device=device)
        self.store = store
        self.host_ids = HostRingIds(ring) if store == "ids" else None
        self.clean = (torch.zeros(B, *ring.groups[0][1], dtype=ring.storage[0].dtype, device=device)
                      if self.embeds else None)
        self.primed = False  # the teacher's BatchNorm statistics hold values (see prime_norms)

    @classmethod
    def build(cls, mode: str, *, capacity: int, batch_size: int, global_size: Size, local_size: Size,
              local_crops_number: int, dtype: torch.dtype, device: torch.device, detector: DetectorConfig,
              source: str = "teacher", embed_dim: int, frozen_weights: str | None = None,
              masks: Sequence[Any] | None = None, images: Sequence[Any] | None = None, amp: Any = None,
              store: str = "crops", dense_layer: str | None = None, arch: str | None = None) -> Replay:
        """The replay of a run.

        Args:
            mode: ``ood``, ``random`` or ``oracle`` (see the module docstring).
            capacity: C, images in the ring; batch_size: B, images staged per step.
            global_size, local_size, local_crops_number: the crops (2 global views + the local ones;
                a size is an int, square, or (height, width)).
            dtype, device: of the crops.
            detector: the metric, percentile and threshold mode (its ``rate`` also sets the random
                and oracle modes' nominal flag rate).
            source: ``teacher`` (the teacher's backbone features, ``embed_dim`` wide) or ``frozen``
                (a frozen ResNet-50 from ``frozen_weights``; ood mode only).
            masks, images: the dataset's paths, for oracle mode.
            store: ``crops`` (the paper's) or ``ids`` (re-augmented by the loader).
            dense_layer: None (pooled embeddings, the paper's) or the feature map a
                :class:`~oodfast.dense.DenseRareDetector` scores (ood mode only); ``arch``: the
                teacher's backbone, for the map's channels.

        Raises:
            ValueError: an unknown mode, source, store or dense layer, or ``frozen`` without weights.
        """
        if store not in REPLAY_STORES:
            raise ValueError(f"replay store (--replay-store) must be crops or ids, got {store!r}")
        if source not in DETECTOR_SOURCES:
            raise ValueError(f"detector source must be one of {DETECTOR_SOURCES}, got {source!r}")
        ring = RareRing.for_multicrop(capacity, global_size=global_size, local_crops_number=local_crops_number,
                                      local_size=local_size, batch_size=batch_size, dtype=dtype, device=device)
        det, encoder = build_detector(mode, detector, batch_size=batch_size, device=device, source=source,
                                      embed_dim=embed_dim, frozen_weights=frozen_weights, dense_layer=dense_layer,
                                      arch=arch)
        return cls(ring, det, encoder=encoder, masks=masks, images=images, amp=amp, store=store,
                   dense_layer=dense_layer)

    # ---- what the model sees -------------------------------------------------------------------

    def views(self) -> list[torch.Tensor]:
        """Per view, the staged batch followed by the ring, [B + C, *crop] (persistent tensors)."""
        return self.ring.views()

    def stage(self, views: Sequence[torch.Tensor], index: torch.Tensor, boxes: torch.Tensor | None = None) -> None:
        """Copy a loader batch (``views`` each [B, *crop], global first, then the clean view where the
        loader was built with ``clean_view``; ``index`` int64 [B]) into the staging rows; oracle mode also
        reads its true rare shares from the masks (``boxes`` [B, n_global, 4], needed then). A batch of
        the ``ids`` store holds B + C rows: its last C (fresh crops of the buffered images) fill the
        ring's rows."""
        views = list(views)
        if len(views) == self.ring.num_views + 1:
            clean = views.pop()
            if self.clean is not None:
                self.clean.copy_(clean[: self.B], non_blocking=True)
        index = index[: self.B]
        if isinstance(self.detector, OracleDetector):
            if boxes is None:
                raise ValueError("the oracle replay needs the batch's crop boxes")
            shares = [rare_shares(read_mask(self.masks[int(i)], self.images[int(i)]), b.numpy()).max()
                      for i, b in zip(index, boxes[: self.B, :2])]
            self.detector.shares.copy_(torch.tensor(shares, dtype=torch.float32).unsqueeze(1), non_blocking=True)
        self.ring.stage(views)
        self.ids.copy_(index, non_blocking=True)

    # ---- embeddings ------------------------------------------------------------------------------

    @property
    def follows_teacher(self) -> bool:
        """Whether the detector scores the teacher's features with fitted statistics (which then go
        stale as the teacher moves: refit them at each epoch start)."""
        return self.encoder is None and isinstance(self.detector, RareDetector)

    @property
    def needs_calibration(self) -> bool:
        """Whether the detector has statistics to fit (the random and oracle modes have none)."""
        return isinstance(self.detector, RareDetector)

    @property
    def embeds(self) -> bool:
        """Whether the detector scores embeddings of the clean views (the random and oracle modes score
        none: their loaders need no clean view)."""
        return isinstance(self.detector, RareDetector)

    def scorer(self, teacher: nn.Module | None) -> nn.Module | None:
        """The module whose features the detector scores: the frozen encoder, else ``teacher``."""
        return self.encoder if self.encoder is not None else teacher

    def features(self, rows: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
        """What the detector scores, for the clean views ``rows`` [n, 3, H, W]: the one place that
        chooses it. Pooled embeddings [1, n, D] fp32 (the frozen encoder's, else
        ``teacher.forward_backbone``'s) or, with a ``dense_layer``, the [P, n, D] fp32 position view of
        that module's :func:`~oodfast.encoders.feature_map`; computed as they are: the caller sets eval
        mode (:meth:`embed`, :meth:`step_input`); traceable by torch.compile."""
        scorer = self.scorer(teacher)
        if scorer is None:
            raise ValueError("Replay.features: the teacher detector needs the teacher module")
        if self.dense_layer is not None:
            with self.amp:
                fmap = feature_map(scorer if self.encoder is not None else scorer.backbone, rows, self.dense_layer)
            return position_view(fmap.float())  # channels_last stays channels_last: a view, no copy
        with self.amp:
            feats = scorer(rows) if self.encoder is not None else scorer.forward_backbone(rows)
        return feats.float().view(-1, rows.shape[0], feats.shape[-1])

    @torch.no_grad()
    def embed(self, rows: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
        """:meth:`features` of ``rows`` with the scoring module in eval mode (its mode restored after)."""
        with eval_mode(self.scorer(teacher)):
            return self.features(rows, teacher)

    def step_input(self, teacher: nn.Module | None,
                   features: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """The detector's input for the staged batch: :meth:`features` of the staged clean views with
        the scoring module in eval mode (``features``: e.g. a compiled :meth:`features`), or, for the
        random and oracle modes, a [B, 1] placeholder they ignore. No host synchronisation."""
        if not self.embeds:
            return self.scores.unsqueeze(1)
        with eval_mode(self.scorer(teacher)), torch.no_grad():
            return (features or self.features)(self.clean, teacher)

    def publish(self, step: int) -> None:
        """After training step ``step`` (its enqueue issued): the ``ids`` store's asynchronous copy of the
        ring's ids to the host, for the loader (:class:`HostRingIds`); a no-op for ``crops``."""
        if self.host_ids is not None:
            self.host_ids.publish(step)

    # ---- score, enqueue, copy -------------------------------------------------------------------

    def add_(self, emb: torch.Tensor, *, skipped: torch.Tensor | None = None,
             detector: RareDetector | ScoreDetector | None = None) -> None:
        """Score the staged images' detector input ``emb`` (:meth:`step_input`: [B, D] pooled, [P, B, D]
        dense), enqueue the flagged ones and copy all
        their crops into the ring; no host synchronisation.

        Args:
            emb: embeddings of the staged batch (or, for a score detector, anything [.., B, ..]).
            skipped: 0-d bool; where true, nothing changes: the ring's state and metadata and the
                detector's threshold and flag rate are put back and no slot is written.
            detector: score with this one instead of :attr:`detector` (warm-up's random top-up).
        """
        det = self.detector if detector is None else detector
        kept = self.ring.bookkeeping() + det.adaptive_state() if skipped is not None else []
        before = [t.clone() for t in kept]
        det.enqueue(emb, self.ring, self.ids, self.step, scores=self.scores, slots=self.slots)
        if skipped is not None:
            for t, old in zip(kept, before):
                t.copy_(torch.where(skipped, old, t))
            self.slots.masked_fill_(skipped, -1)
        self.ring.write(self.slots)

    # ---- before training: calibration and warm-up -------------------------------------------------

    def prime_norms(self, batches: Iterable[Sequence[torch.Tensor]], teacher: nn.Module) -> None:
        """:func:`prime_norms` of the teacher's backbone (a no-op for the frozen encoder)."""
        if self.encoder is None:
            self.primed = prime_norms(batches, teacher, self.amp)

    @torch.no_grad()
    def calibrate_on(self, batches: Callable[[], Iterable[Any]], teacher: nn.Module | None,
                     device: torch.device) -> None:
        """Calibrate on loader batches (each call of ``batches()`` a fresh pass over the same ones, with
        the clean view): a new teacher's BatchNorm statistics are primed on one pass
        (:meth:`prime_norms`), then the clean views are embedded as training embeds them (:meth:`embed`)
        and the detector fitted (:meth:`calibrate`). A no-op for the random and oracle modes."""
        if not self.needs_calibration:
            return
        if self.follows_teacher and not self.primed:
            self.prime_norms(([v.to(device) for v in b.crops[:2]] for b in batches()), teacher)
        if self.dense_layer is not None:
            self.calibrate(calibration_maps(lambda rows: self.embed(rows, teacher),
                                            (b.clean.to(device, self.clean.dtype) for b in batches())))
            return
        feats = [self.embed(b.clean.to(device, self.clean.dtype), teacher) for b in batches()]
        self.calibrate(torch.cat(feats, dim=-2))

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Fit the detector's statistics and threshold on calibration embeddings ``features`` [n, D]
        (or :meth:`embed`'s [1, n, D]; a dense detector's: maps [P, n, D]; a no-op for the random and
        oracle modes)."""
        if not isinstance(self.detector, RareDetector):
            return
        if self.dense_layer is None:
            features = features.reshape(-1, features.shape[-1])
        self.detector.fit(features)
        c, n = self.detector.config, features.shape[-2]
        what = f"{n} maps of {features.shape[0]} positions" if self.dense_layer is not None else f"{n} embeddings"
        log.info("calibrated %s on %s: threshold %.4f (%.2f percentile)", c.metric, what,
                 float(self.detector.threshold), c.percentile)

    @torch.no_grad()
    def warm_up(self, batches: Iterable[Any], *, teacher: nn.Module | None = None,
                refill: Callable[[], Iterable[Any]] | None = None) -> None:
        """Fill the ring before training, as the paper does: stage each of ``batches`` (loader batches
        with ``views`` (the clean view last), ``index``, ``boxes``) and add its flagged images until the
        ring is full; if one pass does not find enough, top it up with random images from fresh passes
        of ``refill()``. The ``ids`` store then seeds the host's copy of the ids with the full ring."""
        for batch in batches:
            if self.ring.is_full():
                break
            self.stage(batch.views, batch.index, batch.boxes)
            self.add_(self.step_input(teacher))
        if not self.ring.is_full() and refill is not None:
            log.warning("warm-up: one pass found %d of %d rare images; topping up with random images",
                        int(self.ring.count), self.ring.capacity)
            filler = RandomDetector(0.5, device=self.scores.device)
            while not self.ring.is_full():
                for batch in refill():
                    self.stage(batch.views, batch.index, batch.boxes)
                    self.add_(self.scores.unsqueeze(1), detector=filler)
                    if self.ring.is_full():
                        break
        if self.host_ids is not None:
            self.host_ids.reset()
        log.info("warm-up done: %d images in the buffer (%s)", int(self.ring.count),
                 "flagged" if isinstance(self.detector, RareDetector) else "random")

    # ---- monitoring and checkpoints ---------------------------------------------------------------

    def monitor(self) -> dict[str, torch.Tensor]:
        """0-d device tensors for the log: flag rate, threshold, images in the ring, non-finite embeddings."""
        return {"flag_rate": self.detector.flag_rate, "threshold": self.detector.threshold, "buffer": self.ring.count,
                "nonfinite": self.ring.nonfinite_total}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``ring`` and ``detector`` entries."""
        return {"ring": self.ring.state_dict(), "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries (an entry that is None or absent is left as it is)."""
        if state.get("ring") is not None:
            self.ring.load_state_dict(state["ring"])
        if state.get("detector") is not None:
            self.detector.load_state_dict(state["detector"])
            self.primed = True  # the restored teacher's statistics are a trained run's
        if self.host_ids is not None:
            self.host_ids.reset()
