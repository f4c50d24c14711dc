"""Probes of frozen features: DINO's weighted kNN and a linear probe (multinomial logistic regression).

:func:`knn_votes` / :func:`knn_classify` follow facebookresearch/dino's ``eval_knn.py`` (k = 20,
T = 0.07); :func:`linear_probe_logits` / :func:`linear_probe` train one ``nn.Linear`` on
standardised train features with AdamW and a cosine schedule, optionally class-balanced. Inputs are
torch tensors or numpy arrays; outputs are numpy arrays on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["knn_classify", "knn_votes", "linear_probe", "linear_probe_logits"]


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


def linear_probe_logits(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """A multinomial logistic regression on frozen, standardised features, trained with AdamW;
    returns the test rows' logits (:func:`linear_probe` takes their argmax).

    Features are standardised with the train split's per-dimension mean and standard deviation
    (dimensions with zero spread are centred only). One ``nn.Linear(D, C)`` is trained with
    cross-entropy, AdamW (``lr``, ``weight_decay``) and a cosine learning-rate decay to 0 over
    ``epochs`` passes of shuffled mini-batches of ``batch_size`` rows. The initialisation and the
    shuffles draw from a generator seeded by ``seed``: same inputs and seed, same predictions.

    ``class_weight="balanced"`` weights each class's loss by ``N / (C_present * N_c)`` (scikit-learn's
    "balanced"), so every class present in the train labels carries the same total weight. Use it
    for imbalanced tasks: at a prevalence of 12% the unweighted probe's best constant answer is
    "absent", and its argmax then says nothing about the features.

    Args:
        train_feats: [N, D] float features; train_labels: [N] int class IDs >= 0.
        test_feats: [M, D] float features.
        num_classes: number of classes (default: max train label + 1).
        class_weight: None (plain cross-entropy, DINO's linear evaluation) or ``"balanced"``.
        device: where to train (default: the device of ``train_feats``, CPU for numpy).

    Returns:
        float32 [M, num_classes] logits of the test rows.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    train = _as_tensor(train_feats, "train_feats", torch.float32, 2)
    dev = torch.device(device) if device is not None else train.device
    train = train.to(dev)
    test = _as_tensor(test_feats, "test_feats", torch.float32, 2).to(dev)
    labels = _as_tensor(train_labels, "train_labels", torch.int64, 1).to(dev)
    n_classes = _check_labels(labels, train.shape[0], "train_labels", num_classes)
    if train.shape[0] == 0:
        raise ValueError("train_feats has no rows; a linear probe needs training data")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_feats have dim {train.shape[1]} but test_feats have dim {test.shape[1]}")

    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    x_train = (train - mean) / std
    x_test = (test - mean) / std

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layer = nn.Linear(train.shape[1], n_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(train.shape[1])  # nn.Linear's default init, from our generator
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
        layer.bias.zero_()
    layer = layer.to(dev)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    weight = None
    if class_weight == "balanced":
        counts = torch.bincount(labels, minlength=n_classes).to(torch.float32)
        present = counts > 0
        weight = torch.where(present, labels.numel() / (present.sum() * counts.clamp_min(1.0)),
                             torch.zeros_like(counts))
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(layer(x_train[idx]), labels[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    if not math.isfinite(float(loss.detach())):
        raise ValueError(f"linear probe diverged (loss {float(loss)}); lower lr (got {lr})")
    with torch.no_grad():
        return layer(x_test).float().cpu().numpy()


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1024,
    num_classes: int | None = None,
    class_weight: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The linear probe's predicted classes: int64 [M], the argmax of :func:`linear_probe_logits`
    (same arguments)."""
    logits = linear_probe_logits(train_feats, train_labels, test_feats, epochs=epochs, lr=lr,
                                 weight_decay=weight_decay, seed=seed, batch_size=batch_size,
                                 num_classes=num_classes, class_weight=class_weight, device=device)
    return logits.argmax(axis=1).astype(np.int64)
