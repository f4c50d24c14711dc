"""Representation quality of a frozen encoder: DINO's weighted kNN and a linear probe on crop labels.

The paper never evaluated whether replaying rare images improves the learned representation. This
module measures it on any BDD10K-layout dataset with segmentation masks (synthdrive or real):

1. Crops (:mod:`oodfast.evaluate.features`). Each image gets ``crops_per_image`` boxes drawn with
   torchvision's RandomResizedCrop algorithm (:func:`oodfast.data.crops.sample_resized_crop_boxes`)
   from a generator seeded by ``(crop_seed, image position)``, so the crops are a pure function of
   the file list and the seed. Each box is cut and resized (bicubic) with PIL and
   ImageNet-normalised: no flip, no colour augmentation.
2. Labels per crop from the mask (:func:`oodfast.evaluate.labels.crop_labels`): the dominant class
   (most frequent train ID in the box, ignore pixels excluded) and rare presence (rare-class pixel
   share >= tau, the same ground truth as ``oodfast evaluate detect``).
3. Frozen features (:func:`oodfast.evaluate.features.extract_features`): the encoder in eval mode
   under ``torch.inference_mode``: a ResNet's pooled features, a ViT's [CLS] embedding (the
   backbone output ``eval_knn.py`` uses).
4. Probes (:mod:`oodfast.evaluate.probes`): DINO's weighted kNN (:func:`knn_votes` /
   :func:`knn_classify`, T = 0.07, k = 20 or each k of ``nb_knn``, as ``eval_knn.py --nb_knn``) and
   a linear probe (:func:`linear_probe_logits`) trained on standardised train-split features,
   evaluated on the test split, for both tasks. The dominant-class probe is plain cross-entropy
   (DINO's linear evaluation); the rare-presence probe is class-balanced, since at a prevalence
   near 12% an unweighted probe answers "absent" everywhere.
5. Accuracy overall and for head / middle / tail classes by pixel frequency
   (:func:`oodfast.evaluate.bands.frequency_bands`,
   :func:`oodfast.evaluate.probe_metrics.per_band_accuracy`); for rare presence accuracy, balanced
   accuracy and the threshold-free AUROC of the kNN vote share and of the probe's logit margin
   (:func:`binary_accuracy`); means and 95% t-intervals over the linear probe's seeds
   (:func:`mean_interval`).

This module runs the whole evaluation (:func:`evaluate_representation`) and writes its report
(:func:`representation_markdown`); the steps' names are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from oodfast.data.classes import CLASS_NAMES, NUM_CLASSES, RARE_CLASS_IDS
from oodfast.data.crops import DEFAULT_RARE_TAU
from oodfast.data.discover import DatasetFiles
from oodfast.evaluate.bands import (
    BAND_RULE,
    BANDS,
    HEAD_CUMULATIVE_SHARE,
    TAIL_CLASS_SHARE,
    frequency_bands,
    share_array,
)
from oodfast.evaluate.features import EVAL_CROP_SCALE, extract_features
from oodfast.evaluate.labels import class_pixel_share, crop_labels
from oodfast.evaluate.probe_metrics import binary_accuracy, mean_interval, per_band_accuracy
from oodfast.evaluate.probes import PROBE_C, PROBE_MAX_ITER, knn_classify, knn_votes, linear_probe, linear_probe_logits

log = logging.getLogger(__name__)

__all__ = [
    "BANDS",
    "EVAL_CROP_SCALE",
    "HEAD_CUMULATIVE_SHARE",
    "TAIL_CLASS_SHARE",
    "binary_accuracy",
    "class_pixel_share",
    "crop_labels",
    "evaluate_representation",
    "extract_features",
    "frequency_bands",
    "knn_classify",
    "knn_votes",
    "linear_probe",
    "linear_probe_logits",
    "mean_interval",
    "per_band_accuracy",
    "representation_markdown",
]


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _summarise(runs: Sequence[Mapping[str, Any]], confidence: float) -> dict[str, Any]:
    """Metric dicts of several seeds -> one dict of {mean, low, high, values, n} per float metric."""
    flats = [_flatten(r) for r in runs]
    summary: dict[str, Any] = {}
    for key in flats[0]:
        if key.endswith((".n", ".classes")) or key in ("n", "prevalence"):
            summary[key] = flats[0][key]  # counts: the same for every seed
        else:
            summary[key] = mean_interval([f[key] for f in flats], confidence, bounds=(0.0, 1.0))
    return summary


def _tasks(train_y: Mapping[str, np.ndarray],
           test_y: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """The two probe tasks: name -> (train rows kept [N] bool, train targets [N] int64, test rows kept,
    test targets, number of classes). ``dominant`` drops crops that are all ignore pixels."""
    keep_tr, keep_te = train_y["dominant"] >= 0, test_y["dominant"] >= 0
    all_tr, all_te = np.ones(len(keep_tr), bool), np.ones(len(keep_te), bool)
    return {
        "dominant": (keep_tr, train_y["dominant"], keep_te, test_y["dominant"], NUM_CLASSES),
        "rare_present": (all_tr, train_y["rare_present"].astype(np.int64), all_te,
                         test_y["rare_present"].astype(np.int64), 2),
    }


def _probe_task(
    task: str, x_tr: torch.Tensor, y_tr: np.ndarray, x_te: torch.Tensor, y_te: np.ndarray, n_classes: int,
    bands: Mapping[int, str], *, seeds: Sequence[int], ks: Sequence[int], primary: int, T: float,
    probe: Mapping[str, Any], confidence: float, device: str | torch.device, say: Callable[[str], None],
) -> dict[str, Any]:
    """One task's kNN and linear-probe metrics (the ``dominant`` / ``rare_present`` entry of the report).

    Args:
        x_tr, x_te: features [N, D] / [M, D] of the task's train and test rows; y_tr, y_te: targets [N] / [M].
        ks: the kNN's k values (each capped at N); primary: the one whose metrics fill ``knn``.
        probe: :func:`linear_probe_logits` keywords (C, max_iter, device).
    """
    if len(y_tr) == 0 or len(y_te) == 0:
        raise ValueError(f"task {task}: no labelled crops in the {'train' if len(y_tr) == 0 else 'test'} "
                         "split (every crop is ignore pixels); check the masks")

    def score(out: np.ndarray) -> dict[str, Any]:
        """kNN vote shares or probe logits [M, C] -> the task's metrics."""
        pred = out.argmax(axis=1)
        if task == "dominant":
            return per_band_accuracy(pred, y_te, bands)
        return binary_accuracy(pred, y_te, scores=out[:, 1] - out[:, 0])

    used = {k: min(k, len(y_tr)) for k in ks}
    for k, k_used in used.items():
        if k_used < k:
            log.warning("task %s: only %d train crops, kNN uses k=%d instead of %d", task, len(y_tr), k_used, k)
    distinct = sorted(set(used.values()))
    say(f"{task}: kNN (k={','.join(map(str, distinct))}, T={T}) and linear probe x {len(seeds)} seeds")
    # One kNN per distinct k actually used (several requested k may cap to the same one), as eval_knn.py.
    at = {k: score(knn_votes(x_tr, y_tr, x_te, k=k, T=T, num_classes=n_classes, device=device)) for k in distinct}
    by_k = {str(k): at[used[k]] for k in ks}
    weighting = None if task == "dominant" else "balanced"
    runs = [score(linear_probe_logits(x_tr, y_tr, x_te, seed=int(s), num_classes=n_classes,  # type: ignore[arg-type]
                                      class_weight=weighting, **probe))
            for s in seeds]
    return {"knn": by_k[str(primary)], "knn_k": used[primary], "knn_by_k": by_k,
            "knn_k_used": {str(k): used[k] for k in ks}, "linear": _summarise(runs, confidence),
            "linear_class_weight": weighting}


def _knn_ks(k: int, nb_knn: Sequence[int] | None) -> tuple[tuple[int, ...], int]:
    """(the k values in the order given, duplicates dropped; the primary k). ValueError naming a bad one."""
    ks = tuple(dict.fromkeys(int(v) for v in (nb_knn if nb_knn is not None else (k,))))
    if not ks:
        raise ValueError("nb_knn must name at least one k (DINO's default: 10 20 100 200)")
    for v in ks + (int(k),):
        if v < 1:
            raise ValueError(f"each kNN k must be >= 1, got {v}")
    return ks, (int(k) if int(k) in ks else ks[0])


def evaluate_representation(
    encoder: nn.Module,
    train_files: DatasetFiles,
    test_files: DatasetFiles,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    crops_per_image: int = 8,
    size: int = 224,
    scale: tuple[float, float] = EVAL_CROP_SCALE,
    crop_seed: int = 0,
    rare_ids: Iterable[int] = RARE_CLASS_IDS,
    tau: float = DEFAULT_RARE_TAU,
    class_share: Mapping[str, float] | Sequence[float] | np.ndarray | None = None,
    k: int = 20,
    nb_knn: Sequence[int] | None = None,
    T: float = 0.07,
    probe_C: float = PROBE_C,
    probe_max_iter: int = PROBE_MAX_ITER,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | None = None,
    confidence: float = 0.95,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of a frozen encoder on crop labels, by frequency band.

    Features of the train and test splits are extracted once (:func:`extract_features`, crop seed
    ``crop_seed``). Two tasks: ``dominant`` (19-way dominant class; crops whose pixels are all
    ignore are dropped) and ``rare_present`` (binary; the probe is class-balanced and AUROC is
    reported beside the accuracies). For each task: DINO's weighted kNN (temperature T, for each
    k of ``nb_knn`` as ``eval_knn.py --nb_knn``, default just ``k``; deterministic: one value, no
    interval) and the linear probe once per seed in ``seeds``,
    summarised as mean and a two-sided Student-t ``confidence`` interval over the seeds
    (:func:`mean_interval`, clipped to [0, 1]; None with a single seed). The probe is scikit-learn's
    L-BFGS logistic regression, convex and deterministic: every seed gives the same probe, so the
    interval has zero width. It covers neither the crop sampling nor the pretraining seed: compare
    checkpoints of several training seeds for that.

    Bands come from ``class_share`` (per-class pixel shares, e.g. synthdrive's manifest) or, when
    None, from the train split's masks (:func:`class_pixel_share`), by :func:`frequency_bands`.

    Returns:
        ``config`` (the arguments), ``band_rule`` (text), ``bands`` (class name -> band),
        ``class_pixel_share`` (class name -> share), ``n_train`` / ``n_test`` (crops),
        ``rare_prevalence`` (``train`` / ``test``: share of rare-present crops), and for each task
        ``dominant`` / ``rare_present``: ``knn`` (a metric dict: :func:`per_band_accuracy` for
        ``dominant``, :func:`binary_accuracy` for ``rare_present``) and ``linear`` (the same metric
        names flattened with dots, e.g. ``"tail.accuracy"``, each ``{mean, low, high, values, n}``;
        counts stay plain ints), with ``knn_k`` (the k used: min(k, train rows)) and
        ``linear_class_weight`` (None or ``"balanced"``). ``knn`` is the result of ``k`` (of the
        first of ``nb_knn`` when ``k`` is not among them); ``knn_by_k`` maps each requested k
        (a string, as JSON keys are) to its metric dict and ``knn_k_used`` to the k used.
    """
    if not seeds:
        raise ValueError("seeds must name at least one linear-probe seed")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    ks, primary = _knn_ks(k, nb_knn)
    rare = tuple(sorted({int(i) for i in rare_ids}))
    say = progress or (lambda msg: log.info("%s", msg))
    common = dict(crops_per_image=crops_per_image, size=size, scale=scale, seed=crop_seed, device=device,
                  batch_size=batch_size, rare_ids=rare, tau=tau, num_workers=num_workers)
    # Bands first: a bad share table fails before any feature is extracted.
    share = share_array(class_pixel_share(train_files.masks or ()) if class_share is None else class_share)
    bands = frequency_bands(share)
    say(f"extracting train features ({len(train_files)} images x {crops_per_image} crops)")
    train_x, train_y = extract_features(encoder, train_files, **common)  # type: ignore[arg-type]
    say(f"extracting test features ({len(test_files)} images x {crops_per_image} crops)")
    test_x, test_y = extract_features(encoder, test_files, **common)  # type: ignore[arg-type]

    results: dict[str, Any] = {
        "config": {"seeds": [int(s) for s in seeds], "crops_per_image": crops_per_image, "size": size,
                   "scale": list(scale), "crop_seed": crop_seed, "rare_classes": [CLASS_NAMES[i] for i in rare],
                   "tau": tau, "k": primary, "nb_knn": list(ks), "T": T, "probe": "sklearn LogisticRegression (lbfgs)",
                   "probe_C": probe_C, "probe_max_iter": probe_max_iter,
                   "confidence": confidence, "interval": "student-t over linear-probe seeds",
                   "probe_class_weight": {"dominant": None, "rare_present": "balanced"}},
        "band_rule": BAND_RULE,
        "bands": {CLASS_NAMES[c]: b for c, b in bands.items()},
        "class_pixel_share": {CLASS_NAMES[c]: float(share[c]) for c in range(NUM_CLASSES)},
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "rare_prevalence": {"train": float(train_y["rare_present"].mean()),
                            "test": float(test_y["rare_present"].mean())},
    }

    probe = dict(C=probe_C, max_iter=probe_max_iter, device=device)
    for task, (sel_tr, y_tr, sel_te, y_te, n_classes) in _tasks(train_y, test_y).items():
        x_tr, x_te = train_x[torch.from_numpy(sel_tr)], test_x[torch.from_numpy(sel_te)]
        results[task] = _probe_task(task, x_tr, y_tr[sel_tr], x_te, y_te[sel_te], n_classes, bands, seeds=seeds,
                                    ks=ks, primary=primary, T=T, probe=probe, confidence=confidence,
                                    device=device, say=say)
    return results


def representation_markdown(report: dict[str, Any], title: str = "Representation quality") -> str:
    """The report as markdown: per task, kNN and the linear probe (mean [95% interval] over seeds)."""
    from oodfast.report import markdown_table

    def fmt(entry: Any) -> str:
        if entry is None:
            return "-"
        if isinstance(entry, dict) and "mean" in entry:
            if entry["mean"] is None:
                return "-"
            if entry.get("low") is None:
                return f"{entry['mean']:.4f}"
            return f"{entry['mean']:.4f} [{entry['low']:.3f}, {entry['high']:.3f}]"
        return f"{entry:.4f}" if isinstance(entry, float) else str(entry)

    text = f"# {title}\n\nBands: {report.get('band_rule', '')}\n"
    for task in ("dominant", "rare_present"):
        if task not in report:
            continue
        res = report[task]
        # one kNN column per distinct k used (older reports: the single ``knn`` entry)
        used = res.get("knn_k_used") or {str(res["knn_k"]): res["knn_k"]}
        columns: dict[int, Mapping[str, Any]] = {}
        for requested, k_used in used.items():
            columns.setdefault(k_used, res.get("knn_by_k", {}).get(requested, res["knn"]))
        rows = []
        for key, value in sorted(res["linear"].items()):
            rows.append((key, *(fmt(_metric(knn, key)) for knn in columns.values()), fmt(value)))
        if res.get("linear_class_weight"):
            text += f"\n## {task}\n\nLinear probe trained with {res['linear_class_weight']} class weights.\n\n"
        else:
            text += f"\n## {task}\n\n"
        text += markdown_table(["metric", *(f"kNN (k={k})" for k in columns), "linear probe"], rows)
    return text


def _metric(knn: Mapping[str, Any], key: str) -> Any:
    """A flattened metric name (``"tail.accuracy"``, ``"auroc"``) looked up in a kNN metric dict."""
    group, _, metric = key.partition(".")
    if isinstance(knn.get(group), Mapping):
        return knn[group].get(metric)
    return knn.get(key, knn.get(metric))
