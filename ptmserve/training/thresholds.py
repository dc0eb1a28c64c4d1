"""Exit thresholds under an accuracy tolerance (pure numpy, no torch).

A cascade of E exits in layer order and a final classifier: a row leaves at the first exit whose score
reaches that exit's threshold, else at the final classifier. Scores are "higher is surer": the top
softmax probability, or minus the softmax entropy (``score``), so one search serves both confidences.

``search`` picks one threshold per exit from a grid (the quantiles of that exit's scores on the
validation rows, plus "never") to minimise the expected compute per row, subject to the cascade's
validation accuracy staying within ``tolerance`` of the final classifier's. Small grids are searched
exhaustively. Larger ones by coordinate descent over pairs of exits (every pair's full sub-grid, the
others held), repeated until no pair lowers the cost: single-exit descent lets the first exit spend the
whole accuracy budget, which the pair moves undo. Starting from "never" everywhere (the final
classifier's own accuracy, always feasible), every step keeps the constraint, so the result always
satisfies it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ptmserve.models import exits
from ptmserve.models.config import CONFIDENCES

NEVER = math.inf
LEVELS = 50  # quantile levels per exit (plus "never")
EXHAUSTIVE_LIMIT = 4096  # grid points searched exhaustively
MAX_SWEEPS = 20
_EPS = 1e-12


def confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    """``(N,)`` each row's confidence: the top softmax probability (``max_prob``) or the softmax
    entropy in nats (``entropy``), computed by the serving code itself (``models.exits.confidence``), so
    that a threshold found here triggers on exactly the rows it triggers on when served."""
    if kind not in CONFIDENCES:
        raise ValueError(f"unknown confidence {kind!r}; use 'max_prob' or 'entropy'")
    return exits.confidence(torch.from_numpy(np.asarray(logits, dtype=np.float32)), kind).numpy()


def score(conf: np.ndarray, kind: str) -> np.ndarray:
    """Confidence as a higher-is-surer score (entropy is negated)."""
    return -conf if kind == "entropy" else conf


def stored_threshold(threshold: float, kind: str) -> float:
    """A score threshold as ``ExitSpec`` stores it (entropy: ``exit when entropy <= -threshold``)."""
    return -threshold if kind == "entropy" else threshold


@dataclass(frozen=True, slots=True)
class Cascade:
    """Thresholds and what they do on the validation rows."""

    thresholds: tuple[float, ...]  # per exit, in score space; NEVER: the exit never fires
    exit_at: np.ndarray  # (N,) the exit each row leaves at; E = the final classifier
    accuracy: float  # of the cascade against the labels
    agreement: float  # share of rows whose cascade prediction equals the final classifier's
    cost: float  # mean cost per row (``costs[exit_at]``)
    final_accuracy: float

    def shares(self) -> np.ndarray:
        """``(E+1,)`` share of rows leaving at each exit, the final classifier last."""
        n_exits = len(self.thresholds)
        return np.bincount(self.exit_at, minlength=n_exits + 1) / max(1, len(self.exit_at))


def grid(scores: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """Candidate thresholds of one exit: distinct score values at ``levels`` quantiles, then NEVER."""
    qs = np.quantile(scores, np.linspace(0.0, 1.0, levels, endpoint=False), method="inverted_cdf")
    return np.append(np.unique(qs), NEVER)


def exits_taken(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``(N,)`` the first exit whose score reaches its threshold, ``E`` when none does."""
    n_exits, n = scores.shape
    fired = scores >= np.asarray(thresholds, dtype=np.float64)[:, None]  # (E, N)
    fired = np.vstack([fired, np.ones((1, n), dtype=bool)])
    return fired.argmax(axis=0)


def evaluate(
    scores: np.ndarray,
    preds: np.ndarray,
    final_pred: np.ndarray,
    y: np.ndarray,
    costs: np.ndarray,
    thresholds: Sequence[float],
) -> Cascade:
    """The cascade with ``thresholds`` on rows with ``scores`` and ``preds`` ``(E, N)``."""
    exit_at = exits_taken(scores, thresholds)
    pred = np.vstack([preds, final_pred[None]])[exit_at, np.arange(len(y))]
    return Cascade(
        tuple(float(t) for t in thresholds),
        exit_at,
        float(np.mean(pred == y)),
        float(np.mean(pred == final_pred)),
        float(np.mean(np.asarray(costs)[exit_at])),
        float(np.mean(final_pred == y)),
    )


def search(
    scores: np.ndarray,
    preds: np.ndarray,
    final_pred: np.ndarray,
    y: np.ndarray,
    costs: Sequence[float],
    tolerance: float,
    *,
    levels: int = LEVELS,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
) -> Cascade:
    """The cheapest thresholds whose cascade accuracy is at least the final accuracy minus ``tolerance``.

    Args:
        scores: ``(E, N)`` each exit's score (higher is surer) on the validation rows.
        preds: ``(E, N)`` each exit's predicted class.
        final_pred: ``(N,)`` the final classifier's predicted class.
        y: ``(N,)`` the labels.
        costs: ``(E+1,)`` the cost of a row that leaves at each exit, the final classifier last.
        tolerance: accuracy (a fraction) the cascade may lose against the final classifier.
        levels: quantile levels per exit.
        exhaustive_limit: search exhaustively when the grid has at most this many points.

    Ties in cost go to the higher accuracy, then to the higher thresholds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    preds, final_pred, y = np.asarray(preds), np.asarray(final_pred), np.asarray(y)
    cost_arr = np.asarray(costs, dtype=np.float64)
    n_exits = scores.shape[0]
    if cost_arr.shape != (n_exits + 1,) or preds.shape != scores.shape:
        raise ValueError(f"shapes: scores {scores.shape}, preds {preds.shape}, costs {cost_arr.shape}")
    if n_exits == 0:
        return evaluate(scores, preds, final_pred, y, cost_arr, ())
    target = float(np.mean(final_pred == y)) - tolerance - _EPS
    grids = [grid(s, levels) for s in scores]
    table = _Table(scores, preds, final_pred, y, cost_arr, target)
    if math.prod(len(g) for g in grids) <= exhaustive_limit:
        best = table.exhaustive(grids)
    else:
        best = table.descend(grids)
    return evaluate(scores, preds, final_pred, y, cost_arr, best)


class _Table:
    """The validation rows, and fast evaluation of one exit's whole grid with the others held."""

    def __init__(
        self,
        scores: np.ndarray,
        preds: np.ndarray,
        final_pred: np.ndarray,
        y: np.ndarray,
        costs: np.ndarray,
        target: float,
    ) -> None:
        self.scores, self.costs, self.target = scores, costs, target
        self.correct = np.vstack([preds, final_pred[None]]) == y[None]  # (E+1, N)
        self.rows = np.arange(len(y))

    def sweep(self, e: int, values: np.ndarray, held: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Cost and accuracy ``(G,)`` of the cascade with exit ``e`` at each of ``values``."""
        fixed = list(held)
        fixed[e] = NEVER
        exit_fixed = exits_taken(self.scores, fixed)  # (N,) where rows leave without exit e
        before = exit_fixed < e
        take = self.scores[e][None, :] >= values[:, None]  # (G, N)
        exit_at = np.where(before[None], exit_fixed[None], np.where(take, e, exit_fixed[None]))
        acc = self.correct[exit_at, self.rows[None]].mean(axis=1)
        return self.costs[exit_at].mean(axis=1), acc

    def pick(self, costs: np.ndarray, accs: np.ndarray, values: np.ndarray) -> int | None:
        """The best feasible grid point: lowest cost, then highest accuracy, then highest value."""
        feasible = np.flatnonzero(accs >= self.target)
        if not len(feasible):
            return None
        order = np.lexsort((-values[feasible], -accs[feasible], np.round(costs[feasible], 12)))
        return int(feasible[order[0]])

    def exhaustive(self, grids: list[np.ndarray]) -> list[float]:
        """Every combination (the last exit's grid vectorised)."""
        last = len(grids) - 1
        best: tuple[float, float, tuple[float, ...]] | None = None
        for head in itertools.product(*grids[:last]):
            held = [*head, NEVER]
            costs, accs = self.sweep(last, grids[last], held)
            i = self.pick(costs, accs, grids[last])
            if i is None:
                continue
            cand = (round(float(costs[i]), 12), -float(accs[i]), tuple(-v for v in (*head, grids[last][i])))
            if best is None or cand < best:
                best = cand
        assert best is not None  # all NEVER is feasible
        return [-v for v in best[2]]

    def descend(self, grids: list[np.ndarray]) -> list[float]:
        """Coordinate descent over pairs of exits (and single exits), from NEVER everywhere."""
        held = [NEVER] * len(grids)
        current = self._cost(held)
        pairs = list(itertools.combinations(range(len(grids)), 2)) or [(0, 0)]
        for _ in range(MAX_SWEEPS):
            improved = False
            for a, b in pairs:
                found = self._best_pair(a, b, grids, held) if a != b else None
                if found is None:
                    costs, accs = self.sweep(a, grids[a], held)
                    i = self.pick(costs, accs, grids[a])
                    found = (float(costs[i]), {a: float(grids[a][i])}) if i is not None else None
                if found is not None and found[0] < current - 1e-12:
                    for e, v in found[1].items():
                        held[e] = v
                    current = found[0]
                    improved = True
            if not improved:
                break
        return held

    def _best_pair(
        self, a: int, b: int, grids: list[np.ndarray], held: list[float]
    ) -> tuple[float, dict[int, float]] | None:
        best: tuple[float, dict[int, float]] | None = None
        for va in grids[a]:
            trial = list(held)
            trial[a] = float(va)
            costs, accs = self.sweep(b, grids[b], trial)
            i = self.pick(costs, accs, grids[b])
            if i is not None and (best is None or costs[i] < best[0] - 1e-12):
                best = (float(costs[i]), {a: float(va), b: float(grids[b][i])})
        return best

    def _cost(self, thresholds: Sequence[float]) -> float:
        return float(self.costs[exits_taken(self.scores, thresholds)].mean())
