"""Exit placement as PAME does it: a batching-pattern matrix, an inference-time matrix, and the exit set
with the lowest expected batch time (pure numpy, no torch).

- The **batching-pattern matrix**: for an exit set (with its thresholds calibrated), the share of a
  batch still running at each layer, from the validation traces (``running_shares``).
- The **inference-time matrix** (``TimeMatrix``): seconds of a packed batch of ``b`` rows through the
  embeddings, through each layer, through one exit head (pooling, the linear classifier, the
  confidence and taking the exited rows out of the batch) and through the final classifier, for each
  measured ``b`` (``timing.measure``).

A batch of ``b`` rows with running shares ``r`` is expected to take
``embed(b) + sum_l layer_l(b r_l) + sum_{exit e} head(b r_{layer e}) + final(b r_{L-1})``, with each
column interpolated linearly in the number of rows (0 rows cost nothing). Exit heads are not free:
an exit that lets few rows go costs more than it saves, and the choice leaves it out.

``choose`` evaluates exit sets: all subsets of the candidates when there are at most
``EXHAUSTIVE_MAX`` (64 sets; every set's thresholds are calibrated again, because which rows reach a
later exit depends on the earlier ones), else PAME's greedy: start from no exit, add the exit that
lowers the expected time most, stop when none does. Either way an exit must earn its keep: a larger set
is taken only when it is at least ``MIN_GAIN`` (1%) faster than a smaller one. An exit that lets a
handful of validation rows go saves less than that, and its threshold rests on those few rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

EXHAUSTIVE_MAX = 6
MIN_GAIN = 0.01


@dataclass(frozen=True, slots=True)
class TimeMatrix:
    """Measured seconds per batch size (rows), per stage (columns)."""

    batch_sizes: tuple[int, ...]  # (K,) increasing
    embed: np.ndarray  # (K,) the embeddings
    layers: np.ndarray  # (K, L) each layer
    exit_head: np.ndarray  # (K,) one exit: pool, linear, confidence, compaction of the batch
    final_head: np.ndarray  # (K,) the final classifier

    def seconds(self, column: np.ndarray, rows: float) -> float:
        """``column`` (K,) at ``rows`` rows, linear between measured sizes, through 0 at 0 rows, and
        extended along the last segment past the largest size."""
        xs = np.array([0, *self.batch_sizes], dtype=np.float64)
        ys = np.array([0.0, *column], dtype=np.float64)
        if rows <= xs[-1]:
            return float(np.interp(rows, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (rows - xs[-1]))

    @property
    def num_layers(self) -> int:
        return int(self.layers.shape[1])

    def to_dict(self) -> dict[str, object]:
        """Milliseconds, JSON-ready."""
        ms = lambda a: np.round(np.asarray(a) * 1e3, 4).tolist()  # noqa: E731
        return {
            "unit": "ms",
            "batch_sizes": list(self.batch_sizes),
            "embed": ms(self.embed),
            "layers": ms(self.layers),
            "exit_head": ms(self.exit_head),
            "final_head": ms(self.final_head),
        }


def running_shares(exit_layers: Sequence[int], exit_at: np.ndarray, num_layers: int) -> np.ndarray:
    """``(L,)`` share of rows that compute layer ``l``: rows leave after their exit's layer (the final
    classifier, index ``len(exit_layers)``, is after the last layer)."""
    layer_of = np.array([*exit_layers, num_layers - 1])[np.asarray(exit_at)]  # (N,)
    return np.array([(layer_of >= layer).mean() for layer in range(num_layers)])


def expected_seconds(
    times: TimeMatrix, batch_size: float, running: np.ndarray, exit_layers: Sequence[int]
) -> float:
    """Expected seconds of a batch of ``batch_size`` rows whose running shares are ``running``."""
    total = times.seconds(times.embed, batch_size)
    for layer in range(times.num_layers):
        total += times.seconds(times.layers[:, layer], batch_size * running[layer])
    for layer in exit_layers:
        total += times.seconds(times.exit_head, batch_size * running[layer])
    return total + times.seconds(times.final_head, batch_size * running[-1])


@dataclass(slots=True)
class Placement:
    """The chosen exit set and every set evaluated on the way."""

    exits: tuple[int, ...]  # chosen exit layers, increasing
    seconds: float  # its expected batch time
    full_seconds: float  # the expected batch time without exits (full depth)
    method: str  # "exhaustive" or "greedy"
    evaluated: dict[tuple[int, ...], float] = field(default_factory=dict)  # exit set -> expected seconds

    @property
    def speedup(self) -> float:
        return self.full_seconds / self.seconds if self.seconds > 0 else 1.0


def choose(
    candidates: Sequence[int],
    pattern_of: Callable[[tuple[int, ...]], np.ndarray],
    times: TimeMatrix,
    batch_size: int,
    *,
    exhaustive_max: int = EXHAUSTIVE_MAX,
    min_gain: float = MIN_GAIN,
) -> Placement:
    """The exit set among ``candidates`` (layers) with the lowest expected time at ``batch_size``.

    Args:
        candidates: candidate exit layers.
        pattern_of: an exit set (increasing layers) -> its running shares ``(L,)`` (calibrated).
        times: the inference-time matrix.
        batch_size: the batch size the choice is made for.
        exhaustive_max: search all subsets up to this many candidates, else greedily.
        min_gain: the share of the expected time a set must save over a smaller one to be preferred.

    Exhaustive: the smallest set within ``min_gain`` of the fastest (the faster of equal sizes).
    Greedy: an exit is added only when it saves at least ``min_gain`` of the current time.
    """
    cands = sorted(set(candidates))
    evaluated: dict[tuple[int, ...], float] = {}

    def cost(exits: tuple[int, ...]) -> float:
        if exits not in evaluated:
            evaluated[exits] = expected_seconds(times, batch_size, pattern_of(exits), exits)
        return evaluated[exits]

    full = cost(())
    if len(cands) <= exhaustive_max:
        method = "exhaustive"
        sets = [s for k in range(len(cands) + 1) for s in itertools.combinations(cands, k)]
        fastest = min(cost(s) for s in sets)
        near = [s for s in sets if cost(s) <= fastest * (1 + min_gain) + 1e-12]
        best = min(near, key=lambda s: (len(s), round(cost(s), 12), s))
    else:
        method = "greedy"
        best = ()
        while True:
            options = [tuple(sorted((*best, c))) for c in cands if c not in best]
            if not options:
                break
            step = min(options, key=lambda s: (round(cost(s), 12), s))
            if cost(step) > cost(best) * (1 - min_gain) - 1e-12:
                break
            best = step
    return Placement(best, cost(best), full, method, evaluated)
