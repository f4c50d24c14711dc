"""A per-patch linear probe for the rare classes: is each rare class linearly readable where it is?

The pooled probes of ``evaluate represent`` ask whether an image holds a rare object; a few pixels of a
person barely move a pooled embedding, so they cannot say whether the encoder sees the object. This
probe asks it per feature-map position: one balanced logistic regression per rare class
(:func:`oodfast.evaluate.probes.linear_probe_logits`, scikit-learn) on the frozen position features,
with a position's label "holds at least one pixel of the class" from the segmentation masks. It
reports, per class, AUROC and average precision over the test positions (scikit-learn's metrics) and
the recall and precision of the probe's own decision (logit > 0).

Usage::

    maps = feature_map(encoder, x, "layer3")                # [N, D, h, w]
    table = patch_probe(train_maps, train_masks, test_maps, test_masks, RARE_CLASS_IDS)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodfast.data.classes import CLASS_NAMES
from oodfast.evaluate.probes import PROBE_C, PROBE_MAX_ITER, linear_probe_logits

#: Train positions the probes fit on at most: every position of a rare class is kept, common ones sampled.
MAX_TRAIN_POSITIONS: int = 50_000


def position_labels(masks: torch.Tensor, grid: tuple[int, int], class_ids) -> torch.Tensor:
    """bool [N, h*w, K]: position (i, j) of image n holds class ``class_ids[k]`` when any pixel of its
    cell (adaptive max pooling of the [H, W] mask onto the ``grid``) has that train ID; 255 (ignore)
    pixels hold nothing."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W] train-ID maps, got shape {tuple(masks.shape)}")
    h, w = grid
    onehot = torch.stack([masks == int(k) for k in class_ids], dim=1).float()  # [N, K, H, W]
    cells = F.adaptive_max_pool2d(onehot, (h, w)) > 0                          # [N, K, h, w]
    return cells.flatten(2).transpose(1, 2)


def _positions(maps: torch.Tensor, name: str) -> torch.Tensor:
    if maps.dim() != 4:
        raise ValueError(f"{name} must be [N, D, h, w] feature maps, got shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} holds NaN or inf; check the encoder and its weights")
    n, d, h, w = maps.shape
    return maps.detach().float().cpu().permute(0, 2, 3, 1).reshape(n * h * w, d)


def patch_probe(
    train_maps: torch.Tensor,
    train_masks: torch.Tensor,
    test_maps: torch.Tensor,
    test_masks: torch.Tensor,
    class_ids,
    *,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    max_train_positions: int = MAX_TRAIN_POSITIONS,
    seed: int = 0,
) -> dict:
    """Per rare class, a balanced linear probe on the train positions, scored on every test position.

    Args:
        train_maps, test_maps: [N, D, h, w] frozen feature maps (same D and grid).
        train_masks, test_masks: [N, H, W] train-ID masks of the same images (any H, W).
        class_ids: the classes to probe (BDD train IDs, e.g. ``RARE_CLASS_IDS``).
        C, max_iter: the probe's inverse L2 strength and L-BFGS iterations.
        max_train_positions: train positions used at most; all positions of any probed class are kept
            and the others drawn at random (``seed``) to fill the rest.

    Returns:
        ``{"grid": [h, w], "train_positions": n, "test_positions": m, "classes": {name: row}, "macro":
        {...}}``; a row holds ``train_pos``, ``test_pos``, ``auroc``, ``ap``, ``recall``, ``precision``
        (None where the class has no train or no test position: nothing to fit or to find) and
        ``prevalence`` (share of test positions holding the class). ``macro`` averages each metric over
        the classes that have one.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    class_ids = [int(k) for k in class_ids]
    if not class_ids:
        raise ValueError("class_ids is empty; name at least one class to probe")
    x_train, x_test = _positions(train_maps, "train_maps"), _positions(test_maps, "test_maps")
    if train_maps.shape[1:] != test_maps.shape[1:]:
        raise ValueError(f"train_maps {tuple(train_maps.shape)} and test_maps {tuple(test_maps.shape)} differ "
                         "in width or grid; extract both at the same layer and crop size")
    for maps, masks, name in ((train_maps, train_masks, "train_masks"), (test_maps, test_masks, "test_masks")):
        if masks.dim() != 3 or masks.shape[0] != maps.shape[0]:
            raise ValueError(f"{name} must be [N, H, W] with N = {maps.shape[0]} (one mask per map), "
                             f"got shape {tuple(masks.shape)}")
    grid = tuple(train_maps.shape[2:])
    y_train = position_labels(train_masks.cpu(), grid, class_ids).reshape(-1, len(class_ids)).numpy()
    y_test = position_labels(test_masks.cpu(), grid, class_ids).reshape(-1, len(class_ids)).numpy()

    rng = np.random.default_rng(seed)
    keep = y_train.any(axis=1)
    others = np.flatnonzero(~keep)
    room = max(int(max_train_positions) - int(keep.sum()), 0)
    keep[rng.choice(others, size=min(room, others.size), replace=False)] = True
    x_fit, y_fit = x_train[torch.from_numpy(keep)], y_train[keep]

    rows: dict[str, dict] = {}
    for k, cid in enumerate(class_ids):
        pos_train, pos_test = int(y_fit[:, k].sum()), int(y_test[:, k].sum())
        row = {"train_pos": pos_train, "test_pos": pos_test, "prevalence": float(y_test[:, k].mean()),
               "auroc": None, "ap": None, "recall": None, "precision": None}
        if pos_train and pos_train < len(y_fit) and pos_test:
            logits = linear_probe_logits(x_fit, y_fit[:, k].astype(np.int64), x_test, C=C, max_iter=max_iter,
                                         num_classes=2, class_weight="balanced", seed=seed)
            score, truth = logits[:, 1] - logits[:, 0], y_test[:, k]
            flagged = score > 0
            row.update(auroc=float(roc_auc_score(truth, score)), ap=float(average_precision_score(truth, score)),
                       recall=float(flagged[truth].mean()),
                       precision=float(truth[flagged].mean()) if flagged.any() else 0.0)
        rows[CLASS_NAMES[cid]] = row
    macro = {m: (float(np.mean(v)) if (v := [r[m] for r in rows.values() if r[m] is not None]) else None)
             for m in ("auroc", "ap", "recall", "precision")}
    return {"grid": list(grid), "train_positions": int(keep.sum()), "test_positions": int(len(y_test)),
            "classes": rows, "macro": macro}


def patch_probe_markdown(result: dict) -> str:
    """The probe's table: one row per class, then the macro average."""
    head = (f"Per-patch linear probe on a {result['grid'][0]}x{result['grid'][1]} grid "
            f"({result['train_positions']} train positions, {result['test_positions']} test positions)\n\n"
            "| class | train positions | test positions | prevalence | AUROC | AP | recall | precision |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"| {name} | {r['train_pos']} | {r['test_pos']} | {r['prevalence']:.4f} | {cell(r['auroc'])} | "
             f"{cell(r['ap'])} | {cell(r['recall'])} | {cell(r['precision'])} |"
             for name, r in result["classes"].items()]
    m = result["macro"]
    lines.append(f"| macro | | | | {cell(m['auroc'])} | {cell(m['ap'])} | {cell(m['recall'])} | {cell(m['precision'])} |")
    return head + "\n".join(lines) + "\n"
