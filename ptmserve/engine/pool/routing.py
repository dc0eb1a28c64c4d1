"""Which worker process takes a request: model affinity first, then load. Pure Python, no state.

The policy, for a request for model M:

1. a live worker whose device tier holds M (no load needed); among several, the least loaded;
2. else a live worker that already has requests for M in flight: it is loading M, and a second worker
   loading the same cold model would pay the same load again and hold a second device copy;
3. else the least loaded live worker.

"Least loaded" is the fewest requests in flight; ties go to the worker with the fewest models on its
device (the most room, so the fewest evictions), then to the lowest index (a stable choice, which tests
can predict).

The trade-off: one hot model stays on one worker (its holder) while the others may idle. That keeps
each device copy single and switches rare, which is what serving many models under small device budgets
needs; a pool serving one model to heavy traffic is better served by one worker with more threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What routing knows of one worker at the moment it decides."""

    index: int  # the worker's slot (0 .. N-1); a restarted worker keeps its slot
    live: bool  # started, and not known to be dead or closing
    in_flight: int  # requests sent to it and not yet answered
    device_models: frozenset[str]  # models its device tier holds, as its last reply said
    models_in_flight: frozenset[str]  # models it has requests in flight for


def choose_worker(model: str, workers: Sequence[WorkerLoad]) -> int | None:
    """The index of the worker that should serve a request for ``model``; None when none is live."""
    live = [w for w in workers if w.live]
    if not live:
        return None
    holders = [w for w in live if model in w.device_models]
    if not holders:
        holders = [w for w in live if model in w.models_in_flight]
    return min(holders or live, key=_load_order).index


def _load_order(w: WorkerLoad) -> tuple[int, int, int]:
    return (w.in_flight, len(w.device_models), w.index)
