"""Dense rarity: score every position of a feature map; an image's score is the max over positions.

The pooled detector (:class:`oodfast.detect.RareDetector`, the paper's) scores one embedding per
image. A rare object that covers a few positions of the map (a small person, a bicycle, a sign) is
averaged away by the pooling, so the pooled score cannot see it. :class:`DenseRareDetector` scores
each position against statistics of calibration positions instead, and flags an image when any of
its positions is rare.

No copy on the hot path. A ResNet run in ``channels_last`` memory produces a [B, D, h, w] map stored
as [B, h, w, D]; :func:`position_view` reinterprets it as [P = h*w, B, D] with rows contiguous in D
(strides (D, P*D, 1)), which is exactly the "views" axis of :func:`oodfast.kernels.rare_enqueue.rare_score`
and of the fused ring enqueue (any view / row strides): the max over positions happens inside the
kernel. A ViT's patch tokens [B, N, D] give [N, B, D] the same way. kNN scores the [B*P, D] rows
(a view of the same memory) with :func:`oodfast.kernels.knn_score.knn_score`, then the max over P.

Calibration, as the pooled detectors: statistics over all calibration positions (the mean, the
Ledoit-Wolf precision with out-of-fold image scores, or a kNN bank), calibration image scores = the
max over positions, threshold = their ``percentile`` (``torch.nanquantile``), the same online mode.

kNN bank (PatchCore, Roth et al. 2022, "Towards total recall in industrial anomaly detection"): the
calibration maps hold n*P positions (256 images x 196 = 50k); the bank keeps a greedy k-center
coreset of ``coreset`` of them (:func:`greedy_k_center`). Since the bank holds only part of the
calibration positions, in-sample image scores would mix zero-distance (selected) and non-zero
positions; the threshold comes from held-out images instead: the bank is built from a seeded 80% of
the calibration images and the threshold from the scores of the other 20% (``fit`` returns those).
"""

from __future__ import annotations

import math

import torch

from oodfast.buffer import RareRing
from oodfast.detect import DetectorConfig, RareDetector

#: Rows the k-center search compares in, as PatchCore: a random projection keeps distances to within
#: a few percent (Johnson-Lindenstrauss) at a fraction of the cost for D = 1024-2048.
PROJECTION_DIM = 128
#: Share of the calibration images a kNN detector holds out to set its threshold.
HOLDOUT = 0.2


def position_view(fmap: torch.Tensor) -> torch.Tensor:
    """A feature map as its positions: a [P, B, D] view of ``fmap``, rows contiguous in D, no copy.

    Args:
        fmap: a [B, D, h, w] map in ``channels_last`` memory (what a ResNet moved with
            ``.to(memory_format=torch.channels_last)`` produces; P = h*w, position p = i*w + j), or a
            ViT's patch tokens [B, N, D] (P = N).

    Raises:
        ValueError: another rank, or a map whose D is not the innermost (contiguous) dimension, e.g.
            a contiguous NCHW map (the message says how to get channels_last).
    """
    if not isinstance(fmap, torch.Tensor) or fmap.dim() not in (3, 4):
        raise ValueError(f"fmap must be a [B, D, h, w] feature map or [B, N, D] tokens, got "
                         f"{list(getattr(fmap, 'shape', [])) or type(fmap).__name__}")
    if fmap.dim() == 3:
        if fmap.shape[-1] > 1 and fmap.stride(-1) != 1:
            raise ValueError(f"tokens [B, N, D] must be contiguous in D (stride(-1) == 1), got strides "
                             f"{fmap.stride()}; call .contiguous()")
        return fmap.transpose(0, 1)
    B, D, h, w = fmap.shape
    if D > 1 and fmap.stride(1) != 1:
        raise ValueError(f"fmap [B, D, h, w] = {list(fmap.shape)} is not channels_last (strides {fmap.stride()}, "
                         "D not innermost): run the backbone on .to(memory_format=torch.channels_last) input "
                         "or pass fmap.contiguous(memory_format=torch.channels_last)")
    try:
        return fmap.permute(2, 3, 0, 1).view(h * w, B, D)
    except RuntimeError:
        raise ValueError(f"fmap {list(fmap.shape)} with strides {fmap.stride()}: its h and w positions do not "
                         "form one stride; pass fmap.contiguous(memory_format=torch.channels_last)") from None


@torch.no_grad()
def greedy_k_center(x: torch.Tensor, m: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center coreset of the rows of ``x`` (PatchCore, Roth et al. 2022).

    Starting from a seeded random row, each step adds the row farthest (Euclidean) from every row
    chosen so far, so the chosen rows cover ``x`` with the smallest radius a greedy choice gives
    (a 2-approximation of the optimum). Rows of D > 128 are compared after a seeded Gaussian random
    projection to 128 dimensions, as PatchCore does. On x's device, m steps of one [N, 128] pass
    each, no host synchronisation inside the loop; ties go to the lowest index.

    Args:
        x: [N, D] float rows (finite).
        m: coreset size, 1 <= m <= N.
        seed: picks the first row and the projection.

    Returns:
        int64 [m] distinct row indices on x's device, in the order they were chosen.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [N, D] tensor, got {x.dtype} {list(x.shape)}")
    n, d = x.shape
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"m must be an int with 1 <= m <= N (rows, N={n}), got {m!r}")
    gen = torch.Generator().manual_seed(seed)
    z = x.float()
    if d > PROJECTION_DIM:
        proj = torch.randn(d, PROJECTION_DIM, generator=gen) / math.sqrt(PROJECTION_DIM)
        z = z @ proj.to(z.device)
    first = torch.randint(n, (1,), generator=gen).to(x.device)
    chosen = torch.empty(m, dtype=torch.int64, device=x.device)
    chosen[:1] = first
    nearest = torch.full((n,), float("inf"), device=x.device)  # squared distance to the closest chosen row
    for i in range(1, m):
        last = z.index_select(0, chosen[i - 1:i])
        torch.minimum(nearest, (z - last).pow(2).sum(1), out=nearest)
        chosen[i:i + 1] = nearest.argmax().view(1)
    return chosen


class DenseRareDetector(RareDetector):
    """Scores feature-map positions for rarity; an image's score is the max over its P positions.

    The interface, buffers and ``state_dict`` of :class:`~oodfast.detect.RareDetector` (``fit``,
    ``score``, ``enqueue``, ``flags``, ``adaptive_state``, ``threshold``, ``flag_rate``, ``fitted``,
    the online threshold), with maps in place of embeddings: ``maps`` is a [P, B, D] view from
    :func:`position_view` or a [B, D, h, w] channels_last map (viewed here; tokens [B, N, D] go through
    :func:`position_view` first, since a 3-D input is read as [P, B, D]).

    Args:
        dim: channels D of the map (see :func:`oodfast.encoders.dense_dim`).
        config: metric, percentile, online mode (:class:`~oodfast.detect.DetectorConfig`).
        coreset: kNN bank rows, a greedy k-center coreset of the calibration positions.
    """

    def __init__(self, dim: int, config: DetectorConfig | None = None, *, coreset: int = 4096,
                 device: torch.device | str | None = None):
        if isinstance(coreset, bool) or not isinstance(coreset, int) or coreset < 1:
            raise ValueError(f"coreset must be a positive int (kNN bank rows), got {coreset!r}")
        super().__init__(dim, config, device=device)
        self.coreset = coreset

    def positions(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps`` as a [P, B, D] view (see the class docstring); ValueError for a wrong shape."""
        if not isinstance(maps, torch.Tensor) or maps.dim() not in (3, 4):
            raise ValueError(f"maps must be [P, B, D] positions (position_view) or a [B, {self.dim}, h, w] "
                             f"channels_last map, got {list(getattr(maps, 'shape', [])) or type(maps).__name__}")
        x = position_view(maps) if maps.dim() == 4 else maps
        if x.shape[-1] != self.dim:
            raise ValueError(f"maps have D={x.shape[-1]} channels, the detector D={self.dim}: pass the map of "
                             "the layer it was built for (maps are [P, B, D] or [B, D, h, w])")
        if x.shape[0] < 1:
            raise ValueError(f"maps have no positions (P = 0): {list(maps.shape)}")
        return x

    # ---- calibration -------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, maps: torch.Tensor) -> torch.Tensor:
        """Fit the statistics and the threshold on calibration maps.

        Args:
            maps: [P, n, D] or [n, D, h, w] maps of the calibration images (any float dtype, device).
                Images with a non-finite value (or a position of norm > 1e18) are dropped with a warning.

        Returns:
            Calibration image scores, fp32 on the detector's device: [n_kept] (euclidean, cosine;
            mahalanobis out-of-fold), or for knn the [n_held_out] scores of the held-out images the
            threshold was set on.

        Raises:
            ValueError: a wrong shape, too few usable images (knn: too few positions for ``knn_k``),
                or scores with no finite percentile.
        """
        x = self.positions(maps)
        if self.config.metric != "knn":
            x = self._usable(x, need=2)
            self._fit_statistics(x.reshape(-1, self.dim))
            return self._set_threshold(self._calibration_scores(x))
        x = self._usable(x, need=2)
        P, n, _ = x.shape
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(x.device)
        n_hold = min(n - 1, max(1, round(HOLDOUT * n)))
        held, part = order[:n_hold], order[n_hold:]
        rows = x[:, part].reshape(-1, self.dim)
        if rows.shape[0] < self.config.knn_k:
            raise ValueError(f"knn calibration needs at least knn_k={self.config.knn_k} bank positions, got "
                             f"{rows.shape[0]} ({len(part)} images x {P} positions); lower knn_k or calibrate "
                             "on more images")
        if rows.shape[0] > self.coreset:
            rows = rows[greedy_k_center(rows, self.coreset)]
        self._fit_statistics(rows)
        return self._set_threshold(self._knn_position_scores(x[:, held]).amax(0))

    # ---- scoring and enqueueing --------------------------------------------------------------

    def _knn_position_scores(self, x: torch.Tensor) -> torch.Tensor:
        """kNN scores [P, B] of positions ``x`` [P, B, D]: one launch on the [B*P, D] rows (a view of a
        channels_last map's memory; a copy only for other layouts)."""
        from oodfast.kernels.knn_score import knn_score

        P, B, D = x.shape
        return knn_score(x.transpose(0, 1).reshape(B * P, D), self.bank, self.config.knn_k).view(B, P).T

    def position_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """Per-position rarity scores, fp32 [P, B] (position p of a map = row i*w + j), for pictures and
        evaluation; NaN for a non-finite position."""
        self._check_fitted()
        x = self.positions(maps)
        if self.config.metric == "knn":
            return self._knn_position_scores(x)
        from oodfast.kernels.rare_enqueue import rare_score

        P, B, D = x.shape
        rows = x.transpose(0, 1).reshape(B * P, D)  # [B*P, D]: 2-D, so no max over views
        return rare_score(rows, self.center, self.proj, self.coef, self.alpha, self.metric_id).view(B, P).T

    def score(self, maps: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rarity scores, fp32 [B]: the max over positions (euclidean / cosine / mahalanobis: in the
        kernel, the positions being its views axis; NaN for an image with a non-finite position)."""
        self._check_fitted()
        x = self.positions(maps)
        if self.config.metric != "knn":
            return super().score(x, out=out)
        score = self._knn_position_scores(x).amax(0)  # amax keeps NaN: a non-finite position is never flagged
        return score if out is None else out.copy_(score)

    def enqueue(self, maps: torch.Tensor, ring: RareRing, sample_ids: torch.Tensor, step: torch.Tensor,
                *, scores: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score, threshold and enqueue flagged images into ``ring`` as :meth:`RareDetector.enqueue`,
        with ``maps`` [P, B, D] / [B, D, h, w] (an image is flagged when its max over positions
        is); no host sync. Returns (scores [B], slots [B])."""
        return super().enqueue(self.positions(maps), ring, sample_ids, step, scores=scores, slots=slots)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dense, coreset={self.coreset}"


__all__ = ["DenseRareDetector", "greedy_k_center", "position_view"]
