"""Probes of frozen features: DINO's weighted kNN and a linear probe (multinomial logistic regression).

:func:`knn_votes` / :func:`knn_classify` follow facebookresearch/dino's ``eval_knn.py`` (k = 20,
T = 0.07); :func:`linear_probe_logits` / :func:`linear_probe` fit a multinomial logistic regression
(scikit-learn, L-BFGS) on standardised train features, optionally class-balanced. Inputs are torch
tensors or numpy arrays; outputs are numpy arrays on the CPU.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PROBE_C", "PROBE_MAX_ITER", "knn_classify", "knn_votes", "linear_probe", "linear_probe_logits"]


def _as_tensor(x: torch.Tensor | np.ndarray, name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values")
    return t.to(dtype)


def _check_labels(labels: torch.Tensor, n: int, name: str, num_classes: int | None) -> int:
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries, features have {n} rows")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class IDs >= 0 (drop unlabelled rows first), got min {int(labels.min())}")
    needed = int(labels.max()) + 1 if n else 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but {name} holds class {needed - 1}")
    return num_classes


@torch.no_grad()
def knn_votes(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """DINO's weighted k-nearest-neighbour votes (facebookresearch/dino ``eval_knn.py``), as shares.

    Features are L2-normalised; for each test row the ``k`` train rows of highest cosine similarity
    vote for their class with weight ``exp(sim / T)``. The votes of each row are divided by their
    sum, so row ``i``'s entry ``c`` is the weighted share of neighbours of class ``c``: a score in
    [0, 1] for threshold-free metrics (AUROC of a binary task). :func:`knn_classify` is its argmax.

    Args:
        train_feats: [N, D] float features.
        train_labels: [N] int class IDs >= 0.
        test_feats: [M, D] float features (same D).
        k: neighbours, 1 <= k <= N.
        T: temperature > 0.
        num_classes: number of classes (default: max train label + 1).
        chunk_size: test rows per similarity block (bounds memory at chunk_size x N).
        device: where to compute (default: the device of ``train_feats``, CPU for numpy).
        normalize: divide each row by its sum (False: the summed weights, scaled so that the
            nearest neighbour's weight is 1).

    Returns:
        float32 [M, num_classes] vote shares; each row sums to 1 (with ``normalize``).
    """
    train = _as_tensor(train_feats, "train_feats", torch.float32, 2)
    train = train.to(torch.device(device) if device is not None else train.device)
    test = _as_tensor(test_feats, "test_feats", torch.float32, 2).to(train.device)
    labels = _as_tensor(train_labels, "train_labels", torch.int64, 1).to(train.device)
    n_classes = _check_labels(labels, train.shape[0], "train_labels", num_classes)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_feats have dim {train.shape[1]} but test_feats have dim {test.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k must lie in [1, number of train rows = {train.shape[0]}], got {k}")
    if not T > 0:
        raise ValueError(f"T must be > 0, got {T}")
    train = F.normalize(train, dim=1, p=2)
    test = F.normalize(test, dim=1, p=2)
    shares = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start:start + chunk_size] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        # exp((sim - max) / T): the largest weight is 1, so no T overflows float32, and every ratio
        # (hence DINO's argmax and the shares) is that of exp(sim / T).
        weights = ((top_sim - top_sim[:, :1]) / T).exp()
        votes = torch.zeros(top_idx.shape[0], n_classes, dtype=torch.float32, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        shares.append(votes / votes.sum(dim=1, keepdim=True) if normalize else votes)
    if not shares:
        return np.zeros((0, n_classes), dtype=np.float32)
    return torch.cat(shares).cpu().numpy()


def knn_classify(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """DINO's weighted k-nearest-neighbour classifier: the class with the largest summed vote of
    :func:`knn_votes` (ties: the lowest class ID; DINO's unstable sort leaves ties unspecified).

    Returns:
        int64 [M] predicted class IDs.
    """
    votes = knn_votes(train_feats, train_labels, test_feats, k, T, num_classes, chunk_size=chunk_size, device=device,
                      normalize=False)
    return votes.argmax(axis=1).astype(np.int64)


#: The linear probe's inverse L2 strength (scikit-learn's ``C``: the penalty is ||W||^2 / 2 against the
#: *summed* log-loss of the standardised train rows). 1.0 is scikit-learn's default and a common
#: linear-probe choice on standardised frozen features; lower it for few rows in many dimensions.
PROBE_C = 1.0
#: L-BFGS iterations at most; 1000 converges on the evaluation's 2048-D features (100, scikit-learn's
#: default, stops early there with a ConvergenceWarning).
PROBE_MAX_ITER = 1000


def linear_probe_logits(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    seed: int = 0,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """A multinomial logistic regression on frozen, standardised features
    (:class:`sklearn.linear_model.LogisticRegression`, L-BFGS: multinomial for three classes or more,
    its two-class case for two); returns the test rows' logits
    (:func:`linear_probe` takes their argmax).

    Features are standardised with the train split's per-dimension mean and standard deviation
    (dimensions with zero spread are centred only). The probe minimises the summed cross-entropy plus
    ``||W||^2 / (2 C)`` (bias unpenalised) with L-BFGS for at most ``max_iter`` iterations. The problem
    is convex and L-BFGS deterministic: same inputs, same logits, whatever ``seed`` (kept for callers
    that loop over seeds; it is passed as ``random_state`` and changes nothing).

    ``class_weight="balanced"`` weights each class's loss by ``N / (C_present * N_c)`` (scikit-learn's
    "balanced"), so every class present in the train labels carries the same total weight. Use it
    for imbalanced tasks: at a prevalence of 12% the unweighted probe's best constant answer is
    "absent", and its argmax then says nothing about the features.

    Args:
        train_feats: [N, D] float features; train_labels: [N] int class IDs >= 0.
        test_feats: [M, D] float features.
        C: inverse L2 strength (> 0), :data:`PROBE_C`; max_iter: L-BFGS iterations (>= 1).
        num_classes: number of classes (default: max train label + 1). Classes absent from the train
            labels get the logit -1e4: they are never predicted.
        class_weight: None (plain cross-entropy, DINO's linear evaluation) or ``"balanced"``.
        device: accepted for the callers' signature; the fit runs on the CPU (inputs are moved there).

    Returns:
        float32 [M, num_classes] logits of the test rows.
    """
    from sklearn.linear_model import LogisticRegression

    if isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not C > 0 or not math.isfinite(C):
        raise ValueError(f"C must be a finite number > 0 (inverse L2 strength), got {C}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    del device  # the solver is scikit-learn's, on the CPU
    train = _as_tensor(train_feats, "train_feats", torch.float64, 2).cpu()
    test = _as_tensor(test_feats, "test_feats", torch.float64, 2).cpu()
    labels = _as_tensor(train_labels, "train_labels", torch.int64, 1).cpu()
    n_classes = _check_labels(labels, train.shape[0], "train_labels", num_classes)
    if train.shape[0] == 0:
        raise ValueError("train_feats has no rows; a linear probe needs training data")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_feats have dim {train.shape[1]} but test_feats have dim {test.shape[1]}")

    x_train, x_test, y = train.numpy(), test.numpy(), labels.numpy()
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    present = np.unique(y)
    logits = np.full((x_test.shape[0], n_classes), np.float32(-1e4), dtype=np.float32)
    if present.size == 1:  # one class: scikit-learn refuses to fit; the answer is that class
        logits[:, present[0]] = 0.0
        return logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # multi_class / penalty deprecations
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=int(max_iter), class_weight=class_weight,
                                   random_state=int(seed))
        model.fit(x_train, y)
    scores = model.decision_function(x_test)
    if present.size == 2:  # scikit-learn's binary decision is one column (class 1 minus class 0): symmetric logits
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    if not np.isfinite(scores).all():
        raise ValueError(f"linear probe gave non-finite logits; check the features (C={C})")
    logits[:, model.classes_] = scores.astype(np.float32)
    return logits


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    seed: int = 0,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The linear probe's predicted classes: int64 [M], the argmax of :func:`linear_probe_logits`
    (same arguments)."""
    logits = linear_probe_logits(train_feats, train_labels, test_feats, C=C, max_iter=max_iter, seed=seed,
                                 num_classes=num_classes, class_weight=class_weight, device=device)
    return logits.argmax(axis=1).astype(np.int64)
