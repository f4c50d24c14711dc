"""Replay: the OOD replay buffer of a training run, as one object.

:class:`Replay` owns what the paper adds to DINO: the detector (the teacher's own features, or a
separate frozen encoder), the ring of rare images (:class:`~oodfast.buffer.RareRing`, tail mode: the
staged batch in rows [0, B), the ring in rows [B, B + C)), calibration, warm-up, and "score, enqueue,
copy crops" as one call (:meth:`Replay.add_`). It is given what it works on (features, batches, the
teacher module) and never reaches into the trainer.

Modes (``replay``): ``ood`` (a :class:`~oodfast.detect.RareDetector` fills the buffer), ``random``
(:class:`~oodfast.detect.RandomDetector`: replay without detection) and ``oracle``
(:class:`~oodfast.detect.OracleDetector`: images whose global crops hold rare-class pixels, read from
the masks). The percentile is checked once, by :class:`~oodfast.detect.DetectorConfig`, and its flag
rate (``DetectorConfig.rate``) is the one every mode uses.

Nothing here synchronises with the host on the training path (:meth:`add_`, :meth:`step_features`);
calibration and warm-up do, before training.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from oodfast.buffer import RareRing
from oodfast.data.crops import DEFAULT_RARE_TAU, rare_shares, read_mask
from oodfast.detect import DetectorConfig, OracleDetector, RandomDetector, RareDetector, ScoreDetector

log = logging.getLogger(__name__)

#: Where the detector's embeddings come from.
DETECTOR_SOURCES = ("teacher", "frozen")
#: The frozen detector's encoder (the paper's: a DINO ResNet-50 trunk) and its embedding size.
FROZEN_ARCH, FROZEN_DIM = "resnet50", 2048

FROZEN_WEIGHTS_HELP = ("--detector frozen needs --detector-weights PATH: a torchvision/DINO ResNet-50 state dict "
                       "such as dino_resnet50_pretrain.pth (linked from the facebookresearch/dino README) or an "
                       "oodfast/DINO checkpoint; or use --detector teacher, which needs no weights")


class Replay:
    """The detector and the ring of one process, with the step's persistent inputs.

    Args:
        ring: the buffer, in tail mode (``batch_size`` B).
        detector: flags images into ``ring``.
        encoder: the frozen detector's encoder ([N, 3, H, W] -> [N, D]), or None: the teacher's
            features are used.
        masks, images: the dataset's mask and image paths (oracle mode reads the staged images' masks).
        amp: the autocast context the embeddings are computed in.

    Persistent tensors, written in place every step: ``ids`` int64 [B] (the staged images' dataset
    positions), ``step`` 0-d int64 (stored with each enqueued image), ``scores`` fp32 [B], ``slots``
    int32 [B].
    """

    def __init__(self, ring: RareRing, detector: RareDetector | ScoreDetector, *, encoder: nn.Module | None = None,
                 masks: Sequence[Any] | None = None, images: Sequence[Any] | None = None,
                 amp: Any = None) -> None:
        if ring.batch_size is None:
            raise ValueError("Replay needs a ring in tail mode: build it with batch_size=B")
        self.ring, self.detector, self.encoder = ring, detector, encoder
        self.masks, self.images = masks, images
        self.amp = amp if amp is not None else contextlib.nullcontext()
        self.B = B = ring.batch_size
        device = ring.state.device
        self.ids = torch.zeros(B, dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.scores = torch.zeros(B, device=device)
        self.slots = torch.full((B,), -1, dtype=torch.int32, device=device)

    @classmethod
    def build(cls, mode: str, *, capacity: int, batch_size: int, global_size: int, local_size: int,
              local_crops_number: int, dtype: torch.dtype, device: torch.device, detector: DetectorConfig,
              source: str = "teacher", embed_dim: int, frozen_weights: str | None = None,
              masks: Sequence[Any] | None = None, images: Sequence[Any] | None = None, amp: Any = None) -> Replay:
        """The replay of a run.

        Args:
            mode: ``ood``, ``random`` or ``oracle`` (see the module docstring).
            capacity: C, images in the ring; batch_size: B, images staged per step.
            global_size, local_size, local_crops_number: the crops (2 global views + the local ones).
            dtype, device: of the crops.
            detector: the metric, percentile and threshold mode (its ``rate`` also sets the random
                and oracle modes' nominal flag rate).
            source: ``teacher`` (the teacher's backbone features, ``embed_dim`` wide) or ``frozen``
                (a frozen ResNet-50 from ``frozen_weights``; ood mode only).
            masks, images: the dataset's paths, for oracle mode.

        Raises:
            ValueError: an unknown mode or source, or ``frozen`` without weights.
        """
        if source not in DETECTOR_SOURCES:
            raise ValueError(f"detector source must be one of {DETECTOR_SOURCES}, got {source!r}")
        ring = RareRing.for_multicrop(capacity, global_size=global_size, local_crops_number=local_crops_number,
                                      local_size=local_size, batch_size=batch_size, dtype=dtype, device=device)
        encoder = None
        if mode == "random":
            det: RareDetector | ScoreDetector = RandomDetector(detector.rate, device=device)
        elif mode == "oracle":
            det = OracleDetector(batch_size, DEFAULT_RARE_TAU, detector.rate, device=device)
        elif mode == "ood":
            dim = embed_dim
            if source == "frozen":
                if not frozen_weights:
                    raise ValueError(FROZEN_WEIGHTS_HELP)
                from oodfast.encoders import load_encoder

                encoder, dim = load_encoder(frozen_weights, FROZEN_ARCH, device), FROZEN_DIM
            det = RareDetector(dim, detector, device=device)
        else:
            raise ValueError(f"replay mode must be ood, random or oracle, got {mode!r}")
        return cls(ring, det, encoder=encoder, masks=masks, images=images, amp=amp)

    # ---- what the model sees -------------------------------------------------------------------

    def views(self) -> list[torch.Tensor]:
        """Per view, the staged batch followed by the ring, [B + C, *crop] (persistent tensors)."""
        return self.ring.views()

    def stage(self, views: Sequence[torch.Tensor], index: torch.Tensor, boxes: torch.Tensor | None = None) -> None:
        """Copy a loader batch (``views`` each [B, *crop], global first; ``index`` int64 [B]) into the
        staging rows; oracle mode also reads its true rare shares from the masks (``boxes``
        [B, n_global, 4], needed then)."""
        if isinstance(self.detector, OracleDetector):
            if boxes is None:
                raise ValueError("the oracle replay needs the batch's crop boxes")
            shares = [rare_shares(read_mask(self.masks[int(i)], self.images[int(i)]), b.numpy()).max()
                      for i, b in zip(index, boxes[:, :2])]
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

    @torch.no_grad()
    def embed(self, globals_: Sequence[torch.Tensor], teacher: nn.Module | None = None) -> torch.Tensor:
        """Detector embeddings [2, B, D] (fp32) of the first B rows of the two global views: the frozen
        encoder's, else ``teacher.forward_backbone``'s (needed then)."""
        rows = [g[: self.B] for g in globals_]
        with self.amp:
            if self.encoder is not None:
                feats = self.encoder(torch.cat(rows))
            else:
                if teacher is None:
                    raise ValueError("Replay.embed: the teacher detector needs the teacher module")
                feats = teacher.forward_backbone(rows)
        return feats.float().view(2, self.B, -1)

    def step_features(self, teacher_feats: torch.Tensor) -> torch.Tensor:
        """The staged batch's detector embeddings [2, B, D] in a training step: the frozen encoder's own,
        else the rows [0, B) of the teacher's backbone features ``teacher_feats`` [2 (B + C), D] from
        that step's forward (random and oracle modes ignore them)."""
        if self.encoder is not None:
            return self.embed(self.views()[:2])
        return teacher_feats.float().view(2, self.B + self.ring.capacity, -1)[:, : self.B]

    # ---- score, enqueue, copy -------------------------------------------------------------------

    def add_(self, emb: torch.Tensor, *, skipped: torch.Tensor | None = None,
             detector: RareDetector | ScoreDetector | None = None) -> None:
        """Score the staged images' embeddings ``emb`` [2, B, D], enqueue the flagged ones and copy all
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

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Fit the detector's statistics and threshold on calibration embeddings ``features`` [n, D]
        (a no-op for the random and oracle modes)."""
        if not isinstance(self.detector, RareDetector):
            return
        self.detector.fit(features)
        c = self.detector.config
        log.info("calibrated %s on %d embeddings: threshold %.4f (%.2f percentile)", c.metric, features.shape[0],
                 float(self.detector.threshold), c.percentile)

    @torch.no_grad()
    def warm_up(self, batches: Iterable[Any], *, teacher: nn.Module | None = None,
                refill: Callable[[], Iterable[Any]] | None = None) -> None:
        """Fill the ring before training, as the paper does: stage each of ``batches`` (loader batches
        with ``views``, ``index``, ``boxes``) and add its flagged images until the ring is full; if one
        pass does not find enough, top it up with random images from fresh passes of ``refill()``."""
        for batch in batches:
            if self.ring.is_full():
                break
            self.stage(batch.views, batch.index, batch.boxes)
            self.add_(self.embed(self.views()[:2], teacher))
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
