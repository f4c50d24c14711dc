"""RareDetector: calibration statistics, thresholds and the fused score -> ring enqueue.

The paper embeds a calibration sample (256 or 1024 images) with a frozen encoder, takes the mean
embedding, and flags an image as rare when its Euclidean distance to the mean exceeds a percentile of
the calibration distances. RareDetector does that and three alternatives (``DetectorConfig.metric``):

* ``euclidean``: ||x - mu|| (the paper's).
* ``cosine``: 1 - cos(x, mu).
* ``mahalanobis``: sqrt((x - mu)^T P (x - mu)) with P the Ledoit-Wolf shrinkage precision. The paper
  dropped Mahalanobis as numerically unstable: with n = 256 calibration images in D = 2048 dimensions
  the sample covariance has rank < n and no inverse (the seed fell back to pinv). Shrinking towards
  a scaled identity (Ledoit & Wolf 2004) gives a well-conditioned P = (a S + b I)^-1, which is stored
  in the factored form P = alpha I + V^T diag(coef) V (V: the calibration set's principal axes), so
  scoring costs a [B, D] x [D, rank] product instead of a D x D one.
* ``knn``: distance of the L2-normalised x to its k-th nearest calibration embedding (Sun et al.
  2022, "Out-of-distribution detection with deep nearest neighbors"), k = 50 by default.

The threshold is a 0-d device tensor set at ``percentile`` of the calibration scores (``torch.nanquantile``,
as the seed). With ``online=True`` it then adapts on the device to hold ``target_rate`` of images
flagged while the encoder drifts (the paper's "adaptive online thresholds"): after each batch,
``threshold += lr * spread * (batch_rate - target_rate)``, a stochastic-approximation quantile tracker
(Robbins-Monro) scaled by the calibration scores' inter-decile spread so ``lr`` is unitless. The
achieved flag rate is an exponential moving average in ``flag_rate``. Nothing here synchronises with
the host after ``fit``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from oodfast.buffer import RareRing
from oodfast.kernels.rare_enqueue import METRICS, SCORE, rare_score

log = logging.getLogger(__name__)

DETECTOR_METRICS = ("euclidean", "cosine", "mahalanobis", "knn")


@dataclass(frozen=True)
class DetectorConfig:
    """How rarity is scored and thresholded. Defaults reproduce the paper (euclidean, 0.95, fixed)."""

    metric: str = "euclidean"
    percentile: float = 0.95
    knn_k: int = 50
    knn_bank_dtype: str = "auto"  # auto: bfloat16 on CUDA (the kernel's tensor-core path), float32 elsewhere
    online: bool = False
    target_rate: float | None = None  # None: 1 - percentile, the rate the calibration threshold implies
    online_lr: float = 0.05
    rate_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.metric not in DETECTOR_METRICS:
            raise ValueError(f"metric must be one of {DETECTOR_METRICS}, got {self.metric!r}")
        if not 0.0 < self.percentile < 1.0:
            raise ValueError(f"percentile must be in (0, 1), e.g. 0.95, got {self.percentile}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if self.knn_bank_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"knn_bank_dtype must be auto, float32 or bfloat16, got {self.knn_bank_dtype!r}")
        if self.target_rate is not None and not 0.0 < self.target_rate < 1.0:
            raise ValueError(f"target_rate must be in (0, 1), got {self.target_rate}")

    @property
    def rate(self) -> float:
        """The flag rate the online mode holds."""
        return 1.0 - self.percentile if self.target_rate is None else self.target_rate


def ledoit_wolf(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Ledoit-Wolf shrinkage of the covariance of ``features`` [n, D], as a factored precision.

    Shrunk covariance: (1 - s) S + s m I with S the (1/n) sample covariance, m = tr(S) / D and the
    shrinkage s from Ledoit & Wolf (2004), computed as scikit-learn's ``ledoit_wolf_shrinkage``.
    With S = V^T diag(lam) V (thin SVD of the centred data), its inverse is exactly
    ``alpha I + V^T diag(coef) V`` with alpha = 1 / b, coef = -a lam / (b (a lam + b)), a = 1 - s, b = s m.

    Returns:
        (mean [D], alpha 0-d, proj V [r, D], coef [r], shrinkage s), float64.
    """
    x = features.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
    lam = sv ** 2 / n                                    # the non-zero eigenvalues of S
    m = lam.sum() / d                                    # tr(S) / D
    s_fro2 = (lam ** 2).sum()                            # ||S||_F^2
    delta = s_fro2 / d - m ** 2                          # ||S - m I||_F^2 / D
    beta = ((xc ** 2).sum(1) ** 2).sum() / n / n / d - s_fro2 / n / d
    beta = torch.minimum(beta, delta)
    shrink = float(beta / delta) if delta > 0 else 1.0
    a, b = 1.0 - shrink, shrink * m
    # A vanishing shrinkage (n >> D) still needs b > 0 for the factored form; 1e-6 m is far below
    # any eigenvalue that matters and keeps P finite.
    b = torch.clamp(b, min=1e-6 * m.clamp_min(1e-30))
    keep = lam > lam.max() * 1e-12 if lam.numel() else lam > 0
    lam, vt = lam[keep], vt[keep]
    coef = -a * lam / (b * (a * lam + b))
    return mean, 1.0 / b, vt, coef, shrink


#: Calibration rows beyond this norm are dropped: squared distances between such rows overflow fp32.
_MAX_NORM = 1e18


class RareDetector(nn.Module):
    """Scores embeddings for rarity and feeds the flagged images into a :class:`RareRing`.

    Buffers (all in ``state_dict``): ``center`` [D], ``proj`` [r, D], ``coef`` [r], ``alpha`` 0-d,
    ``bank`` [N, D] (knn), ``threshold`` 0-d, ``spread`` 0-d, ``flag_rate`` 0-d.

    Args:
        dim: embedding size D (2048 for ResNet-50).
        config: metric, percentile, online mode.
    """

    def __init__(self, dim: int, config: DetectorConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__()
        self.dim = dim
        self.config = config or DetectorConfig()
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("center", torch.zeros(dim, **f32))
        self.register_buffer("proj", torch.zeros(0, dim, **f32))
        self.register_buffer("coef", torch.zeros(0, **f32))
        self.register_buffer("alpha", torch.ones((), **f32))
        self.register_buffer("bank", torch.zeros(0, dim, **f32))
        self.register_buffer("threshold", torch.full((), float("inf"), **f32))
        self.register_buffer("spread", torch.ones((), **f32))
        self.register_buffer("flag_rate", torch.full((), self.config.rate, **f32))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        self._fitted = False  # host mirror of ``fitted``: checking it must not synchronise with the device
        self._knn_scores = torch.zeros(0, **f32)  # scratch for knn scores, reused between calls

    @property
    def metric_id(self) -> int:
        return SCORE if self.config.metric == "knn" else METRICS[self.config.metric]

    # ---- calibration -------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> torch.Tensor:
        """Fit the statistics and the threshold on calibration embeddings.

        Args:
            features: [n, D] embeddings of the calibration images (any float dtype, any device).
                Rows with non-finite values, or of a magnitude whose squared distances overflow fp32
                (norm > 1e18), are dropped with a warning.

        Returns:
            The calibration scores [n_kept] (fp32, on the detector's device).

        Raises:
            ValueError: wrong shape, too few usable rows for the metric, or calibration scores with no
                finite percentile (e.g. all-zero embeddings under cosine).
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape [n, {self.dim}], got {list(features.shape)}")
        knn = self.config.metric == "knn"
        x = self._usable(features, need=self.config.knn_k + 1 if knn else 2)
        self._fit_statistics(x)
        if knn:
            # The calibration images are in the bank: each one's nearest neighbour is itself, so its
            # score is the distance to its (k + 1)-th neighbour.
            from oodfast.kernels.knn_score import knn_score

            scores = knn_score(x, self.bank, self.config.knn_k + 1)
        else:
            scores = self._calibration_scores(x)
        return self._set_threshold(scores)

    def _usable(self, features: torch.Tensor, need: int) -> torch.Tensor:
        """The calibration images of ``features`` ([n, D], or [V, n, D]: V rows per image) that can be
        used, fp32 on the detector's device: an image with a non-finite value, or a row of norm > 1e18,
        is dropped with a warning. Raises ValueError when fewer than ``need`` images are left."""
        rows = features if features.dim() == 3 else features.unsqueeze(0)
        finite = torch.isfinite(rows).all(-1).all(0)
        if not finite.all():
            log.warning("fit: dropping %d calibration embeddings with non-finite values", int((~finite).sum()))
            rows = rows[:, finite]
        norms = torch.linalg.vector_norm(rows.double(), dim=-1).amax(0) if rows.numel() else rows.new_zeros(0)
        huge = norms > _MAX_NORM
        if huge.any():
            log.warning("fit: dropping %d calibration embeddings of norm > %.0e (their distances overflow fp32; "
                        "largest %.3g): check the encoder", int(huge.sum()), _MAX_NORM, float(norms.max()))
            rows = rows[:, ~huge]
        n = rows.shape[1]
        if n < need:
            raise ValueError(f"{self.config.metric} calibration needs at least {need} finite embeddings, got {n}"
                             + ("; lower knn_k or calibrate on more images" if self.config.metric == "knn" else ""))
        x = rows.to(self.center.device, torch.float32)
        return x if features.dim() == 3 else x[0]

    def _fit_statistics(self, x: torch.Tensor) -> None:
        """The metric's statistics from calibration rows ``x`` [N, D] fp32: the centre (euclidean,
        cosine), the Ledoit-Wolf factors (mahalanobis) or the normalised bank (knn)."""
        dev = self.center.device
        metric = self.config.metric
        if metric == "cosine":
            mean = x.double().mean(0)
            self.center.copy_(mean / mean.norm().clamp_min(1e-12))
        elif metric == "mahalanobis":
            mu, alpha, proj, coef, shrink = ledoit_wolf(x)
            log.info("mahalanobis: Ledoit-Wolf shrinkage %.3f, rank %d", shrink, proj.shape[0])
            self.center.copy_(mu)
            self.alpha.fill_(float(alpha))
            self.proj = proj.to(dev, torch.float32).contiguous()
            self.coef = coef.to(dev, torch.float32).contiguous()
        elif metric == "knn":
            dtype = self.config.knn_bank_dtype
            if dtype == "auto":  # bf16 halves the bank traffic and runs on tensor cores (similarities to ~1e-3)
                dtype = "bfloat16" if x.device.type == "cuda" else "float32"
            self.bank = nn.functional.normalize(x.float(), dim=1).to(getattr(torch, dtype)).contiguous()
        else:
            self.center.copy_(x.double().mean(0))

    def _calibration_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Calibration scores [n] of ``x`` [n, D] or [V, n, D] (max over V) for euclidean / cosine
        (in-sample) and mahalanobis (out-of-fold)."""
        if self.config.metric == "mahalanobis":
            return self._cross_fitted_mahalanobis(x)
        return rare_score(x, self.center, self.proj, self.coef, self.alpha, self.metric_id)

    def _set_threshold(self, scores: torch.Tensor) -> torch.Tensor:
        """Threshold at ``percentile`` of the calibration ``scores`` [n] (``torch.nanquantile``), the
        inter-decile spread the online mode scales its steps by, and the fitted flag; returns ``scores``."""
        threshold = float(torch.nanquantile(scores, self.config.percentile))
        if not math.isfinite(threshold):
            raise ValueError(f"{self.config.metric} calibration gave no finite score ({int(torch.isfinite(scores).sum())} "
                             f"of {scores.numel()} finite): check the calibration embeddings (all zero? an encoder "
                             "that outputs constants?)")
        self.threshold.fill_(threshold)
        q10, q90 = torch.nanquantile(scores, torch.tensor([0.1, 0.9], device=scores.device))
        self.spread.fill_(float((q90 - q10).clamp_min(1e-6)))
        self.flag_rate.fill_(self.config.rate)
        self.fitted.fill_(True)
        self._fitted = True
        return scores

    def _cross_fitted_mahalanobis(self, x: torch.Tensor, folds: int = 5) -> torch.Tensor:
        """Out-of-fold calibration scores of ``x`` [n, D] (or [V, n, D]: V rows per image, the max
        scored): each fold of images scored with statistics fitted without it.

        With fewer calibration images than dimensions (256 in 2048), the calibration set lies in the
        span of its own principal axes, where the shrinkage precision is smallest: in-sample scores
        are biased low, and a threshold set on them flags almost every new image. Scoring each fold
        with statistics from the other folds removes that bias (the final statistics use all images).
        Folds split images, never the rows of one image.
        """
        n, d = x.shape[-2:]
        folds = max(2, min(folds, n // 2))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(x.device)
        scores = torch.empty(n, dtype=torch.float32, device=x.device)
        for part in order.tensor_split(folds):
            keep = torch.ones(n, dtype=torch.bool, device=x.device)
            keep[part] = False
            mu, alpha, proj, coef, _ = ledoit_wolf(x[..., keep, :].reshape(-1, d))
            f32 = dict(dtype=torch.float32, device=x.device)
            scores[part] = rare_score(x[..., part, :].contiguous(), mu.to(**f32), proj.to(**f32).contiguous(),
                                      coef.to(**f32), alpha.to(**f32).reshape(()), self.metric_id)
        return scores

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # proj, coef and bank change shape with the calibration: adopt the checkpoint's shapes.
        for name in ("proj", "coef", "bank"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.center.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "fitted" in state_dict:
            self._fitted = bool(state_dict[prefix + "fitted"])  # once, at load time

    # ---- scoring and enqueueing --------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("RareDetector is not calibrated: call fit(calibration_embeddings) first")

    def score(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rarity scores, fp32 [B], of embeddings ``x`` [B, D] or [V, B, D] (max over the V views)."""
        self._check_fitted()
        if self.config.metric != "knn":
            return rare_score(x, self.center, self.proj, self.coef, self.alpha, self.metric_id, out=out)
        from oodfast.kernels.knn_score import knn_score

        per_view = [knn_score(v, self.bank, self.config.knn_k) for v in (x if x.dim() == 3 else x.unsqueeze(0))]
        score = torch.stack(per_view).amax(0)
        return score if out is None else out.copy_(score)

    def enqueue(self, x: torch.Tensor, ring: RareRing, sample_ids: torch.Tensor, step: torch.Tensor,
                *, scores: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score, threshold, and enqueue flagged images into ``ring``'s metadata; no host sync.

        Args:
            x: embeddings [B, D] or [V, B, D] (V views per image: flagged when any view is).
            ring: the buffer whose metadata and state advance.
            sample_ids: int64 [B] ids stored with each enqueued image.
            step: 0-d int64 device tensor, stored with each enqueued image.
            scores, slots: optional preallocated outputs (fp32 [B], int32 [B]).

        Returns:
            (scores [B], slots [B]): ``slots[b]`` is the ring slot image b was written to, or -1.
            Pass ``slots`` to ``ring.write`` to copy the crops.
        """
        self._check_fitted()
        B = x.shape[-2]
        scores = torch.empty(B, dtype=torch.float32, device=x.device) if scores is None else scores
        slots = torch.empty(B, dtype=torch.int32, device=x.device) if slots is None else slots
        if self.config.metric == "knn":
            self.score(x, out=scores)
            x_in = scores.unsqueeze(1)
        else:
            x_in = x
        ring.enqueue(x_in, self.center, self.proj, self.coef, self.alpha, self.threshold, sample_ids, step,
                     scores, slots, self.metric_id)
        self._track_rate(scores)
        return scores, slots

    def adaptive_state(self) -> list[torch.Tensor]:
        """The tensors an enqueue changes (``threshold``, ``flag_rate``), for a caller that must be able
        to put them back (a skipped training step)."""
        return [self.threshold, self.flag_rate]

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [B]: which scores the current threshold flags (NaN never)."""
        return scores > self.threshold  # NaN compares False

    @torch.no_grad()
    def _track_rate(self, scores: torch.Tensor) -> None:
        finite = ~torch.isnan(scores)
        rate = self.flags(scores).sum() / finite.sum().clamp_min(1)
        self.flag_rate.lerp_(rate.to(self.flag_rate.dtype), 1.0 - self.config.rate_momentum)
        if self.config.online:
            self.threshold.add_(self.config.online_lr * self.spread * (rate - self.config.rate))

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, metric={c.metric}, percentile={c.percentile}, online={c.online}"


class ScoreDetector(nn.Module):
    """Flags images whose given score exceeds a fixed threshold, through the same fused enqueue as
    :class:`RareDetector` (metric ``score``). The ablations are built on it, so they differ from the
    OOD run only in which images enter the buffer:

    * :class:`RandomDetector`: uniform random scores (replay without detection);
    * :class:`OracleDetector`: the true rare-pixel share of each image (the best a detector could do).
    """

    def __init__(self, threshold: float, rate: float, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold), device=device))
        self.register_buffer("flag_rate", torch.tensor(float(rate), device=device))
        # The "score" metric reads no statistics; these placeholders only satisfy the op's signature.
        z = dict(device=device)
        self._no_stats = (torch.zeros(1, **z), torch.zeros(0, 1, **z), torch.zeros(0, **z), torch.ones((), **z))

    def scores_for(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [B, 1] scores for the batch ``x`` stands for ([B, ...] or [V, B, ...])."""
        raise NotImplementedError

    def adaptive_state(self) -> list[torch.Tensor]:
        """The tensors an enqueue changes (``threshold``, ``flag_rate``), for a caller that must be able
        to put them back (a skipped training step)."""
        return [self.threshold, self.flag_rate]

    def enqueue(self, x: torch.Tensor, ring: RareRing, sample_ids: torch.Tensor, step: torch.Tensor,
                *, scores: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`RareDetector.enqueue`, with :meth:`scores_for` as the score."""
        B = x.shape[-2]
        scores = torch.empty(B, dtype=torch.float32, device=x.device) if scores is None else scores
        slots = torch.empty(B, dtype=torch.int32, device=x.device) if slots is None else slots
        center, proj, coef, alpha = self._no_stats
        ring.enqueue(self.scores_for(x), center, proj, coef, alpha, self.threshold, sample_ids, step, scores, slots,
                     SCORE)
        with torch.no_grad():
            self.flag_rate.lerp_((scores > self.threshold).float().mean(), 0.01)
        return scores, slots


class RandomDetector(ScoreDetector):
    """The replay ablation: flags each image with probability ``rate``, whatever its embedding (a
    uniform random score against the threshold ``1 - rate``)."""

    def __init__(self, rate: float, *, device: torch.device | str | None = None) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        super().__init__(1.0 - rate, rate, device=device)
        self.rate = rate

    def scores_for(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[-2], 1, device=x.device)


class OracleDetector(ScoreDetector):
    """The upper bound: flags an image when the rare-pixel share of either global crop, read from the
    masks, reaches ``tau``. The caller writes the shares of the staged batch into :attr:`shares`.

    ``matched=True`` holds the flag rate at ``rate`` (the random and OOD arms' rate) instead of the
    data's prevalence, so the arms differ in which images enter the buffer and not in how fast it
    turns over: each truly rare image is flagged with probability ``min(1, rate / prevalence)``,
    ``prevalence`` a running mean of the batches' truly-rare share (the plain mean over the first 100
    batches, then an exponential one). The score is ``1 - u * prevalence / rate`` (u uniform) for a
    rare image and -1 otherwise, against the threshold 0; all on the device, no host read.
    """

    def __init__(self, batch_size: int, tau: float, rate: float, *, matched: bool = False,
                 device: torch.device | str | None = None) -> None:
        if matched and not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1) for the matched oracle, got {rate}")
        super().__init__(0.0 if matched else tau, rate, device=device)
        if not matched:  # share >= tau flags, the op compares score > threshold: nudge the threshold below tau
            self.threshold.copy_(torch.nextafter(self.threshold, torch.zeros_like(self.threshold)))
        self.tau, self.rate, self.matched = float(tau), float(rate), matched
        self.register_buffer("shares", torch.zeros(batch_size, 1, device=device), persistent=False)
        if matched:  # checkpointed with the run; the plain oracle's checkpoint keys stay as they were
            self.register_buffer("prevalence", torch.zeros((), device=device))
            self.register_buffer("batches", torch.zeros((), device=device))

    def adaptive_state(self) -> list[torch.Tensor]:
        extra = [self.prevalence, self.batches] if self.matched else []
        return super().adaptive_state() + extra

    def scores_for(self, x: torch.Tensor) -> torch.Tensor:
        if not self.matched:
            return self.shares
        rare = self.shares >= self.tau
        with torch.no_grad():
            self.batches.add_(1.0)
            self.prevalence.lerp_(rare.float().mean(), torch.clamp(1.0 / self.batches, min=0.01))
        u = torch.rand_like(self.shares)
        return torch.where(rare, 1.0 - u * self.prevalence / self.rate, -1.0)
