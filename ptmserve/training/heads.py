"""Linear classifiers over frozen features: one per exit, and the final one when the base has no head.

Each head is a multinomial logistic regression with an L2 penalty, fitted full-batch with L-BFGS on
standardised features from zero weights (so the same data always gives the same head; no random
initialisation). The standardisation is folded back into the weights, so the stored head applies to
the raw pooled features. The penalty is chosen per layer from ``WEIGHT_DECAYS`` by k-fold
cross-validation on the training part only (the validation part is kept for the thresholds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
"""Candidate L2 penalties (on standardised features, added to the mean cross-entropy as ``wd/2 |W|^2``)."""
FOLDS = 3
MAX_ITER = 200


@dataclass(frozen=True, slots=True)
class LinearHead:
    """``logits = x @ weight.T + bias`` over raw pooled features ``x`` ``(N, H)``."""

    weight: np.ndarray  # (C, H) float32
    bias: np.ndarray  # (C,) float32
    weight_decay: float  # the penalty it was fitted with

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, C)`` float32 logits of the rows of ``x``."""
        return (x @ self.weight.T + self.bias).astype(np.float32)

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{prefix.weight, prefix.bias}`` as tensors of ``dtype`` (what the repository stores)."""
        return {
            f"{prefix}.weight": torch.from_numpy(self.weight.copy()).to(dtype),
            f"{prefix}.bias": torch.from_numpy(self.bias.copy()).to(dtype),
        }


def fit(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
) -> LinearHead:
    """The head for features ``x`` ``(N, H)`` and classes ``y`` ``(N,)``, its penalty chosen by
    cross-validation (folds drawn with ``seed``) when several are given."""
    if len(weight_decays) == 1:
        wd = float(weight_decays[0])
    else:
        wd = choose_weight_decay(x, y, num_classes, weight_decays, seed=seed)
    return fit_fixed(x, y, num_classes, wd)


def choose_weight_decay(
    x: np.ndarray, y: np.ndarray, num_classes: int, weight_decays: Sequence[float], *, seed: int
) -> float:
    """The penalty with the best mean held-out log loss over ``FOLDS`` stratified folds (the larger
    penalty on a tie)."""
    folds = _folds(y, FOLDS, seed)
    best, best_loss = float(max(weight_decays)), np.inf
    for wd in sorted(weight_decays, reverse=True):
        losses = []
        for held in folds:
            keep = np.setdiff1d(np.arange(len(y)), held)
            head = fit_fixed(x[keep], y[keep], num_classes, wd)
            losses.append(_log_loss(head.logits(x[held]), y[held]))
        loss = float(np.mean(losses))
        if loss < best_loss - 1e-9:
            best, best_loss = float(wd), loss
    return best


def fit_fixed(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float) -> LinearHead:
    """The head fitted with penalty ``weight_decay`` (deterministic: zero start, full batch)."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    mean = xt.mean(0)
    scale = xt.std(0, unbiased=False).clamp_min(1e-6)
    z = (xt - mean) / scale  # (N, H)
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, target) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        weight = w / scale  # (C, H) on raw features
        bias = b - weight @ mean
    return LinearHead(weight.numpy().astype(np.float32), bias.numpy().astype(np.float32), weight_decay)


def _folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` held-out index sets, each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        for j, row in enumerate(rng.permutation(np.flatnonzero(y == c))):
            parts[j % k].append(int(row))
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts if p]


def _log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())
