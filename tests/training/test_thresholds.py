"""Threshold search on synthetic confidences whose optimum is known."""

from __future__ import annotations

import itertools

import numpy as np

from ptmserve.training import thresholds
from ptmserve.training.thresholds import NEVER, search


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two exits and a final classifier that is always right. Exit 0 is right exactly when its score is
    >= 0.7; exit 1 exactly when its score is >= 0.4 (scores uniform on a grid)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    scores = np.round(rng.uniform(0.0, 1.0, (2, n)), 2)
    preds = np.where(scores >= np.array([[0.7], [0.4]]), y[None], (y[None] + 1) % 3)
    return scores, preds, y.copy(), y


def test_zero_tolerance_finds_the_lowest_error_free_thresholds() -> None:
    scores, preds, final, y = _synthetic()
    costs = np.array([1.0, 2.0, 3.0])
    best = search(scores, preds, final, y, costs, tolerance=0.0)
    # Any row exiting below 0.7 at exit 0 (or 0.4 at exit 1) is wrong, so the cheapest error-free cascade
    # takes every row at or above those scores: the thresholds are the smallest such grid values.
    grid0, grid1 = thresholds.grid(scores[0]), thresholds.grid(scores[1])
    assert best.thresholds == (grid0[grid0 >= 0.7].min(), grid1[grid1 >= 0.4].min())
    assert best.accuracy == 1.0 and best.agreement == 1.0


def test_matches_brute_force_with_a_tolerance() -> None:
    scores, preds, final, y = _synthetic(seed=3)
    costs = np.array([1.0, 2.0, 3.0])
    grids = [thresholds.grid(s, 12) for s in scores]
    feasible = []
    for t in itertools.product(*grids):
        c = thresholds.evaluate(scores, preds, final, y, costs, t)
        if c.accuracy >= 1.0 - 0.05 - 1e-12:
            feasible.append(c.cost)
    exhaustive = search(scores, preds, final, y, costs, 0.05, levels=12)
    descent = search(scores, preds, final, y, costs, 0.05, levels=12, exhaustive_limit=1)
    assert exhaustive.cost == min(feasible) and exhaustive.accuracy >= 0.95 - 1e-12
    assert descent.cost == min(feasible) and descent.accuracy >= 0.95 - 1e-12


def test_descent_never_breaks_the_tolerance_with_many_exits() -> None:
    rng = np.random.default_rng(1)
    n, e = 300, 5
    y = rng.integers(0, 4, n)
    scores = rng.uniform(0, 1, (e, n))
    # later exits are better: right with probability rising with the score and the depth
    right = rng.uniform(0, 1, (e, n)) < scores * (0.5 + 0.1 * np.arange(e))[:, None] + 0.3
    preds = np.where(right, y[None], (y[None] + 1) % 4)
    final = np.where(rng.uniform(0, 1, n) < 0.95, y, (y + 2) % 4)
    costs = np.arange(1.0, e + 2)
    best = search(scores, preds, final, y, costs, 0.01)
    assert best.accuracy >= best.final_accuracy - 0.01 - 1e-12
    assert best.cost < costs[-1]  # some rows leave early
    assert np.isclose(best.shares().sum(), 1.0)


def test_an_exit_that_is_always_wrong_never_fires() -> None:
    scores, preds, final, y = _synthetic()
    preds = (y[None] + 1) % 3 + 0 * preds
    best = search(scores, preds, final, y, np.array([1.0, 2.0, 3.0]), tolerance=0.0)
    assert best.thresholds == (NEVER, NEVER) and best.cost == 3.0


def test_confidence_and_entropy() -> None:
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert np.allclose(thresholds.confidence(logits, "max_prob"), [0.5, 1.0], atol=1e-4)
    entropy = thresholds.confidence(logits, "entropy")
    assert np.isclose(entropy[0], np.log(2)) and entropy[1] < 1e-3
    assert thresholds.stored_threshold(-0.2, "entropy") == 0.2
